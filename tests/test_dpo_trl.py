"""llmctl's DPO against TRL's DPOTrainer, the reference implementation: the same tiny model (its
Hugging Face export), the same reference model, the same pairs rendered to the same tokens, fp32 on
a CPU. The first optimizer step's loss, mean rewards of the chosen and rejected replies, and gradient
norm (before clipping) agree within 1e-5, for the sigmoid and the IPO losses.

llmctl's side is a real `llmctl dpo` run of one step (every pair in one micro-batch, `--reference`
naming the second model), read from its event stream; TRL's is `DPOTrainer.train()` for one step,
read from its log history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from finetune_helpers import write_jsonl
from preference_helpers import TOPICS, style_pairs
from pretrain_helpers import events_of
from tiny_checkpoints import write_run_checkpoint

from llmctl.checkpoint.load import load_model
from llmctl.config import ModelConfig
from llmctl.data.sft import render_prompt
from llmctl.export.hf import export_hf
from llmctl.tokenizer import END_OF_TURN_TOKEN
from llmctl.workspace import Workspace

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = ModelConfig(n_layer=2, n_head=4, d_model=64, context_length=64, vocab_size=262, tie_embeddings=False)
PAIRS = style_pairs(TOPICS[:6], seed=3)
BETA = 0.1


def _perturb(model: torch.nn.Module) -> None:
    for param in model.parameters():
        param.add_(0.05 * torch.randn_like(param))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A policy and a different reference (llmctl checkpoints), and their Hugging Face exports."""
    root = tmp_path_factory.mktemp("trl") / "workspace"
    policy = write_run_checkpoint(root, "policy", model_config=SHAPE)
    reference = write_run_checkpoint(root, "reference", model_config=SHAPE, edit=_perturb)
    ws = Workspace(root)
    exports = {}
    for name, path in (("policy", policy), ("reference", reference)):
        exports[name] = export_hf(ws, str(path), root.parent / f"{name}-hf", verify=False).directory
    write_jsonl(root / "prefs.jsonl", PAIRS)
    return {
        "root": root,
        "policy": policy,
        "reference": reference,
        **{f"{k}_hf": v for k, v in exports.items()},
    }


def _llmctl_first_step(cli_ws, models, loss: str) -> dict:
    run = f"ours-{loss}"
    result = cli_ws(
        "dpo",
        "--model",
        models["policy"],
        "--reference",
        models["reference"],
        "--data",
        models["root"] / "prefs.jsonl",
        "--run",
        run,
        "--loss",
        loss,
        "--beta",
        BETA,
        "--prompt-style",
        "chat",
        "--max-steps",
        "1",
        *("--set", f"train.micro_batch_size={len(PAIRS)}", "--set", "train.precision=fp32"),
        *("--set", "train.log_every=1", "--set", "train.eval_every=1000", "--set", "train.grad_clip=1.0"),
        *("--set", "train.warmup_steps=0", "--set", "train.lr=1e-6", "--set", "train.min_lr=1e-6"),
    )
    assert result.exit_code == 0, result.stderr
    (first,) = [event for event in events_of(models["root"], run) if event["event"] == "train"]
    return first


def _trl_first_step(models, loss: str, tmp_path: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(models["policy_hf"])
    eot = tokenizer.eos_token
    # the pairs rendered as llmctl renders them: the prompt up to the reply header, then each reply
    # with its end-of-turn and end tokens (TRL appends no second end token to a reply ending in one)
    rows = [
        {
            "prompt": render_prompt([{"role": "user", "content": pair["prompt"]}], "chat"),
            "chosen": f"{pair['chosen']}{END_OF_TURN_TOKEN}\n{eot}",
            "rejected": f"{pair['rejected']}{END_OF_TURN_TOKEN}\n{eot}",
        }
        for pair in PAIRS
    ]
    history: list[dict] = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                history.append(dict(logs))

    args = DPOConfig(
        output_dir=str(tmp_path / f"trl-{loss}"),
        loss_type=[loss],
        beta=BETA,
        per_device_train_batch_size=len(PAIRS),
        max_steps=1,
        logging_steps=1,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_length=None,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to=[],
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(models["policy_hf"], dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(models["reference_hf"], dtype=torch.float32),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Keep()],
    )
    trainer.train()
    (first,) = history
    return first


@pytest.fixture
def cli_ws(models, capsys, monkeypatch):
    from cli_helpers import run_cli

    monkeypatch.setenv("COLUMNS", "160")
    return lambda *args: run_cli(capsys, ["--workspace", models["root"], *args])


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_first_step_matches_trl(cli_ws, models, loss, tmp_path):
    ours = _llmctl_first_step(cli_ws, models, loss)
    theirs = _trl_first_step(models, loss, tmp_path)
    close = {"rel": 1e-5, "abs": 1e-5}
    assert ours["loss"] == pytest.approx(theirs["loss"], **close)
    assert ours["rewards_chosen"] == pytest.approx(theirs["rewards/chosen"], **close)
    assert ours["rewards_rejected"] == pytest.approx(theirs["rewards/rejected"], **close)
    assert ours["reward_margin"] == pytest.approx(theirs["rewards/margins"], **close)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], **close)
    # the comparison means something: the models differ, so rewards and loss are far from a tie's
    assert abs(ours["rewards_chosen"]) > 1e-3 and abs(ours["loss"] - 0.6931) > 1e-3


def test_the_rendered_tokens_are_the_ones_trl_scores(models):
    """The pairs TRL tokenizes from the rendered text are exactly llmctl's rendered tokens."""
    from transformers import AutoTokenizer

    from llmctl.data.preference import encode_pairs, normalize

    ours = load_model(Workspace(models["root"]), str(models["policy"])).tokenizer
    theirs = AutoTokenizer.from_pretrained(models["policy_hf"])
    (pair,) = encode_pairs([normalize(PAIRS[0])], ours, "chat", SHAPE.context_length, "pairs").pairs
    prompt = render_prompt([{"role": "user", "content": PAIRS[0]["prompt"]}], "chat")
    reply = f"{PAIRS[0]['chosen']}{END_OF_TURN_TOKEN}\n{theirs.eos_token}"
    assert theirs(prompt + reply)["input_ids"] == pair.chosen.ids
    trained = [i for i, flag in enumerate(pair.chosen.trained) if flag]
    assert trained == list(range(len(theirs(prompt)["input_ids"]), len(pair.chosen.ids)))
    assert (
        json.loads((models["policy_hf"] / "tokenizer_config.json").read_text())["eos_token"]
        == theirs.eos_token
    )
