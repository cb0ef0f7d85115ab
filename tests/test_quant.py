"""qlora_tutor.quant against bitsandbytes' CPU path (bit for bit) and against float64 brute force."""

from __future__ import annotations

import math

import pytest
import torch

from bnb_reference import assert_matches_bnb, bnb_cpu_dequant_misscales, same_bits
from qlora_tutor.quant import (
    BLOCKSIZES, NESTED_BLOCKSIZE, QuantizedTensor, codebook, dynamic_map, normal_float_levels, quantize,
)

F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _no_torch_compile():
    """bitsandbytes torch.compiles its pure-PyTorch dequantization (used for odd shapes on CPU) once per shape;
    the compiled and eager code compute the same thing, so skip the compile time (only inside these tests)."""
    with torch._dynamo.config.patch(disable=True):
        yield
SEEDS = [11, 22, 33]


def fresh_weight(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random test data: normal, heavy-tailed (Student-t df=2 plus a few huge outliers) or with all-zero blocks."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "normal":
        w = torch.randn(n, generator=g) * 0.02
    elif kind == "heavy":
        # Student-t with 2 degrees of freedom: normal / sqrt(chi2_2 / 2), chi2_2 = -2 log U
        z = torch.randn(n, generator=g)
        chi2 = -2.0 * torch.log(torch.rand(n, generator=g).clamp(min=1e-12))
        w = z / torch.sqrt(chi2 / 2.0)
        w[torch.randint(0, n, (5,), generator=g)] *= 1e3
    elif kind == "zeros":
        w = torch.randn(n, generator=g)
        w[: n // 3] = 0.0          # many whole blocks of zeros
        w[-min(n, 37):] = 0.0      # and a partial last block of zeros
    else:
        raise ValueError(kind)
    return w.reshape(shape).to(dtype)


def bnb_quantize(w, quant_type, blocksize, double_quant):
    return F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


def assert_same_as_bnb(q: QuantizedTensor, packed, state) -> None:
    assert torch.equal(q.packed, packed.reshape(-1)), "packed bytes differ"
    assert q.absmax.dtype == state.absmax.dtype and same_bits(q.absmax, state.absmax), "absmax differs"
    assert same_bits(codebook(q.quant_type), state.code), "code table differs"
    if state.nested:
        assert q.double_quant
        assert same_bits(q.nested_absmax, state.state2.absmax), "nested absmax differs"
        assert same_bits(q.offset, state.offset), "offset differs"
        assert q.nested_blocksize == state.state2.blocksize
        assert same_bits(dynamic_map(), state.state2.code), "8-bit map differs"
    else:
        assert not q.double_quant
    assert not bnb_cpu_dequant_misscales(tuple(state.shape), state.blocksize)  # (bnb_reference, quirk 3)
    ref = F.dequantize_4bit(packed, state)
    exact = q.dequantize(torch.float32, backend="torch")  # fp32 products: see bnb_reference on float16 ties
    for backend in ("torch", "auto"):  # the PyTorch code, and the native C pass where it is available
        assert_matches_bnb(q.dequantize(backend=backend), ref, q.quant_type, exact, what=backend)


# ---------------------------------------------------------------- code books

def test_nf4_built_from_quantiles_equals_bnb_table():
    assert same_bits(codebook("nf4"), F.get_4bit_type("nf4", device="cpu"))


def test_nf4_structure():
    nf4 = codebook("nf4")
    assert nf4[0] == -1.0 and nf4[-1] == 1.0 and nf4[7] == 0.0
    assert (nf4 > 0).sum() == 8 and (nf4 < 0).sum() == 7
    assert torch.all(nf4[1:] > nf4[:-1])
    # float64-everywhere construction agrees to float32 precision (1 ulp)
    p = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    m = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    exact = torch.cat([m, torch.zeros(1, dtype=torch.float64), p]).sort().values
    assert torch.allclose(exact / exact.max(), nf4.double(), rtol=0, atol=2e-7)


def test_other_code_books():
    assert same_bits(codebook("fp4"), F.get_4bit_type("fp4", device="cpu"))  # code 8 is +0.0 there too
    int4 = codebook("int4")
    assert torch.equal(int4 * 7, torch.arange(-8, 8, dtype=torch.float32))
    assert same_bits(dynamic_map(), F.create_dynamic_map())
    assert torch.equal(normal_float_levels(), codebook("nf4"))
    assert codebook("NF4").dtype == torch.float32


# ---------------------------------------------------------------- bit-exact with bitsandbytes (CPU)

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bit_exact_normal(seed, dtype, quant_type, double_quant):
    w = fresh_weight("normal", (97, 518), dtype, seed)   # 50,246 values: not a multiple of any block size
    packed, state = bnb_quantize(w, quant_type, 64, double_quant)
    assert_same_as_bnb(quantize(w, quant_type, 64, double_quant), packed, state)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("kind", ["heavy", "zeros"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bit_exact_block_sizes_and_awkward_data(blocksize, kind, double_quant):
    seed = 1000 + blocksize
    for dtype, quant_type, shape in [(torch.float32, "nf4", (130, 1002)), (torch.bfloat16, "fp4", (3, 20_001)),
                                     (torch.float16, "nf4", (7, 11, 13))]:
        w = fresh_weight(kind, shape, dtype, seed)
        packed, state = bnb_quantize(w, quant_type, blocksize, double_quant)
        assert_same_as_bnb(quantize(w, quant_type, blocksize, double_quant), packed, state)


@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_through_bitsandbytes(double_quant):
    w = fresh_weight("normal", (128, 333), torch.bfloat16, 7)
    q = quantize(w, "nf4", 64, double_quant)
    packed, state = q.to_bitsandbytes()
    assert packed.shape == ((w.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
    assert same_bits(F.dequantize_4bit(packed, state), q.dequantize())
    back = QuantizedTensor.from_bitsandbytes(*bnb_quantize(w, "nf4", 64, double_quant))
    assert_same_as_bnb(back, *bnb_quantize(w, "nf4", 64, double_quant))
    assert same_bits(back.dequantize(), q.dequantize())


# ---------------------------------------------------------------- independent references

@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("seed", SEEDS)
def test_nearest_code_against_float64_argmin(quant_type, seed):
    """Every code is the nearest code value (ties to the lower value) to w / absmax, checked by brute force."""
    bs = 64
    w = fresh_weight("normal", (64 * 300 + 17,), torch.float32, seed)
    q = quantize(w, quant_type, bs)
    n = w.numel()
    codes = torch.stack([q.packed >> 4, q.packed & 15], dim=1).reshape(-1)[:n].long()
    absmax = torch.nn.functional.pad(w.abs(), (0, -n % bs)).view(-1, bs).amax(1).repeat_interleave(bs)[:n]
    scaled = w.double() / absmax.double()
    table = codebook(quant_type).double()
    dist = (scaled[:, None] - table[None, :]).abs()
    best = dist.min(dim=1).values
    # our code is at the minimum distance (float32 scaling can shift a value lying within 1e-6 of a midpoint)
    assert torch.all(dist.gather(1, codes[:, None]).squeeze(1) <= best + 1e-6)
    assert (dist.gather(1, codes[:, None]).squeeze(1) > best).float().mean() < 1e-3
    # and the dequantized value is within half the largest code gap of the input
    gap = (table.sort().values.diff().max() / 2).item()
    assert torch.all((q.dequantize().double() - w.double()).abs() <= gap * absmax.double() + 1e-7)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_fast_search_equals_bucketize_on_awkward_values(quant_type):
    """The bin-table search must agree with a plain binary search (torch.bucketize) everywhere, edges included."""
    from qlora_tutor.quant import _nearest_index, _tables

    t = _tables(quant_type, torch.device("cpu"))
    m = t.midpoints
    g = torch.Generator().manual_seed(99)
    up, down = torch.nextafter(m, torch.tensor(2.0)), torch.nextafter(m, torch.tensor(-2.0))
    x = torch.cat([torch.rand(200_000, generator=g) * 2 - 1, (torch.rand(50_000, generator=g) - 0.5) * 0.02,
                   m, up, down, -m, torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 1e-38, -1e-38,
                                                  1e-45, -1e-45])])
    offset = int(t.order[0]) if t.byte_to_code is None else 0   # Int4 codes start at 1; FP4 is remapped later
    expected = torch.bucketize(x, m) + offset
    assert torch.equal(_nearest_index(x, quant_type).long(), expected)


def test_halfway_values_go_to_the_lower_code():
    nf4 = codebook("nf4")
    w = torch.zeros(64)
    w[0] = 1.0                                    # absmax 1: the scaled values are the values themselves
    w[1:16] = (nf4[:-1] + nf4[1:]) / 2            # exactly on each midpoint
    q = quantize(w, "nf4", 64)
    codes = torch.stack([q.packed >> 4, q.packed & 15], 1).reshape(-1)
    assert torch.equal(codes[1:16], torch.arange(15, dtype=torch.uint8))


def test_int4_is_symmetric_absmax_rounding():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64 * 50, generator=g)
    q = quantize(w, "int4", 64)
    blocks = w.view(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    expected = torch.round(blocks.double() / absmax.double() * 7) / 7 * absmax.double()   # no exact ties here
    assert torch.allclose(q.dequantize().view(-1, 64).double(), expected, atol=1e-6)
    codes = torch.stack([q.packed >> 4, q.packed & 15], 1).reshape(-1)
    assert codes.min() >= 1  # code 0 (= -8) is never produced


def test_double_quant_matches_paper_bits_per_param():
    w = torch.randn(64 * NESTED_BLOCKSIZE * 64)   # 1,048,576 parameters
    q = quantize(w, "nf4", 64, double_quant=True)
    expected = 4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel()   # codes, 8-bit c2, fp32 c1, the fp32 offset
    assert q.nbytes == w.numel() // 2 + w.numel() // 64 + 4 * (w.numel() // (64 * 256)) + 4
    assert abs(q.bits_per_param - expected) < 1e-12
    assert abs(q.bits_per_param - 4.127) < 1e-3
    assert abs(quantize(w, "nf4", 64).bits_per_param - 4.5) < 1e-12


def test_dequantize_dtype_device_repr():
    w = torch.randn(10, 70, dtype=torch.bfloat16)
    q = quantize(w, "nf4")
    assert q.dequantize().dtype == torch.bfloat16 and q.dequantize().shape == w.shape
    assert torch.equal(q.dequantize(torch.float32).to(torch.bfloat16), q.dequantize())
    moved = q.to("cpu")
    assert torch.equal(moved.dequantize(), q.dequantize())
    text = repr(quantize(w, "fp4", 128, double_quant=True))
    assert "fp4" in text and "blocksize=128" in text and "double_quant" in text and "bits/param" in text


# ---------------------------------------------------------------- double quantization at the edges of float32

def _tiny_constant_groups():
    """Weights whose block constants differ from their mean by a few float32 steps near 1e-37, so that a group
    of 256 constants has a subnormal absmax: 1/absmax is inf, and its zeros (and the padding) scale to NaN."""
    for steps, blocks, dtype in [(1, 256, torch.float32), (1, 300, torch.float32), (1, 1000, torch.float32),
                                 (3, 256, torch.float32), (100, 1000, torch.float32), (1, 300, torch.bfloat16),
                                 (7, 513, torch.float32)]:
        v = up = torch.tensor(3e-37, dtype=dtype)
        for _ in range(steps):  # steps of the weight's own dtype (a bfloat16 step there is still subnormal)
            up = torch.nextafter(up, torch.tensor(1.0, dtype=dtype))
        w = torch.full((blocks, 64), v.item(), dtype=dtype)
        w[0, 0] = up
        w[blocks // 2, 5] = -up  # a negative constant of the same size
        yield w
    w = torch.full((64, 1000), 3e-37)  # the case as first reported
    w[0, 0] = 3.00001e-37
    yield w


def test_double_quant_with_subnormal_constant_groups_matches_bitsandbytes():
    for w in _tiny_constant_groups():
        packed, state = bnb_quantize(w, "nf4", 64, True)
        nested = state.state2.absmax
        assert (nested[nested > 0] < torch.finfo(torch.float32).tiny).any(), "the case must reach a subnormal group"
        assert_same_as_bnb(quantize(w, "nf4", 64, True), packed, state)


@pytest.mark.parametrize("value,blocks", [(1e36, 1000), (1e37, 1000), (3.4e38, 4), (1e38, 100)])
def test_double_quant_whose_mean_overflows_is_a_clear_error(value, blocks):
    w = torch.full((blocks, 64), value)
    w[1] *= 0.25
    _, state = bnb_quantize(w, "nf4", 64, True)
    assert not torch.isfinite(state.offset)  # bitsandbytes stores an infinite offset (and dequantizes to Inf/NaN)
    with pytest.raises(ValueError, match=r"mean overflows float32.*double_quant=False"):
        quantize(w, "nf4", 64, True)
    assert_same_as_bnb(quantize(w, "nf4", 64, False), *bnb_quantize(w, "nf4", 64, False))  # fine without DQ


def test_double_quant_of_huge_but_summable_constants_matches_bitsandbytes():
    w = torch.full((30, 64), 1e37)  # the mean of 30 constants of 1e37 is finite
    w[0, 7], w[1] = 5e36, 2.5e36
    assert_same_as_bnb(quantize(w, "nf4", 64, True), *bnb_quantize(w, "nf4", 64, True))
