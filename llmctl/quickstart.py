"""The whole pipeline on built-in defaults, in about N + 3 minutes on two CPU cores.

    corpus     stdlib-code         Python's standard library, the code the model learns from
    tokenizer  stdlib-code-8k      byte-level BPE with 8192 tokens, trained on it
    corpus     stdlib-docstrings   instruction pairs: a function's docstring asks, its source answers
    pretrain   quickstart-base     cpu-debug on a CPU (a preset that fits on a GPU) for N minutes
    finetune   quickstart-sft      on stdlib-docstrings, for 45 seconds
    eval       the base's bits per byte on stdlib-code's validation split, and the code probes
    sample     a completion from the finetuned model

What a step builds is reused by the next quickstart: corpora and the tokenizer when registered,
a run when it ended normally; a run that was interrupted is resumed from its last checkpoint.
Whatever is built again, everything made from it is built again too (the runs after a new
tokenizer, the finetune after a new base). Evaluation and the sample run every time.
"""

from __future__ import annotations

import ast
import json
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from llmctl.config import GenerationConfig
from llmctl.events import COMPLETED
from llmctl.workspace import EVENTS_FILE, Workspace

CODE_CORPUS = "stdlib-code"
TOKENIZER = "stdlib-code-8k"
VOCAB_SIZE = 8192
INSTRUCT_CORPUS = "stdlib-docstrings"
BASE_RUN = "quickstart-base"
SFT_RUN = "quickstart-sft"
FINETUNE_SECONDS = 45
# GPU presets by the memory they need, largest first; below all of them, cpu-debug.
GPU_PRESETS = (("small-16g", 15 * 2**30), ("rtx4060-8g", 7 * 2**30))
CPU_PRESET = "cpu-debug"

# Instruction pairs short enough to fit cpu-debug's 128-token context with their prompt.
MAX_REQUEST_CHARS = 200
MAX_RESPONSE_CHARS = 400
MIN_REQUEST_CHARS = 20
SAMPLE_REQUEST = "Return True if the string reads the same backwards."
SAMPLE = GenerationConfig(temperature=0.0, max_new_tokens=96)


@dataclass
class QuickstartOptions:
    minutes: float = 5.0
    fresh: bool = False  # train the runs again (corpora and tokenizer are reused all the same)


@dataclass
class Step:
    """One stage of the pipeline: what it makes, whether it builds, reuses or resumes it, and after
    it ran, its figures and the seconds it took."""

    name: str  # code corpus, tokenizer, instructions, pretrain, finetune, eval, sample
    target: str
    action: str  # build, reuse, resume, run
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def choose_preset(device_type: str, device_memory: int | None) -> str:
    if device_type != "cuda" or device_memory is None:
        return CPU_PRESET
    return next((preset for preset, needs in GPU_PRESETS if device_memory >= needs), CPU_PRESET)


# ---------------------------------------------------------------- plan


def plan_quickstart(workspace: Workspace, options: QuickstartOptions) -> list[Step]:
    """What a quickstart in `workspace` will do, reading only the registry and the run directories."""
    registry = workspace.registry()

    def made(row: dict[str, Any] | None) -> str:
        return "reuse" if row is not None and Path(row["path"]).exists() else "build"

    def run_action(run: str) -> str:
        row = registry.run(run)
        if options.fresh or row is None or not workspace.run_dir(run).is_dir():
            return "build"
        if row["meta"].get("end_reason") in COMPLETED and registry.checkpoints(run):
            return "reuse"
        return "resume" if registry.checkpoints(run) else "build"

    # what is made again makes everything made from it stale
    corpus = made(registry.corpus(CODE_CORPUS))
    tokenizer = made(registry.tokenizer(TOKENIZER)) if corpus == "reuse" else "build"
    instructions = made(registry.corpus(INSTRUCT_CORPUS))
    base = run_action(BASE_RUN) if tokenizer == "reuse" else "build"
    finetune = run_action(SFT_RUN) if base == instructions == "reuse" else "build"
    return [
        Step("code corpus", CODE_CORPUS, corpus),
        Step("tokenizer", TOKENIZER, tokenizer),
        Step("instructions", INSTRUCT_CORPUS, instructions),
        Step("pretrain", BASE_RUN, base),
        Step("finetune", SFT_RUN, finetune),
        Step("eval", BASE_RUN, "run"),
        Step("sample", SFT_RUN, "run"),
    ]


