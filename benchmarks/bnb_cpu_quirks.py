"""Where bitsandbytes' CPU dequantize differs from its own other paths, on this CPU (see tests/bnb_reference.py).

Usage: python benchmarks/bnb_cpu_quirks.py
For nf4 and fp4, with and without double quantization, three output dtypes and a few shapes and block sizes, it
dequantizes with bitsandbytes and with qlora_tutor (fp32 product, rounded once to nearest even) and counts values
that differ: as numbers, only in the sign of zero, and, for float16, how many of the differing values are exact
ties that bitsandbytes rounded away from zero. Then, for shapes chosen on both sides of the rule, how many values
its C++ kernel gives another block's scale (quirk 3).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qlora_tutor import hardware
from qlora_tutor.quant import quantize

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def main() -> None:
    import bitsandbytes
    import bitsandbytes.functional as F

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = hardware.cpu_name()
    print(f"CPU: {name}; AVX512-FP16: {'avx512_fp16' in flags}; torch {torch.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}\n")
    print("| type | double quant | dtype | shape, block | values | differ as numbers | differ in the sign of zero "
          "| float16 ties rounded away |\n|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    total: dict[str, int] = {}
    for quant_type in ("nf4", "fp4"):
        for dq in (False, True):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for shape, bs in [((24, 4096), 32), ((24, 4096), 64), ((24, 4096), 1024), ((97, 518), 64)]:
                    w = (torch.randn(shape) * 0.02).to(dtype)
                    packed, state = F.quantize_4bit(w, blocksize=bs, quant_type=quant_type, compress_statistics=dq)
                    q = quantize(w, quant_type, bs, dq)
                    ref, ours = F.dequantize_4bit(packed, state), q.dequantize(backend="torch")
                    numbers = ref != ours
                    bits = ref.view(BITS[dtype]) != ours.view(BITS[dtype])
                    ties = "-"
                    if dtype == torch.float16:
                        exact = q.dequantize(torch.float32, backend="torch")[numbers].double()
                        o, r = ours[numbers].double(), ref[numbers].double()
                        ties = str(int(((exact - o).abs() == (exact - r).abs()).logical_and(r.abs() > o.abs()).sum()))
                    row = [int(numbers.sum()), int((bits & ~numbers).sum())]
                    for key, v in zip(("numbers", "zero sign"), row):
                        total[key] = total.get(key, 0) + v
                    total["values"] = total.get("values", 0) + w.numel()
                    print(f"| {quant_type} | {'yes' if dq else 'no'} | {str(dtype)[6:]} | {tuple(shape)}, {bs} "
                          f"| {w.numel():,} | {row[0]} | {row[1]} | {ties} |")
    print(f"\nin all: {total['values']:,} values, {total['numbers']} differ as numbers, "
          f"{total['zero sign']} only in the sign of zero")
    block_scales(F)


# (rows, last dimension, block size): shapes where the AVX-512 path should mis-scale, and shapes where it should not
SCALE_CASES = [(2, 80, 64), (33, 80, 64), (4, 400, 64), (3, 64, 128), (3, 1040, 1024), (5, 48, 32),
               (4, 300, 64), (2, 64, 128), (1, 80, 64), (7, 82, 64), (6, 96, 32), (5, 80, 2048), (3, 4112, 4096)]


def block_scales(F) -> None:
    """Quirk 3 (tests/bnb_reference.py): values the C++ kernel gives another block's scale, against bitsandbytes'
    own pure-PyTorch dequantize (which ours equals), for nf4 float32 weights whose blocks differ in scale."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    print("\n| shape, block | last dim % 16 | last dim % block | values | values with another block's scale |\n"
          "|---|---|---|---|---|")
    g = torch.Generator().manual_seed(5)
    for rows, n, bs in SCALE_CASES:
        w = torch.randn(rows, n, generator=g) * torch.rand(rows, n, generator=g).mul(8).exp()
        packed, state = F.quantize_4bit(w, blocksize=bs, quant_type="nf4")
        with torch._dynamo.config.patch(disable=True):
            ref = _dequantize_4bit_compute(packed.view(-1), state.absmax, state.code, bs, (rows, n), torch.float32)
        got = F.dequantize_4bit(packed, state)
        print(f"| ({rows}, {n}), {bs} | {n % 16} | {n % bs} | {w.numel():,} "
              f"| {int((got.reshape(-1) != ref.reshape(-1)).sum()):,} |")


if __name__ == "__main__":
    main()
