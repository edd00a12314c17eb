"""Where a network runs, one rule for every face: CUDA, then MPS, then the CPU (`--device` overrides), and what
kind of CPU this is, which decides the fast form of some layers and whether bf16 pays (precision.py)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .errors import UserError

# how a user says "the default": the CLI's --device default, the library's device=None
AUTO = "auto"


def has_accelerator() -> bool:
    """A CUDA, XPU or MPS device that accelerate (the training engine) would pick."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu is not None and xpu.is_available())


def default_device() -> torch.device:
    """Where training runs and so where every face runs a network by default: CUDA, then MPS, then the CPU (and an
    Intel XPU, which accelerate would train on too)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    xpu = getattr(torch, "xpu", None)
    return torch.device("xpu" if xpu is not None and xpu.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """torch.device for "auto" / None (default_device) or a name such as cpu, cuda, cuda:1, mps; one clear
    error for a device this machine does not have."""
    if device is None or device == AUTO:
        return default_device()
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: choose from auto, cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available here; use --device cpu or auto")
    return dev


# what an allocator raises when a tensor does not fit: CUDA's (and XPU's) OutOfMemoryError; the CPU's, MPS's and a CUDA
# library's own allocation a RuntimeError with one of these phrases
_NO_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "MPS backend out of memory", "CUDA error: out of memory")


def out_of_memory(e: BaseException) -> bool:
    """Whether e says the device had no memory for a tensor (a chunk or a batch too large for it)."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and any(p in str(e) for p in _NO_MEMORY))


def release_cached_memory(device: torch.device) -> None:
    """Hand the caching allocator's free blocks back (after an allocation failed), so a smaller retry finds them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def onednn_isa_allows_bf16() -> bool:
    """Whether ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA) leaves oneDNN its bf16 instructions:
    capping it at AVX2 (with ATEN_CPU_CAPABILITY=avx2) makes an AVX-512 machine behave like an AVX2 one."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return cap == "ALL" or any(word in cap for word in ("BF16", "AMX", "AVX10", "FP16"))


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16; AMX tiles come with it), and torch and oneDNN may use
    it (neither capped below it by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA). torch says so only privately; without
    that query, any AVX-512 CPU counts."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512") or not onednn_isa_allows_bf16():
        return False
    query = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(query()) if query is not None else True


def cpu_model() -> str:
    """The CPU's marketing name, for figures that must name their machine."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_kind() -> str:
    """The kind of CPU, as the docs' tables name it: "AVX-512-bf16", "AVX-512", "AVX2" (also an AVX-512 machine
    under the AVX2 caps), or torch's capability name (e.g. "DEFAULT" on ARM)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "AVX-512-bf16" if cpu_computes_bf16() else "AVX-512"
    return "AVX2" if capability == "AVX2" else capability


NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")  # there on Linux wherever NVIDIA's kernel driver is loaded


def unused_gpu(driver: Path | None = None) -> str | None:
    """A line for a machine with an NVIDIA GPU that this torch cannot use (a CPU build, or a CUDA build the driver is
    too old for), else None: training there runs on the CPU, 10-100x slower."""
    if torch.cuda.is_available() or not (driver or NVIDIA_DRIVER).exists():
        return None
    build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, which this driver does not run"
    return (f"note: this machine has an NVIDIA GPU, but torch {torch.__version__} ({build}) cannot use it, so this runs on the "
            "CPU: install a CUDA build of torch into .venv and run `make TORCH_PIN= demo` (README; docs/gpu.md)")


def describe_device(device: torch.device) -> str:
    """One line naming the device a figure or a run comes from: the GPU's name and memory, or describe_cpu()."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return describe_cpu() if device.type == "cpu" else f"{device.type}, torch {torch.__version__}"


def describe_cpu() -> str:
    """One line naming the CPU, its kind, the caps in force and the threads: printed beside every CPU figure."""
    caps = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)]
    return (f"{cpu_model()}, kind {cpu_kind()} (torch capability {torch.backends.cpu.get_cpu_capability()}"
            f"{'; ' + ' '.join(caps) if caps else ''}), {torch.get_num_threads()} threads, torch {torch.__version__}")
