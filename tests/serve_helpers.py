"""A workspace to serve, built once per test session, and a server running on a loopback port.

The workspace holds two runs:
  tiny-base   a real 20-step pretrain (stdlib code corpus, 512-token BPE tokenizer) with its
              events.jsonl and checkpoints at steps 10, 15 and 20; step 20 carries an eval row
  tiny-chat   tiny_checkpoints' byte-level chat model (answers "hi" and the add-function request
              greedily), registered as a finetune of tiny-base's best checkpoint so the page has a
              lineage to draw
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from pretrain_helpers import TINY, build_template, one_thread
from tiny_checkpoints import byte_tokenizer_file, write_run_checkpoint

from llmctl.cli.main import main
from llmctl.config import GenerationConfig, ModelConfig
from llmctl.serve.app import ServeSettings, bind_socket, create_app
from llmctl.serve.transport import server_config
from llmctl.tokenizer import load_tokenizer_file
from llmctl.workspace import Workspace

BASE_RUN = "tiny-base"
CHAT_RUN = "tiny-chat"
PRETRAIN = [
    "pretrain",
    "--corpus",
    "code",
    "--tokenizer",
    "tok",
    "--preset",
    "cpu-debug",
    "--run-name",
    BASE_RUN,
    "--max-steps",
    "20",
    *TINY,
    "--set",
    "model.context_length=64",
    "--set",
    "train.log_every=1",
    "--set",
    "train.eval_every=5",
    "--set",
    "train.save_every=5",
]


@functools.cache
def served_workspace() -> Path:
    root = Path(tempfile.mkdtemp(prefix="llmctl-serve-"))
    atexit.register(shutil.rmtree, root, True)
    build_template(root)
    with one_thread():
        assert main(["--workspace", str(root), *PRETRAIN]) == 0
    registry = Workspace(root).registry()
    base = registry.checkpoint_at(BASE_RUN, 20)
    registry.add_eval(base["id"], "perplexity", {"val_loss": base["meta"].get("val_loss"), "windows": 8})
    chat_checkpoint = write_run_checkpoint(root, CHAT_RUN, step=150, val_loss=0.05)
    registry.add_run(CHAT_RUN, "finetune", root / "runs" / CHAT_RUN, base_checkpoint=base["id"])
    registry.add_checkpoint(CHAT_RUN, 150, "full", chat_checkpoint, {"val_loss": 0.05})
    return root


ENDLESS_RUN = "endless"
# Random weights with the end-of-text logit at 0 while the likeliest of 261 random logits is positive:
# it never stops on its own, and is big enough that a thousand tokens take seconds on a CPU.
ENDLESS = ModelConfig(
    n_layer=4, n_head=4, d_model=256, context_length=1024, vocab_size=262, init_std=0.5, tie_embeddings=False
)


def endless_workspace(root: Path) -> Path:
    """A workspace holding run 'endless': a model that never stops, with a context of 1024 tokens."""
    tokenizer = load_tokenizer_file(byte_tokenizer_file(root / "byte-tokenizer").parent)

    def silence_end_of_text(model) -> None:
        model.lm_head.weight[tokenizer.eot_id] = 0

    write_run_checkpoint(
        root,
        ENDLESS_RUN,
        model_config=ENDLESS,
        generation=GenerationConfig(temperature=0, max_new_tokens=1000),
        edit=silence_end_of_text,
    )
    return root


@contextlib.contextmanager
def running_server(settings: ServeSettings) -> Iterator[str]:
    """The app for `settings` served by uvicorn in a background thread; yields its base URL."""
    sock = bind_socket("127.0.0.1", 0)
    app = create_app(settings)
    server = uvicorn.Server(server_config(app, settings.connections))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
