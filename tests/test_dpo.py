"""`llmctl dpo` end to end on the tiny pretrained base: a few steps raise held-out preference
accuracy; LoRA's reference is the base with its adapters off, and its checkpoints merge, export,
sample and chat; QLoRA trains on the 4-bit base; a full-weight run with precomputed reference
scores resumes exactly after SIGKILL, reusing them; the dry run counts what each reference costs;
status and monitor show the figures; bad input is one line and writes nothing."""

from __future__ import annotations

import io
import math
import signal
import sys

import pytest
import torch
from finetune_helpers import QUICK, plain_tokenizer_base, write_jsonl
from preference_helpers import TOPICS, style_pairs
from pretrain_helpers import events_of, llmctl_process, nothing_written, one_thread, wait_for_event
from safetensors.torch import load_file

from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.data.build import BuildOptions, build_corpus
from llmctl.workspace import REFERENCE_LOGPS, Workspace

pytest_plugins = ["finetune_fixtures"]

FAST = [*QUICK, "--set", "train.log_every=1", "--set", "train.warmup_steps=2"]
LORA = ["--lora-r", "4", "--lora-targets", "q_proj,v_proj,o_proj,lm_head", "--set", "adapter.dropout=0"]


@pytest.fixture(scope="module")
def prefs(base_workspace) -> str:
    """A preference corpus in the shared workspace: the style pairs, a quarter held out."""
    source = write_jsonl(base_workspace / "prefs.jsonl", style_pairs(TOPICS))
    options = BuildOptions(format="preference", val_fraction=0.25, overwrite=True)
    build_corpus(Workspace(base_workspace), "prefs", [str(source)], options)
    return "prefs"


def _figures(base_workspace, run: str, kind: str) -> list[dict]:
    return [event for event in events_of(base_workspace, run) if event["event"] == kind]


