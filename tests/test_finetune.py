"""`llmctl finetune` end to end on a tiny pretrained base: full finetuning and LoRA learn an
instruction task, adapters save and load exactly, resume after SIGKILL is exact for LoRA,
classification, --inspect, --dry-run, and bad input."""

from __future__ import annotations

import json
import random
import signal

import pytest
import torch
from finetune_helpers import QUICK, TASK, exact_match, plain_tokenizer_base, write_jsonl
from pretrain_helpers import events_of, llmctl_process, nothing_written, one_thread, wait_for_event
from safetensors.torch import load_file

from llmctl.checkpoint import load as loader
from llmctl.checkpoint.load import load_model
from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.train.finetune import FinetuneOptions, make_plan
from llmctl.train.recipe import start_run
from llmctl.workspace import Workspace

pytest_plugins = ["finetune_fixtures"]

# LoRA on the attention projections, plus the output head: the base never produced the chat tokens,
# and only the head can learn to (the embedding and head of a tiny base are a large share of it)
LORA = [
    "--lora",
    "--lora-r",
    "4",
    "--lora-targets",
    "q_proj,k_proj,v_proj,o_proj,lm_head",
    "--set",
    "adapter.dropout=0",
]


def task_file(base_workspace):
    return base_workspace / "task.jsonl"


def test_full_finetuning_learns_the_task(ft, base_workspace):
    result = ft(
        "finetune",
        "--model",
        "base",
        "--data",
        task_file(base_workspace),
        "--run",
        "full",
        *QUICK,
        "--set",
        "train.lr=3e-3",
        "--max-steps",
        "100",
    )
    assert result.exit_code == 0, result.stderr
    ws = Workspace(base_workspace)
    base, tuned = load_model(ws, "base"), load_model(ws, "full")
    assert exact_match(base.model, base.tokenizer) <= 0.125
    assert exact_match(tuned.model, tuned.tokenizer) >= 0.75
    row = ws.registry().run("full")
    base_row = ws.registry().checkpoint(row["base_checkpoint"])
    assert row["stage"] == "finetune" and base_row["run"] == "base"
    assert [c["kind"] for c in ws.registry().checkpoints("full")] == ["full"]


def test_lora_learns_trains_few_parameters_and_saves_in_peft_format(base_workspace, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ws = Workspace(base_workspace)
    options = FinetuneOptions(
        run="lora",
        model="base",
        data=str(task_file(base_workspace)),
        lora=True,
        lora_r=4,
        lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"],
        max_steps=120,
        overrides=[*QUICK[1::2], "train.lr=1e-2", "adapter.dropout=0"],
    )
    with one_thread():
        plan = make_plan(ws, options)
        start_run(ws, plan)
        trainer = plan.build_trainer(ws, show_progress=False)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
        assert trainable / total < 0.05 and trainable == plan.trainable
        assert trainer.fit().reason == "finished"

        checkpoint = resolve_model_ref(ws, "lora:latest")
        assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in checkpoint.iterdir()}
        assert not (checkpoint / "model.safetensors").exists()
        meta = json.loads((checkpoint / "meta.json").read_text())
        assert meta["kind"] == "adapter" and meta["base_checkpoint"] == str(resolve_model_ref(ws, "base"))
        assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == 4
        assert all("lora_" in name for name in load_file(checkpoint / "adapter_model.safetensors"))

        # save -> load: the base with the adapter read back computes exactly what training left
        reloaded = loader.load_adapter(loader.load_weights(resolve_model_ref(ws, "base")), checkpoint)
        ids = torch.randint(0, plan.tokenizer.vocab_size, (2, 40))
        trainer.model.eval()
        assert torch.equal(trainer.model(ids), reloaded.eval()(ids))

        merged = load_model(ws, "lora")  # what sample, chat and eval get: base + adapter
        assert exact_match(merged.model, merged.tokenizer) >= 0.75


