"""torch.compile(fullgraph=True) over our quantize, dequantize and QLoRA layer (custom operators with fake kernels).

Dynamo cannot trace the C kernel (ctypes), a Triton launch or quantize's data-dependent NaN check; registered as
torch.library custom operators with fake implementations they compile as single opaque nodes, as bitsandbytes'
kernels do. Most tests use the "aot_eager" backend (dynamo + AOT autograd, the part fullgraph is about, without
generating code); one compiles the layer with inductor. `opcheck` tests the registrations themselves.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from bnb_reference import same_bits
from layer_helpers import rel_error
from qlora_tutor.qlora import QLoRALinear
from qlora_tutor.quant import quantize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_and_quantize_compile_with_fullgraph(device):
    w = torch.randn(33, 70, device=device)
    q = quantize(w, "nf4", 64, double_quant=True)
    deq = torch.compile(lambda: q.dequantize(torch.bfloat16), fullgraph=True, backend="aot_eager")
    assert same_bits(deq(), q.dequantize(torch.bfloat16))
    quant = torch.compile(lambda w: quantize(w, "fp4", 32, double_quant=True), fullgraph=True, backend="aot_eager")
    got, ref = quant(w), quantize(w, "fp4", 32, double_quant=True)
    for field in ("packed", "absmax", "nested_absmax", "offset"):
        assert same_bits(getattr(got, field), getattr(ref, field)), field
    assert got.shape == ref.shape and got.blocksize == 32 and got.quant_type == "fp4"


def test_the_custom_operators_pass_opcheck():
    w = torch.randn(5, 99)
    for dq in (False, True):
        q = quantize(w, "nf4", 32, double_quant=dq)
        torch.library.opcheck(torch.ops.qlora_tutor.dequantize_4bit,
                              (q.packed, q.absmax, q.nested_absmax, q.offset, [5, 99], 32, 256, "nf4",
                               torch.float16, "auto"))
        torch.library.opcheck(torch.ops.qlora_tutor.quantize_4bit, (w, "nf4", 32, dq))


def _fwd_bwd(m, x):
    xx = x.detach().clone().requires_grad_(True)
    m.lora_A.grad = m.lora_B.grad = None
    y = m(xx)
    y.float().square().sum().backward()
    return [y, xx.grad, m.lora_A.grad.clone(), m.lora_B.grad.clone()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["one-node", "modules"])
def test_qlora_layer_compiles_with_fullgraph(fused, device, monkeypatch):
    monkeypatch.setattr(QLoRALinear, "fused", fused)
    torch.manual_seed(0)
    m = QLoRALinear.from_linear(nn.Linear(96, 40, device=device), r=4, alpha=8, compute_dtype=torch.float32)
    with torch.no_grad():
        m.lora_B.normal_(std=0.1)
    x = torch.randn(2, 5, 96, device=device)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for a, b in zip(_fwd_bwd(compiled, x), _fwd_bwd(m, x)):
        assert rel_error(a, b) < 1e-6


def test_qlora_layer_compiles_with_inductor():
    torch.manual_seed(1)
    m = QLoRALinear.from_linear(nn.Linear(64, 32), r=4, alpha=8, quant_type="fp4", compute_dtype=torch.float32)
    with torch.no_grad():
        m.lora_B.normal_(std=0.1)
    x = torch.randn(3, 64)
    compiled = torch.compile(m, fullgraph=True)
    for a, b in zip(_fwd_bwd(compiled, x), _fwd_bwd(m, x)):
        assert rel_error(a, b) < 1e-5