# ---------------------------------------------------------------- run


def run_quickstart(
    workspace: Workspace,
    options: QuickstartOptions,
    console: Console,
    on_step: Callable[[Step], None] = lambda step: None,
) -> list[Step]:
    """Every step of the plan in order; `on_step` hears of each before it starts. Trainers show
    their progress on `console`."""
    actions: dict[str, Callable[[Step], None]] = {
        "code corpus": lambda step: _code_corpus(workspace, step),
        "tokenizer": lambda step: _tokenizer(workspace, step),
        "instructions": lambda step: _instruct_corpus(workspace, step),
        "pretrain": lambda step: _pretrain(workspace, step, options.minutes, console),
        "finetune": lambda step: _finetune(workspace, step, console),
        "eval": lambda step: _evaluate(workspace, step),
        "sample": lambda step: _sample(workspace, step),
    }
    steps = plan_quickstart(workspace, options)
    for step in steps:
        on_step(step)
        started = time.monotonic()
        actions[step.name](step)
        step.seconds = time.monotonic() - started
    return steps


def _code_corpus(workspace: Workspace, step: Step) -> None:
    from llmctl.data.build import BuildOptions, build_corpus

    meta = (
        build_corpus(workspace, CODE_CORPUS, ["stdlib"], BuildOptions(overwrite=True))
        if step.action == "build"
        else workspace.registry().corpus(CODE_CORPUS)["meta"]
    )
    step.figures = {"documents": meta["documents"], "bytes": meta["bytes"]}


def _tokenizer(workspace: Workspace, step: Step) -> None:
    from llmctl.tokenizer import tokenizer_meta
    from llmctl.tokenizer_build import train_tokenizer

    if step.action == "build":
        train_tokenizer(workspace, TOKENIZER, CODE_CORPUS, vocab_size=VOCAB_SIZE, overwrite=True)
    meta = tokenizer_meta(workspace, TOKENIZER)
    step.figures = {"vocab_size": meta["vocab_size"], "bytes_per_token": meta["figures"]["bytes_per_token"]}


def _instruct_corpus(workspace: Workspace, step: Step) -> None:
    from llmctl.data.build import BuildOptions, build_corpus
    from llmctl.data.sources import parse_source, source_files

    if step.action == "build":
        pairs = workspace.root / f".{INSTRUCT_CORPUS}.jsonl"
        try:
            with pairs.open("w", encoding="utf-8") as sink:
                for path, _ in source_files(parse_source("stdlib")):
                    for pair in docstring_pairs(path.read_text(encoding="utf-8", errors="replace")):
                        sink.write(json.dumps(pair) + "\n")
            options = BuildOptions(format="alpaca", overwrite=True)
            meta = build_corpus(workspace, INSTRUCT_CORPUS, [str(pairs)], options)
        finally:
            pairs.unlink(missing_ok=True)
    else:
        meta = workspace.registry().corpus(INSTRUCT_CORPUS)["meta"]
    step.figures = {"pairs": meta["documents"], "bytes": meta["bytes"]}


