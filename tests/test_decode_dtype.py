"""Decoding dtypes: int8 weight-only linear layers and bf16 weights, converted once at load, held
to stated tolerances against fp32, and chosen by `--dtype` (or `generation.dtype`) on every
command that generates or scores.

Tolerances, on the tiny chat model over the chats it was trained on: mean |Δ log-probability| at
most 0.1 nats per token, the same likeliest token at 95% of positions or more, bits per byte
within 1% of fp32's; on one layer, int8's error is within half a quantization step per weight.
"""

from __future__ import annotations

import copy
import io
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_checkpoints import CHATS, GREETING, write_run_checkpoint
from torch import nn

from llmctl.checkpoint.load import load_model
from llmctl.eval.perplexity import measure_perplexity
from llmctl.generate import load_engine
from llmctl.model.decode_dtype import Int8Linear, convert_for_decoding, quantize_linear_layers
from llmctl.tokenizer import render_chat
from llmctl.workspace import Workspace

pytestmark = pytest.mark.usefixtures("single_thread")
CHAT_PROMPT = "<|user|>\nhi<|end|>\n<|assistant|>\n"
CPU = torch.device("cpu")


@pytest.fixture
def run(workspace_dir: Path) -> str:
    write_run_checkpoint(workspace_dir, "tiny", step=100)
    return "tiny"


def chats_text() -> str:
    return "".join(render_chat(chat, add_generation_prompt=False) for chat in CHATS)


# ---------------------------------------------------------------- the int8 layer


def test_an_int8_layer_is_within_half_a_step_of_its_weights_and_computes_with_them():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero row must not divide by zero
        linear.weight[5, 7] = 4.0  # an outlier sets its row's scale
    layer = Int8Linear.from_linear(linear)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (40, 96)
    step = layer.scales.float()[:, None]
    error = (layer.dequantized() - linear.weight).abs()
    assert bool((error <= step * 0.51).all())  # half a step (the largest may round over 127 by 0.4%)
    assert bool((layer.dequantized()[3] == 0).all())
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        expected = x @ layer.dequantized().T + linear.bias
        got = layer(x)
        exact = linear(x)
    assert got.shape == (2, 5, 40) and got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=2e-2, atol=2e-2)  # the kernel takes bf16 activations
    assert (got - exact).norm() / exact.norm() < 2e-2


def test_quantizing_replaces_every_linear_layer_and_keeps_embeddings_and_norms(run, workspace_dir):
    model = load_model(Workspace(workspace_dir), run).model
    assert model.cfg.tie_embeddings
    embedding = model.embed_tokens.weight.detach().clone()
    int8 = convert_for_decoding(copy.deepcopy(model), "int8", CPU)
    linear_layers = [m for m in int8.modules() if isinstance(m, Int8Linear)]
    assert len(linear_layers) == 7 * model.cfg.n_layer + 1  # q k v o gate up down, and the head
    assert not any(type(m) is nn.Linear for m in int8.modules())
    assert int8.embed_tokens.weight.dtype == torch.float32 and torch.equal(
        int8.embed_tokens.weight, embedding
    )
    assert isinstance(int8.lm_head, Int8Linear)  # its own int8 copy of the tied matrix
    assert all(p.dtype == torch.float32 for n, p in int8.named_parameters() if "norm" in n)
    assert int8.new_kv_cache(1, 8).keys[0].dtype == torch.float32  # the compute dtype
    bf16 = convert_for_decoding(copy.deepcopy(model), "bf16", CPU)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.new_kv_cache(1, 8).keys[0].dtype == torch.bfloat16
    assert quantize_linear_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))) == 2


# ---------------------------------------------------------------- accuracy against fp32


