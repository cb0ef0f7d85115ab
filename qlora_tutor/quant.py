"""4-bit data types from scratch (NF4, FP4, Int4) and double quantization, bit-exact with bitsandbytes' CPU path.

A weight tensor is cut into blocks of `blocksize` values (over the flattened, row-major tensor). Each block is
scaled by its absolute maximum into [-1, 1], each value is replaced by the index of the nearest of 16 code values,
and two 4-bit indices are packed into one byte (first element in the high nibble). With double quantization the
fp32 block constants are themselves quantized to 8 bits in blocks of 256 after subtracting their mean.
Paper symbols (QLoRA Eq. 6): W_NF4 = `packed`, c2 = the block absmax (8-bit when double-quantized), c1 = the fp32
`nested_absmax`. Only torch is needed; bitsandbytes is imported lazily by the two conversion methods.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

import torch

from . import config, native, triton_kernels
from .config import BNB_QUANT_TYPES  # the types bitsandbytes has kernels for: to/from_bitsandbytes accept these

if TYPE_CHECKING:
    import bitsandbytes

BLOCKSIZES = tuple(2**k for k in range(5, 13))  # 32 ... 4096, what bitsandbytes' 4-bit path accepts
NESTED_BLOCKSIZE = 256  # block size of the 8-bit quantization of the constants (paper section 3, bitsandbytes)
DEQUANTIZE_BACKENDS = ("auto", "native", "torch", "triton")
QUANTIZE_BACKENDS = ("auto", "torch", "triton")  # auto: the Triton kernel on CUDA where available, else PyTorch
NF4_OFFSET = 0.9677083  # outermost quantile probability in bitsandbytes' create_normal_map
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK = 1 << 22  # values per step: temporaries stay below ~80 MB whatever the tensor size, and few steps
# keep the number of (multi-threaded) PyTorch ops small


# ----------------------------------------------------------------------------------------------------------------
# Code books
# ----------------------------------------------------------------------------------------------------------------

def normal_float_levels(offset: float = NF4_OFFSET, bits: int = 4) -> torch.Tensor:
    """The NormalFloat levels, built from quantiles of N(0, 1): 2^(k-1) positive, 2^(k-1)-1 negative, and 0.

    Probabilities are spaced evenly from `offset` down to 0.5 (one more level on the positive side, so zero is
    exact); each side is mapped through the normal quantile function and everything is divided by the largest.
    Rounding follows bitsandbytes (float32 probabilities, float64 quantiles, float32 normalisation), so the 4-bit
    result equals its table bit for bit; done in float64 throughout, 10 of the 16 values differ by <= 1.2e-7.
    """
    bits_ = _as_int(bits)
    if bits_ is None or not 2 <= bits_ <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8 (NF4 is 4), got {bits!r}")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not 0.5 < float(offset) < 1.0:
        raise ValueError(f"offset is the outermost quantile's probability, a number in (0.5, 1); got {offset!r} "
                         f"(NF4 uses {NF4_OFFSET})")
    half = 2 ** (bits_ - 1)
    probs_pos = torch.linspace(offset, 0.5, half + 1, dtype=torch.float32)[:-1]  # 8 probabilities > 0.5
    probs_neg = torch.linspace(offset, 0.5, half, dtype=torch.float32)[:-1]      # 7 probabilities > 0.5
    positive = torch.special.ndtri(probs_pos.double()).float()
    negative = -torch.special.ndtri(probs_neg.double()).float()
    levels = torch.cat([negative, torch.zeros(1), positive]).sort().values
    return levels / levels.max()


def _fp4_levels() -> torch.Tensor:
    """bitsandbytes' FP4 (E2M1) in bit-pattern order: code = sign bit, 2 exponent bits e, 1 mantissa bit m.

    Magnitude (before dividing by the largest, 12): m * 0.0625 when e = 0 (subnormal), else (1 + m/2) * 2^(4-e):
    0b01m -> 8, 12; 0b10m -> 4, 6; 0b11m -> 2, 3. Codes 8-15 are the negatives. Code 8, the bit pattern of -0,
    stands for +0.0 in bitsandbytes' table (and in what its CPU kernels return), so it does here too: otherwise
    dequantized zeros would differ from bitsandbytes' in their sign bit.
    """
    magnitude = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
    levels = torch.cat([magnitude, -magnitude]) / 12.0
    levels[8] = 0.0  # +0.0, not -0.0
    return levels


def _int4_levels() -> torch.Tensor:
    """Symmetric absmax integers q/7 for q = -7..7, stored as code q + 8 (offset binary, as GPTQ-style formats do).

    Code 0 would be q = -8, i.e. -8/7: quantize never produces it (|scaled| <= 1); dequantizing it gives -8/7.
    """
    return torch.arange(-8, 8, dtype=torch.float32) / 7.0


@dataclass(frozen=True)
class Format:
    """A 4-bit data type: how its 16 values (index = code) are built and which codes quantize may produce.
    A new 4-bit type is one entry in FORMATS."""

    levels: Callable[[], torch.Tensor]
    used_codes: tuple[int, ...] = tuple(range(16))


FORMATS: dict[str, Format] = {
    "nf4": Format(normal_float_levels),
    "fp4": Format(_fp4_levels),
    "int4": Format(_int4_levels, used_codes=tuple(range(1, 16))),  # code 0 (-8/7) is never produced
}
QUANT_TYPES = tuple(FORMATS)


@lru_cache(maxsize=None)
def _codebook_cpu(quant_type: str) -> torch.Tensor:
    return FORMATS[quant_type].levels().to(torch.float32)


def codebook(quant_type: str) -> torch.Tensor:
    """The 16 values a 4-bit code stands for (float32, index = code), for "nf4", "fp4" or "int4"."""
    return _codebook_cpu(check_quant_type(quant_type)).clone()


@lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    # Dettmers' dynamic tree type (arXiv 1511.04561), signed, 8 bits: for e = 0..6 the decade 10^(e-6) holds 2^e
    # linearly spaced magnitudes (centres of 2^e bins between 0.1 and 1), each with both signs; plus 0 and 1.
    parts = []
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        parts.append((edges[:-1] + edges[1:]) / 2 * (10.0 ** (e - 6)))
    magnitudes = torch.cat(parts)
    return torch.cat([magnitudes, -magnitudes, torch.tensor([0.0, 1.0])]).sort().values


def dynamic_map() -> torch.Tensor:
    """The 256 values of bitsandbytes' signed 8-bit dynamic map, used to quantize the constants (double quant)."""
    return _dynamic_map_cpu().clone()


