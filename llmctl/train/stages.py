"""The training stages by name, for what drives any of them (`llmctl tune`): what each takes
besides the run options, how its options are built and planned, and which figures its
evaluations produce. A new stage adds one entry here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmctl.errors import UsageError
from llmctl.events import EVAL_FIGURES, PREFERENCE_FIGURES
from llmctl.model.classifier import TASK
from llmctl.train import dpo, finetune, pretrain
from llmctl.train.dpo import DpoOptions
from llmctl.train.finetune_config import FinetuneOptions
from llmctl.train.pretrain import PretrainOptions
from llmctl.train.recipe import Plan
from llmctl.train.runs import RunOptions
from llmctl.workspace import Workspace

Warn = Callable[[str], None]
LM_FIGURES = ("val_loss", "val_ppl")  # every stage's; val_bpb needs the bytes of a token cache


@dataclass(frozen=True)
class Stage:
    name: str
    options_class: type[RunOptions]
    inputs: tuple[str, ...]  # the options the stage takes besides RunOptions' (its data, its base)
    planner: Callable[..., Plan]  # make_plan(workspace, options, warn=...)
    fixed: dict[str, Any] = field(default_factory=dict)  # options every run of the stage has
    figures: Callable[[RunOptions], tuple[str, ...]] = lambda options: LM_FIGURES

    def options(self, inputs: dict[str, Any], **run: Any) -> RunOptions:
        """The stage's options from its inputs (None: not given) and the run options."""
        given = {key: value for key, value in inputs.items() if value is not None}
        foreign = sorted(set(given) - set(self.inputs))
        if foreign:
            flags = ", ".join(f"--{key}" for key in foreign)
            raise UsageError(
                f"the {self.name} stage takes no {flags}; it takes "
                + ", ".join(f"--{key}" for key in self.inputs)
            )
        return self.options_class(**self.fixed, **given, **run)

    def plan(self, workspace: Workspace, options: RunOptions, warn: Warn | None = None) -> Plan:
        return self.planner(workspace, options, warn=warn)


def _finetune_figures(options: FinetuneOptions) -> tuple[str, ...]:
    # classification's loss sums its correct answers: its evaluations add val_accuracy
    return (*LM_FIGURES, "val_accuracy") if options.task == TASK else LM_FIGURES


FINETUNE_INPUTS = ("model", "data", "task")
STAGES: dict[str, Stage] = {
    "pretrain": Stage(
        "pretrain",
        PretrainOptions,
        ("corpus", "tokenizer"),
        pretrain.make_plan,
        figures=lambda options: EVAL_FIGURES,
    ),
    "finetune": Stage(
        "finetune",
        FinetuneOptions,
        FINETUNE_INPUTS,
        finetune.make_plan,
        {"stage": "finetune"},
        _finetune_figures,
    ),
    "qlora": Stage(
        "qlora",
        FinetuneOptions,
        FINETUNE_INPUTS,
        finetune.make_plan,
        {"stage": "qlora", "lora": True},
        _finetune_figures,
    ),
    # the reference is the base with adapters off under --set adapter.enabled=true, else a
    # frozen copy; its evaluations add the figures its loss sums (reward margin, accuracy)
    "dpo": Stage(
        "dpo",
        DpoOptions,
        ("model", "data"),
        dpo.make_plan,
        figures=lambda options: ("val_loss", *(f"val_{name}" for name in PREFERENCE_FIGURES)),
    ),
}


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise UsageError(f"unknown stage '{name}'; choose one of: {', '.join(STAGES)}")
    return STAGES[name]