def test_lora_resume_after_sigkill_is_exact(ft, base_workspace):
    steps = [
        "--data",
        task_file(base_workspace),
        *LORA,
        *QUICK,
        "--set",
        "train.save_every=10",
        "--set",
        "adapter.dropout=0.1",
        "--max-steps",
        "40",
    ]  # dropout: the RNG must be restored too
    assert ft("finetune", "--model", "base", "--run", "whole", *steps).exit_code == 0

    with one_thread():
        process = llmctl_process(
            base_workspace, "finetune", "--model", "base", "--run", "cut", *map(str, steps)
        )
        wait_for_event(base_workspace, "cut", "checkpoint", process)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not any(event["event"] == "end" for event in events_of(base_workspace, "cut"))

    changed = ft("finetune", "--run", "cut", "--resume", "--lora-r", "8")
    assert changed.exit_code == 2 and "adapter.r cannot change when resuming" in changed.stderr
    resumed = ft("finetune", "--run", "cut", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    ws = Workspace(base_workspace)
    cut = load_file(resolve_model_ref(ws, "cut:step-40") / "adapter_model.safetensors")
    whole = load_file(resolve_model_ref(ws, "whole:step-40") / "adapter_model.safetensors")
    assert cut.keys() == whole.keys() and all(torch.equal(cut[name], whole[name]) for name in cut)
    assert [e["resumed"] for e in events_of(base_workspace, "cut") if e["event"] == "start"] == [False, True]


def test_classification_reaches_high_accuracy(ft, base_workspace, tmp_path):
    rng = random.Random(0)
    spam = ["win", "free", "prize", "cash", "claim", "urgent"]
    ham = ["lunch", "meeting", "mom", "home", "later", "thanks"]
    records = [
        {"text": " ".join(rng.choices(words, k=4)), "label": label}
        for _ in range(30)
        for words, label in ((spam, "spam"), (ham, "ham"))
    ]
    data = write_jsonl(tmp_path / "spam.jsonl", records)
    result = ft(
        "finetune",
        "--model",
        "base",
        "--data",
        data,
        "--task",
        "classify",
        "--run",
        "clf",
        *QUICK,
        "--set",
        "train.lr=2e-3",
        "--set",
        "train.micro_batch_size=8",
        "--set",
        "train.eval_every=30",
        "--max-steps",
        "60",
    )
    assert result.exit_code == 0, result.stderr
    evals = [event for event in events_of(base_workspace, "clf") if event["event"] == "eval"]
    assert evals[-1]["val_accuracy"] >= 0.9

    checkpoint = resolve_model_ref(Workspace(base_workspace), "clf")
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["task"] == "classify" and meta["labels"] == ["ham", "spam"]
    classifier = loader.load_weights(checkpoint).eval()
    from llmctl.data.sft import collate_classification, encode_classification
    from llmctl.tokenizer import load_tokenizer_file

    examples, _ = encode_classification(
        records, load_tokenizer_file(checkpoint / "tokenizer.json"), meta["labels"], 64
    )
    batch = collate_classification(examples, 64, 1, torch.device("cpu"))
    with torch.no_grad():
        predicted = classifier(batch["input_ids"], class_positions=batch["class_positions"]).argmax(-1)
    assert (predicted == batch["class_labels"]).float().mean() >= 0.95


def test_inspect_shows_trained_tokens_and_writes_nothing(ft, base_workspace):
    result = ft(
        "finetune", "--model", "base", "--data", task_file(base_workspace), "--run", "peek", "--inspect"
    )
    assert result.exit_code == 0, result.stderr
    assert "Name a red fruit." in result.stdout and "trained tokens" in result.stdout
    assert "examples 8" in result.stdout and nothing_written(base_workspace, "peek")
    figures = ft(
        "finetune", "--model", "base", "--data", task_file(base_workspace), "--inspect", "--json"
    ).json()
    first = figures["examples"][0]["pieces"]
    assert [piece["text"] for piece in first if piece["trained"]] == ["apple<|end|>\n<|endoftext|>"]


def test_dry_run_plans_without_writing(ft, base_workspace):
    result = ft(
        "finetune",
        "--model",
        "base",
        "--data",
        task_file(base_workspace),
        "--run",
        "plan",
        *LORA,
        "--no-packing",
        "--dry-run",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    plan = result.json()
    assert (
        plan["method"] == "lora" and plan["train_examples"] == len(TASK) and plan["train_rows"] == len(TASK)
    )
    assert plan["trainable_fraction"] < 0.05 and plan["memory"]["total"] > 0
    assert nothing_written(base_workspace, "plan")


def test_no_packing_trains_and_samples_replies_to_a_validation_prompt(ft, base_workspace):
    args = ["--data", task_file(base_workspace), "--run", "padded", "--no-packing", *QUICK]
    result = ft("finetune", "--model", "base", *args, "--set", "train.sample_every=3", "--max-steps", "3")
    assert result.exit_code == 0, result.stderr
    events = events_of(base_workspace, "padded")
    assert events[0]["task"] == "sft" and events[0]["trainable_params"] == events[0]["params"]
    (sample,) = [event for event in events if event["event"] == "sample"]
    assert sample["prompt"] == "<|user|>\nName a red fruit.<|end|>\n<|assistant|>\n"


def test_bad_input_is_a_one_line_error_and_writes_nothing(ft, base_workspace, tmp_path):
    no_fields = write_jsonl(tmp_path / "bad.jsonl", [{"question": "x", "answer": "y"}])
    cases = [
        (["--data", no_fields], "has no instruction fields (fields found: question, answer)"),
        (
            ["--data", task_file(base_workspace), "--lora", "--lora-targets", "q_proj,wq"],
            "LoRA targets wq match no module of the model; the linear layers are named down_proj, gate_proj",
        ),
        (["--data", task_file(base_workspace), "--set", "model.n_layer=4"], "'model.n_layer' cannot be set"),
        (["--data", task_file(base_workspace), "--task", "classify"], "needs a 'label' field"),
        (["--data", tmp_path / "missing.jsonl"], "does not exist"),
    ]
    for args, message in cases:
        result = ft("finetune", "--model", "base", "--run", "bad", *args)
        assert result.exit_code != 0 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert nothing_written(base_workspace, "bad")
    missing = ft("finetune", "--model", "nosuchrun", "--data", task_file(base_workspace))
    assert missing.exit_code == 2 and "no run or checkpoint directory named 'nosuchrun'" in missing.stderr


def test_a_base_without_chat_tokens_asks_for_a_plain_prompt_style(ft, base_workspace, tmp_path):
    checkpoint = plain_tokenizer_base(tmp_path)
    args = ["finetune", "--model", checkpoint, "--data", task_file(base_workspace), "--run", "plainft"]
    refused = ft(*args)
    assert refused.exit_code == 2 and "use --prompt-style alpaca" in refused.stderr
    assert nothing_written(base_workspace, "plainft")
    accepted = ft(*args, "--prompt-style", "alpaca", *QUICK, "--max-steps", "2")
    assert accepted.exit_code == 0, accepted.stderr


@pytest.mark.parametrize("command", [["finetune", "--lora"], ["qlora"]])
def test_a_hugging_face_model_directory_is_a_base(ft, base_workspace, tmp_path, command):
    from hf_helpers import save_llama_dir

    directory = tmp_path / "llama"
    save_llama_dir(directory, max_shard_size="100KB")  # sharded, with other parameter names
    records = [{"system": "Answer.", "instruction": prompt, "output": answer} for prompt, answer in TASK]
    data = write_jsonl(tmp_path / "task.jsonl", records)
    run = f"hf-{command[0]}"
    result = ft(
        *command,
        "--model",
        directory,
        "--data",
        data,
        "--run",
        run,
        "--prompt-style",
        "alpaca",
        *QUICK,
        "--max-steps",
        "2",
    )
    assert result.exit_code == 0, result.stderr
    loaded = load_model(Workspace(base_workspace), run)
    assert loaded.meta["base_checkpoint"] == str(directory) and loaded.model.cfg.n_kv_head == 2


def test_early_stopping_works_through_the_shared_trainer(ft, base_workspace):
    # a rate of ~0 keeps the val loss flat: the second evaluation fails to improve on the first
    flat = [
        "--set",
        "train.lr=1e-9",
        "--set",
        "train.min_lr=0",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.early_stopping_patience=1",
        "--set",
        "train.early_stopping_min_delta=0.01",
    ]
    result = ft(
        "finetune",
        "--model",
        "base",
        "--data",
        task_file(base_workspace),
        "--run",
        "stops",
        "--lora",
        *QUICK,
        *flat,
        "--max-steps",
        "50",
    )
    assert result.exit_code == 0, result.stderr
    end = events_of(base_workspace, "stops")[-1]
    assert end["event"] == "end" and end["reason"] == "early_stopping" and end["step"] == 4
