"""Export a checkpoint as one GGUF file that llama.cpp (and Ollama, LM Studio, llamafile) runs as it is.

    FILE.gguf    the `llama` or `gpt2` architecture (llmctl.export.gguf_model), the weights in f32,
                 f16, bf16, q8_0 or q4_0, the tokenizer with its pre-tokenizer's name, special ids,
                 chat template and end-of-turn token (llmctl.export.gguf_vocab), the sampling defaults
    Modelfile    with --modelfile, beside it: for `ollama create` (llmctl.export.modelfile)

The file is written with the gguf package, llama.cpp's own Python writer, so no llama.cpp checkout
or conversion script is involved. An adapter is merged into its base first. The file is written
under a temporary name beside FILE and checked in llama.cpp itself (llmctl.export.gguf_verify,
through xllamacpp); only a file that passes is renamed to FILE. `--overwrite` replaces only a
GGUF file llmctl wrote (one carrying the `llmctl.version` key) and a Modelfile llmctl wrote.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from llmctl import __version__
from llmctl.checkpoint.load import load_model
from llmctl.config import GenerationConfig
from llmctl.errors import UsageError
from llmctl.export.gguf_model import add_hyperparameters, check_quant, gguf_architecture, gguf_tensors
from llmctl.export.gguf_verify import GGUFVerification, verify_gguf
from llmctl.export.gguf_vocab import GGUFVocab, gguf_vocab
from llmctl.export.hf import ExportCheckFailed
from llmctl.export.llamacpp import llamacpp_available
from llmctl.export.modelfile import MARKER, MODELFILE, check_modelfile_template, modelfile_text
from llmctl.model.transformer import Transformer
from llmctl.workspace import Workspace

DEFAULT_QUANT = "f16"
LLMCTL_KEY = "llmctl.version"


@dataclass
class GGUFExportResult:
    path: Path
    source: Path  # the checkpoint (or model directory) exported
    architecture: str  # llama.cpp's
    params: int
    quant: str
    size: int  # bytes
    tokens: int
    pre_tokenizer: str
    modelfile: Path | None
    verification: GGUFVerification | None
    skipped: str | None  # why the check in llama.cpp did not run


def export_gguf(
    workspace: Workspace,
    ref: str,
    out: Path,
    quant: str = DEFAULT_QUANT,
    verify: bool = True,
    overwrite: bool = False,
    modelfile: bool = False,
) -> GGUFExportResult:
    """Write the model `ref` names to the GGUF file `out`, checked in llama.cpp unless `verify` is
    False (or xllamacpp is not installed: `skipped` says so); with `modelfile`, an Ollama Modelfile
    beside it. Every refusal comes before anything is written."""
    quant = check_quant(quant)
    out = Path(out).expanduser().resolve()
    check_replaceable(out, overwrite)
    modelfile_path = out.parent / MODELFILE if modelfile else None
    if modelfile_path is not None:
        check_replaceable_modelfile(modelfile_path, overwrite)
    if importlib.util.find_spec("gguf") is None:
        raise UsageError("GGUF export needs the gguf package: pip install 'llmctl[gguf]'")
    skipped = None
    if not verify:
        skipped = "--no-verify"
    elif not llamacpp_available():
        skipped, verify = "xllamacpp is not installed (pip install 'llmctl[gguf]')", False

    loaded = load_model(workspace, ref)
    if not isinstance(loaded.model, Transformer):
        raise UsageError(f"'{ref}' is a classifier; export takes a language model checkpoint")
    model, tokenizer, cfg = loaded.model, loaded.tokenizer, loaded.config.model
    architecture = gguf_architecture(cfg)
    vocab = gguf_vocab(tokenizer, cfg)
    if modelfile_path is not None:
        check_modelfile_template(tokenizer)

    verification = None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        params = write_gguf(staging, model, vocab, architecture, quant, loaded.config.generation, out.stem)
        if verify:
            verification = verify_gguf(staging, model, tokenizer, quant, architecture)
            if not verification.ok:
                raise ExportCheckFailed(
                    f"check in llama.cpp failed, nothing written to '{out}': "
                    f"{'; '.join(verification.problems)} (--no-verify exports anyway)"
                )
        size = staging.stat().st_size
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    if modelfile_path is not None:
        text = modelfile_text(out.name, tokenizer, loaded.config.generation, cfg.context_length)
        _write_text_atomic(modelfile_path, text)
    return GGUFExportResult(
        path=out,
        source=loaded.path,
        architecture=architecture,
        params=params,
        quant=quant,
        size=size,
        tokens=len(vocab.tokens),
        pre_tokenizer=vocab.pre,
        modelfile=modelfile_path,
        verification=verification,
        skipped=skipped,
    )


# ---------------------------------------------------------------- the file


def write_gguf(
    path: Path,
    model: Transformer,
    vocab: GGUFVocab,
    architecture: str,
    quant: str,
    generation: GenerationConfig,
    name: str,
) -> int:
    """Write the file; returns the number of parameters in it."""
    import gguf

    writer = _gguf_writer(path, architecture)
    writer.add_name(name)
    writer.add_string(LLMCTL_KEY, __version__)
    add_hyperparameters(writer, model.cfg, architecture, quant)
    add_vocab(writer, vocab)
    add_sampling_defaults(writer, generation)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    params = 0
    for tensor in gguf_tensors(model, architecture, quant):
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=gguf.GGMLQuantizationType[tensor.gguf_type])
        params += tensor.elements
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return params


def add_vocab(writer, vocab: GGUFVocab) -> None:
    import gguf

    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    # a byte tokenizer has no merges, but llama.cpp requires the key
    writer.add_key_value(
        gguf.Keys.Tokenizer.MERGES, vocab.merges, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
    )
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.pad_id)
    if vocab.unk_id is not None:
        writer.add_unk_token_id(vocab.unk_id)
    if vocab.eot_id is not None:
        writer.add_eot_token_id(vocab.eot_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


def add_sampling_defaults(writer, generation: GenerationConfig) -> None:
    """The checkpoint's sampling defaults, which llama.cpp uses where a request sets none."""
    writer.add_sampling_temp(generation.temperature)
    writer.add_sampling_top_p(generation.top_p)
    writer.add_sampling_top_k(generation.top_k or 0)  # 0: no top-k, as llmctl's None
    writer.add_sampling_min_p(generation.min_p)
    writer.add_sampling_penalty_repeat(generation.repetition_penalty)
    writer.add_sampling_penalty_last_n(-1)  # llmctl's repetition penalty sees the whole sequence


