"""A model's weights converted for decoding: fp32, bf16, or int8 weight-only linear layers.

Decoding one token reads every weight once, so on a CPU a token costs about what reading the
weights costs. bf16 halves those bytes and int8 quarters them (for the linear layers, which hold
nearly all of a model's weights): the two ways to decode faster with the same model.

int8 is weight-only and per output channel: each row of a weight matrix is stored as int8 with
one scale (its largest magnitude / 127), and the activations stay in floating point. The
multiplication is torch's own kernel for that layout (`torch._weight_int8pack_mm`, which
torchao's int8 weight-only layout calls on a CPU), fed bf16 activations: its fast path. The
embedding, the norms, attention and the KV cache stay in the compute dtype (fp32 on a CPU); the
output head is quantized like the other linear layers (a copy of its own when it is tied to the
embedding, which stays as it was).
"""

from __future__ import annotations

import torch
from torch import nn

from llmctl.errors import UsageError

DECODE_DTYPES = ("fp32", "bf16", "fp16", "int8")
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INT8_KERNEL_DTYPE = torch.bfloat16  # the activations' dtype for the int8 kernel (its fast path)


def int8_kernel_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W as int8 rows times one scale each, computed by torch's int8 kernel."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # int8 [out, in]
        self.register_buffer("scales", scales)  # [out], in the kernel's dtype
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | None = None) -> Int8Linear:
        weight = linear.weight.detach().to(device=device, dtype=torch.float32)
        # an all-zero row gets scale 1, so it quantizes to zeros instead of dividing by zero
        absmax = weight.abs().amax(dim=1)
        # rounded to the kernel's dtype first, and the weights divided by the rounded scale, so each
        # weight is within half a step of the value the kernel multiplies by
        scales = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)).to(INT8_KERNEL_DTYPE)
        quantized = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().to(device=device).clone()
        return cls(quantized.contiguous(), scales, bias)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in fp32 (for checks and tests)."""
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(INT8_KERNEL_DTYPE)
        scales = self.scales if self.scales.dtype == INT8_KERNEL_DTYPE else self.scales.to(INT8_KERNEL_DTYPE)
        y = torch._weight_int8pack_mm(rows, self.weight, scales)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def quantize_linear_layers(model: nn.Module, device: torch.device | None = None) -> int:
    """Replace every nn.Linear in `model` with an Int8Linear, in place; returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, Int8Linear.from_linear(child, device))
                replaced += 1
    return replaced


def resolve_decode_dtype(requested: str, device: torch.device) -> str:
    """What `--dtype` asks for, with `auto` decided for `device`: the fastest dtype that keeps the
    model's accuracy (docs/benchmarks.md measures both). On a CPU that is int8 weights (a quarter
    of fp32's bytes to read per token); on a GPU bf16 (fp16 on GPUs without bf16)."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "int8" if device.type == "cpu" and int8_kernel_available() else "fp32"
    if requested not in DECODE_DTYPES:
        raise UsageError(f"unknown dtype '{requested}' (--dtype): use auto, {', '.join(DECODE_DTYPES)}")
    if requested == "int8" and not int8_kernel_available():
        raise UsageError(
            f"--dtype int8 needs torch's int8 weight-only kernel, which torch {torch.__version__} lacks"
        )
    return requested


def dtype_name(model: nn.Module) -> str:
    """The decode dtype `model` holds its weights in."""
    if any(isinstance(module, Int8Linear) for module in model.modules()):
        return "int8"
    dtype = next(model.parameters()).dtype
    return next((name for name, value in FLOAT_DTYPES.items() if value == dtype), str(dtype))


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The floating-point dtype activations, norms and the KV cache use for decode dtype `name`."""
    if name == "int8":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return FLOAT_DTYPES[name]


def convert_for_decoding(model: nn.Module, name: str, device: torch.device) -> nn.Module:
    """`model` on `device` with its weights in decode dtype `name` (once, at load time)."""
    model = model.to(device=device, dtype=compute_dtype(name, device))
    if name == "int8":
        with torch.no_grad():
            quantize_linear_layers(model, device)
    return model.eval()
