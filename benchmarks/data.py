"""Data pipeline throughput on the standard library corpus.

    python benchmarks/data.py [--repeats 3] [--workspace DIR]

Measures, in one process on one machine:
  - `corpus build` of the stdlib source (MB of documents kept per second);
  - `tokenizer train` of an 8k byte-level BPE on that corpus (training alone, and with the
    round-trip check over the validation split);
  - the token cache (read the JSONL splits, encode, append end-of-text, write uint16) against the
    tokenizer as the cache calls it: the same text-only encoder (llmctl.tokenizer.text_only_encoder)
    and the same `encode_batch_fast`, over the same documents held in memory, in the same batches.
    The pipeline should cost at most 1.25x that raw encoding (`encode_batch`, which also computes
    character offsets the cache never reads, is printed beside it for reference).
Timings are the best of --repeats runs after one untimed warm-up of each, interleaved with the
order rotated each round, so a busy neighbour inflates every side alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from llmctl.data.build import BuildOptions, build_corpus
from llmctl.data.store import SPLITS, CorpusStore
from llmctl.data.tokencache import DEFAULT_CHUNK_CHARS, build_token_cache
from llmctl.tokenizer import load_tokenizer, text_only_encoder
from llmctl.tokenizer_build import train_tokenizer
from llmctl.workspace import Workspace

PIPELINE_BUDGET = 1.25


def _seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _chunks(texts: list[str], chunk_chars: int) -> Iterator[list[str]]:
    """The batches the token cache hands to encode_batch: about chunk_chars characters each."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= chunk_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def run(workspace: Workspace, repeats: int) -> None:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    build_s = _seconds(lambda: build_corpus(workspace, "stdlib", ["stdlib"], BuildOptions(overwrite=True)))
    store = CorpusStore.open(workspace, "stdlib")
    corpus_mb = store.meta["bytes"] / 1e6
    print(
        f"corpus build        {corpus_mb:7.1f} MB in {build_s:6.2f} s  = {corpus_mb / build_s:6.1f} MB/s"
        f"  ({store.meta['documents']:,} documents)"
    )

    train_s = _seconds(lambda: train_tokenizer(workspace, "stdlib-8k", "stdlib", 8192, overwrite=True))
    loaded = load_tokenizer(workspace, "stdlib-8k")
    figures = loaded.meta["figures"]
    print(
        f"tokenizer train 8k  {figures['train_seconds']:6.2f} s training, {train_s:6.2f} s with the "
        f"validation check  ({figures['chars_per_token']:.2f} chars/token on val)"
    )

    texts = [text for split in SPLITS for text in store.texts(split)]
    text_mb = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    batches = list(_chunks(texts, DEFAULT_CHUNK_CHARS))
    encoder = text_only_encoder(loaded.tokenizer)  # what build_token_cache encodes with

    def raw(encode: Callable) -> None:
        for batch in batches:
            encode(batch, add_special_tokens=False)

    def pipeline() -> None:
        cache = build_token_cache(store, loaded.tokenizer, loaded.sha256, loaded.eot_id, rebuild=True)
        assert sum(cache.n_tokens.values()) > 0

    work: dict[str, Callable[[], None]] = {"token cache": pipeline}
    if hasattr(encoder, "encode_batch_fast"):
        work["encode_batch_fast"] = lambda: raw(encoder.encode_batch_fast)
    work["encode_batch"] = lambda: raw(encoder.encode_batch)
    for job in work.values():  # untimed: file cache and allocator warm for every side
        job()
    timings: dict[str, list[float]] = {name: [] for name in work}
    names = list(work)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            timings[name].append(_seconds(work[name]))
    best = {name: min(values) for name, values in timings.items()}
    for name, seconds in best.items():
        print(f"{name:<19} {text_mb:7.1f} MB in {seconds:6.2f} s  = {text_mb / seconds:6.1f} MB/s")

    baseline = "encode_batch_fast" if "encode_batch_fast" in best else "encode_batch"
    ratio = best["token cache"] / best[baseline]
    verdict = "within" if ratio <= PIPELINE_BUDGET else "OVER"
    print(f"token cache / raw {baseline} = {ratio:.2f}x  ({verdict} the {PIPELINE_BUDGET}x budget)")
    print(f"token cache / raw encode_batch (offsets too) = {best['token cache'] / best['encode_batch']:.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each tokenization (best kept)")
    parser.add_argument("--workspace", type=Path, help="workspace to build in (default: a temporary one)")
    args = parser.parse_args()
    if args.workspace:
        run(Workspace(args.workspace), args.repeats)
        return
    with tempfile.TemporaryDirectory(prefix="llmctl-bench-") as root:
        run(Workspace(root), args.repeats)


if __name__ == "__main__":
    main()