def _gguf_writer(path: Path, architecture: str):
    """gguf's GGUFWriter, taught to write an empty array (which it refuses) for the empty merge
    list of a byte tokenizer."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
                header = self._pack("I", vtype) if add_vtype else b""
                return header + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer(path, architecture)


# ---------------------------------------------------------------- what may be replaced


def check_replaceable(path: Path, overwrite: bool) -> None:
    """An existing --out needs --overwrite, and even then only a GGUF file llmctl wrote is replaced."""
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise UsageError(f"'{path}' already exists; pass --overwrite to replace it")
    if path.is_dir() or not path.is_file():
        raise UsageError(f"'{path}' is not a file; --overwrite replaces only a GGUF file llmctl wrote")
    if not _written_by_llmctl(path):
        raise UsageError(f"'{path}' is not a GGUF file llmctl wrote; --overwrite replaces only those")


def check_replaceable_modelfile(path: Path, overwrite: bool) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise UsageError(f"'{path}' already exists; pass --overwrite to replace it")
    try:
        ours = path.is_file() and path.read_text(encoding="utf-8").startswith(MARKER)
    except (OSError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise UsageError(f"'{path}' is not a Modelfile llmctl wrote; --overwrite replaces only those")


def _written_by_llmctl(path: Path) -> bool:
    try:
        from gguf import GGUFReader

        return LLMCTL_KEY in GGUFReader(path, "r").fields
    except Exception:  # not GGUF at all (gguf raises ValueError, struct errors, ...)
        return False


def _write_text_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)
