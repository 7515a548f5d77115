"""`llmctl tune` over the finetune and qlora stages, on the tiny pretrained base of
finetune_fixtures: every trial a real adapter run with its sampled settings."""

from __future__ import annotations

import optuna
import pytest
from finetune_helpers import QUICK

from llmctl.tune.storage import open_storage
from llmctl.workspace import Workspace

pytest_plugins = ["finetune_fixtures"]


def trials_of(workspace, name: str) -> list:
    storage = open_storage(f"sqlite:///{workspace / 'studies.db'}")
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def test_a_lora_study_trains_each_trial_with_its_rank(ft, base_workspace):
    data = base_workspace / "task.jsonl"
    result = ft(
        "tune", "--study", "ft-rank", "--stage", "finetune", "--model", "base", "--data", data,
        "--set", "adapter.enabled=true", "--param", "adapter.r=choice:2,4", "--sampler", "grid",
        "--trials", "2", "--trial-steps", "6", *QUICK, "--set", "train.eval_every=3", "--pruner", "none",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    trials = trials_of(base_workspace, "ft-rank")
    assert sorted(trial.params["adapter.r"] for trial in trials) == [2, 4]
    assert all(trial.state.name == "COMPLETE" and trial.value > 0 for trial in trials)
    registry = Workspace(base_workspace).registry()
    for trial in trials:
        run = registry.run(f"ft-rank-t{trial.number:03d}")
        assert run["stage"] == "finetune" and run["meta"]["study"] == "ft-rank"
        assert run["meta"]["config"]["adapter"]["r"] == trial.params["adapter.r"]
        assert {row["kind"] for row in registry.checkpoints(run["name"])} == {"adapter"}
        # a trial is finetuned from the base, as a finetune run is
        assert registry.checkpoint(run["base_checkpoint"])["run"] == "base"


def test_a_qlora_study_runs_its_trials_on_the_4_bit_base(ft, base_workspace):
    result = ft(
        "tune", "--study", "q-lr", "--stage", "qlora", "--model", "base", "--data",
        base_workspace / "task.jsonl", "--param", "train.lr=log:1e-3..1e-2", "--trials", "1",
        "--trial-steps", "4", *QUICK, "--set", "train.eval_every=2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    (trial,) = trials_of(base_workspace, "q-lr")
    assert trial.state.name == "COMPLETE" and sorted(trial.intermediate_values) == [2, 4]
    run = Workspace(base_workspace).registry().run("q-lr-t000")
    assert run["stage"] == "qlora" and run["meta"]["config"]["adapter"]["quantize"] == "nf4"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--corpus", "code"], "the finetune stage takes no --corpus; it takes --model, --data, --task"),
        (
            ["--objective", "val_bpb"],
            "the finetune stage produces it; its evaluations give val_loss, val_ppl",
        ),
        (
            ["--param", "model.n_layer=choice:1,2"],
            "'model.n_layer' cannot be set: the model's shape comes from",
        ),
    ],
)
def test_bad_finetune_input_starts_no_trial(ft, base_workspace, args, message):
    data = base_workspace / "task.jsonl"
    result = ft("tune", "--study", "ft-bad", "--stage", "finetune", "--model", "base", "--data", data,
                "--param", "train.lr=log:1e-4..1e-3", *args)  # fmt: skip
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert Workspace(base_workspace).registry().study("ft-bad") is None
