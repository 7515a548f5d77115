"""`llmctl status`: the workspace at a glance and one run in detail, from registry rows and logs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import yaml

from llmctl.events import EventWriter
from llmctl.workspace import Workspace


def make_workspace(root: Path) -> None:
    """A corpus, a tokenizer, a finished pretrain run and a QLoRA run started from its best checkpoint."""
    ws = Workspace(root)
    registry = ws.registry()
    registry.add_corpus("code", "text", ws.corpus_dir("code"), {"documents": 1234, "bytes": 5_600_000})
    registry.add_corpus("sft", "instruct", ws.corpus_dir("sft"), {"documents": 52, "bytes": 40_000})
    registry.add_tokenizer("code-8k", ws.tokenizer_dir("code-8k"), "code", "ab" * 32, 8192, {"kind": "bpe"})

    registry.add_run("base", "pretrain", ws.run_dir("base"), corpus="code", tokenizer="code-8k")
    best_id = registry.add_checkpoint(
        "base",
        200,
        "full",
        ws.run_dir("base") / "checkpoints" / "step-00000200",
        {"val_loss": 2.25, "val_ppl": 9.49, "val_bpb": 1.05},
    )
    registry.add_checkpoint(
        "base",
        300,
        "full",
        ws.run_dir("base") / "checkpoints" / "step-00000300",
        {"val_loss": 2.5, "val_ppl": 12.18, "val_bpb": 1.2},
    )
    registry.add_eval(best_id, "humaneval", {"pass@1": 0.0625, "problems": 164})
    config = {
        "preset": "cpu-debug",
        "model": {
            "n_layer": 2,
            "n_head": 4,
            "n_kv_head": None,
            "d_model": 256,
            "context_length": 128,
            "vocab_size": 8192,
        },
        "train": {
            "lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 20,
            "micro_batch_size": 16,
            "grad_accum_steps": 1,
            "max_steps": 300,
            "precision": "fp32",
        },
        "data": {"corpus": "code", "tokenizer": "code-8k"},
        "adapter": {"enabled": False},
    }
    (ws.run_dir("base")).mkdir(parents=True, exist_ok=True)
    (ws.run_dir("base") / "config.yaml").write_text(yaml.safe_dump(config))
    with EventWriter(ws.run_dir("base") / "events.jsonl") as writer:
        writer.write(
            "start",
            0,
            run="base",
            stage="pretrain",
            preset="cpu-debug",
            pid=os.getpid(),
            host=socket.gethostname(),
            device="cpu",
            max_steps=300,
        )
        for step in (100, 200, 300):
            writer.write("train", step, loss=3.0 - step / 1000)
        writer.write("eval", 200, val_loss=2.25, val_ppl=9.49, val_bpb=1.05)
        writer.write("eval", 300, val_loss=2.5, val_ppl=12.18, val_bpb=1.2)
        writer.write("end", 300, reason="finished", elapsed_s=30.0, best_val_loss=2.25)

    registry.add_run(
        "tuned", "qlora", ws.run_dir("tuned"), corpus="sft", tokenizer="code-8k", base_checkpoint=best_id
    )
    ws.run_dir("tuned").mkdir(parents=True)
    adapter = {
        "enabled": True,
        "r": 8,
        "alpha": 16.0,
        "dropout": 0.05,
        "targets": ["q_proj", "v_proj"],
        "quantize": "nf4",
    }
    (ws.run_dir("tuned") / "config.yaml").write_text(yaml.safe_dump({**config, "adapter": adapter}))


def test_status_json_is_one_document_with_everything(cli, workspace_dir: Path):
    make_workspace(workspace_dir)
    result = cli("status", "--json")
    assert result.exit_code == 0 and result.stderr == ""
    doc = result.json()
    assert doc["workspace"] == str(workspace_dir) and doc["exists"]
    cpu = doc["devices"][-1]
    assert cpu["device"] == "cpu" and cpu["cores"] >= 1 and cpu["memory_bytes"] > 0
    assert [(c["name"], c["kind"], c["documents"]) for c in doc["corpora"]] == [
        ("code", "text", 1234),
        ("sft", "instruct", 52),
    ]
    assert [(t["name"], t["vocab_size"], t["corpus"]) for t in doc["tokenizers"]] == [
        ("code-8k", 8192, "code")
    ]
    base, tuned = doc["runs"]
    assert (base["name"], base["stage"], base["state"], base["step"], base["max_steps"]) == (
        "base",
        "pretrain",
        "finished",
        300,
        300,
    )
    assert base["best_eval"]["val_loss"] == 2.25 and base["best_eval"]["val_bpb"] == 1.05
    assert base["best_checkpoint"]["step"] == 200 and base["latest_checkpoint"]["step"] == 300
    assert (tuned["name"], tuned["stage"], tuned["state"]) == ("tuned", "qlora", "registered")


def test_status_of_one_run_has_config_lineage_checkpoints_evals(cli, workspace_dir: Path):
    make_workspace(workspace_dir)
    doc = cli("status", "tuned", "--json").json()
    lineage = doc["lineage"]
    assert lineage["corpus"]["name"] == "sft" and lineage["tokenizer"]["vocab_size"] == 8192
    assert lineage["adapter"] == {
        "r": 8,
        "alpha": 16.0,
        "dropout": 0.05,
        "targets": ["q_proj", "v_proj"],
        "quantize": "nf4",
    }
    base = lineage["base_checkpoint"]
    assert (base["run"], base["step"], base["val_loss"]) == ("base", 200, 2.25)
    assert base["lineage"]["corpus"]["name"] == "code" and base["lineage"]["stage"] == "pretrain"

    doc = cli("status", "base", "--json").json()
    assert doc["config"]["train"]["lr"] == 1e-3
    assert [(c["step"], c["val_ppl"]) for c in doc["checkpoints"]] == [(200, 9.49), (300, 12.18)]
    assert doc["evals"] == [
        {
            "checkpoint_step": 200,
            "kind": "humaneval",
            "created": doc["evals"][0]["created"],
            "pass@1": 0.0625,
            "problems": 164,
        }
    ]
    assert doc["end"]["reason"] == "finished" and doc["alerts"] == []


def test_status_for_people(cli, workspace_dir: Path):
    make_workspace(workspace_dir)
    text = cli("status").stdout
    for shown in (
        "workspace",
        str(workspace_dir),
        "cpu",
        "corpora",
        "code",
        "1,234",
        "5.6 MB",
        "tokenizers",
        "code-8k",
        "8,192",
        "runs",
        "base",
        "finished",
        "300 / 300",
        "2.250",
        "tuned",
        "registered",
    ):
        assert shown in text, shown
    text = cli("status", "tuned").stdout
    for shown in (
        "lineage",
        "base checkpoint",
        "base:step-200",
        "corpus",
        "sft",
        "adapter",
        "QLoRA (nf4) r=8",
        "q_proj, v_proj",
        "2 layers · 4 heads",
        "lr 1e-3 → 1e-4",
    ):
        assert shown in text, shown
    text = cli("status", "base").stdout
    assert "humaneval" in text and "pass@1 0.0625" in text and "200 ★" in text


def test_status_in_a_fresh_directory_creates_nothing(cli, workspace_dir: Path):
    doc = cli("status", "--json").json()
    assert doc["exists"] is False and doc["runs"] == [] and not workspace_dir.exists()
    result = cli("status", "nope")
    assert result.exit_code == 2 and "no run 'nope'" in result.stderr


def test_devices_come_from_nvidia_smi_when_present(tmp_path: Path, monkeypatch):
    from llmctl.monitor.status import devices

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 81559, 1024'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gpu, cpu = devices()
    assert gpu == {
        "device": "cuda:0",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_bytes": 81559 << 20,
        "memory_used_bytes": 1024 << 20,
    }
    assert cpu["device"] == "cpu"
