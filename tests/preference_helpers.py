"""Helpers for the dpo tests: a synthetic preference set (replies in one style preferred over
another) and the records' shapes people have."""

from __future__ import annotations

import random

TOPICS = [
    "cats",
    "dogs",
    "rain",
    "tea",
    "maps",
    "bees",
    "jazz",
    "snow",
    "ships",
    "clocks",
    "bread",
    "stars",
    "rivers",
    "glass",
    "paper",
    "trains",
    "lamps",
    "salt",
    "wolves",
    "kites",
    "moss",
    "owls",
    "sand",
    "tin",
]
FACTS = [
    "are old",
    "can be small",
    "come in many kinds",
    "are found in towns",
    "change with time",
    "are well known",
]
PREFERRED = "Gladly! "  # the style the pairs prefer ...
DISPREFERRED = "no. "  # ... over this one


def style_pairs(topics: list[str], seed: int = 0) -> list[dict[str, str]]:
    """One pair a topic: the same kind of reply, opened politely (chosen) or curtly (rejected)."""
    rng = random.Random(seed)
    pairs = []
    for topic in topics:
        chosen, rejected = rng.sample(FACTS, 2)
        pairs.append(
            {
                "prompt": f"Tell me about {topic}.",
                "chosen": f"{PREFERRED}{topic.capitalize()} {chosen}.",
                "rejected": f"{DISPREFERRED}{topic} {rejected}.",
            }
        )
    return pairs
