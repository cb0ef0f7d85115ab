"""Comparing dequantized values with bitsandbytes' CPU output, bit for bit, and the three places where bitsandbytes
0.50.2 disagrees with itself (so that a test states exactly what it accepts, and nothing more).

1. FP4 code 8 (the bit pattern of -0) is +0.0 in bitsandbytes' table and its PyTorch path, and ours; its C++ CPU
   kernel returns -0.0 for it on some shapes and CPUs (every shape on an Intel Xeon with AVX512-FP16; on the AMD
   EPYC of CI only in its plain loop, used where the last dimension is even but not a multiple of 16). Zeros are
   compared as numbers for FP4.
2. On CPUs with AVX512-FP16 (Intel Sapphire Rapids and later) its C++ kernel rounds the fp32 product to float16
   with ties away from zero; everywhere else (and in ours) ties go to even. Measured on the H200 host's Xeon: 130 of
   4,141,896 values differ, every one an exact float16 tie. Only such ties may differ, and only on such CPUs.
3. Block scales. Where the CPU has AVX-512, its C++ kernel walks the tensor row by row and gives the 16 values at
   column c of row r the scale absmax[r * (n // blocksize) + c // blocksize], n being the last dimension: right
   only when every row starts a new block. It takes that path when n is even and a multiple of 16 and the block
   size is below 2048 (bitsandbytes' Python side sends larger blocks and odd n to its pure-PyTorch code, which is
   right). So it mis-scales values when n is a multiple of 16 but not of the block size, once the rows are enough
   for a block to straddle a row start: (2, 80) with block 64, (3, 64) with block 128, (4, 400) with block 64;
   never (4, 300) (not a multiple of 16) or (2, 64) with block 128 (both rows inside block 0).
   `bnb_cpu_dequant_misscales` computes exactly where; test_qlora checks it against bitsandbytes on this CPU.
1 and 2 are recorded, per CPU, in results/bnb_cpu_quirks.md (made by benchmarks/bnb_cpu_quirks.py), with 3.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.uint8: torch.uint8}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal says 0.0 == -0.0; this does not)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def assert_same_bits_as_peft(ours, ref, peft_layer, x: torch.Tensor) -> torch.Tensor:
    """`ours(x)` and `ref(x)` give the same bits, and so do the gradients of x, lora_A and lora_B after one
    backward (`peft_layer` is the PEFT LoRA layer inside `ref`; its adapter is 'default'). Returns ours(x)."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    assert same_bits(y1, y2), f"{(y1 != y2).float().mean():.1%} of the outputs differ"
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert same_bits(x1.grad, x2.grad)
    assert same_bits(ours.lora_A.grad, peft_layer.lora_A["default"].weight.grad)
    assert same_bits(ours.lora_B.grad, peft_layer.lora_B["default"].weight.grad)
    return y1


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.lru_cache(maxsize=None)
def cpu_has_avx512f() -> bool:
    """Whether bitsandbytes' CPU kernels take their AVX-512 paths here (/proc/cpuinfo, else torch's own probe)."""
    flags = _cpu_flags()
    return " avx512f" in flags if flags else torch.backends.cpu.get_cpu_capability() == "AVX512"


def bnb_cpu_dequant_misscales(shape: tuple[int, ...], blocksize: int) -> bool:
    """True where bitsandbytes 0.50.2's C++ CPU dequantize_4bit gives some values another block's scale (quirk 3
    above): it reproduces the kernel's index arithmetic and compares it with the right block of every value."""
    n = shape[-1] if shape else 1
    if not cpu_has_avx512f() or blocksize >= 2048 or n % 2 or n % 16:
        return False
    rows = int(torch.Size(shape[:-1]).numel()) if len(shape) > 1 else 1
    r = torch.arange(rows).repeat_interleave(n // 16)
    c = torch.arange(0, n, 16).repeat(rows)
    used = r * (n // blocksize) + c // blocksize           # the scale the kernel uses for values c..c+15 of row r
    first, last = (r * n + c) // blocksize, (r * n + c + 15) // blocksize  # the blocks those values are in
    return bool(((used != first) | (used != last)).any())


@functools.lru_cache(maxsize=None)
def cpu_has_avx512_fp16() -> bool:
    return " avx512_fp16" in _cpu_flags()


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
