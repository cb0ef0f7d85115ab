"""The native (C) dequantize against the PyTorch one and bitsandbytes: same bits, every type, shape and dtype.

Also: clear errors for bad calls (the C code reads raw pointers), the fallback when there is no compiler, the
off switch, the build cache, and the huge-page advice skipping memory that is already mapped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from bnb_reference import (BITS, assert_matches_bnb, bnb_cpu_dequant_misscales, fp16_ties_rounded_away,
                           same_bits)
from qlora_tutor import native
from qlora_tutor.quant import BLOCKSIZES, QuantizedTensor, codebook, quantize

if not native.available():
    if native._compiler() is not None and os.environ.get("QLORA_TUTOR_NATIVE", "1") != "0":
        # a compiler is there, so the build should have worked: that is a bug to see, not a test to skip
        pytest.fail(f"the native dequantize did not build: {native.status()}", pytrace=False)
    pytest.skip(f"native dequantize unavailable: {native.status()}", allow_module_level=True)

OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def native_dequantize(q: QuantizedTensor, dtype: torch.dtype, use_avx512: bool = True,
                      threads: int | None = None, stream: bool | None = None) -> torch.Tensor:
    """The native path with its options forced (the AVX-512 or plain loop, thread count, store kind)."""
    return q._dequantize_native(dtype, use_avx512=use_avx512, threads=threads, stream=stream)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("in_dtype", OUT_DTYPES)
def test_native_equals_torch_every_shape_and_dtype(quant_type, double_quant, in_dtype):
    g = torch.Generator().manual_seed(hash((quant_type, double_quant, str(in_dtype))) % 2**31)
    # odd sizes (a lone last nibble), partial last blocks, single values, sizes that are whole blocks
    for shape in [(1,), (3, 7), (37, 53), (129, 64), (2, 4096), (5, 1000, 3)]:
        w = (torch.randn(shape, generator=g) * torch.rand(1, generator=g) * 10).to(in_dtype)
        for blocksize in (32, 64, 256, 4096):
            q = quantize(w, quant_type, blocksize, double_quant)
            for out_dtype in OUT_DTYPES:
                ref = q.dequantize(out_dtype, backend="torch")
                assert same_bits(q.dequantize(out_dtype, backend="native"), ref), (shape, blocksize, out_dtype)
                assert same_bits(native_dequantize(q, out_dtype, use_avx512=False), ref), "plain C loop"


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_native_equals_bitsandbytes_all_block_sizes(blocksize):
    F = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(blocksize)
    for dtype, quant_type, double_quant in [(torch.float32, "nf4", False), (torch.bfloat16, "fp4", True),
                                            (torch.float16, "nf4", True), (torch.bfloat16, "nf4", False)]:
        # last dim a multiple of every block size: bitsandbytes' C++ kernel mis-scales some other shapes
        assert not bnb_cpu_dequant_misscales((24, 4096), blocksize)
        w = (torch.randn(24, 4096, generator=g) * 0.05).to(dtype)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=double_quant)
        q = QuantizedTensor.from_bitsandbytes(packed, state)
        assert_matches_bnb(q.dequantize(backend="native"), F.dequantize_4bit(packed, state), quant_type,
                           q.dequantize(torch.float32, backend="torch"), what=f"{dtype} {quant_type}")


def test_the_float16_tie_rule_accepts_only_ties_rounded_away():
    # the exception bnb_reference allows on AVX512-FP16 CPUs, checked here on any CPU so that it can fail
    exact = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-12, -(1 + 2**-11)], dtype=torch.float32)
    ours = exact.half()                                                  # ties to even: 1, 1 + 2**-9, 1, -1
    away = torch.tensor([1 + 2**-10, 1 + 2**-9, 1, -(1 + 2**-10)]).half()  # ties away from zero
    assert fp16_ties_rounded_away(ours, away, exact)
    not_a_tie = away.clone()
    not_a_tie[2] = 1 + 2**-10                                            # 1 + 2**-12 is no tie: must be refused
    assert not fp16_ties_rounded_away(ours, not_a_tie, exact)
    wrong_way = torch.tensor([1 - 2**-11]).half()                        # a neighbour on the other side
    assert not fp16_ties_rounded_away(torch.tensor([1.0]).half(), wrong_way, torch.tensor([1 + 2**-11]))


def test_threads_and_store_kinds_give_the_same_bits():
    w = torch.randn(1024, 1536) * 0.02  # 1.5 M values: enough for several workers
    for double_quant in (False, True):
        q = quantize(w, "nf4", 64, double_quant)
        ref = q.dequantize(torch.bfloat16, backend="torch")
        for threads in (1, 2, 3, 5):
            for stream in (False, True):  # ordinary and non-temporal stores
                assert same_bits(native_dequantize(q, torch.bfloat16, threads=threads, stream=stream), ref)
    q = quantize(torch.randn(777, 1001), "fp4", 32, True)  # a partial last block, odd size
    for dtype in OUT_DTYPES:
        for stream in (False, True):
            ref = q.dequantize(dtype, backend="torch")
            assert same_bits(native_dequantize(q, dtype, threads=3, stream=stream), ref)


def test_fp16_rounding_edges_subnormals_overflow_and_ties():
    # scales chosen so that products land on fp16 subnormals, near the overflow threshold, and on rounding ties
    code = codebook("nf4")
    scales = torch.tensor([1e-7, 3e-6, 6.1e-5, 65504.0, 65519.0, 65520.0, 7e4, 1.0, 2.0**-24, 2.0**-25])
    scales = torch.cat([scales, torch.rand(54) * 1e-4])  # many values around the subnormal/normal boundary
    q = quantize(torch.randn(scales.numel(), 64), "nf4", 64)
    q = replace(q, absmax=scales.float())
    ref = q.dequantize(torch.float16, backend="torch")
    assert torch.isinf(ref).any() and (ref.abs() < 6.1e-5).logical_and(ref != 0).any()  # the edges are exercised
    assert same_bits(q.dequantize(torch.float16, backend="native"), ref)
    assert same_bits(native_dequantize(q, torch.float16, use_avx512=False), ref)
    assert code.dtype == torch.float32


def test_non_finite_constants_stay_non_finite():
    # quantize() refuses NaN/Inf, but a corrupted or hand-made state can hold them: finite values keep their bits
    # and NaN stays NaN (PyTorch's own fp32 -> bf16 casts disagree on the NaN bit pattern, so that is not compared)
    q = quantize(torch.randn(8, 64), "nf4", 64)
    absmax = q.absmax.clone()
    absmax[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40])
    q = replace(q, absmax=absmax)
    for dtype in OUT_DTYPES:
        ref, ours = q.dequantize(dtype, backend="torch"), q.dequantize(dtype, backend="native")
        assert torch.equal(torch.isnan(ours), torch.isnan(ref))
        finite = ~torch.isnan(ref)
        assert torch.equal(ours[finite].view(BITS[dtype]), ref[finite].view(BITS[dtype]))


def test_backend_choice_and_errors():
    q = quantize(torch.randn(16, 64), "nf4", 64)
    with pytest.raises(ValueError, match="unknown backend"):
        q.dequantize(backend="fast")
    with pytest.raises(ValueError, match="backend='torch'"):
        q.dequantize(torch.float64, backend="native")
    assert q.dequantize(torch.float64).dtype == torch.float64  # auto falls back to the PyTorch code
    out = torch.empty(q.numel)
    with pytest.raises(ValueError, match="absmax must be a contiguous CPU torch.float32 tensor of 16 values"):
        native.dequantize_4bit(q.packed, codebook("nf4"), out, 64, absmax=q.absmax[:-1])
    with pytest.raises(ValueError, match="packed must be"):
        native.dequantize_4bit(q.packed[:-1], codebook("nf4"), out, 64, absmax=q.absmax)
    with pytest.raises(ValueError, match="packed must be"):
        native.dequantize_4bit(q.packed.int(), codebook("nf4"), out, 64, absmax=q.absmax)
    with pytest.raises(ValueError, match="block size must be an integer from 2"):
        native.dequantize_4bit(q.packed, codebook("nf4"), out, 0, absmax=q.absmax)
    with pytest.raises(ValueError, match="even block size"):
        native.dequantize_4bit(q.packed, codebook("nf4"), out, 63, absmax=q.absmax)
    with pytest.raises(ValueError, match="writes float32, bfloat16 or float16"):
        native.dequantize_4bit(q.packed, codebook("nf4"), out.double(), 64, absmax=q.absmax)
    with pytest.raises(ValueError, match="pass absmax, or qabsmax"):
        native.dequantize_4bit(q.packed, codebook("nf4"), out, 64)
    with pytest.raises(ValueError, match="contiguous"):
        native.dequantize_4bit(q.packed, codebook("nf4"), torch.empty(2 * q.numel)[::2], 64, absmax=q.absmax)


# Sizes ctypes would cut to their low 64 (or 32) bits on the way to C: 2**64 arrives as 0 (SIGFPE), 2**64 + 64
# as 64 (reads out of bounds), 2**63 as a negative number; and sizes that are simply absurd or not integers.
BAD_SIZES = [2**64, 2**64 + 64, 2**64 + 2**32 + 64, 2**63, 2**63 - 2, 2**32 + 64, 2**31, -2**63, -64, 0, 64.0, "64",
             True]
CRASH_PROBE = f"""
import numpy, torch
from dataclasses import replace
from qlora_tutor import native
from qlora_tutor.quant import QuantizedTensor, _codebook_cpu, _dynamic_map_cpu, quantize
caught = 0
for dq in (False, True):
    q = quantize(torch.randn(2**14), "nf4", 64, dq)
    for bad in {BAD_SIZES!r} + [numpy.uint64(2**64 - 1), numpy.int64(-64)]:
        calls = [lambda: QuantizedTensor(q.packed, q.absmax[:1], q.shape, q.dtype, bad, "nf4",
                                         q.nested_absmax, q.offset).dequantize(),
                 lambda: replace(q, blocksize=bad).dequantize(backend="native"),
                 lambda: replace(q, nested_blocksize=bad).dequantize(backend="native")]
        out = torch.empty(q.numel)
        if dq:
            kw = dict(qabsmax=q.absmax, dynamic_map=_dynamic_map_cpu(), nested=q.nested_absmax, offset=float(q.offset))
            calls += [lambda: native.dequantize_4bit(q.packed, _codebook_cpu("nf4"), out, bad, **kw),
                      lambda: native.dequantize_4bit(q.packed, _codebook_cpu("nf4"), out, 64, nested_blocksize=bad,
                                                     **kw)]
        else:
            calls += [lambda: native.dequantize_4bit(q.packed, _codebook_cpu("nf4"), out, bad, absmax=q.absmax),
                      lambda: native.dequantize_4bit(q.packed, _codebook_cpu("nf4"), out, 64, absmax=q.absmax,
                                                     threads=bad)]
        for call in calls:
            try:
                call()
            except (ValueError, TypeError) as err:
                caught += 1
            else:
                raise SystemExit(f"accepted {{bad!r}}")