@dataclass(frozen=True)
class _Tables:
    """Lookup tables of one data type on one device (built once, cached)."""

    midpoints: torch.Tensor   # float32 (m-1,): halfway between consecutive used values, sorted ascending
    order: torch.Tensor       # uint8 (m,): code of the i-th smallest used value
    bin_low: torch.Tensor     # uint8 (65536,): sorted position of the smallest value in each bin (see below)
    bin_midpoint: torch.Tensor  # float32 (65536,): the one midpoint inside that bin, +inf if none
    byte_to_code: torch.Tensor | None  # uint8 (256,): packed positions -> packed codes, None when not needed
    pairs: torch.Tensor       # int64 (256,): a byte's two code values (fp32, high nibble first) as one 8-byte word


@lru_cache(maxsize=None)
def _tables(quant_type: str, device: torch.device) -> _Tables:
    code = _codebook_cpu(quant_type)
    used = torch.tensor(FORMATS[quant_type].used_codes)
    # stable sort: FP4's two zeros, code 0 and code 8, keep that order, the order bitsandbytes' CPU argsort gives
    order = used[torch.sort(code[used], stable=True).indices]
    sorted_values = code[order]
    midpoints = (sorted_values[:-1] + sorted_values[1:]) / 2  # fp32, as bitsandbytes computes them

    # Fast nearest-code search. The top 16 bits of a float32 (sign, exponent, 7 mantissa bits) split all floats
    # into 65536 bins, each a short interval of values. For each bin we store the sorted position of its lowest
    # value and the midpoint that lies inside it (at most one does); a value's position is then
    # bin_low + (value > bin_midpoint): two table lookups and a comparison instead of a binary search.
    bits = torch.arange(65536, dtype=torch.int32) << 16
    ends = torch.stack([bits.view(torch.float32), (bits | 0xFFFF).view(torch.float32)], dim=1)
    ends[~torch.isfinite(ends).all(dim=1)] = 0.0  # Inf/NaN bins: scaled values never fall there
    low, high = ends.min(dim=1).values, ends.max(dim=1).values
    pos_low = torch.bucketize(low, midpoints)
    inside = torch.bucketize(high, midpoints) - pos_low
    assert int(inside.max()) <= 1, "two midpoints in one bin: the fast search would be wrong"
    bin_midpoint = torch.where(inside == 1, midpoints[pos_low.clamp(max=len(midpoints) - 1)],
                               torch.tensor(float("inf")))
    consecutive = torch.equal(order, order[0] + torch.arange(len(order)))
    bin_low = (pos_low + (order[0] if consecutive else 0)).to(torch.uint8)
    byte_to_code = None
    if not consecutive:  # FP4: positions are packed first, then mapped to codes one byte (two codes) at a time
        byte = torch.arange(256)
        byte_to_code = ((order[byte >> 4] << 4) | order[byte & 15]).to(torch.uint8)
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous().view(torch.int64).reshape(256)
    return _Tables(midpoints.to(device), order.to(torch.uint8).to(device), bin_low.to(device),
                   bin_midpoint.to(device), None if byte_to_code is None else byte_to_code.to(device),
                   pairs.to(device))


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------

