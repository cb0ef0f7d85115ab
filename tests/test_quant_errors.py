"""Bad input to qlora_tutor.quant gets a clear error that names the problem and the fix."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
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


# ---------------------------------------------------------------- QuantizedTensor checks its parts, once

def _parts(double_quant: bool) -> dict:
    q = quantize(torch.randn(37, 53), "nf4", 64, double_quant)  # 1,961 values: odd, a partial last block
    return dict(packed=q.packed, absmax=q.absmax, shape=q.shape, dtype=q.dtype, blocksize=q.blocksize,
                quant_type=q.quant_type, nested_absmax=q.nested_absmax, offset=q.offset)


def _bad_parts(double_quant: bool):
    """(what is wrong, changes to the parts, the part the error must name) for one quantization's parts."""
    p = _parts(double_quant)
    packed, absmax = p["packed"], p["absmax"]
    yield "packed too short", dict(packed=packed[:-1]), "packed"
    yield "packed much too short", dict(packed=packed[:10]), "packed"
    yield "packed too long", dict(packed=torch.cat([packed, packed[:1]])), "packed"
    yield "packed empty", dict(packed=packed[:0]), "packed"
    yield "packed as int32", dict(packed=packed.int()), "packed"
    yield "packed in bitsandbytes' (n, 1) layout", dict(packed=packed.view(-1, 1)), "packed"
    yield "packed as a list", dict(packed=packed.tolist()), "packed"
    yield "absmax one short", dict(absmax=absmax[:-1]), "absmax"
    yield "absmax one long", dict(absmax=torch.cat([absmax, absmax[:1]])), "absmax"
    yield "absmax 2-D", dict(absmax=absmax.view(1, -1)), "absmax"
    yield "shape of another tensor", dict(shape=(53, 38)), "packed"
    yield "shape with a negative side", dict(shape=(-37, -53)), "shape"
    yield "shape with no values", dict(shape=(0, 53)), "shape"
    yield "shape of floats", dict(shape=(37.0, 53.0)), "shape"
    yield "shape as an int", dict(shape=1961), "shape"
    yield "dtype int8", dict(dtype=torch.int8), "dtype"
    yield "dtype as a string", dict(dtype="float32"), "dtype"
    yield "absmax on another device", dict(absmax=absmax.to("meta")), "absmax"
    if double_quant:
        nested, offset = p["nested_absmax"], p["offset"]
        yield "absmax as fp32 scales with a nested state", dict(absmax=absmax.float()), "absmax"
        yield "nested_absmax too short", dict(nested_absmax=nested[:0]), "nested_absmax"
        yield "nested_absmax as fp16", dict(nested_absmax=nested.half()), "nested_absmax"
        yield "offset missing", dict(offset=None), "offset"
        yield "offset as a float", dict(offset=float(offset)), "offset"
        yield "offset as float64", dict(offset=offset.double()), "offset"
        yield "offset with two values", dict(offset=offset.repeat(2)), "offset"
        yield "nested blocksize 2**64", dict(nested_blocksize=2**64), "nested_blocksize"
    else:
        yield "absmax as uint8 codes without a nested state", dict(absmax=absmax.to(torch.uint8)), "absmax"
        yield "absmax as fp16", dict(absmax=absmax.half()), "absmax"
        yield "absmax as float64", dict(absmax=absmax.double()), "absmax"
        yield "nested_absmax without offset", dict(nested_absmax=absmax[:1]), "offset"


@pytest.mark.parametrize("double_quant", [False, True])
def test_inconsistent_parts_are_refused_by_the_constructor(double_quant):
    good = _parts(double_quant)
    ref = QuantizedTensor(**good).dequantize(backend="torch")
    for what, change, part in _bad_parts(double_quant):
        with pytest.raises((ValueError, TypeError), match=part) as err:
            QuantizedTensor(**(good | change))
        assert "QuantizedTensor" in str(err.value) or part.endswith("blocksize"), what
    # the same object rebuilt through dataclasses.replace is checked too (every backend sees checked parts)
    from dataclasses import replace
    q = QuantizedTensor(**good)
    with pytest.raises(ValueError, match="packed"):
        replace(q, packed=q.packed[:-1])
    for backend in ("torch", "auto"):
        assert torch.equal(QuantizedTensor(**good).dequantize(backend=backend), ref)


BAD_BLOCKSIZES = [0, 1, 16, 48, 100, 8192, -64, 2**63 - 2, 2**63, 2**64, 2**64 + 64, 64.0, "64", True, None,
                  torch.tensor(64.0), torch.tensor([64, 64]), torch.tensor(True)]


@pytest.mark.parametrize("blocksize", BAD_BLOCKSIZES, ids=repr)
def test_bad_block_sizes_everywhere(blocksize):
    good = _parts(False)
    with pytest.raises(ValueError, match="power of two from 32 to 4096"):
        QuantizedTensor(**(good | dict(blocksize=blocksize)))
    with pytest.raises(ValueError, match="power of two from 32 to 4096"):
        quantize(torch.randn(256), blocksize=blocksize)


@pytest.mark.parametrize("blocksize", [np.int64(64), np.int32(128), np.uint16(32), torch.tensor(64), 256],
                         ids=repr)
def test_integer_block_sizes_of_any_integer_type_are_the_integer(blocksize):
    w = torch.randn(33, 70)
    q = quantize(w, blocksize=blocksize)
    assert type(q.blocksize) is int and q.blocksize == int(blocksize)
    assert torch.equal(q.packed, quantize(w, blocksize=int(blocksize)).packed)
    nested = QuantizedTensor(**(_parts(True) | dict(nested_blocksize=np.int64(256))))
    assert type(nested.nested_blocksize) is int


