"""`llmctl export --format gguf`: the file runs in llama.cpp itself (the server xllamacpp ships) with
llmctl's token ids, greedy tokens, log-probabilities, chat rendering and stops; loads in
transformers with the source's logits; quantized files keep perplexity; the Modelfile renders
llmctl's chat format in Go's template language; every refusal leaves nothing at the path."""

from __future__ import annotations

import json
import math

import pytest
import torch
from finetune_helpers import QUICK, task_records, write_jsonl
from gguf_helpers import (
    HELD_OUT_REPLY,
    HELD_OUT_REQUEST,
    gguf_fields,
    gguf_tensor_types,
    go_render,
    replace_with_sentencepiece_style_tokenizer,
    save_llama3_style_dir,
)
from hf_helpers import save_llama_dir
from tiny_checkpoints import MODEL, write_run_checkpoint

from llmctl.chat import ChatSession
from llmctl.checkpoint.load import load_model
from llmctl.config import GenerationConfig, ModelConfig
from llmctl.export.gguf import export_gguf
from llmctl.export.gguf_verify import TOKEN_PROBES
from llmctl.export.llamacpp import LlamaCpp
from llmctl.export.modelfile import OLLAMA_CHAT_TEMPLATE
from llmctl.generate import Engine, load_engine
from llmctl.workspace import Workspace

pytest.importorskip("gguf")
pytest.importorskip("xllamacpp")
pytestmark = pytest.mark.usefixtures("single_thread")

CODE_PROMPTS = ["def add(a, b):\n", "<|user|>\nhi<|end|>\n<|assistant|>\n", "class Point:\n    def"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def _greedy(engine: Engine, ids: list[int], n: int) -> list[int]:
    return engine.generate([ids], GenerationConfig(temperature=0.0, max_new_tokens=n))[0].token_ids


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0, :-1].double(), dim=-1)


def _logprob_diff(llama: LlamaCpp, model, context: list[int], ids: list[int]) -> float:
    """Largest |Δ log-probability| over the vocabulary at each position of `ids` after `context`
    (`ids` free of end-of-generation tokens, which llama.cpp cannot be made to read past)."""
    theirs = llama.logprobs(context, ids, model.cfg.vocab_size)
    return (theirs - _logprobs(model, context + ids)[len(context) - 1 :]).abs().max().item()