def test_a_few_steps_raise_held_out_preference_accuracy(ft, base_workspace, prefs):
    before = ft("eval", "preference", "--model", "base", "--reference", "base", "--data", prefs, "--json")
    assert before.exit_code == 0, before.stderr
    assert before.json()["accuracy"] == 0.5  # the policy is its reference: every pair a tie
    result = ft(
        "dpo", "--model", "base", "--data", prefs, "--run", "dpo-full", *FAST,
        "--set", "train.lr=1e-3", "--set", "train.eval_every=10", "--max-steps", "20",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    first, *_, last = _figures(base_workspace, "dpo-full", "train")
    # step 1: the policy is still its frozen copy, so the loss is ln 2 and every pair a tie
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (first["rewards_chosen"], first["rewards_rejected"], first["preference_accuracy"]) == (0, 0, 0.5)
    assert last["reward_margin"] > 1 and last["preference_accuracy"] == 1.0
    evals = _figures(base_workspace, "dpo-full", "eval")
    assert evals[-1]["val_preference_accuracy"] >= 0.9 and evals[-1]["val_loss"] < 0.3

    after = ft("eval", "preference", "--model", "dpo-full:latest", "--data", prefs, "--json").json()
    assert after["accuracy"] >= 0.9 and after["pairs"] >= 3 and after["split"] == "val"
    # the same pairs, the same reference: the eval repeats the trainer's last evaluation
    assert after["reward_margin"] == pytest.approx(evals[-1]["val_reward_margin"], abs=1e-4)
    assert after["reference"] == str(resolve_model_ref(Workspace(base_workspace), "base"))

    registry = Workspace(base_workspace).registry()
    row = registry.run("dpo-full")
    assert row["stage"] == "dpo" and row["corpus"] == "prefs"
    assert registry.checkpoint(row["base_checkpoint"])["run"] == "base"
    status = ft("status", "dpo-full")
    assert "dpo" in status.stdout and "preference" in status.stdout and "val acc" in status.stdout
    frame = ft("monitor", "dpo-full", "--once")
    assert "pref acc" in frame.stdout and "margin" in frame.stdout
    plotted = ft("plot", "dpo-full", "--out", base_workspace / "dpo.png")
    assert plotted.exit_code == 0 and (base_workspace / "dpo.png").stat().st_size > 0


def test_lora_is_held_to_its_base_and_its_checkpoints_work_everywhere(
    ft, base_workspace, prefs, tmp_path, monkeypatch
):
    plan = ft("dpo", "--model", "base", "--data", prefs, "--lora", *LORA, "--dry-run", "--json").json()
    assert plan["reference"] == "adapters-off" and plan["reference_bytes"] == 0
    result = ft(
        "dpo", "--model", "base", "--data", prefs, "--run", "dpo-lora", "--lora", *LORA, *FAST,
        "--set", "train.lr=1e-2", "--max-steps", "12",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    start = _figures(base_workspace, "dpo-lora", "start")[0]
    assert start["reference"] == "adapters-off" and start["trainable_params"] < start["params"] / 10
    train = _figures(base_workspace, "dpo-lora", "train")
    assert train[0]["preference_accuracy"] == 0.5 and train[-1]["reward_margin"] > train[0]["reward_margin"]

    ws = Workspace(base_workspace)
    checkpoint = resolve_model_ref(ws, "dpo-lora:latest")
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert [c["kind"] for c in ws.registry().checkpoints("dpo-lora")] == ["adapter"]
    merged = ft("merge", "dpo-lora", "--run", "dpo-lora-merged")
    assert merged.exit_code == 0, merged.stderr
    exported = ft("export", "--model", "dpo-lora", "--out", tmp_path / "hf")  # checked in transformers
    assert exported.exit_code == 0, exported.stderr
    for model in ("dpo-lora", "dpo-lora-merged"):
        assert ft("sample", "--model", model, "--prompt", "Tell me", "-n", "4").exit_code == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me about owls.\n"))
    chat = ft("chat", "--model", "dpo-lora", "-n", "8")
    assert chat.exit_code == 0, chat.stderr
    scored = ft("eval", "preference", "--model", "dpo-lora-merged", "--data", prefs, "--json").json()
    direct = ft("eval", "preference", "--model", "dpo-lora", "--data", prefs, "--json").json()
    assert scored["reward_margin"] == pytest.approx(direct["reward_margin"], abs=1e-4)


def test_qlora_trains_on_the_4bit_base_with_adapters_off_as_reference(ft, base_workspace, prefs):
    result = ft(
        "dpo", "--model", "base", "--data", prefs, "--run", "dpo-q", "--qlora", *LORA, *FAST,
        "--set", "train.lr=1e-2", "--max-steps", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    train = _figures(base_workspace, "dpo-q", "train")
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and train[-1]["reward_margin"] > 0
    checkpoint = resolve_model_ref(Workspace(base_workspace), "dpo-q:latest")
    assert "nf4" in (checkpoint / "config.yaml").read_text()
    # eval preference holds the merged QLoRA policy to the base's 4-bit round trip, as training did
    scored = ft("eval", "preference", "--model", "dpo-q:latest", "--data", prefs, "--json").json()
    last_eval = _figures(base_workspace, "dpo-q", "eval")[-1]
    assert scored["reward_margin"] == pytest.approx(last_eval["val_reward_margin"], abs=1e-3)
    assert ft("merge", "dpo-q", "--run", "dpo-q-merged").exit_code == 0


def test_precomputed_reference_resume_after_sigkill_is_exact(ft, base_workspace, prefs):
    steps = [
        "--data",
        prefs,
        "--precompute-reference",
        *QUICK,
        "--set",
        "train.save_every=5",
        "--set",
        "model.dropout=0.1",
        "--set",
        "train.lr=1e-3",
        "--max-steps",
        "15",
    ]  # fmt: skip  (dropout: the RNG must be restored too)
    assert ft("dpo", "--model", "base", "--run", "dpo-whole", *steps).exit_code == 0
    stored = base_workspace / "runs" / "dpo-whole" / REFERENCE_LOGPS
    scores = load_file(stored)
    assert set(scores) == {"chosen", "rejected"} and scores["chosen"].shape == (len(TOPICS),)

    with one_thread():
        process = llmctl_process(
            base_workspace, "dpo", "--model", "base", "--run", "dpo-cut", *map(str, steps)
        )
        wait_for_event(base_workspace, "dpo-cut", "checkpoint", process)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not _figures(base_workspace, "dpo-cut", "end")
    cut_scores = base_workspace / "runs" / "dpo-cut" / REFERENCE_LOGPS
    written = cut_scores.stat().st_mtime_ns

    changed = ft("dpo", "--run", "dpo-cut", "--resume", "--beta", "0.2")
    assert changed.exit_code == 2 and "dpo.beta cannot change when resuming" in changed.stderr
    resumed = ft("dpo", "--run", "dpo-cut", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert cut_scores.stat().st_mtime_ns == written  # the resumed run scored nothing again
    ws = Workspace(base_workspace)
    cut = load_file(resolve_model_ref(ws, "dpo-cut:step-15") / "model.safetensors")
    whole = load_file(resolve_model_ref(ws, "dpo-whole:step-15") / "model.safetensors")
    assert cut.keys() == whole.keys() and all(torch.equal(cut[name], whole[name]) for name in cut)
    assert [e["resumed"] for e in _figures(base_workspace, "dpo-cut", "start")] == [False, True]


def test_early_stopping_works_through_the_shared_trainer(ft, base_workspace, prefs):
    result = ft(
        "dpo",
        "--model",
        "base",
        "--data",
        prefs,
        "--run",
        "dpo-early",
        "--loss",
        "hinge",
        *FAST,
        "--set",
        "train.eval_every=2",
        "--set",
        "train.early_stopping_patience=2",
        "--set",
        "train.early_stopping_min_delta=10",
        "--max-steps",
        "50",
    )  # fmt: skip  (no evaluation can improve by 10: the run stops two evaluations after the first)
    assert result.exit_code == 0, result.stderr
    (end,) = _figures(base_workspace, "dpo-early", "end")
    assert end["reason"] == "early_stopping" and end["step"] == 6


def test_dry_run_counts_what_each_reference_costs(ft, base_workspace, prefs):
    def plan(*args):
        result = ft(
            "dpo", "--model", "base", "--data", prefs, "--run", "planned", *args, "--dry-run", "--json"
        )
        assert result.exit_code == 0, result.stderr
        return result.json()

    full, precomputed, lora = plan(), plan("--precompute-reference"), plan("--lora")
    assert full["reference"] == "frozen-copy" and full["reference_bytes"] == 4 * full["params"]
    assert precomputed["reference"] == "precomputed" and precomputed["reference_bytes"] == 0
    assert full["memory"]["weights"] - precomputed["memory"]["weights"] == full["reference_bytes"]
    assert lora["reference"] == "adapters-off" and lora["reference_bytes"] == 0
    assert (full["loss"], full["beta"], full["train_pairs"] + full["val_pairs"]) == (
        "sigmoid",
        0.1,
        len(TOPICS),
    )
    shown = ft("dpo", "--model", "base", "--data", prefs, "--run", "planned", "--dry-run")
    assert "a frozen copy of the base" in shown.stdout and "--precompute-reference" in shown.stdout
    assert nothing_written(base_workspace, "planned")


def test_bad_input_is_one_line_and_writes_nothing(ft, base_workspace, prefs, tmp_path):
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    plain = plain_tokenizer_base(tmp_path / "plain")
    cases = [
        (["--data", wrong], "fields found: question, good, bad); a pair needs 'chosen' and 'rejected'"),
        (["--data", prefs, "--beta", "0"], "invalid value for 'dpo.beta'"),
        (["--data", prefs, "--beta", "11"], "less than or equal to 10"),
        (["--data", prefs, "--loss", "kto"], "invalid value for 'dpo.loss'"),
        (["--data", prefs, "--loss", "ipo", "--label-smoothing", "0.1"], "sigmoid loss only"),
        (
            ["--data", prefs, "--lora-r", "4"],
            "--lora-r shapes LoRA adapters, and this run trains every weight",
        ),
        (["--data", prefs, "--lora", "--reference", "base"], "--reference goes with full-weight dpo"),
        (["--data", prefs, "--reference", plain], "a reference must score the same tokens"),
        (["--data", "code"], "corpus 'code' holds text data; dpo needs preference pairs"),
    ]
    for args, message in cases:
        result = ft("dpo", "--model", "base", "--run", "bad", *args)
        assert result.exit_code == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
        assert nothing_written(base_workspace, "bad")
    chat = ft("dpo", "--model", plain, "--data", prefs, "--run", "bad", "--prompt-style", "chat")
    assert chat.exit_code == 2 and "use --prompt-style alpaca" in chat.stderr
    assert nothing_written(base_workspace, "bad")


def test_tune_searches_dpo_settings_on_the_preference_figures(ft, base_workspace, prefs):
    import optuna

    from llmctl.tune.storage import open_storage

    result = ft(
        "tune", "--study", "dpo-beta", "--stage", "dpo", "--model", "base", "--data", prefs,
        "--param", "dpo.beta=choice:0.05,0.5", "--sampler", "grid", "--trials", "2",
        "--trial-steps", "6", *FAST, "--set", "train.lr=1e-3", "--set", "train.eval_every=3",
        "--pruner", "none", "--objective", "val_preference_accuracy", "--direction", "maximize",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    storage = open_storage(f"sqlite:///{base_workspace / 'studies.db'}")
    trials = optuna.load_study(study_name="dpo-beta", storage=storage).get_trials()
    assert sorted(trial.params["dpo.beta"] for trial in trials) == [0.05, 0.5]
    registry = Workspace(base_workspace).registry()
    for trial in trials:
        run = f"dpo-beta-t{trial.number:03d}"
        row = registry.run(run)
        assert row["stage"] == "dpo" and row["meta"]["study"] == "dpo-beta"
        assert row["meta"]["config"]["dpo"]["beta"] == trial.params["dpo.beta"]
        # the trial's value is its run's last evaluation of the objective
        last = _figures(base_workspace, run, "eval")[-1]
        assert trial.state.name == "COMPLETE" and trial.value == last["val_preference_accuracy"]
