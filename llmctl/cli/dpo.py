"""`llmctl dpo`: preference tuning (DPO, IPO, hinge) of a trained model, all weights, LoRA or QLoRA."""

from __future__ import annotations

import typer

from llmctl.cli.common import (
    ADAPTER_OPTIONS,
    LORA_SWITCH,
    MAX_LENGTH_OPTION,
    PROMPT_STYLE_OPTION,
    RUN_OPTIONS,
    adapt_options,
    adapter_option_values,
    announce,
    err,
    report_result,
    run_option_values,
    show_plan,
    warn,
    with_options,
    workspace,
)
from llmctl.cli.common import option as opt

PREFERENCE_OPTIONS = [
    *adapt_options("Preference corpus (corpus build --format preference) or a .jsonl/.json file of pairs."),
    PROMPT_STYLE_OPTION,
    MAX_LENGTH_OPTION,
    opt(
        "loss",
        str,
        typer.Option(None, "--loss", help="sigmoid (DPO), ipo or hinge \\[default: sigmoid]."),
    ),
    opt(
        "beta",
        float,
        typer.Option(
            None,
            "--beta",
            help="How strongly the policy is held to the reference, in (0, 10] \\[default: 0.1].",
        ),
    ),
    opt(
        "label_smoothing",
        float,
        typer.Option(
            None,
            "--label-smoothing",
            help="sigmoid: the assumed share of flipped pairs, in [0, 0.5) \\[default: 0].",
        ),
    ),
    opt(
        "precompute_reference",
        bool,
        typer.Option(
            None,
            "--precompute-reference/--live-reference",
            help="Score every pair with the reference once before training, store the scores with the run, "
            "and free the reference \\[default: live].",
        ),
    ),
    opt(
        "reference",
        str,
        typer.Option(None, "--reference", help="Full weights: the frozen reference \\[default: the base]."),
    ),
]
QLORA_SWITCH = [
    opt(
        "qlora",
        bool,
        typer.Option(
            False, "--qlora", help="LoRA adapters on the base quantized to 4-bit NF4 (bitsandbytes)."
        ),
    ),
]
JSON_OPTION = [opt("as_json", bool, typer.Option(False, "--json", help="With --dry-run: print JSON."))]


@with_options(PREFERENCE_OPTIONS, LORA_SWITCH, QLORA_SWITCH, ADAPTER_OPTIONS, RUN_OPTIONS, JSON_OPTION)
def dpo(**flags) -> int:
    """Preference-tune a model on chosen/rejected pairs: DPO (sigmoid), IPO or hinge, held to a
    reference (LoRA/QLoRA: the base with adapters off; full weights: a frozen copy, or scores
    precomputed once).

    Examples:

      llmctl dpo --model code-sft --data prefs --run code-dpo

      llmctl dpo --model code-sft --data prefs --lora --run code-dpo-lora

      llmctl dpo --model code-sft --data prefs --qlora --loss ipo --beta 0.5 --dry-run

      llmctl dpo --run code-dpo --resume
    """
    from llmctl.errors import UsageError
    from llmctl.train import recipe
    from llmctl.train.dpo import DpoOptions, make_plan

    if flags["as_json"] and not flags["dry_run"]:
        raise UsageError("--json goes with --dry-run")
    options = DpoOptions(
        model=flags["model"],
        data=flags["data"],
        prompt_style=flags["prompt_style"],
        max_length=flags["max_length"],
        lora=flags["lora"] or flags["qlora"],
        qlora=flags["qlora"],
        loss=flags["loss"],
        beta=flags["beta"],
        label_smoothing=flags["label_smoothing"],
        precompute_reference=flags["precompute_reference"],
        reference=flags["reference"],
        **adapter_option_values(flags),
        **run_option_values(flags),
    )
    ws = workspace()
    plan = make_plan(ws, options, warn=warn)
    if not plan.fits:
        warn("the estimated memory exceeds the device (continuing because of --force)")
    if flags["dry_run"]:
        show_plan(plan, flags["as_json"])
        return 0
    result = recipe.train(ws, plan, console=err, on_start=announce)
    report_result("dpo", plan.run, result)
    return result.exit_code