def check_quant_type(quant_type: str, bitsandbytes: bool = False) -> str:
    """The quant type's canonical (lower-case) name; a clear error for an unknown one (or, with `bitsandbytes`,
    one bitsandbytes has no kernels for). The one rule every module uses (config.check_quant_type, with this
    module's list of formats)."""
    return config.check_quant_type(quant_type, BNB_QUANT_TYPES if bitsandbytes else tuple(FORMATS))


def _as_int(value: object) -> int | None:
    """`value` as a Python int if it is an integer (int, numpy integer, 0-d integer tensor), else None; bools are
    not integers here."""
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):
        return None
    if isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_blocksize(blocksize: object, what: str = "blocksize") -> int:
    """The block size as an int (a numpy integer or 0-d integer tensor is the integer it holds), or a clear error:
    a power of two from 32 to 4096, what bitsandbytes' 4-bit path accepts."""
    value = _as_int(blocksize)
    if value not in BLOCKSIZES:
        raise ValueError(
            f"{what} must be a power of two from 32 to 4096 (as in bitsandbytes), got {blocksize!r}; "
            + ("QLoRA uses 64" if what == "blocksize" else f"bitsandbytes uses {NESTED_BLOCKSIZE}")
        )
    return value


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize() needs a torch.Tensor, got {type(w).__name__}; wrap it with torch.tensor(...)")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"quantize() needs a float32, bfloat16 or float16 tensor (as bitsandbytes does), got {w.dtype}; "
            "convert it first, e.g. w.float()"
        )
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)}): there is nothing to store")
    if w.device.type == "meta":
        raise ValueError(
            f"cannot quantize a tensor on the meta device (shape {tuple(w.shape)}): it has a shape but no values, "
            "as in a model built under torch.device('meta') or init_empty_weights. Load the real weights first "
            "(e.g. model.to_empty(device='cpu'), then model.load_state_dict(...))"
        )


def _raise_non_finite(w: torch.Tensor) -> None:
    nan, inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
    first = int(torch.nonzero(~torch.isfinite(w.reshape(-1)))[0])
    raise ValueError(
        f"cannot quantize a tensor with {nan} NaN and {inf} Inf values (first at flat index {first}): one of them "
        "would ruin the scale of its whole block. Find where they come from, or replace them with torch.nan_to_num(w)"
    )


# ----------------------------------------------------------------------------------------------------------------
# Blockwise quantization
# ----------------------------------------------------------------------------------------------------------------