def _export(cli, *args: object) -> dict:
    result = cli("export", "--format", "gguf", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return result.json()


def test_the_chat_model_runs_in_llamacpp_as_in_llmctl(cli, workspace_dir, tmp_path):
    write_run_checkpoint(workspace_dir, "chat")
    document = _export(cli, "--model", "chat", "--quant", "f32", "--out", tmp_path / "chat.gguf")
    check = document["verification"]
    assert (
        check["ok"]
        and check["max_logprob_diff"] < 1e-4
        and check["greedy_tokens"] > 0
        and check["chat_checked"]
    )
    assert document["architecture"] == "llama" and document["pre_tokenizer"] == "gpt-2"

    fields = gguf_fields(tmp_path / "chat.gguf")
    assert fields["general.architecture"] == "llama" and fields["llmctl.version"]
    assert (fields["llama.block_count"], fields["llama.attention.head_count"]) == (
        MODEL.n_layer,
        MODEL.n_head,
    )
    assert fields["llama.context_length"] == MODEL.context_length
    # 262 tokens and rows: the 58 rows llmctl pads its vocabulary to 320 with are gone
    assert len(fields["tokenizer.ggml.tokens"]) == fields["llama.vocab_size"] == 262
    assert fields["tokenizer.ggml.token_type"][:6] == [3] * 6 and fields["tokenizer.ggml.token_type"][6] == 1
    assert (fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.eot_token_id"]) == (0, 5)
    assert fields["tokenizer.ggml.add_bos_token"] is False

    loaded = load_model(Workspace(workspace_dir), "chat")
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = Engine(model, tokenizer, stop_token_ids=[])
    with LlamaCpp(tmp_path / "chat.gguf", MODEL.context_length) as llama:
        rendered = tokenizer.render_chat(CHAT)
        for text in [*TOKEN_PROBES, "<|endoftext|><|pad|><|user|>x<|end|>", rendered, "  \n\n\t\t   "]:
            assert llama.tokenize(text) == tokenizer.encode(text)
        for prompt in CODE_PROMPTS:
            ids = tokenizer.encode(prompt)
            assert (
                llama.greedy(ids, 40).tokens == _greedy(engine, ids, 40)[: len(llama.greedy(ids, 40).tokens)]
            )
        assert _logprob_diff(llama, model, tokenizer.encode(rendered), tokenizer.encode("Hello! Ask")) < 1e-4

        # llama.cpp's own chat template handling, against llmctl chat itself
        assert llama.render_chat(CHAT) == rendered
        session = ChatSession(
            load_engine(Workspace(workspace_dir), "chat", "cpu", "fp32"), loaded.config.generation, None
        )
        session.system = "Be brief."
        prompt_ids, _ = session.build_prompt("hi")
        reply = session.send("hi")
        text = "".join(reply)
        theirs = llama.chat(CHAT, 60)
        assert text == theirs.text == "Hello! Ask me about code."
        assert reply.completion.stop == "<|end|>" and theirs.finish_reason == "stop"
        assert theirs.prompt_tokens == len(prompt_ids)
        # the checkpoint's sampling defaults are the file's, and llama.cpp uses them
        defaults = llama.sampling_defaults()
        assert (defaults["temperature"], defaults["top_k"], defaults["repeat_penalty"]) == (0.0, 0, 1.0)


@pytest.mark.parametrize(
    ("quant", "tolerance", "matrix_type"), [("f16", 5e-2, "F16"), ("bf16", 5e-1, "BF16")]
)
def test_half_precision_files_agree_within_a_looser_tolerance(
    workspace_dir, tmp_path, quant, tolerance, matrix_type
):
    write_run_checkpoint(workspace_dir, "chat")
    result = export_gguf(Workspace(workspace_dir), "chat", tmp_path / f"chat-{quant}.gguf", quant=quant)
    assert result.verification.ok and result.verification.max_logprob_diff < tolerance
    assert result.verification.tolerance == tolerance
    types = gguf_tensor_types(result.path)
    assert types["blk.0.attn_q.weight"] == matrix_type and types["blk.0.attn_norm.weight"] == "F32"

    loaded = load_model(Workspace(workspace_dir), "chat")
    ids = loaded.tokenizer.encode(loaded.tokenizer.render_chat([{"role": "user", "content": "hi"}]))
    with LlamaCpp(result.path, MODEL.context_length) as llama:
        theirs = llama.greedy(ids, 40)
        assert theirs.stopped and theirs.tokens[-1] == 5  # <|end|>, as llmctl chat
        assert loaded.tokenizer.decode(theirs.tokens[:-1]) == "Hello! Ask me about code."


def test_q8_0_keeps_perplexity_within_one_percent_of_f32(workspace_dir, tmp_path, capsys):
    write_run_checkpoint(workspace_dir, "chat")
    loaded = load_model(Workspace(workspace_dir), "chat")
    context, ids = loaded.tokenizer.encode(HELD_OUT_REQUEST), loaded.tokenizer.encode(HELD_OUT_REPLY)
    perplexity = {}
    for quant in ("f32", "q8_0", "q4_0"):
        result = export_gguf(Workspace(workspace_dir), "chat", tmp_path / f"chat-{quant}.gguf", quant=quant)
        assert result.verification.ok, result.verification.problems
        with LlamaCpp(result.path, MODEL.context_length) as llama:
            perplexity[quant] = math.exp(-llama.score(context, ids).mean().item())
    types = gguf_tensor_types(tmp_path / "chat-q4_0.gguf")
    assert types["blk.0.ffn_up.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    with capsys.disabled():
        rises = {quant: f"{perplexity[quant] / perplexity['f32'] - 1:+.3%}" for quant in ("q8_0", "q4_0")}
        print(f"\nheld-out perplexity in llama.cpp: {perplexity} (against f32: {rises})")
    assert abs(perplexity["q8_0"] / perplexity["f32"] - 1) < 0.01
    assert perplexity["q4_0"] / perplexity["f32"] - 1 < 0.25


def test_an_imported_llama_with_grouped_query_attention_and_bos(workspace_dir, tmp_path):
    save_llama_dir(tmp_path / "llama", tie=False)  # 4 query heads, 2 key/value heads, untied head
    result = export_gguf(
        Workspace(workspace_dir), str(tmp_path / "llama"), tmp_path / "llama.gguf", quant="f32"
    )
    assert result.verification.ok and result.verification.max_logprob_diff < 1e-4
    fields = gguf_fields(result.path)
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is True and "output.weight" in gguf_tensor_types(
        result.path
    )

    loaded = load_model(Workspace(workspace_dir), str(tmp_path / "llama"))
    engine = Engine(loaded.model, loaded.tokenizer, stop_token_ids=[])
    with LlamaCpp(result.path, 128) as llama:
        for prompt in ("def add(a, b):", "for item in items:\n"):
            ids = loaded.tokenizer.encode_prompt(prompt)
            assert llama.tokenize(prompt, add_special=True) == ids and ids[0] == 1  # <s> opens it
            theirs = llama.greedy(ids, 24).tokens
            assert theirs == _greedy(engine, ids, 24)[: len(theirs)]


def test_transformers_loads_the_file_with_the_source_logits(workspace_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_llama_dir(tmp_path / "llama", tie=False)
    write_run_checkpoint(workspace_dir, "chat")
    for ref, name in ((str(tmp_path / "llama"), "llama.gguf"), ("chat", "chat.gguf")):
        export_gguf(Workspace(workspace_dir), ref, tmp_path / name, quant="f32", verify=False)
        ours = load_model(Workspace(workspace_dir), ref)
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=name, dtype=torch.float32).eval()
        their_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=name)
        text = "def add(a, b):\n    return a + b  # ünïcode"
        assert their_tokenizer(text, add_special_tokens=False).input_ids == ours.tokenizer.encode(text)
        ids = torch.tensor([ours.tokenizer.encode_prompt(text)])
        with torch.no_grad():
            assert (theirs(ids).logits - ours.model(ids)).abs().max().item() < 1e-4


def test_a_llama3_style_tokenizer_goes_in_as_llama_bpe(workspace_dir, tmp_path):
    save_llama3_style_dir(tmp_path / "llama3")
    result = export_gguf(
        Workspace(workspace_dir), str(tmp_path / "llama3"), tmp_path / "l3.gguf", quant="f32"
    )
    assert result.pre_tokenizer == "llama-bpe" and result.verification.ok
    tokenizer = load_model(Workspace(workspace_dir), str(tmp_path / "llama3")).tokenizer
    with LlamaCpp(result.path, 128) as llama:
        for text in ("IT'S THE CAT'S 12345 toys", "x = 1234567\n\n\n  y", "naïve 日本 🐍"):
            assert llama.tokenize(text) == tokenizer.encode(text)


@pytest.mark.parametrize(
    "shape",
    [
        {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True},
        {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "tie_embeddings": False},
        {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
        {"n_kv_head": 2, "bias": True, "tie_embeddings": False},
    ],
    ids=["gpt2", "gpt2-untied", "rope-linear", "rope-llama3", "gqa-bias"],
)
def test_other_shapes_match_in_llamacpp(workspace_dir, tmp_path, shape):
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64, context_length=64, vocab_size=262, **shape)
    # random weights are too flat for greedy paths to mean much; widen the matrices
    widen = lambda model: [p.mul_(4) for p in model.parameters() if p.ndim > 1]  # noqa: E731
    write_run_checkpoint(workspace_dir, "m", model_config=cfg, edit=widen)
    result = export_gguf(Workspace(workspace_dir), "m", tmp_path / "m.gguf", quant="f32")
    gpt2 = shape.get("position") == "learned"
    assert result.architecture == ("gpt2" if gpt2 else "llama") and result.verification.ok
    # llama.cpp's CPU GELU reads an f16 table: its gpt2 architecture agrees to about 1e-3 only
    tolerance = 1e-2 if gpt2 else 1e-4
    loaded = load_model(Workspace(workspace_dir), "m")
    ids = loaded.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    with LlamaCpp(result.path, 64) as llama:
        assert _logprob_diff(llama, loaded.model, ids[:1], ids[1:]) < tolerance


def test_an_adapter_is_merged_into_its_base_first(cli, workspace_dir, tmp_path):
    write_run_checkpoint(workspace_dir, "chat")
    data = write_jsonl(tmp_path / "task.jsonl", task_records())
    tuned = cli(
        "finetune",
        "--lora",
        "--model",
        "chat",
        "--data",
        data,
        "--run",
        "lora",
        *QUICK,
        "--set",
        "train.lr=5e-2",
        "--max-steps",
        "3",
    )
    assert tuned.exit_code == 0, tuned.stderr
    assert _export(cli, "--model", "lora", "--quant", "f32", "--out", tmp_path / "lora.gguf")["verification"][
        "ok"
    ]
    base, merged = load_model(Workspace(workspace_dir), "chat"), load_model(Workspace(workspace_dir), "lora")
    context, ids = base.tokenizer.encode(CODE_PROMPTS[1]), base.tokenizer.encode("Hello! Ask me")
    with LlamaCpp(tmp_path / "lora.gguf", MODEL.context_length) as llama:
        assert _logprob_diff(llama, merged.model, context, ids) < 1e-4
        assert _logprob_diff(llama, base.model, context, ids) > 1e-2  # the adapter moved it


def test_the_modelfile_renders_llmctl_chat_format_in_go(cli, workspace_dir, tmp_path):
    write_run_checkpoint(
        workspace_dir, "chat", generation=GenerationConfig(temperature=0.7, top_p=0.9, max_new_tokens=99)
    )
    document = _export(
        cli, "-m", "chat", "-f", "gguf", "--quant", "q8_0", "-o", tmp_path / "chat.gguf", "--modelfile"
    )
    assert document["modelfile"] == str(tmp_path / "Modelfile")
    lines = (tmp_path / "Modelfile").read_text().splitlines()
    assert "FROM ./chat.gguf" in lines
    stops = [line.removeprefix("PARAMETER stop ") for line in lines if line.startswith("PARAMETER stop ")]
    assert stops == ['"<|endoftext|>"', '"<|system|>"', '"<|user|>"', '"<|assistant|>"', '"<|end|>"']
    for parameter in (
        "temperature 0.7",
        "top_p 0.9",
        "top_k 0",
        "repeat_penalty 1.0",
        "num_predict 99",
        "num_ctx 256",
    ):
        assert f"PARAMETER {parameter}" in lines
    text = (tmp_path / "Modelfile").read_text()
    assert f'TEMPLATE """{OLLAMA_CHAT_TEMPLATE}"""' in text

    messages = [*CHAT, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "and?"}]
    rendered = go_render(OLLAMA_CHAT_TEMPLATE, messages, tmp_path)
    if rendered is None:
        pytest.skip("no Go toolchain to run Ollama's template language (apt-get install golang-go)")
    assert rendered == load_model(Workspace(workspace_dir), "chat").tokenizer.render_chat(messages)


# ---------------------------------------------------------------- refusals: one line, nothing written


def _refused(cli, path, *args: object, code: int = 2) -> str:
    result = cli("export", "--format", "gguf", "--out", path, *args)
    assert result.exit_code == code, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_bad_input_is_refused_and_leaves_nothing(cli, workspace_dir, tmp_path):
    write_run_checkpoint(workspace_dir, "chat")
    target = tmp_path / "out" / "chat.gguf"
    assert "--quant q4_k is not supported" in _refused(cli, target, "-m", "chat", "--quant", "q4_k")
    assert "unknown --quant 'int3'" in _refused(cli, target, "-m", "chat", "--quant", "int3")
    assert (
        "apply to --format gguf only"
        in cli("export", "-m", "chat", "-o", tmp_path / "hf", "--quant", "f16").stderr
    )

    odd = ModelConfig(n_layer=1, n_head=4, d_model=64, context_length=64, vocab_size=262, norm="layernorm")
    write_run_checkpoint(workspace_dir, "odd", model_config=odd)
    stderr = _refused(cli, target, "-m", "odd")
    assert "no llama.cpp architecture" in stderr and "norm: layernorm" in stderr

    save_llama_dir(tmp_path / "spm")
    replace_with_sentencepiece_style_tokenizer(tmp_path / "spm")
    stderr = _refused(cli, target, "-m", tmp_path / "spm")
    assert "cannot represent this tokenizer" in stderr and "byte fallback" in stderr
    assert not target.parent.exists() or list(target.parent.iterdir()) == []


def test_an_existing_path_is_replaced_only_when_llmctl_wrote_it(cli, workspace_dir, tmp_path):
    write_run_checkpoint(workspace_dir, "chat")
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"GGUF but not from llmctl")
    assert "pass --overwrite" in _refused(cli, mine, "-m", "chat")
    assert "not a GGUF file llmctl wrote" in _refused(cli, mine, "-m", "chat", "--overwrite")
    assert mine.read_bytes() == b"GGUF but not from llmctl"
    (tmp_path / "folder.gguf").mkdir()
    assert "is not a file" in _refused(cli, tmp_path / "folder.gguf", "-m", "chat", "--overwrite")

    ours = tmp_path / "chat.gguf"
    _export(cli, "-m", "chat", "--quant", "q8_0", "-o", ours, "--no-verify", "--modelfile")
    assert "pass --overwrite" in _refused(cli, ours, "-m", "chat")
    (tmp_path / "Modelfile").write_text("FROM somebody-else\n")
    assert "not a Modelfile llmctl wrote" in _refused(cli, ours, "-m", "chat", "--overwrite", "--modelfile")
    document = _export(cli, "-m", "chat", "--quant", "f32", "-o", ours, "--overwrite")
    assert document["quant"] == "f32" and gguf_fields(ours)["general.file_type"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "Modelfile",
        "chat.gguf",
        "folder.gguf",
        "mine.gguf",
        "workspace",
    ]