print(caught)
"""


def test_sizes_ctypes_would_truncate_are_errors_not_crashes():
    """A Python process must never die from a bad argument: each bad size is a ValueError/TypeError (run in a
    child process, so that a crash shows as its exit signal instead of killing the test run)."""
    result = subprocess.run([sys.executable, "-c", CRASH_PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit status {result.returncode} (negative: killed by that signal)\n" \
                                   f"{result.stdout[-500:]}{result.stderr[-2000:]}"
    assert int(result.stdout.split()[-1]) == 2 * 5 * (len(BAD_SIZES) + 2)


def _run(code: str, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


CHECK = ("import torch; from qlora_tutor import native; from qlora_tutor.quant import quantize; "
         "q = quantize(torch.randn(64, 64), 'nf4', 64); "
         "assert torch.equal(q.dequantize(), q.dequantize(backend='torch')); "
         "print(native.available(), '|', native.status())")


def test_off_switch_and_no_compiler_fall_back_to_torch(tmp_path):
    assert _run(CHECK, QLORA_TUTOR_NATIVE="0").startswith("False | turned off by QLORA_TUTOR_NATIVE=0")
    # a "compiler" that fails: the reason is reported and dequantize still works (PyTorch path)
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 1\n")
    broken.chmod(0o755)
    out = _run(CHECK, CC=str(broken), XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert out.startswith("False | native build failed") and "this compiler is broken" in out


def test_build_is_cached_and_rebuilt_when_missing(tmp_path):
    env = dict(XDG_CACHE_HOME=str(tmp_path))
    assert _run(CHECK, **env).startswith("True")
    folder = tmp_path / "qlora_tutor"
    built = sorted(folder.glob("dequant4-*"))  # the library and its recorded SHA-256
    assert [p.suffix for p in built] == [".so" if sys.platform != "darwin" else ".dylib", ".sha256"]
    assert oct(folder.stat().st_mode & 0o777) == "0o700" and not built[0].stat().st_mode & 0o077
    mtime = built[0].stat().st_mtime_ns
    assert "cached in" in _run(CHECK + "; print(native._load()['where'])", **env)
    assert built[0].stat().st_mtime_ns == mtime  # loaded from the cache, not compiled again
    assert sorted(p.name for p in folder.iterdir()) == [".lock", *(p.name for p in built)]  # no temporary files


@pytest.mark.skipif(sys.platform != "linux", reason="transparent huge pages are a Linux feature")
def test_huge_page_advice_skips_memory_already_mapped():
    lib = native._load()["lib"]
    touched = torch.ones(8 << 20)  # 32 MiB, every page written: nothing to gain, must be left alone
    assert lib.qt_is_resident(touched.data_ptr(), touched.numel() * 4) == 1
    assert lib.qt_advise_huge_pages(touched.data_ptr(), touched.numel() * 4) == 1
    small = torch.empty(1000)
    assert lib.qt_advise_huge_pages(small.data_ptr(), 4000) == -1  # smaller than one 2 MiB page
    fresh = native.empty(1 << 24, torch.float32)  # advised or not, it is an ordinary tensor
    assert fresh.shape == (1 << 24,) and fresh.dtype == torch.float32
