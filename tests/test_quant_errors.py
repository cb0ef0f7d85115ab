"""Bad input to qlora_tutor.quant gets a clear error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch

from qlora_tutor.quant import QuantizedTensor, codebook, quantize


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float64])
def test_non_float_tensors_are_refused(dtype):
    w = torch.ones(128, dtype=dtype)
    with pytest.raises(TypeError, match=r"float32, bfloat16 or float16.*w\.float\(\)"):
        quantize(w)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize([0.1, 0.2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_and_inf_are_located(dtype):
    w = torch.randn(1000).to(dtype)
    w[17] = float("nan")
    w[500] = float("inf")
    w[900] = float("-inf")
    with pytest.raises(ValueError, match=r"1 NaN and 2 Inf.*flat index 17.*nan_to_num"):
        quantize(w)
    tail = torch.randn(1000)
    tail[-1] = float("nan")   # in the partial last block
    with pytest.raises(ValueError, match="flat index 999"):
        quantize(tail, blocksize=64)


def test_empty_tensor():
    with pytest.raises(ValueError, match="empty"):
        quantize(torch.empty(0, 16))


@pytest.mark.parametrize("blocksize", [0, -64, 16, 48, 100, 8192, 64.0, True, "64"])
def test_bad_block_sizes(blocksize):
    with pytest.raises(ValueError, match="power of two from 32 to 4096"):
        quantize(torch.randn(256), blocksize=blocksize)


@pytest.mark.parametrize("quant_type", ["nf8", "int8", "", None, "af4"])
def test_unknown_quant_type(quant_type):
    with pytest.raises(ValueError, match="'nf4', 'fp4', 'int4'"):
        quantize(torch.randn(256), quant_type=quant_type)
    with pytest.raises(ValueError, match="'nf4', 'fp4', 'int4'"):
        codebook(quant_type)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, "fp16"])
def test_dequantize_needs_a_float_dtype(dtype):
    with pytest.raises(TypeError, match="floating-point.*torch.float32"):
        quantize(torch.randn(256)).dequantize(dtype)


def test_module_imports_without_bitsandbytes():
    import subprocess
    import sys
    code = ("import sys; sys.modules['bitsandbytes'] = None; import torch; from qlora_tutor.quant import quantize; "
            "print(quantize(torch.randn(1000)).dequantize().shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1000])" in out.stdout


def test_int4_cannot_go_to_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="no int4 4-bit kernels"):
        quantize(torch.randn(256), "int4").to_bitsandbytes()


def test_from_bitsandbytes_checks_the_state():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(64, 64)
    packed, state = F.quantize_4bit(w, quant_type="fp4")
    with pytest.raises(ValueError, match=r"expected a 'nf4' QuantState but got a 'fp4'.*quant_type='fp4'"):
        QuantizedTensor.from_bitsandbytes(packed, state, quant_type="nf4")
    assert QuantizedTensor.from_bitsandbytes(packed, state, quant_type="fp4").quant_type == "fp4"
    state.code = F.get_4bit_type("nf4", device="cpu")   # a state whose table does not match its type
    with pytest.raises(ValueError, match="code table"):
        QuantizedTensor.from_bitsandbytes(packed, state)
    packed, state = F.quantize_4bit(w, quant_type="nf4")
    with pytest.raises(ValueError, match="inconsistent sizes"):
        QuantizedTensor.from_bitsandbytes(packed[:-3], state)
    with pytest.raises(TypeError, match="QuantState"):
        QuantizedTensor.from_bitsandbytes(packed, {"absmax": state.absmax})