def test_int8_and_bf16_log_probabilities_and_bits_per_byte_are_within_tolerance(run, workspace_dir):
    loaded = load_model(Workspace(workspace_dir), run)
    text = chats_text()
    ids = torch.tensor([loaded.tokenizer.encode(text)[: loaded.model.cfg.context_length]])
    models = {
        name: convert_for_decoding(copy.deepcopy(loaded.model), name, CPU)
        for name in ("fp32", "bf16", "int8")
    }
    with torch.inference_mode():
        reference = models["fp32"](ids).float().log_softmax(-1)
        bpb = {
            name: measure_perplexity(model, loaded.tokenizer, [text]).bits_per_byte
            for name, model in models.items()
        }
        for name in ("bf16", "int8"):
            log_probs = models[name](ids).float().log_softmax(-1)
            assert (log_probs - reference).abs().mean() <= 0.1, name
            assert (log_probs.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.95, name
            assert abs(bpb[name] - bpb["fp32"]) <= 0.01 * bpb["fp32"], (name, bpb)


# ---------------------------------------------------------------- every command that takes --dtype


@pytest.mark.parametrize(
    ("dtype", "reported"), [("fp32", "fp32"), ("bf16", "bf16"), ("int8", "int8"), ("auto", "int8")]
)
def test_sample_converts_to_the_dtype_asked_for(cli, run, dtype, reported):
    result = cli("sample", "-m", run, "-p", CHAT_PROMPT, "--stop", "<|end|>", "--dtype", dtype, "--json")
    assert result.exit_code == 0, result.stderr
    document = result.json()
    assert document["dtype"] == reported and document["generation"]["dtype"] == reported
    assert document["completions"][0]["text"] == GREETING


def test_the_checkpoint_generation_dtype_is_the_default_and_the_flag_overrides_it(cli, run, workspace_dir):
    config_file = workspace_dir / "runs" / run / "checkpoints" / "step-00000100" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["generation"]["dtype"] = "bf16"
    config_file.write_text(yaml.safe_dump(config))
    assert load_engine(Workspace(workspace_dir), run, "cpu").engine.dtype == "bf16"
    assert cli("sample", "-m", run, "-p", "x", "--json").json()["dtype"] == "bf16"
    assert cli("sample", "-m", run, "-p", "x", "--dtype", "fp32", "--json").json()["dtype"] == "fp32"
    assert cli("sample", "-m", run, "-p", "x", "--precision", "int8", "--json").json()["dtype"] == "int8"


def test_chat_answers_in_each_dtype(cli, run, monkeypatch):
    for dtype in ("bf16", "int8"):
        monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
        result = cli("chat", "-m", run, "--dtype", dtype)
        assert result.exit_code == 0, result.stderr
        assert GREETING in result.stdout


def test_perplexity_reports_bits_per_byte_in_each_dtype(cli, run, tmp_path):
    text = tmp_path / "chats.txt"
    text.write_text(chats_text(), encoding="utf-8")
    scored = {}
    for dtype in ("fp32", "bf16", "int8"):
        result = cli("eval", "perplexity", "-m", run, "-f", text, "--dtype", dtype, "--json")
        assert result.exit_code == 0, result.stderr
        scored[dtype] = result.json()
        assert scored[dtype]["dtype"] == dtype
    default = cli("eval", "perplexity", "-m", run, "-f", text, "--json").json()
    assert default["dtype"] == "fp32" and default["bits_per_byte"] == scored["fp32"]["bits_per_byte"]
    for dtype in ("bf16", "int8"):
        assert (
            abs(scored[dtype]["bits_per_byte"] - scored["fp32"]["bits_per_byte"])
            <= 0.01 * scored["fp32"]["bits_per_byte"]
        )


def test_eval_probes_and_humaneval_generate_in_the_dtype_asked_for(cli, run, tmp_path):
    probes = cli("eval", "probes", "-m", run, "--dtype", "bf16", "--json")
    assert probes.exit_code == 0, probes.stderr
    assert probes.json()["dtype"] == "bf16"
    flags = ("--limit", "1", "--n-samples", "1", "--max-new-tokens", "8", "--out", tmp_path / "he")
    humaneval = cli("eval", "humaneval", "-m", run, *flags, "--dtype", "int8", "--json")
    assert humaneval.exit_code == 0, humaneval.stderr
    assert humaneval.json()["generation"]["dtype"] == "int8"


def test_serve_loads_models_in_its_dtype(run, workspace_dir):
    httpx = pytest.importorskip("httpx")
    from serve_helpers import running_server

    from llmctl.serve.app import ServeSettings

    with running_server(ServeSettings(workspace_dir, dtype="bf16")) as url:
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": run, "messages": [{"role": "user", "content": "hi"}], "temperature": 0},
            timeout=60,
        )
        assert reply.json()["choices"][0]["message"]["content"] == GREETING
        assert httpx.get(f"{url}/api/models/{run}", timeout=30).json()["dtype"] == "bf16"


@pytest.mark.parametrize(
    "command",
    [
        ["sample", "-p", "x"],
        ["chat"],
        ["serve", "--port", "0"],
        ["eval", "probes"],
        ["eval", "perplexity", "-f", "x"],
    ],
)
def test_an_unknown_dtype_is_one_line_before_any_model_loads(cli, run, command):
    result = cli(*command, "-m", run, "--dtype", "fp8")
    assert result.exit_code == 2
    assert "unknown dtype 'fp8'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
