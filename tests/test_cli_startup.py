"""Start-up is part of the interface: reporting commands must not load the training stack.

Each command runs in a fresh interpreter; afterwards no heavy library may be in sys.modules.
(Importing peft alone costs about 6 s here; torch about 1.5 s.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "peft", "bitsandbytes", "transformers", "datasets", "tokenizers", "pyarrow", "pandas")

PROBE = """
import contextlib, io, json, sys
from llmctl.cli.main import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
""".replace("HEAVY", repr(HEAVY))

LIGHT_COMMANDS = [
    ["--help"],
    ["presets", "list"],
    ["presets", "list", "--json"],
    ["config", "show", "--preset", "rtx4060-8g", "--set", "train.lr=1e-4"],
    ["config", "keys"],
    ["corpus", "list"],
    ["status"],
    ["status", "--json"],
]


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=" ".join)
def test_light_commands_do_not_import_the_training_stack(argv, workspace_dir):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    assert report["heavy"] == []


# `tune show` and `tune best` read a study's storage (made here with Optuna itself) without torch
TUNE_READERS = [
    ["tune", "show"],
    ["tune", "show", "sweep", "--plot", "{tmp}/sweep.png"],
    ["tune", "best", "sweep", "--write", "{tmp}/best.yaml"],
]


@pytest.fixture
def study_workspace(workspace_dir):
    import optuna

    from llmctl.tune.storage import open_storage

    workspace_dir.mkdir(parents=True)
    study = optuna.create_study(
        study_name="sweep", storage=open_storage(f"sqlite:///{workspace_dir}/studies.db")
    )
    question = {"stage": "pretrain", "objective": "val_loss", "direction": "minimize", "space": []}
    study.set_user_attr("question", question)
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    for number, (rate, value) in enumerate([(1e-3, 2.0), (3e-3, 1.5), (5e-4, 2.5), (2e-3, 1.7)]):
        trial = optuna.trial.create_trial(
            params={"train.lr": rate},
            distributions={"train.lr": lr},
            value=value,
            intermediate_values={10: value + 0.5, 20: value},
            user_attrs={"run": f"sweep-t{number:03d}"},
        )
        study.add_trial(trial)
    return workspace_dir


@pytest.mark.parametrize("argv", TUNE_READERS, ids=" ".join)
def test_tune_reports_do_not_import_the_training_stack(argv, study_workspace, tmp_path):
    argv = [part.format(tmp=tmp_path) for part in argv]
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    assert report["heavy"] == []
