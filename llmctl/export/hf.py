"""Export a checkpoint as a Hugging Face model directory that transformers loads as it is.

    DIR/config.json               LlamaForCausalLM (the Llama shape) or GPT2LMHeadModel (the GPT-2 shape)
    DIR/model.safetensors         transformers' tensor names, the vocabulary's padding rows cut off
    DIR/tokenizer.json            the checkpoint's own
    DIR/tokenizer_config.json     special tokens and the chat template, for AutoTokenizer
    DIR/generation_config.json    the checkpoint's sampling defaults and stop tokens

An adapter checkpoint is merged into its base first. The directory is built under a temporary
name and the round-trip check (llmctl.export.verify) runs there: only an export that passes is
renamed to DIR, so a failed check leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmctl import __version__
from llmctl.checkpoint.load import load_model
from llmctl.config import GenerationConfig, ModelConfig
from llmctl.errors import LlmctlError, UsageError
from llmctl.export.verify import Verification, transformers_available, verify_export
from llmctl.model import hf
from llmctl.model.transformer import Transformer
from llmctl.storage import atomic_dir, check_replaceable_dir, write_json_atomic
from llmctl.tokenizer import END_OF_TURN_TOKEN, HF_TOKENIZER_CONFIG, TOKENIZER_FILE, LoadedTokenizer
from llmctl.workspace import Workspace

FORMATS = ("hf",)
EXPORT_MARKER = ".llmctl-export"
WEIGHTS = "model.safetensors"


@dataclass
class ExportResult:
    directory: Path
    source: Path  # the checkpoint (or model directory) exported
    architecture: str
    params: int
    dtype: str
    files: dict[str, int]  # name -> bytes
    verification: Verification | None
    skipped: str | None  # why the round-trip check did not run


class ExportCheckFailed(LlmctlError):
    """transformers disagrees with llmctl about the exported model."""


def export_hf(
    workspace: Workspace, ref: str, out: Path, verify: bool = True, overwrite: bool = False
) -> ExportResult:
    """Write the model `ref` names to `out` as a transformers model directory, checked unless
    `verify` is False (or transformers is not installed: `skipped` says so)."""
    out = Path(out).expanduser().resolve()
    check_replaceable_dir(out, overwrite, EXPORT_MARKER, "an export", workspace.root)
    skipped = None
    if not verify:
        skipped = "--no-verify"
    elif not transformers_available():
        skipped, verify = "transformers is not installed (pip install transformers)", False

    loaded = load_model(workspace, ref)
    if not isinstance(loaded.model, Transformer):
        raise UsageError(f"'{ref}' is a classifier; export takes a language model checkpoint")
    model, tokenizer, cfg = loaded.model, loaded.tokenizer, loaded.config.model
    config, tensors = _hf_config_and_weights(model, cfg)
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    config |= {**_special_token_ids(tokenizer), "torch_dtype": dtype}

    verification = None
    with atomic_dir(out, overwrite=True) as staging:
        save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
        _write_json(staging / "config.json", config)
        shutil.copyfile(tokenizer.path, staging / TOKENIZER_FILE)
        _write_json(staging / HF_TOKENIZER_CONFIG, tokenizer_config(tokenizer, cfg.context_length))
        sampling = generation_config(loaded.config.generation, tokenizer)
        _write_json(staging / "generation_config.json", sampling)
        if verify:
            verification = verify_export(staging, model, tokenizer)
            if not verification.ok:
                problems = "; ".join(verification.problems)
                raise ExportCheckFailed(
                    f"round-trip check failed, nothing written to '{out}': {problems} "
                    "(--no-verify exports anyway)"
                )
        files = {path.name: path.stat().st_size for path in sorted(staging.iterdir())}
        # what lets a later --overwrite know this directory is an export it may replace
        write_json_atomic(
            staging / EXPORT_MARKER, {"llmctl_version": __version__, "source": str(loaded.path)}
        )
    return ExportResult(
        directory=out,
        source=loaded.path,
        architecture=config["architectures"][0],
        params=sum(tensor.numel() for tensor in tensors.values()),
        dtype=dtype,
        files=files,
        verification=verification,
        skipped=skipped,
    )


def _hf_config_and_weights(
    model: Transformer, cfg: ModelConfig
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the state dict under transformers' names, for whichever class fits the shape."""
    state_dict = model.state_dict()
    try:
        if cfg.position == "learned":
            config, tensors = hf.to_hf_gpt2_config(cfg), hf.to_hf_gpt2_state_dict(state_dict, cfg)
        else:
            config, tensors = hf.to_hf_llama_config(cfg), hf.to_hf_llama_state_dict(state_dict, cfg)
    except ValueError as exc:
        raise UsageError(f"this model has no transformers class to export to: {exc}") from exc
    # safetensors wants each tensor whole and alone (cut vocabulary rows are views of the padded ones)
    return config, {name: tensor.detach().contiguous().clone() for name, tensor in tensors.items()}


def _special_token_ids(tokenizer: LoadedTokenizer) -> dict[str, int]:
    bos = tokenizer.meta.get("bos_token")
    return {
        "bos_token_id": tokenizer.special_ids.get(bos, tokenizer.eot_id) if bos else tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": tokenizer.pad_id,
    }


def tokenizer_config(tokenizer: LoadedTokenizer, context_length: int) -> dict[str, Any]:
    """tokenizer_config.json for AutoTokenizer: the generic fast tokenizer over tokenizer.json (which
    adds no special tokens, as llmctl's encode adds none), its special tokens, the chat template.
    Documents in training follow an end-of-text token, so it serves as bos where none is named."""
    eot = tokenizer.meta["eot_token"]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.meta.get("bos_token") or eot,
        "eos_token": eot,
        "pad_token": tokenizer.meta["pad_token"],
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
    }
    if "<unk>" in tokenizer.special_ids:
        config["unk_token"] = "<unk>"
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    return config


def generation_config(generation: GenerationConfig, tokenizer: LoadedTokenizer) -> dict[str, Any]:
    """generation_config.json: greedy or sampling as the checkpoint's defaults say; a chat model
    also stops at the end of a turn."""
    stops = [tokenizer.eot_id]
    if tokenizer.chat_template is not None and END_OF_TURN_TOKEN in tokenizer.special_ids:
        stops.append(tokenizer.special_ids[END_OF_TURN_TOKEN])
    config: dict[str, Any] = {
        **_special_token_ids(tokenizer),
        "eos_token_id": stops if len(stops) > 1 else stops[0],
        "max_new_tokens": generation.max_new_tokens,
        "do_sample": generation.temperature > 0,
    }
    if generation.temperature > 0:
        # top_k 0 turns off transformers' own default of 50, which llmctl does not have
        config |= {
            "temperature": generation.temperature,
            "top_p": generation.top_p,
            "top_k": generation.top_k or 0,
        }
        if generation.min_p > 0:
            config["min_p"] = generation.min_p
    if generation.repetition_penalty != 1.0:
        config["repetition_penalty"] = generation.repetition_penalty
    return config


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
