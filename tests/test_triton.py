"""The Triton kernels (qlora_tutor/triton_kernels.py) against our PyTorch code and bitsandbytes, bit for bit.

On the CPU they run under Triton's interpreter (TRITON_INTERPRET=1, set per test with monkeypatch so the rest of
the suite is unaffected; the kernels are wrapped by the interpreter when they are called, not when imported).
The interpreter is slow, so tensors are small; the shapes are chosen for what breaks kernels: odd sizes, partial
last blocks, a nested block cut short, all-zero blocks, every block size class. Where CUDA is present the same
tests run on it (then compiled, not interpreted).
"""

from __future__ import annotations

import pytest
import torch

from bnb_reference import assert_matches_bnb, same_bits
from qlora_tutor import triton_kernels as tk
from qlora_tutor.quant import QuantizedTensor, codebook, dynamic_map, quantize

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("QLORA_TUTOR_TRITON", raising=False)


def weight(shape, dtype, seed, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    flat[: flat.numel() // 4] = 0.0                 # whole blocks of zeros
    flat[-3:] *= 1e3                                 # outliers in the last block
    return w.to(dtype).to(device)


# (shape, blocksize): odd count (a half-used last byte) and a partial block; block 32; one partial 4096 block;
# more than 256 blocks, so the nested constants have a second, partial block
SHAPES = [((7, 37), 64), ((5, 99), 32), ((5000,), 4096), ((260, 65), 64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_dequantize_kernel_gives_the_same_bits_as_the_pytorch_path(quant_type, double_quant, device):
    for i, (shape, bs) in enumerate(SHAPES):
        q = quantize(weight(shape, DTYPES[i % 3], seed=i, device=device), quant_type, bs, double_quant)
        for out in DTYPES:
            ref = q.dequantize(out, backend="torch")
            got = q.dequantize(out, backend="triton")
            assert same_bits(got, ref), (shape, bs, out, int((got != ref).sum()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_quantize_kernel_gives_the_same_bytes_as_the_pytorch_path(quant_type, double_quant, device):
    for i, (shape, bs) in enumerate(SHAPES):
        w = weight(shape, DTYPES[(i + 1) % 3], seed=10 + i, device=device)
        a = quantize(w, quant_type, bs, double_quant, backend="torch")
        b = quantize(w, quant_type, bs, double_quant, backend="triton")
        for field in ("packed", "absmax", "nested_absmax", "offset"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None) == (y is None)
            if x is not None:
                assert x.dtype == y.dtype and same_bits(x.reshape(-1), y.reshape(-1)), (shape, bs, field)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_triton_dequantize_matches_bitsandbytes_cpu(quant_type):
    F = pytest.importorskip("bitsandbytes.functional")
    w = weight((9, 71), torch.bfloat16, seed=5)  # 639 values: odd, and the last of 10 blocks is partial
    with torch._dynamo.config.patch(disable=True):  # bnb compiles its odd-shape path; eager is the same math
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
        ref = F.dequantize_4bit(packed, state)
    q = QuantizedTensor.from_bitsandbytes(packed, state)
    got = q.dequantize(backend="triton")
    assert_matches_bnb(got, ref, quant_type, q.dequantize(torch.float32, backend="triton"), what="triton")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
def test_quantize_kernel_reports_nan_and_inf_like_the_pytorch_path():
    w = weight((4, 64), torch.float32, seed=3)
    w[2, 7] = float("nan")
    with pytest.raises(ValueError, match="1 NaN and 0 Inf.*flat index 135"):
        quantize(w, backend="triton")
    w[2, 7] = float("-inf")
    with pytest.raises(ValueError, match="0 NaN and 1 Inf"):
        quantize(w, backend="triton")


def test_fused_small_matmul_is_as_accurate_as_dequantize_then_matmul():
    """Not the same sums as a dense matmul, so a float64 reference: the error must be that of bf16/fp16 rounding."""
    for dtype, (m, n_out, k), dq, tol in [(torch.bfloat16, (3, 40, 96), True, 8e-3),
                                          (torch.float16, (17, 33, 70), False, 1e-3),
                                          (torch.float32, (1, 20, 128), True, 1e-6)]:
        q = quantize(weight((n_out, k), torch.float32, seed=m), "nf4", 32 if k % 64 else 64, dq)
        x = torch.randn(m, k).to(dtype)
        bias = torch.randn(n_out).to(dtype)
        code = codebook("nf4")
        kw = (dict(qabsmax=q.absmax, dynamic_map=dynamic_map(), nested_absmax=q.nested_absmax,
                   offset=q.offset) if dq else dict(absmax=q.absmax))
        got = tk.matmul_4bit(x, q.packed, code, n_out, q.blocksize, bias=bias, BLOCK_N=16, BLOCK_K=32, **kw)
        ref = x.double() @ q.dequantize(dtype, backend="torch").double().T + bias.double()
        assert got.dtype == dtype and got.shape == (m, n_out)
        assert float((got.double() - ref).norm() / ref.norm()) < tol, dtype


def test_dequantize_reference_is_the_same_formula():
    q = quantize(weight((3, 45), torch.float32, seed=1), "fp4", 32, True)
    for dtype in DTYPES:
        got = tk.dequantize_reference(q.packed, q.scales(), codebook("fp4"), 32, q.numel, dtype)
        assert same_bits(got.view(q.shape), q.dequantize(dtype, backend="torch"))


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_input_gets_errors_that_name_the_problem():
    q = quantize(weight((4, 64), torch.float32, seed=2), "nf4", 64)
    code = codebook("nf4")
    with pytest.raises(ValueError, match="not contiguous"):
        tk.dequantize_4bit(torch.zeros(256, dtype=torch.uint8)[::2], code, 256, 64, torch.float16, absmax=q.absmax)
    with pytest.raises(TypeError, match="packed must be torch.uint8"):
        tk.dequantize_4bit(q.packed.to(torch.int8), code, 256, 64, torch.float16, absmax=q.absmax)
    with pytest.raises(ValueError, match="absmax has 3 values, expected 4"):
        tk.dequantize_4bit(q.packed, code, 256, 64, torch.float16, absmax=q.absmax[:3])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        q.dequantize(torch.float64, backend="triton")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="on cpu but the packed codes are on cuda"):
            tk.dequantize_4bit(q.packed.cuda(), code, 256, 64, torch.float16, absmax=q.absmax)


def test_bf16_on_a_gpu_without_it_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    tk._capability.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"Tesla T4, compute capability 7.5\) has no bfloat16.*float16"):
            tk.check_output_dtype(torch.bfloat16, torch.device("cuda"))
        tk.check_output_dtype(torch.float16, torch.device("cuda"))  # fp16 is fine on a T4
    finally:
        tk._capability.cache_clear()


def test_without_the_interpreter_the_cpu_falls_back_and_status_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q = quantize(weight((4, 64), torch.float32, seed=4), "nf4", 64, True)
    assert not tk.available("cpu")
    assert "TRITON_INTERPRET=1" in tk.status("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        q.dequantize(backend="triton")
    assert same_bits(q.dequantize(torch.bfloat16), q.dequantize(torch.bfloat16, backend="torch"))  # auto: no kernel
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("QLORA_TUTOR_TRITON", "0")
    assert "QLORA_TUTOR_TRITON=0" in tk.status("cpu")


def test_missing_triton_is_reported_and_dequantize_still_works(monkeypatch):
    monkeypatch.setattr(tk, "triton", None)
    monkeypatch.setattr(tk, "_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    assert not tk.available("cuda") and "pip install triton" in tk.status("cuda")
    q = quantize(weight((4, 64), torch.float32, seed=6), "fp4", 64)
    assert same_bits(q.dequantize(), q.dequantize(backend="torch"))
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        q.dequantize(backend="triton")