def test_a_failed_check_leaves_no_file(cli, workspace_dir, tmp_path, monkeypatch):
    from llmctl.export import gguf_model

    write_run_checkpoint(workspace_dir, "chat")
    # the rotary layout left as llmctl's: llama.cpp then pairs the wrong dimensions
    monkeypatch.setattr(gguf_model, "interleave_rope_rows", lambda weight, heads: weight)
    stderr = _refused(cli, tmp_path / "chat.gguf", "-m", "chat", "--quant", "f32", code=1)
    assert "check in llama.cpp failed" in stderr and "log-probabilities differ" in stderr
    assert list(tmp_path.iterdir()) == [workspace_dir]

    skipped = _export(cli, "-m", "chat", "-o", tmp_path / "chat.gguf", "--no-verify")
    assert skipped["verification"] is None and skipped["skipped_verification"] == "--no-verify"


def test_without_xllamacpp_the_check_is_skipped_and_said(cli, workspace_dir, tmp_path, monkeypatch):
    from llmctl.export import gguf

    write_run_checkpoint(workspace_dir, "chat")
    monkeypatch.setattr(gguf, "llamacpp_available", lambda: False)
    result = cli("export", "-m", "chat", "--format", "gguf", "-o", tmp_path / "chat.gguf")
    assert result.exit_code == 0, result.stderr
    assert "check in llama.cpp skipped: xllamacpp is not installed" in result.stderr
    assert json.loads(json.dumps(gguf_fields(tmp_path / "chat.gguf")["general.file_type"])) == 1  # f16