def _nearest_index(scaled: torch.Tensor, quant_type: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Index (uint8) of the nearest used code value in sorted order, for float32 values; halfway goes to the lower.

    Equals torch.bucketize(scaled, midpoints) (bitsandbytes' CPU rule), plus 1 for Int4 so that it is the code
    there; NF4 codes are already sorted; FP4's are mapped from sorted order after packing (`byte_to_code`).
    """
    t = _tables(quant_type, scaled.device)
    bins = (scaled.view(torch.int32) >> 16) & 0xFFFF
    return torch.add(t.bin_low.index_select(0, bins), scaled > t.bin_midpoint.index_select(0, bins), out=out)


def _pack(positions: torch.Tensor) -> torch.Tensor:
    """Two 4-bit numbers per byte, the first (even-index) one in the high nibble; the count must be even."""
    if sys.byteorder == "little":  # bytes (a, b) read as int16 are a + 256 b: (v << 4 | v >> 8) keeps a << 4 | b
        v = positions.view(torch.int16)
        return ((v << 4) | (v >> 8)).to(torch.uint8)
    return (positions[0::2] << 4) | positions[1::2]


def _use_triton(backend: str, device: torch.device) -> bool:
    """quantize's choice: the Triton kernels when asked for, or by default on CUDA where they are available."""
    return backend == "triton" or (backend == "auto" and device.type == "cuda" and triton_kernels.available(device))


def _quantize_flat(flat: torch.Tensor, quant_type: str, blocksize: int,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes and fp32 absmax of a flat tensor, with bitsandbytes' arithmetic (x * (1/absmax) in fp32)."""
    if backend not in QUANTIZE_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(map(repr, QUANTIZE_BACKENDS))}")
    if _use_triton(backend, flat.device):
        t = _tables(quant_type, flat.device)  # one Triton kernel, same bits (triton_kernels.py)
        packed, absmax = triton_kernels.quantize_4bit(flat.contiguous(), t.midpoints, t.order, blocksize)
        if not torch.isfinite(absmax).all():
            _raise_non_finite(flat)
        return packed, absmax
    n = flat.numel()
    full = n - n % blocksize
    positions = torch.empty(n + n % 2, dtype=torch.uint8, device=flat.device)
    absmax_parts = []
    step = max(blocksize, _CHUNK // blocksize * blocksize)
    buffer = torch.empty(min(step, full), dtype=torch.float32, device=flat.device)
    for start in range(0, full, step):  # chunks of many blocks keep the temporaries small and in cache
        block = flat[start:min(start + step, full)].float().view(-1, blocksize)
        absmax = block.abs().amax(dim=1)
        scaled = buffer[:block.numel()]
        torch.mul(block, (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), out=scaled.view(-1, blocksize))
        _nearest_index(scaled, quant_type, out=positions[start:start + block.numel()])
        absmax_parts.append(absmax)
    if full < n:  # the last, partial block: bitsandbytes divides here, and stores the clamped absmax
        tail = flat[full:].float()
        absmax = tail.abs().amax().clamp(min=1e-38)
        positions[full:n] = _nearest_index(tail / absmax, quant_type)
        absmax_parts.append(absmax.reshape(1))
    if n % 2:  # bitsandbytes pads the scaled values with one 0.0 before rounding
        positions[n:] = _nearest_index(torch.zeros(1, device=flat.device), quant_type)
    absmax = torch.cat(absmax_parts)
    if not torch.isfinite(absmax).all():  # a NaN or Inf makes its block's absmax non-finite: a free check
        _raise_non_finite(flat)
    packed = _pack(positions)
    table = _tables(quant_type, flat.device).byte_to_code
    return (packed if table is None else table.index_select(0, packed.int())), absmax


@lru_cache(maxsize=None)
def _grid_table(device: torch.device) -> torch.Tensor:
    """Code of the nearest dynamic-map value for each of 65536 grid points on [-1, 1] (ties go to the lower one)."""
    code = _dynamic_map_cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(midpoints, grid).to(torch.uint8).to(device)  # first midpoint >= the grid point


def _quantize_8bit_cpu_rule(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with bitsandbytes' CPU rule (used for the constants in double quantization).

    bitsandbytes' CPU kernel does not search the 256 values: it rounds the scaled value to a grid of 65536 points
    on [-1, 1] and looks the code up in a table built for those points. That is not always the nearest value (it
    is near zero, where the dynamic map is finer than the grid); CUDA's kernel searches exactly. We match the CPU.
    """
    lut = _grid_table(x.device)
    n = x.numel()
    padded = torch.nn.functional.pad(x.float(), (0, -n % blocksize)).view(-1, blocksize)
    absmax = padded.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # all-zero block: no 0 * inf
    scaled = (padded * inverse.unsqueeze(1)).clamp(-1.0, 1.0)
    grid = ((scaled + 1.0) * 0.5) * 65535.0 + 0.5  # same operation order as the C++ kernel
    # A subnormal block absmax has an infinite inverse: its zeros scale to 0 * inf = NaN (and the padding of the
    # last block does too). The C++ kernel turns NaN into grid point 0 (an x86 float-to-int conversion of NaN gives
    # 0x80000000, whose low 16 bits are 0), i.e. code 0; so do we, instead of indexing with NaN cast to int.
    index = torch.nan_to_num(grid, nan=0.0).to(torch.int32)
    q = lut[index.long()]
    q[absmax == 0] = 0  # an all-zero block is stored as code 0
    return q.reshape(-1)[:n], absmax


def _dequantize_8bit(q: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    code = _dynamic_map_cpu().to(q.device)
    n = q.numel()
    values = torch.nn.functional.pad(code[q.long()], (0, -n % blocksize)).view(-1, blocksize)
    return (values * absmax.unsqueeze(1)).reshape(-1)[:n]


@lru_cache(maxsize=None)
def _device_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16-value code book and the 256-value dynamic map on `device` (for the Triton kernel), copied once."""
    return _codebook_cpu(quant_type).to(device), _dynamic_map_cpu().to(device)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A 4-bit blockwise-quantized tensor: packed codes plus the constants needed to get the values back.

    `absmax` holds one fp32 scale per block, or, when double-quantized, one uint8 code per block; then
    `nested_absmax` (fp32, one per 256 blocks) and `offset` (the fp32 mean that was subtracted) complete it.
    """

    packed: torch.Tensor                 # uint8, (numel + 1) // 2 bytes; first element in the high nibble (W_NF4)
    absmax: torch.Tensor                 # float32 per block, or uint8 per block when double-quantized (c2)
    shape: torch.Size
    dtype: torch.dtype                   # dtype of the original tensor; dequantize() returns it by default
    blocksize: int
    quant_type: str
    nested_absmax: torch.Tensor | None = None  # float32 per NESTED_BLOCKSIZE constants (c1), double quant only
    offset: torch.Tensor | None = None         # float32 scalar: mean of the constants, double quant only
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        # Checked once, here, for every way of making one (quantize, from_bitsandbytes, to(), by hand), so that no
        # backend ever reads past a buffer or scales with the wrong numbers: only sizes, dtypes and devices are
        # looked at, never the values (cheap, and fine under torch.compile's fake tensors).
        set_ = object.__setattr__  # frozen dataclass: canonical forms are stored through object.__setattr__
        set_(self, "quant_type", check_quant_type(self.quant_type))
        set_(self, "blocksize", check_blocksize(self.blocksize))
        set_(self, "nested_blocksize", check_blocksize(self.nested_blocksize, "nested_blocksize"))
        dims = [_as_int(d) for d in (self.shape if isinstance(self.shape, (tuple, list, torch.Size)) else [None])]
        if any(d is None or d < 0 for d in dims) or math.prod(dims) == 0:
            raise ValueError(f"QuantizedTensor: shape must be a tuple of non-negative ints holding at least one "
                             f"value, got {self.shape!r}")
        set_(self, "shape", torch.Size(dims))
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"QuantizedTensor: dtype is the original tensor's floating-point dtype (e.g. "
                            f"torch.bfloat16), got {self.dtype!r}")
        n = math.prod(dims)
        blocks = -(-n // self.blocksize)
        fix = "build it with quantize() or from_bitsandbytes(), or pass the parts of one quantization together"
        if (self.nested_absmax is None) != (self.offset is None):
            given = "offset" if self.nested_absmax is None else "nested_absmax"
            raise ValueError("QuantizedTensor: double quantization needs both nested_absmax and offset (plain 4-bit "
                             f"quantization neither); got only {given}")
        expect = [("packed", self.packed, torch.uint8, (n + 1) // 2,
                   f"(numel + 1) // 2 bytes for shape {tuple(dims)}, two 4-bit codes per byte")]
        if self.nested_absmax is None:
            expect.append(("absmax", self.absmax, torch.float32, blocks,
                           f"one fp32 scale per block of {self.blocksize}"))
            if isinstance(self.absmax, torch.Tensor) and self.absmax.dtype == torch.uint8:
                raise ValueError("QuantizedTensor: absmax is uint8, i.e. the 8-bit codes of double quantization, but "
                                 "nested_absmax and offset are missing, so the codes would be read as scales; "
                                 "pass the nested state too (from_bitsandbytes: a QuantState with state2)")
        else:
            expect += [("absmax", self.absmax, torch.uint8, blocks,
                        f"one 8-bit code per block of {self.blocksize} (double quantization)"),
                       ("nested_absmax", self.nested_absmax, torch.float32, -(-blocks // self.nested_blocksize),
                        f"one fp32 scale per {self.nested_blocksize} block constants"),
                       ("offset", self.offset, torch.float32, 1, "one fp32 value, the mean that was subtracted")]
        device = self.packed.device if isinstance(self.packed, torch.Tensor) else None
        for name, t, dtype, size, what in expect:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"QuantizedTensor: {name} must be a torch.Tensor, got {type(t).__name__}")
            flat_ok = t.dim() <= 1 if name == "offset" else t.dim() == 1
            if t.dtype != dtype or t.numel() != size or not flat_ok:
                raise ValueError(f"QuantizedTensor: inconsistent sizes: {name} must be a flat {dtype} tensor of "
                                 f"{size} values ({what}), got {t.dtype} of shape {tuple(t.shape)}; {fix}")
            if t.device != device:
                raise ValueError(f"QuantizedTensor: {name} is on {t.device} but packed is on {device}: every part "
                                 "must be on one device (move the whole object with .to(device))")

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def scales(self) -> torch.Tensor:
        """The fp32 absmax of every block (decoded from 8 bits first when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        return _dequantize_8bit(self.absmax, self.nested_absmax, self.nested_blocksize) + self.offset

    def dequantize(self, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
        """The values the codes stand for, code value * block absmax in fp32, then cast to `dtype` (default: original).

        backend: "torch" is the PyTorch code below (the one the notebooks explain, any device); "native" is the
        same arithmetic in one C pass (`native.py`, CPU only, float32/bfloat16/float16); "triton" is one Triton
        kernel (`triton_kernels.py`, CUDA, or the CPU under TRITON_INTERPRET=1); "auto" (default) takes "triton"
        on CUDA and "native" on the CPU where they apply and are available, else "torch". All give the same bits.
        Under torch.compile this is one custom operator (`torch.ops.qlora_tutor.dequantize_4bit`).
        """
        dtype = self.dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dequantize() returns floating-point values: pass dtype=torch.float32, bfloat16 or "
                            f"float16 (or None for the original {self.dtype}), not {dtype!r}")
        if backend not in DEQUANTIZE_BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(map(repr, DEQUANTIZE_BACKENDS))}")
        if torch.compiler.is_compiling():  # dynamo cannot trace ctypes or Triton launches: an opaque operator
            return torch.ops.qlora_tutor.dequantize_4bit(
                self.packed, self.absmax, self.nested_absmax, self.offset, list(self.shape), self.blocksize,
                self.nested_blocksize, self.quant_type, dtype, backend)
        return self._dequantize_eager(dtype, backend)

    def _dequantize_eager(self, dtype: torch.dtype, backend: str) -> torch.Tensor:
        native_fits = self.device.type == "cpu" and dtype in _FLOAT_DTYPES
        if backend == "native" and not native_fits:
            raise ValueError(f"the native backend runs on the CPU and returns float32, bfloat16 or float16; this "
                             f"is {dtype} on {self.device}: use backend='torch' (or 'auto')")
        if backend == "triton" or (backend == "auto" and self.device.type == "cuda" and self._triton_fits(dtype)):
            return self._dequantize_triton(dtype)
        if backend == "native" or (backend == "auto" and native_fits and native.available()):
            return self._dequantize_native(dtype)
        return self._dequantize_torch(dtype)

    def _triton_fits(self, dtype: torch.dtype) -> bool:
        """"auto" takes the kernel where it runs; a bf16 output on a GPU without bf16 stays on the PyTorch path."""
        if dtype not in _FLOAT_DTYPES or not triton_kernels.available(self.device):
            return False
        return dtype != torch.bfloat16 or triton_kernels.has_bf16(self.device)

    def _dequantize_triton(self, dtype: torch.dtype) -> torch.Tensor:
        code, dynamic = _device_tables(self.quant_type, self.device)
        if self.double_quant:
            out = triton_kernels.dequantize_4bit(
                self.packed, code, self.numel, self.blocksize, dtype, qabsmax=self.absmax, dynamic_map=dynamic,
                nested_absmax=self.nested_absmax, offset=self.offset, nested_blocksize=self.nested_blocksize)
        else:
            out = triton_kernels.dequantize_4bit(self.packed, code, self.numel, self.blocksize, dtype,
                                                 absmax=self.absmax)
        return out.view(self.shape)

    def _dequantize_native(self, dtype: torch.dtype, **options) -> torch.Tensor:
        """The native path; `options` (use_avx512, threads, stream) go to `native.dequantize_4bit` (for tests)."""
        out = native.empty(self.numel, dtype)
        code, packed = _codebook_cpu(self.quant_type), self.packed.contiguous()
        if self.double_quant:
            native.dequantize_4bit(packed, code, out, self.blocksize, qabsmax=self.absmax.contiguous(),
                                   dynamic_map=_dynamic_map_cpu(), nested=self.nested_absmax.float().contiguous(),
                                   nested_blocksize=self.nested_blocksize, offset=float(self.offset), **options)
        else:
            native.dequantize_4bit(packed, code, out, self.blocksize, absmax=self.absmax.float().contiguous(),
                                   **options)
        return out.view(self.shape)

    def _dequantize_torch(self, dtype: torch.dtype) -> torch.Tensor:
        n, bs = self.numel, self.blocksize
        pairs = _tables(self.quant_type, self.device).pairs
        scales = self.scales()
        out = torch.empty(n, dtype=dtype, device=self.device)
        step = max(bs, _CHUNK // bs * bs)  # values per step (even)
        buffer = torch.empty(min(step, n + 1) // 2 + 1, dtype=torch.int64, device=self.device)
        for start in range(0, n, step):
            stop = min(start + step, n)
            index = self.packed[start // 2:(stop + 1) // 2].int()
            # one 256-entry lookup per byte gives both values (the fp32 pair is moved as one int64: bits untouched);
            # for fp32 output it is written straight into `out`, else into an fp32 buffer
            if dtype == torch.float32 and (stop - start) % 2 == 0:
                values = out[start:stop]
                torch.index_select(pairs, 0, index, out=values.view(torch.int64))
            else:
                values = torch.index_select(pairs, 0, index, out=buffer[:index.numel()]).view(torch.float32)
            full = (stop - start) // bs * bs
            if full:  # value * its block's absmax in fp32 (in place)
                values[:full].view(-1, bs).mul_(scales[start // bs:(start + full) // bs].unsqueeze(1))
            if start + full < stop:  # the partial last block
                values[full:stop - start].mul_(scales[-1])
            if values.data_ptr() != out[start:stop].data_ptr():  # rounded once to the output dtype
                out[start:stop].copy_(values[:stop - start])  # (4x faster than a multiply that writes bf16)
        return out.view(self.shape)

    def constants(self) -> list[torch.Tensor]:
        """The tensors besides the packed codes that dequantization needs: absmax (+ nested absmax and offset)."""
        return [t for t in (self.absmax, self.nested_absmax, self.offset) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this object holds: codes and all constants (the shared code books are not counted)."""
        return sum(t.numel() * t.element_size() for t in [self.packed, *self.constants()])

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """A copy with every tensor on `device`."""
        move = (lambda t: None if t is None else t.to(device))
        return replace(self, packed=move(self.packed), absmax=move(self.absmax),
                       nested_absmax=move(self.nested_absmax), offset=move(self.offset))

    def __repr__(self) -> str:
        dq = (f", double_quant (uint8 absmax + {self.nested_absmax.numel()} fp32 nested, block {self.nested_blocksize})"
              if self.double_quant else "")
        return (f"QuantizedTensor({self.quant_type}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"blocksize={self.blocksize}{dq}, {self.nbytes:,} bytes = {self.bits_per_param:.3f} bits/param, "
                f"device={self.device})")

    # -- bitsandbytes interop ----------------------------------------------------------------------------------

    def to_bitsandbytes(self) -> tuple[torch.Tensor, "bitsandbytes.functional.QuantState"]:
        """(packed, QuantState) in bitsandbytes' layout, ready for bitsandbytes.functional.dequantize_4bit."""
        if self.quant_type not in BNB_QUANT_TYPES:
            raise ValueError(f"bitsandbytes has no {self.quant_type} 4-bit kernels (only "
                             f"{' and '.join(map(repr, BNB_QUANT_TYPES))}): quantize with one of those to convert")
        from bitsandbytes.functional import QuantState

        dev = self.device
        code = _codebook_cpu(self.quant_type).to(dev)
        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=_dynamic_map_cpu().to(dev),
                                blocksize=self.nested_blocksize, dtype=torch.float32)
        state = QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=code, dtype=self.dtype,
                           blocksize=self.blocksize, quant_type=self.quant_type, offset=self.offset, state2=state2)
        return self.packed.view(-1, 1), state

    @classmethod
    def from_bitsandbytes(cls, packed: torch.Tensor, quant_state: "bitsandbytes.functional.QuantState",
                          quant_type: str | None = None) -> "QuantizedTensor":
        """Wrap bitsandbytes' (packed, QuantState) without copying; `quant_type`, if given, must match the state's."""
        from bitsandbytes.functional import QuantState

        if not isinstance(quant_state, QuantState):
            raise TypeError(f"quant_state must be a bitsandbytes QuantState, got {type(quant_state).__name__}")
        qt = quant_state.quant_type
        if not isinstance(qt, str) or qt.lower() not in BNB_QUANT_TYPES:
            raise ValueError(f"QuantState has quant_type {qt!r}; only 4-bit {' and '.join(map(repr, BNB_QUANT_TYPES))}"
                             " states can be converted")
        qt = qt.lower()
        if quant_type is not None and check_quant_type(quant_type) != qt:
            raise ValueError(f"expected a {quant_type!r} QuantState but got a {qt!r} one: "
                             f"pass quant_type={qt!r}, or quantize with the type you want")
        if quant_state.code is not None and not torch.equal(quant_state.code.float().cpu(), _codebook_cpu(qt)):
            raise ValueError(f"QuantState says {qt!r} but its code table is not bitsandbytes' {qt} table")
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"packed must be the torch.Tensor of packed 4-bit codes, got {type(packed).__name__}")
        if packed.dtype != torch.uint8:
            if packed.dtype.itemsize != 1 and not packed.is_contiguous():
                raise ValueError(f"packed is a non-contiguous {packed.dtype} tensor: its bytes cannot be viewed as "
                                 "uint8 codes; pass packed.contiguous()")
            packed = packed.view(torch.uint8)  # bitsandbytes may store the bytes as another dtype (quant_storage)
        nested_absmax = offset = None
        nested_blocksize = NESTED_BLOCKSIZE
        if quant_state.nested:
            s2 = quant_state.state2
            if s2 is None or s2.absmax is None or quant_state.offset is None:
                raise ValueError("the QuantState says it is double-quantized but lacks its nested state (state2 with "
                                 "absmax) or its offset; pass the QuantState bitsandbytes made, unchanged")
            if s2.code is not None and not torch.equal(s2.code.float().cpu(), _dynamic_map_cpu()):
                raise ValueError("the nested QuantState does not use bitsandbytes' dynamic 8-bit map")
            nested_absmax, offset, nested_blocksize = s2.absmax, quant_state.offset, s2.blocksize
        # every size, dtype and device is checked by the constructor (a uint8 absmax without a nested state too)
        return cls(packed=packed.reshape(-1), absmax=quant_state.absmax, shape=quant_state.shape,
                   dtype=quant_state.dtype, blocksize=quant_state.blocksize, quant_type=qt,
                   nested_absmax=nested_absmax, offset=offset, nested_blocksize=nested_blocksize)


def quantize(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
             double_quant: bool = False, backend: str = "auto") -> QuantizedTensor:
    """Quantize `w` to 4 bits blockwise (absmax scaling, nearest code), as bitsandbytes' quantize_4bit does on CPU.

    `double_quant=True` also quantizes the per-block absmax: subtract the mean, then 8-bit dynamic map in
    blocks of 256 (bitsandbytes' compress_statistics=True), saving about 0.37 bits per parameter.
    backend: "torch" (the code the notebooks explain), "triton" (one kernel for the codes, one for the 8-bit
    constants: CUDA, or the CPU under TRITON_INTERPRET=1) or "auto" (Triton on CUDA where available); same bits.
    """
    _check_weight(w)
    quant_type = check_quant_type(quant_type)
    blocksize = check_blocksize(blocksize)
    if not isinstance(double_quant, bool) and type(double_quant).__name__ not in ("bool_", "bool"):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    if torch.compiler.is_compiling():  # one opaque operator (see the end of this file)
        packed, absmax, nested, offset = torch.ops.qlora_tutor.quantize_4bit(w.detach(), quant_type, blocksize,
                                                                            double_quant)
        return QuantizedTensor(packed, absmax, w.shape, w.dtype, blocksize, quant_type,
                               nested if double_quant else None, offset if double_quant else None)
    flat = w.detach().reshape(-1)
    packed, absmax = _quantize_flat(flat, quant_type, blocksize, backend)
    if not double_quant:
        return QuantizedTensor(packed, absmax, w.shape, w.dtype, blocksize, quant_type)
    offset = absmax.mean()
    if not torch.isfinite(offset):  # absmax is finite (checked above), but the float32 sum behind the mean is not
        raise ValueError(
            f"double quantization subtracts the mean of the {absmax.numel()} block constants, and that mean "
            f"overflows float32 here (the largest absmax is {float(absmax.max()):.3g}; the sum of them all exceeds "
            f"{torch.finfo(torch.float32).max:.3g}); bitsandbytes would store an infinite offset and dequantize to "
            "Inf/NaN. Quantize with double_quant=False, or scale the weights down first"
        )
    if _use_triton(backend, absmax.device):  # the 8-bit step as one kernel too (same bits)
        qabsmax, nested_absmax = triton_kernels.quantize_constants(absmax, offset, _grid_table(absmax.device),
                                                                   NESTED_BLOCKSIZE)
    else:
        qabsmax, nested_absmax = _quantize_8bit_cpu_rule(absmax - offset, NESTED_BLOCKSIZE)
    return QuantizedTensor(packed, qabsmax, w.shape, w.dtype, blocksize, quant_type,
                           nested_absmax=nested_absmax, offset=offset)


# ----------------------------------------------------------------------------------------------------------------
# torch.compile: quantize and dequantize as custom operators
# ----------------------------------------------------------------------------------------------------------------
# Dynamo traces Python bytecode; it cannot look inside the C kernel (ctypes), a Triton launch, or quantize's
# data-dependent NaN check. As bitsandbytes does with its kernels, each is registered as one opaque operator with a
# "fake" implementation that only gives the result's shape and dtype, which is all the compiler needs; the real one
# runs the eager code above. `dequantize()` and `quantize()` call them only while being compiled.

def _dequantize_op(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                   offset: torch.Tensor | None, shape: list[int], blocksize: int, nested_blocksize: int,
                   quant_type: str, dtype: torch.dtype, backend: str) -> torch.Tensor:
    q = QuantizedTensor(packed, absmax, torch.Size(shape), dtype, blocksize, quant_type, nested_absmax, offset,
                        nested_blocksize)
    return q._dequantize_eager(dtype, backend)


def _dequantize_fake(packed, absmax, nested_absmax, offset, shape, blocksize, nested_blocksize, quant_type, dtype,
                     backend):
    return packed.new_empty(shape, dtype=dtype)


def _quantize_op(w: torch.Tensor, quant_type: str, blocksize: int,
                 double_quant: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q = quantize(w, quant_type, blocksize, double_quant)
    if not double_quant:  # the schema has four outputs; unused ones are empty (and must not alias each other)
        return q.packed, q.absmax, w.new_empty(0, dtype=torch.float32), w.new_empty(0, dtype=torch.float32)
    return q.packed, q.absmax, q.nested_absmax, q.offset


def _quantize_fake(w, quant_type, blocksize, double_quant):
    n = w.numel()
    blocks = -(-n // blocksize)
    packed = w.new_empty((n + 1) // 2, dtype=torch.uint8)
    if not double_quant:
        return (packed, w.new_empty(blocks, dtype=torch.float32), w.new_empty(0, dtype=torch.float32),
                w.new_empty(0, dtype=torch.float32))
    return (packed, w.new_empty(blocks, dtype=torch.uint8),
            w.new_empty(-(-blocks // NESTED_BLOCKSIZE), dtype=torch.float32), w.new_empty((), dtype=torch.float32))


def _register_ops() -> None:
    # explicit schemas: inferring them from the annotations above needs a newer torch than we require
    ops = [("dequantize_4bit", _dequantize_op, _dequantize_fake,
            "(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, int[] shape, int blocksize, "
            "int nested_blocksize, str quant_type, ScalarType dtype, str backend) -> Tensor"),
           ("quantize_4bit", _quantize_op, _quantize_fake,
            "(Tensor w, str quant_type, int blocksize, bool double_quant) -> (Tensor, Tensor, Tensor, Tensor)")]
    for name, impl, fake, schema in ops:
        if hasattr(torch.ops.qlora_tutor, name):  # this module was imported (or reloaded) before
            continue
        op = torch.library.custom_op(f"qlora_tutor::{name}", impl, mutates_args=(), schema=schema)
        op.register_fake(fake)


_register_ops()
