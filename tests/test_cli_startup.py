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
