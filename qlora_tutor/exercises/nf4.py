"""Checks for notebook 01's exercises: the 16 NF4 levels, blockwise absmax quantize / dequantize, nibble packing.

Each check runs the learner's function on fresh inputs (not the notebook's weights) and compares it with this
package's `quant` module, which equals bitsandbytes' CPU path byte for byte (tests/test_quant.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import quant
from .base import check, compare, expect, run, wrong

NF4_OFFSET = quant.NF4_OFFSET


def _fresh(shape: tuple[int, ...], seed: int, scale: float = 0.02, heavy_tail: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    if heavy_tail:  # a few large weights, as trained models have: they decide their block's absmax
        w.view(-1)[:: 97] *= 8.0
    return w


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n].long()


# ------------------------------------------------------------------------------------------------ the 16 levels

def _check_level_structure(got: object, offset: float) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        wrong(f"return a torch.Tensor of 16 levels, got {type(got).__name__}")
    got = got.detach().reshape(-1) if got.dim() > 1 and got.numel() == 16 else got.detach()
    if got.dim() != 1:
        wrong(f"return the levels as a 1-D tensor of 16 values, got shape {tuple(got.shape)}")
    if got.is_floating_point() and torch.isinf(got).any():
        wrong("a level is ±inf: a probability of 0 or 1 has an infinite normal quantile (Eq. 4 taken literally). "
              f"Space the probabilities from offset = {offset} down to 0.5 instead")
    pos, neg, zeros = int((got > 0).sum()), int((got < 0).sum()), int((got == 0).sum())
    if got.numel() != 16:
        hint = " (the exact 0 is missing)" if zeros == 0 else ""
        wrong(f"{got.numel()} values ({pos} positive, {neg} negative, {zeros} zero){hint}; NF4 has 8 positive, "
              "7 negative and one exact 0: 16 levels")
    if not got.is_floating_point():
        wrong(f"the levels should be floats (float32), got {got.dtype}")
    expect(torch.isfinite(got).all(), "a level is NaN: check the probabilities you pass to the quantile function")
    expect(bool((got[1:] >= got[:-1]).all()), "sort the levels in ascending order (code i = the i-th smallest level)")
    if zeros > 1:
        wrong(f"{zeros} levels are exactly 0: the quantile of probability 0.5 is 0, so drop 0.5 from each half "
              "(linspace(...)[:-1]) and add a single shared 0")
    if (pos, neg) == (7, 8):
        wrong("8 negative and 7 positive levels: the extra level belongs on the positive side "
              "(9 probabilities for the positive half, 8 for the negative half)")
    expect((pos, neg, zeros) == (8, 7, 1),
           f"{pos} positive, {neg} negative and {zeros} zero levels; NF4 has 8 positive, 7 negative and one exact 0")
    top, bottom = float(got.max()), float(got.min())
    expect(abs(top - 1.0) < 1e-6, f"the largest level is {top:.6g}, not 1: divide all levels by the largest")
    expect(abs(bottom + 1.0) < 1e-6,
           f"the smallest level is {bottom:.6g}, not -1: build both halves from the same outermost probability "
           "(offset), then divide by the largest level")
    return got


@check("NF4 levels from normal quantiles")
def check_nf4_levels(fn: Callable[..., torch.Tensor]) -> str:
    """`fn(offset=0.9677083)` must return bitsandbytes' 16 NF4 levels (float32, ascending); with another offset,
    the NormalFloat levels that offset gives."""
    got = _check_level_structure(run(fn), NF4_OFFSET)
    compare("level", got, quant.codebook("nf4"), atol=1e-6)
    other = 0.99
    got_other = _check_level_structure(run(fn, offset=other), other)
    if torch.allclose(got_other.float(), got.float()):
        wrong("the levels do not change with `offset`: use the argument, not the constant 0.9677083")
    compare(f"level (offset={other})", got_other, quant.normal_float_levels(offset=other), atol=1e-6)
    exact = torch.equal(got, quant.codebook("nf4"))
    return ("equals bitsandbytes' NF4 table " + ("bit for bit" if exact else
            f"to {float((got - quant.codebook('nf4')).abs().max()):.1e} (float32 probabilities, float64 quantiles "
            "and float32 normalisation make it bit for bit)") + f"; other offsets work too")


# ------------------------------------------------------------------------------------------ quantize / dequantize

_CASES = (  # (shape, blocksize, quant type whose levels are passed, heavy tails)
    ((24, 128), 64, "nf4", False),
    ((10, 96), 32, "nf4", True),
    ((8, 256), 128, "int4", False),
)


@check("blockwise absmax quantize")
def check_quantize_blockwise(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> str:
    """`fn(w, levels, blocksize)` -> (codes, absmax): one code (0..15, the index of the nearest level to
    w / absmax) per value of the flattened tensor, one float32 absmax per block of `blocksize` values."""
    for i, (shape, bs, qt, heavy) in enumerate(_CASES):
        w = _fresh(shape, seed=100 + i, heavy_tail=heavy)
        levels = quant.codebook(qt)
        out = run(fn, w.clone(), levels.clone(), bs)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            wrong(f"return two things, (codes, absmax); got {type(out).__name__}"
                  + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
        codes, absmax = out
        ref = quant.quantize(w, qt, bs)
        n, blocks = w.numel(), w.numel() // bs
        where = f"(w of shape {shape}, blocksize {bs})"
        if not isinstance(absmax, torch.Tensor):
            wrong(f"absmax should be a tensor, got {type(absmax).__name__}")
        if absmax.numel() == shape[0] and shape[0] != blocks:
            wrong(f"absmax has one value per row ({shape[0]}); QLoRA's blocks are {bs} consecutive values of the "
                  f"flattened tensor: {blocks} blocks {where}. Use w.reshape(-1, blocksize)")
        expect(absmax.numel() == blocks,
               f"absmax should hold one value per block of {bs}: {blocks} values {where}, got {absmax.numel()}")
        absmax = absmax.detach().reshape(-1)
        signed_max = w.reshape(-1, bs).amax(dim=1)
        if not torch.allclose(absmax.float(), ref.absmax) and torch.allclose(absmax.float(), signed_max):
            wrong("absmax is the largest w of each block, not the largest |w|: use w.abs().amax(...) so that "
                  "negative outliers count too")
        compare("absmax", absmax.float(), ref.absmax, rtol=1e-6)
        if not isinstance(codes, torch.Tensor):
            wrong(f"codes should be a tensor, got {type(codes).__name__}")
        expect(codes.numel() == n, f"one code per value: {n} codes {where}, got {codes.numel()}")
        codes = codes.detach().reshape(-1)
        if codes.is_floating_point():
            if torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 15:
                codes = codes.long()
            else:
                wrong("codes are fractional: return the index of the nearest level (an integer 0..15), not the "
                      "level's value; e.g. torch.bucketize(scaled, midpoints)")
        expect(int(codes.min()) >= 0 and int(codes.max()) <= 15,
               f"codes must lie in 0..15 (4 bits); yours run from {int(codes.min())} to {int(codes.max())}")
        codes = codes.long()
        want = _unpack(ref.packed, n)
        scaled = (w.reshape(-1, bs) * (1.0 / ref.absmax).unsqueeze(1)).reshape(-1)
        gap_got, gap_want = (scaled - levels[codes]).abs(), (scaled - levels[want]).abs()
        bad = (codes != want) & ~((gap_got - gap_want).abs() <= 1e-6)  # an exact tie may go either way
        if bad.any():
            j = int(bad.nonzero()[0])
            c, k = int(codes[j]), int(want[j])
            hint = (" (off by one: check how the midpoints line up with the levels)" if abs(c - k) == 1 else "")
            wrong(f"code[{j}] is {c} (level {float(levels[c]):.4f}) but w[{j}] / absmax = {float(scaled[j]):.4f} is "
                  f"nearest to level {k} ({float(levels[k]):.4f}){hint}; {int(bad.sum())} of {n} codes differ {where}")
    return "codes and absmax equal the package's quantize (= bitsandbytes) on three fresh tensors"


@check("blockwise dequantize")
def check_dequantize_blockwise(fn: Callable[..., torch.Tensor]) -> str:
    """`fn(codes, absmax, levels, blocksize, shape)` -> float32 tensor of `shape`: levels[code] * its block's absmax."""
    for i, (shape, bs) in enumerate((((12, 128), 64), ((6, 160), 32))):
        g = torch.Generator().manual_seed(200 + i)
        n = shape[0] * shape[1]
        codes = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
        absmax = torch.rand(n // bs, generator=g) * 0.1 + 0.01
        levels = quant.codebook("nf4")
        got = run(fn, codes.clone(), absmax.clone(), levels.clone(), bs, torch.Size(shape))
        qt = quant.QuantizedTensor((codes[0::2] << 4) | codes[1::2], absmax, torch.Size(shape), torch.float32, bs,
                                   "nf4")
        want = qt.dequantize(backend="torch")
        if isinstance(got, torch.Tensor) and got.numel() == n and tuple(got.shape) != shape:
            wrong(f"the values are there but the shape is {tuple(got.shape)}: reshape to `shape` {shape}")
        if isinstance(got, torch.Tensor) and got.shape == want.shape:
            values = levels[codes.long()]
            if torch.allclose(got.float(), (values * absmax.repeat(bs)).view(shape)):
                wrong("each block's absmax must scale that block's values: absmax.repeat(...) interleaves the blocks;"
                      " use absmax.repeat_interleave(blocksize), or values.view(-1, blocksize) * absmax[:, None]")
            if torch.allclose(got.float(), (values.view(-1, bs) / absmax[:, None]).view(shape)):
                wrong("you divided by absmax: quantize divided by it, so dequantize multiplies by it")
            if torch.allclose(got.float(), values.view(shape)):
                wrong("these are the bare levels in [-1, 1]: multiply each by its block's absmax")
        compare("value", got, want, rtol=1e-6)
    return "equals the package's dequantize (= bitsandbytes) on fresh codes and constants"


# ---------------------------------------------------------------------------------------------------- packing

@check("two codes per byte")
def check_pack_codes(fn: Callable[[torch.Tensor], torch.Tensor]) -> str:
    """`fn(codes)` -> uint8 bytes, two codes each, the first (even-index) code in the high nibble, as bitsandbytes."""
    for i, shape in enumerate(((16, 64), (3, 128))):
        w = _fresh(shape, seed=300 + i)
        ref = quant.quantize(w, "nf4", 64)
        levels = quant.codebook("nf4")
        blocks = w.reshape(-1, 64)
        scaled = blocks * (1.0 / blocks.abs().amax(dim=1, keepdim=True))
        codes = torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2).reshape(-1).to(torch.uint8)
        got = run(fn, codes.clone())
        if not isinstance(got, torch.Tensor):
            wrong(f"return a torch.Tensor of bytes, got {type(got).__name__}")
        n = codes.numel()
        if got.numel() == n:
            wrong(f"{n} values for {n} codes: one byte holds two codes, so return {n // 2} bytes")
        expect(got.numel() == n // 2, f"{n} codes pack into {n // 2} bytes, got {got.numel()} values")
        got = got.reshape(-1)
        c = codes.long()
        swapped = (c[1::2] << 4) | c[0::2]
        if torch.equal(got.long(), swapped) and not torch.equal(got.long(), ref.packed.long()):
            wrong("the nibbles are swapped: bitsandbytes puts the FIRST (even-index) code in the HIGH nibble, "
                  "byte = code[2j] * 16 + code[2j+1]")
        if torch.equal(got.long(), c[0::2] | c[1::2]):
            wrong("without a shift the two codes overlap: move the first one into the high nibble (code << 4)")
        expect(got.dtype == torch.uint8, f"the bytes should be torch.uint8, got {got.dtype}: add .to(torch.uint8)")
        compare("byte", got, ref.packed)
    return "the same bytes as the package's quantize (= bitsandbytes' packed weight)"
