"""Checks for notebook 02's exercises: double-quantize the block constants, and count the bits per parameter.

The reference is this package's `quantize(..., double_quant=True)`, equal to bitsandbytes' compress_statistics
on the CPU. bitsandbytes' CPU kernel rounds the 8-bit codes through a 65,536-point grid, which for a few constants
is not the nearest map value; the check accepts either that code or the truly nearest one.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import quant
from .base import check, compare, expect, run, wrong


def _constants(n_blocks: int, seed: int) -> tuple[torch.Tensor, quant.QuantizedTensor]:
    """Fresh fp32 block constants c2 (the absmax of n_blocks blocks of 64) and the package's double quantization."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_blocks * 64, generator=g) * 0.02
    w.view(-1)[::131] *= 6.0  # some blocks with an outlier: a spread of constants, as in trained weights
    return quant.quantize(w, "nf4", 64).absmax, quant.quantize(w, "nf4", 64, double_quant=True)


@check("double quantization of the constants")
def check_double_quantize(fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> str:
    """`fn(c2, code_map, blocksize=256)` -> (codes, c1, offset): offset = mean of c2; per block of 256 centered
    constants c1 = their absmax; codes = index of the nearest code_map value to (c2 - offset) / c1 (uint8)."""
    code_map = quant.dynamic_map()
    for i, n_blocks in enumerate((256 * 3, 256 * 8)):
        c2, ref = _constants(n_blocks, seed=400 + i)
        out = run(fn, c2.clone(), code_map.clone(), 256)
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            wrong("return three things, (codes, c1, offset)")
        codes, c1, offset = out
        offset = torch.as_tensor(offset).detach().float()
        expect(offset.numel() == 1, f"offset is one number (the mean of all constants), got shape {tuple(offset.shape)}")
        if abs(float(offset)) < 1e-12:
            wrong(f"offset is 0; it should be the mean of the constants ({float(ref.offset):.6f}). The constants are "
                  "all positive: without subtracting their mean, the signed 8-bit map would waste its negative half")
        compare("offset", offset.reshape(()), ref.offset, rtol=1e-5)
        if not isinstance(c1, torch.Tensor):
            wrong(f"c1 should be a tensor, got {type(c1).__name__}")
        blocks = n_blocks // 256
        if c1.numel() == n_blocks // 64:
            wrong(f"{c1.numel()} values of c1: the constants are grouped in blocks of 256 (not 64), so there are "
                  f"{blocks}")
        expect(c1.numel() == blocks, f"one c1 per block of 256 constants: {blocks} values, got {c1.numel()}")
        c1 = c1.detach().reshape(-1).float()
        uncentered = c2.view(-1, 256).abs().amax(dim=1)
        if torch.allclose(c1, uncentered) and not torch.allclose(c1, ref.nested_absmax):
            wrong("c1 is the absmax of the constants themselves; it should be the absmax of the CENTERED constants "
                  "(c2 - offset) in each block of 256")
        compare("c1", c1, ref.nested_absmax, rtol=1e-5)
        if not isinstance(codes, torch.Tensor):
            wrong(f"codes should be a tensor, got {type(codes).__name__}")
        expect(codes.numel() == n_blocks, f"one 8-bit code per constant: {n_blocks}, got {codes.numel()}")
        codes = codes.detach().reshape(-1)
        expect(not codes.is_floating_point(),
               "codes should be integers (the index of the nearest map value, 0..255), not the values themselves")
        expect(int(codes.min()) >= 0 and int(codes.max()) <= 255, "codes must lie in 0..255 (8 bits)")
        codes = codes.long()
        scaled = ((c2 - ref.offset).view(-1, 256) / ref.nested_absmax.unsqueeze(1)).reshape(-1)
        nearest = (scaled.unsqueeze(1) - code_map).abs().argmin(dim=1)
        ok = (codes == ref.absmax.long()) | (codes == nearest) | \
             ((scaled - code_map[codes]).abs() <= (scaled - code_map[nearest]).abs() + 1e-7)
        if not ok.all():
            j = int((~ok).nonzero()[0])
            wrong(f"code[{j}] is {int(codes[j])} (map value {float(code_map[codes[j]]):.5f}), but (c2 - offset) / c1 "
                  f"= {float(scaled[j]):.5f} there is nearest to code {int(nearest[j])} "
                  f"({float(code_map[nearest[j]]):.5f}); {int((~ok).sum())} of {n_blocks} codes differ")
    return "offset, c1 and the 8-bit codes agree with the package (= bitsandbytes' nested QuantState)"


_BITS_CASES = ((2**18, 64, True), (2**18, 64, False), (128 * 256 * 3, 128, True), (2**17, 32, True),
               (2**18, 256, False))


@check("bits per parameter")
def check_bits_per_param(fn: Callable[..., float]) -> str:
    """`fn(n_weights, blocksize, double_quant)` -> the storage bits per weight of NF4 with those settings, counting
    codes, block constants and (with double quantization) c1 and the offset; n_weights is a multiple of 256·blocksize."""
    for n, bs, dq in _BITS_CASES:
        got = run(fn, n, bs, dq)
        try:
            got = float(got)
        except (TypeError, ValueError):
            wrong(f"return a number (bits per weight), got {type(got).__name__}")
        w = torch.randn(n, generator=torch.Generator().manual_seed(n + bs))
        want = quant.quantize(w, "nf4", bs, double_quant=dq).bits_per_param  # measured from the stored tensors
        case = f"n_weights={n:,}, blocksize={bs}, double_quant={dq}"
        if abs(got - want) <= 1e-9 * want:
            continue
        short = want - got
        if dq and abs(got - (4 + 32 / bs)) < 1e-9:
            wrong(f"{case}: {got:.5f} is the cost without double quantization; with it each block constant takes "
                  "8 bits, not 32")
        if dq and abs(short - 32 / (bs * 256)) < 1e-9:
            wrong(f"{case}: {short:.5f} bits short: count the fp32 c1, one per 256 block constants (32/(blocksize·256))")
        if dq and abs(short - 32 / n) < 1e-9:
            wrong(f"{case}: {short:.2e} bits short: count the one fp32 offset of the tensor (32/n_weights)")
        if abs(got - 4) < 1e-9:
            wrong(f"{case}: 4 bits counts only the codes; add the block constants (32/blocksize without DQ)")
        wrong(f"{case}: got {got:.6f} bits per weight, measured {want:.6f}")
    return "equals the bits measured from the package's stored tensors, with and without double quantization"
