"""What machine we are on, and which compute dtype it can do.

QLoRA computes in 16-bit (bf16 in the paper). A T4 or V100 has no bf16, so there fp16 is used with fp32
adapters; a CPU computes in fp32. Asking for bf16 where it cannot run is an error that says what to use.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
import random
from dataclasses import dataclass

import torch

from .config import canonical_dtype


@dataclass(frozen=True)
class DeviceInfo:
    device: str               # "cuda" or "cpu"
    name: str                 # GPU model or CPU architecture
    bf16: bool                # can this device compute in bfloat16 at speed (compute capability 8.0+)?
    total_memory_gb: float | None

    def __str__(self) -> str:
        if self.device == "cuda":
            return (f"CUDA GPU: {self.name}, {self.total_memory_gb:.0f} GB, "
                    f"bf16 {'supported' if self.bf16 else 'NOT supported (use fp16)'}")
        return f"CPU: {self.name} ({os.cpu_count()} cores); training runs in float32"


BF16_MIN_CAPABILITY = (8, 0)  # Ampere (A100, RTX 30xx) and later compute in bf16 natively


def has_native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability computes in bf16 at speed: 8.0 (Ampere) and up.

    Not `torch.cuda.is_bf16_supported()`: its default (including_emulation=True) also says yes on a T4 (7.5)
    or V100 (7.0), where bf16 only runs emulated, slowly, and bitsandbytes/Trainer then fail or crawl.
    """
    return tuple(capability) >= BF16_MIN_CAPABILITY


def detect() -> DeviceInfo:
    """The device QLoRA Tutor will use: the first CUDA GPU if there is one, else the CPU."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        bf16 = has_native_bf16(torch.cuda.get_device_capability(0))
        return DeviceInfo("cuda", props.name, bf16, props.total_memory / 2**30)
    return DeviceInfo("cpu", platform.machine() or "unknown", False, None)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16', 'fp16', 'fp32' (or a torch dtype) as a torch dtype; a clear error otherwise."""
    if isinstance(name, torch.dtype):
        if name not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"compute dtype must be float32, float16 or bfloat16, not {name}")
        return name
    return getattr(torch, canonical_dtype(name))


def compute_dtype(requested: str | torch.dtype | None = None, info: DeviceInfo | None = None) -> torch.dtype:
    """The compute dtype to use: `requested` if the device can do it, else the best the device has.

    None picks automatically: bf16 on a GPU that has it, fp16 on one that does not (T4, V100), fp32 on CPU.
    Asking for bf16 on a GPU without it raises, because it would run slowly or not at all.
    """
    info = info or detect()
    if requested is None or requested == "auto":
        if info.device == "cuda":
            return torch.bfloat16 if info.bf16 else torch.float16
        return torch.float32
    dtype = parse_dtype(requested)
    if dtype == torch.bfloat16 and info.device == "cuda" and not info.bf16:
        raise ValueError(
            f"bf16 was asked for, but this GPU ({info.name}) has no bfloat16 support (T4 and V100 lack it). "
            "Use fp16 (adapters stay in fp32 so mixed precision works), or leave the dtype on 'auto'."
        )
    return dtype


def set_seed(seed: int) -> None:
    """Seed Python, NumPy (if present) and torch so that a run repeats exactly on the same machine."""
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:  # numpy is optional for the package itself
        pass
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def cpu_name() -> str:
    """The CPU model, for naming the machine a result was measured on: /proc/cpuinfo's "model name" on Linux,
    else the platform's processor string (or its architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Versions of the libraries the tutorial depends on ('not installed' where missing)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


STACK = ("python", "torch", "transformers", "peft", "bitsandbytes")


def versions_text(names: tuple[str, ...] = STACK, found: dict[str, str] | None = None) -> str:
    """'python 3.11.7, torch 2.13.0+cpu, ...' for a recorded result: `names` in order, from `found` (a saved
    `versions()`; names it lacks are left out) or from this process."""
    found = versions() if found is None else found
    return ", ".join(f"{name} {found[name]}" for name in names if name in found)


def show_environment() -> DeviceInfo:
    """Print library versions and the device found; the first code cell of every notebook calls this."""
    for pkg, ver in versions().items():
        print(f"{pkg:>13}: {ver}")
    info = detect()
    print(f"{'device':>13}: {info}")
    return info
