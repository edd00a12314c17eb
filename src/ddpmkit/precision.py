"""Mixed precision, for training and sampling alike: which precision "auto" means on this machine, and a
network wrapper that computes in bf16/fp16 but hands back float32, so that the schedule and sampler
arithmetic around it stays in float32."""
from __future__ import annotations

import torch
from torch import nn

from .devices import cpu_computes_bf16
from .errors import UserError

# the one precision vocabulary, for training (train.mixed_precision), sampling (--precision) and pipeline weights (--dtype)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = (*DTYPES, "auto")
# other spellings people bring: accelerate's "no", torch's dtype names
ALIASES = {"no": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def canonical(setting: str) -> str:
    """fp32, bf16, fp16 or auto for any accepted spelling, or one clear error."""
    name = ALIASES.get(setting, setting)
    if name not in CHOICES:
        raise UserError(f"precision {setting!r}: choose from {list(CHOICES)} (also {sorted(ALIASES)})")
    return name


def dtype_of(setting: str | torch.dtype) -> torch.dtype:
    """The torch dtype of fp32, bf16 or fp16 (any accepted spelling; a dtype passes through)."""
    if isinstance(setting, torch.dtype):
        return setting
    name = canonical(setting)
    if name == "auto":
        raise UserError("weights need a definite precision: fp32, bf16 or fp16, not auto")
    return DTYPES[name]


def resolve_precision(setting: str) -> str:
    """"no", "bf16" or "fp16" (accelerate's words) for a setting that may be "auto": bf16 where the device computes
    it natively (CUDA GPUs from Ampere on, gpu_computes_bf16; CPUs with AVX-512 BF16, whose instructions and AMX tiles make it 1.4-2.5x faster for
    the demo UNet, bench/sampling_throughput.py), else "no": on an AVX2-only CPU bf16 is emulated and ~8x slower."""
    setting = canonical(setting)
    if setting != "auto":
        return "no" if setting == "fp32" else setting
    if torch.cuda.is_available():
        return "bf16" if gpu_computes_bf16(torch.cuda.get_device_capability(), bool(torch.version.hip)) else "no"
    return "bf16" if cpu_computes_bf16() else "no"


def gpu_computes_bf16(capability: tuple[int, int], rocm: bool = False) -> bool:
    """Whether a GPU computes bf16 natively: NVIDIA's from Ampere on (compute capability 8.0), AMD's under ROCm.
    torch.cuda.is_bf16_supported() also says yes for a T4 or V100 (7.x), which only emulates it, slower than fp32."""
    return rocm or tuple(capability) >= (8, 0)


__all__ = ["CHOICES", "DTYPES", "Autocast", "canonical", "cpu_computes_bf16", "dtype_of", "gpu_computes_bf16", "resolve_precision"]


class Autocast(nn.Module):
    """net under autocast to dtype (convolutions and matrix products in it; the rest float32), its output
    as float32. Autocast is entered inside forward because its state is per thread."""

    def __init__(self, net: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.net(x, *args, **kwargs).float()