def docstring_pairs(source: str) -> Iterator[dict[str, str]]:
    """{"instruction": the docstring's first paragraph, "output": the function without its
    docstring} for each short documented function or method in a module's source."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        docstring = ast.get_docstring(node)
        if not docstring:
            continue
        request = " ".join(docstring.split("\n\n")[0].split())
        first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
        doc_node = node.body[0]
        body = lines[doc_node.end_lineno : node.end_lineno]
        while body and not body[0].strip():  # the blank line that often followed the docstring
            body.pop(0)
        response = textwrap.dedent("\n".join(lines[first - 1 : doc_node.lineno - 1] + body))
        if MIN_REQUEST_CHARS <= len(request) <= MAX_REQUEST_CHARS and len(response) <= MAX_RESPONSE_CHARS:
            yield {"instruction": request, "output": response}


def _pretrain(workspace: Workspace, step: Step, minutes: float, console: Console) -> None:
    from llmctl.train.precision import describe_device, device_memory_bytes, resolve_device
    from llmctl.train.pretrain import PretrainOptions, make_plan

    if step.action != "reuse":
        device = resolve_device("auto")
        preset = choose_preset(device.type, device_memory_bytes(device))
        options = PretrainOptions(
            run=BASE_RUN,
            corpus=CODE_CORPUS,
            tokenizer=TOKENIZER,
            preset=preset,
            max_time=f"{round(minutes * 60)}s",
            resume=step.action == "resume",
            overwrite=step.action == "build",
        )
        plan = make_plan(workspace, options, warn=_warner(console))
        console.print(f"pretraining {BASE_RUN}: preset {preset} on {describe_device(plan.device)}")
        _train(workspace, plan, console)
    step.figures = _run_figures(workspace, BASE_RUN)


def _finetune(workspace: Workspace, step: Step, console: Console) -> None:
    from llmctl.train.finetune import FinetuneOptions, make_plan

    if step.action != "reuse":
        options = FinetuneOptions(
            run=SFT_RUN,
            model=BASE_RUN,
            data=INSTRUCT_CORPUS,
            max_time=f"{FINETUNE_SECONDS}s",
            resume=step.action == "resume",
            overwrite=step.action == "build",
        )
        _train(workspace, make_plan(workspace, options, warn=_warner(console)), console)
    step.figures = _run_figures(workspace, SFT_RUN)


def _train(workspace: Workspace, plan, console: Console) -> None:
    from llmctl.errors import LlmctlError
    from llmctl.train import recipe

    result = recipe.train(workspace, plan, console=console)
    if not result.reason.completed:
        raise LlmctlError(
            f"run '{plan.run}' stopped ({result.reason}) at step {result.step}; run llmctl quickstart again "
            "to resume it"
        )


def _warner(console: Console) -> Callable[[str], None]:
    return lambda message: console.print(f"[yellow]warning:[/yellow] {message}")


def _run_figures(workspace: Workspace, run: str) -> dict[str, Any]:
    from llmctl.events import read_events

    events = read_events(workspace.run_dir(run) / EVENTS_FILE)
    evals = [event for event in events if event["event"] == "eval"]
    end = next((event for event in reversed(events) if event["event"] == "end"), {})
    figures: dict[str, Any] = {"steps": end.get("step"), "minutes": round(end.get("elapsed_s", 0) / 60, 1)}
    if evals:
        figures |= {"val_loss": round(evals[-1]["val_loss"], 3)}
        if "val_bpb" in evals[-1]:
            figures["val_bpb"] = round(evals[-1]["val_bpb"], 3)
    return figures


def _evaluate(workspace: Workspace, step: Step) -> None:
    """Bits per byte on the code corpus's validation split and the code probes, of the pretrained
    model (the finetune's own validation loss is in its figures); recorded against its checkpoint
    as `llmctl eval` records them."""
    from llmctl.checkpoint.load import load_model
    from llmctl.data.store import CorpusStore
    from llmctl.eval.perplexity import measure_perplexity
    from llmctl.eval.probes import run_probes
    from llmctl.eval.results import describe_checkpoint, record
    from llmctl.generate import Engine

    loaded = load_model(workspace, BASE_RUN)
    checkpoint = describe_checkpoint(workspace, BASE_RUN, loaded.path)
    texts = CorpusStore.open(workspace, CODE_CORPUS).texts("val")
    perplexity = {
        "kind": "perplexity",
        **checkpoint,
        "source": {"corpus": CODE_CORPUS, "split": "val"},
        **measure_perplexity(loaded.model, loaded.tokenizer, texts).as_dict(),
    }
    perplexity["eval_id"] = record(workspace, "perplexity", perplexity)
    probes = {"kind": "probes", **checkpoint, **run_probes(Engine(loaded.model, loaded.tokenizer))}
    probes["eval_id"] = record(workspace, "probes", probes)
    step.figures = {
        "bits_per_byte": round(perplexity["bits_per_byte"], 3),
        "probe_score": round(probes["score"], 2),
    }


def _sample(workspace: Workspace, step: Step) -> None:
    from llmctl.generate import load_engine

    loaded = load_engine(workspace, SFT_RUN, device="auto")
    prompt = loaded.engine.tokenizer.render_chat([{"role": "user", "content": SAMPLE_REQUEST}])
    (completion,) = loaded.engine.generate([prompt], SAMPLE)
    step.figures = {"request": SAMPLE_REQUEST, "completion": completion.text}
