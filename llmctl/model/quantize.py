"""4-bit NF4 weights through bitsandbytes: the frozen base of QLoRA.

The base's linear layers become bitsandbytes `Linear4bit` (NF4, double quantization: the
per-block scales are themselves quantized); the output head stays in full precision (it is tied
to the embedding in most llmctl models, and small next to the rest). A QLoRA adapter is trained
against the dequantized NF4 weights, so merging one uses `fake_quantize`d weights, not the
originals. bitsandbytes is imported only inside these functions.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from llmctl.errors import LlmctlError
from llmctl.model.classifier import HEAD

UNQUANTIZED = ("lm_head", HEAD)  # linear layers QLoRA keeps in full precision
NF4_BLOCK = 64
# NF4 stores 4 bits per weight plus one absmax per 64-weight block; double quantization stores
# those absmaxes in 8 bits with an fp32 scale per 256 blocks (Dettmers et al., 2023, section 3)
NF4_BITS_PER_WEIGHT = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * 256)


def quiet_bitsandbytes_import() -> None:
    """On CPUs with AVX512-BF16, bitsandbytes logs at import (peft imports it too) that an optional
    faster kernel package is missing; the 4-bit layers work without it, so the warning would only
    alarm. Call before importing either."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def require_bitsandbytes(device: torch.device) -> None:
    """Check that 4-bit NF4 layers work on `device`, or fail naming what is missing."""
    quiet_bitsandbytes_import()
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # a broken install raises more than ImportError (missing libraries, CUDA setup)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise LlmctlError(
            f"qlora needs bitsandbytes, which cannot be loaded ({reason}); "
            "install it with: pip install 'bitsandbytes>=0.43', or use llmctl finetune --lora"
        ) from exc
    try:
        probe = bnb.nn.Linear4bit(
            NF4_BLOCK,
            NF4_BLOCK,
            bias=False,
            compute_dtype=torch.float32,
            compress_statistics=True,
            quant_type="nf4",
        )
        probe.to(device)(torch.zeros(1, NF4_BLOCK, device=device))
    except Exception as exc:  # the backend for this device is what fails here
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise LlmctlError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit layers on {device} "
            f"({reason}); "
            "install a bitsandbytes build for this device (bitsandbytes >= 0.45 for CPUs), "
            "or use llmctl finetune --lora"
        ) from exc


_SIXTEEN_BIT = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(device: torch.device, precision: str | None = None) -> torch.dtype:
    """What the 4-bit layers dequantize to for their matmuls: on a GPU the run's 16-bit precision
    (else bf16, fp16 on GPUs without it), fp32 on CPU. A QLoRA run in fp16 must compute in fp16:
    bf16 layers under an fp16 autocast would round twice, and fail on GPUs without bf16."""
    if device.type == "cuda":
        if precision in _SIXTEEN_BIT:
            return _SIXTEEN_BIT[precision]
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantizable(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in UNQUANTIZED


def nf4_layer(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device):
    quiet_bitsandbytes_import()
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    # A bf16 base on a CPU (fp32 compute) is quantized from its exact fp32 upcast, so each forward
    # dequantizes straight to fp32 rather than to bf16 and then copying; never cast down, which
    # would change the codes from those fake_quantize (merge) computes from the weights as they are
    if weight.element_size() < torch.empty((), dtype=dtype).element_size():
        weight = weight.to(dtype)
    layer.weight = bnb.nn.Params4bit(
        weight.contiguous(),
        requires_grad=False,
        compress_statistics=True,
        quant_type="nf4",
        blocksize=NF4_BLOCK,
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    # On CPUs with AVX512-BF16, an eval-mode forward without gradients would repack the weight in
    # place for a bf16 kernel: evaluation would then differ from training, and training after an
    # evaluation would run through that kernel, which passes no gradient to the layer's input.
    layer.support_avx512bf16_for_cpu = False
    return layer.to(device)  # moving the weight to a device is what quantizes it


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_model(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> int:
    """Replace the model's quantizable linear layers with NF4 Linear4bit ones computing in `dtype`
    (compute_dtype's default); returns how many."""
    dtype = dtype or compute_dtype(device)
    targets = [(name, module) for name, module in model.named_modules() if quantizable(name, module)]
    for name, module in targets:
        set_submodule(model, name, nf4_layer(module.weight.data, module.bias, dtype, device))
    model.is_loaded_in_4bit = True  # peft's signal to wrap these layers with its 4-bit LoRA layer
    return len(targets)


def fake_quantize(model: nn.Module) -> None:
    """Replace each quantizable weight by its NF4 round trip: the base a QLoRA adapter was trained on."""
    quiet_bitsandbytes_import()
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    with torch.no_grad():
        for name, module in model.named_modules():
            if quantizable(name, module):
                weight = module.weight.data
                packed, state = quantize_4bit(
                    weight.float().contiguous(),
                    blocksize=NF4_BLOCK,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                module.weight.data = dequantize_4bit(packed, state).to(weight.dtype).view_as(weight)


def count_quantized(model: nn.Module) -> tuple[int, int]:
    """(parameters QLoRA quantizes, parameters it keeps in full precision) of a plain (or meta) model."""
    quantized = kept = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if quantizable(name, module) and param is module.weight:
                quantized += param.numel()
            else:
                kept += param.numel()
    return quantized, kept