@pytest.mark.parametrize("quant_type", ["nf5", "NF8", "", None, 4, "af4"])
def test_unknown_quant_types_are_value_errors_everywhere(quant_type):
    from qlora_tutor.qlora import QLoRALinear, QuantizedLinear
    calls = [lambda: quantize(torch.randn(64), quant_type), lambda: codebook(quant_type),
             lambda: QuantizedTensor(**(_parts(False) | dict(quant_type=quant_type))),
             lambda: QuantizedLinear.from_linear(torch.nn.Linear(64, 4), quant_type, compute_dtype="fp32"),
             lambda: QLoRALinear.from_linear(torch.nn.Linear(64, 4), 2, 4, quant_type=quant_type, compute_dtype="fp32")]
    for call in calls:
        with pytest.raises(ValueError, match=r"unknown quant_type .*'nf4', 'fp4', 'int4'"):
            call()


def test_quant_type_names_are_one_rule_in_both_stacks():
    """'NF4' is 'nf4' wherever a quant type is taken; 'int4' is ours only; the same message everywhere."""
    from qlora_tutor import config, memory
    from qlora_tutor.qlora import QLoRALinear
    for name in ("NF4", "Fp4", "int4", "INT4"):
        assert quantize(torch.randn(64), name).quant_type == name.lower()
        assert QuantizedTensor(**(_parts(False) | dict(quant_type=name))).quant_type == name.lower()
        layer = QLoRALinear.from_linear(torch.nn.Linear(64, 4), 2, 4, quant_type=name, compute_dtype="fp32")
        assert layer.base_layer.weight.quant_type == name.lower()
    assert config.check_quant_type("NF4") == "nf4"
    est = memory.estimate("llama-7b", "qlora", quant_type="NF4")
    assert est.total == memory.estimate("llama-7b", "qlora", quant_type="nf4").total
    for bad in ("int4", "nf5", None):
        with pytest.raises(ValueError, match=r"unknown quant_type .*bitsandbytes has 4-bit kernels for 'nf4', 'fp4'"):
            memory.estimate("llama-7b", "qlora", quant_type=bad)
        with pytest.raises(ValueError, match=r"bitsandbytes has 4-bit kernels for 'nf4', 'fp4'"):
            config.check_quant_type(bad)
    for fn in (memory.quantized_bytes, memory.unit_bytes):
        with pytest.raises(ValueError, match="unknown quant_type 'nf5'"):
            fn(*(["llama-7b"] if fn is memory.unit_bytes else [4096]), quant_type="nf5")
    if importlib.util.find_spec("bitsandbytes") and importlib.util.find_spec("transformers"):
        from qlora_tutor import measure
        assert measure.quantize_linears(torch.nn.Sequential(torch.nn.Linear(64, 64)), quant_type="NF4") == 1
        with pytest.raises(ValueError, match="unknown quant_type 'nf5'"):
            measure.quantize_linears(torch.nn.Sequential(torch.nn.Linear(64, 64)), quant_type="nf5")


def test_a_meta_tensor_is_refused_with_the_fix():
    from qlora_tutor.qlora import QLoRALinear
    with pytest.raises(ValueError, match=r"meta device.*no values.*to_empty"):
        quantize(torch.empty(64, 64, device="meta"))
    with torch.device("meta"):
        lin = torch.nn.Linear(64, 8)
    with pytest.raises(ValueError, match="meta device"):
        QLoRALinear.from_linear(lin, 2, 4, compute_dtype="fp32")
    q = quantize(torch.randn(64, 64)).to("meta")  # moving an existing one is fine: a shape-only dequantize
    assert q.dequantize(backend="torch").device.type == "meta"


@pytest.mark.parametrize("value", ["yes", 1, None, torch.tensor(True)], ids=repr)
def test_double_quant_must_be_a_bool(value):
    with pytest.raises(TypeError, match="double_quant must be True or False"):
        quantize(torch.randn(256), double_quant=value)


@pytest.mark.parametrize("kwargs", [dict(bits=0), dict(bits=9), dict(bits=4.0), dict(offset=1.0), dict(offset=0.5),
                                    dict(offset=2), dict(offset="0.97")], ids=repr)
def test_normal_float_levels_needs_sensible_bits_and_offset(kwargs):
    from qlora_tutor.quant import normal_float_levels
    with pytest.raises(ValueError, match="bits must be|offset is"):
        normal_float_levels(**kwargs)


def test_from_bitsandbytes_refuses_states_that_do_not_add_up():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(40, 64)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    stripped = copy.copy(state)  # uint8 codes kept, the nested state dropped: the codes would be used as scales
    stripped.state2, stripped.nested, stripped.offset = None, False, None
    with pytest.raises(ValueError, match="absmax is uint8.*nested"):
        QuantizedTensor.from_bitsandbytes(packed, stripped)
    broken = copy.copy(state)
    broken.state2 = None
    with pytest.raises(ValueError, match="lacks its nested state"):
        QuantizedTensor.from_bitsandbytes(packed, broken)
    for change in (dict(blocksize=2**64), dict(blocksize=48), dict(shape=(40, 65)), dict(dtype=torch.int8),
                   dict(absmax=state.absmax[:-1])):
        bad = copy.copy(state)
        for k, v in change.items():
            setattr(bad, k, v)
        with pytest.raises((ValueError, TypeError)):
            QuantizedTensor.from_bitsandbytes(packed, bad)
    assert QuantizedTensor.from_bitsandbytes(packed, state).double_quant
