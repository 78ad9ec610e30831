"""Where and how a run computes: the device, the number format (bf16 / fp16 / float32) and the
loader processes, chosen in one place for training, analysis, suites, inference and the notebooks.

``fit()`` prints one line saying which device and number format a run trains in, and why, so that
a user can tell a CPU-only torch wheel, a GPU that is not visible, or a CPU without bf16 units from
the first lines of the output:

>>> import torch
>>> describe_device_and_precision("auto", torch.device("cpu"), None, cpu_name="AMD EPYC", cuda_build=None)
'device cpu (AMD EPYC; this torch is a CPU-only build: see the README to install a CUDA one), precision float32 (amp=auto: this CPU has no AMX units, where bf16 is slower than float32)'
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from foodlib.config import ConfigError

if TYPE_CHECKING:  # annotations only
    from foodlib.config import Config

_UNSET = object()


def cpu_model_name() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device_and_precision(amp: str, device: torch.device, dtype: torch.dtype | None,
                                  cpu_name: str | None = None, cuda_build=_UNSET) -> str:
    """``device ... (what and why), precision ... (why)`` for a run.

    Args:
        amp: the config's ``amp`` setting (auto | bf16 | fp16 | off).
        device: the device the run trains on.
        dtype: the autocast dtype chosen for it (None: float32), see :func:`autocast_dtype`.
        cpu_name: the CPU's name (default: read from the machine).
        cuda_build: torch's CUDA version (default ``torch.version.cuda``; None for a CPU-only wheel).
    """
    cuda_build = torch.version.cuda if cuda_build is _UNSET else cuda_build
    precision = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        where = f"device {device} ({torch.cuda.get_device_name(index)}, CUDA {cuda_build})"
    else:
        if cuda_build is None:
            why_cpu = "this torch is a CPU-only build: see the README to install a CUDA one"
        elif torch.cuda.is_available():
            why_cpu = "device=cpu was asked for"
        else:
            why_cpu = f"torch is built for CUDA {cuda_build} but sees no GPU: no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides it"
        where = f"device {device.type} ({cpu_name or cpu_model_name()}; {why_cpu})"
    if amp == "off":
        why = "amp=off"
    elif amp in ("bf16", "fp16"):
        why = f"amp={amp} was asked for"
    elif device.type == "cuda":
        why = ("amp=auto: this GPU supports bf16" if dtype == torch.bfloat16
               else "amp=auto: this GPU has no bf16, so fp16 with a gradient scaler")
    elif dtype == torch.bfloat16:
        why = "amp=auto: this CPU has AMX units, where bf16 trains about 2x faster than float32"
    else:
        why = "amp=auto: this CPU has no AMX units, where bf16 is slower than float32"
    return f"{where}, precision {precision} ({why})"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA GPU is visible; use device='auto' or 'cpu'")
    return device


def loader_workers(cfg: Config, device: torch.device) -> int:
    """Loader processes: none on a CPU reading the cache (a memcpy per batch; processes would only
    take cores from the model), a few where decoding or GPU overlap needs them."""
    if cfg.train.workers is not None:
        return cfg.train.workers
    if device.type == "cpu" and cfg.data.cache:
        return 0
    return min(4, os.cpu_count() or 1)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX-bf16 units (Sapphire Rapids and later), where bf16 convolutions win."""
    capabilities = getattr(torch.cpu, "get_capabilities", lambda: {})()  # torch >= 2.5
    return bool(capabilities.get("amx_bf16"))


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware has it, fp16 (with a grad scaler) on older GPUs, None for float32.

    "auto" on a CPU means bf16 only with AMX units: there bf16 + channels_last trains ResNet-18
    1.7x and the small CNN 2.3x faster than float32 (benchmarks/RESULTS.md); without AMX bf16
    convolutions are slower than float32.
    """
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
