"""Comparing dequantized values with bitsandbytes' CPU output, bit for bit, and the two places where bitsandbytes
0.50.2 disagrees with itself (so that a test states exactly what it accepts, and nothing more).

1. FP4 code 8 (the bit pattern of -0) is +0.0 in bitsandbytes' table and its PyTorch path, and ours; its C++ CPU
   kernel returns -0.0 for it on some shapes and CPUs (every shape on an Intel Xeon with AVX512-FP16; only when
   the last dimension is not a multiple of 32 on the AMD EPYC of CI). Zeros are compared as numbers for FP4.
2. On CPUs with AVX512-FP16 (Intel Sapphire Rapids and later) its C++ kernel rounds the fp32 product to float16
   with ties away from zero; everywhere else (and in ours) ties go to even. Measured on the H200 host's Xeon: 130 of
   4,141,896 values differ, every one an exact float16 tie. Only such ties may differ, and only on such CPUs.
Both are recorded, per CPU, in results/bnb_cpu_quirks.md (made by benchmarks/bnb_cpu_quirks.py).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.uint8: torch.uint8}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal says 0.0 == -0.0; this does not)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


@functools.lru_cache(maxsize=None)
def cpu_has_avx512_fp16() -> bool:
    try:
        return " avx512_fp16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def fp16_ties_rounded_away(ours: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> bool:
    """True if every float16 value where `ref` differs from `ours` is an exact tie of the fp32 `exact` between the
    two, and `ref` is the one farther from zero (round half away); `ours` must then be the even one."""
    differ = ours.view(torch.int16) != ref.view(torch.int16)
    o, r, x = ours[differ].double(), ref[differ].double(), exact[differ].double()
    tie = torch.equal((x - o).abs(), (x - r).abs())
    even = bool(((ours[differ].view(torch.int16) & 1) == 0).all())
    return tie and even and bool((r.abs() > o.abs()).all())


def assert_matches_bnb(ours: torch.Tensor, ref: torch.Tensor, quant_type: str, exact: torch.Tensor | None = None,
                       what: str = "") -> None:
    """ours == bitsandbytes' dequantized `ref` bit for bit, but for the two documented disagreements above.

    `exact`: the fp32 products (our float32 dequantization), needed to check float16 ties on AVX512-FP16 CPUs."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
    if quant_type == "fp4":
        ref = torch.where(ref == 0, torch.zeros_like(ref), ref)
    if same_bits(ours, ref):
        return
    if ours.dtype == torch.float16 and cpu_has_avx512_fp16() and exact is not None:
        assert fp16_ties_rounded_away(ours, ref, exact), f"{what}: differences that are not float16 ties"
        return
    raise AssertionError(f"{what}: dequantized values differ in {(ours != ref).sum().item()} places")
