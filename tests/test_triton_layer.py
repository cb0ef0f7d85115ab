"""The QLoRA layer as one autograd node (qlora_tutor/fused_layer.py) against the module-by-module layer.

Same arithmetic, so the same bits: outputs and the gradients of x, A and B, for every compute dtype, input dtype,
shape, bias, dropout; and, like the module path, no dense weight kept from forward to backward. On CUDA the same
checks run with the Triton dequantize, and the fused few-token matmul is checked against a float64 reference.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from bnb_reference import same_bits
from layer_helpers import rel_error
from qlora_tutor import fused_layer, triton_kernels
from qlora_tutor.qlora import QLoRALinear, add_adapters
from test_qlora import _alive_after_forward, _saved_weight_like_tensors, _tiny_llama

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def layer(cd, bias=True, dropout=0.0, quant_type="nf4", device="cpu", seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(96, 40, bias=bias, device=device)
    m = QLoRALinear.from_linear(lin, r=4, alpha=8, compute_dtype=cd, dropout=dropout, quant_type=quant_type)
    with torch.no_grad():
        m.lora_B.normal_(std=0.1)
    return m


def run(m, x, fused, seed=None):
    default = QLoRALinear.fused
    QLoRALinear.fused = fused
    try:
        m.lora_A.grad = m.lora_B.grad = None
        xx = x.detach().clone().requires_grad_(True)
        if seed is not None:
            torch.manual_seed(seed)
        y = m(xx)
        (y.float().square().sum()).backward()
        return [y, xx.grad, m.lora_A.grad, m.lora_B.grad]
    finally:
        QLoRALinear.fused = default


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_one_node_gives_the_same_bits_as_the_modules(cd, device):
    if device == "cuda" and cd == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    for x_dtype, shape, bias in itertools.product((torch.float32, torch.bfloat16), ((7, 96), (2, 5, 96)), (1, 0)):
        m = layer(cd, bool(bias), device=device, seed=len(shape))
        x = torch.randn(*shape, device=device).to(x_dtype)
        for a, b in zip(run(m, x, True), run(m, x, False)):
            assert same_bits(a, b), (x_dtype, shape, bias)


def test_dropout_and_rslora_keep_the_same_bits():
    m = layer(torch.float32, dropout=0.25, quant_type="fp4")
    m.train()
    x = torch.randn(3, 4, 96)
    for a, b in zip(run(m, x, True, seed=5), run(m, x, False, seed=5)):
        assert same_bits(a, b)
    assert not torch.equal(run(m, x, True, seed=5)[0], run(m, x, True, seed=6)[0])  # dropout really acts


def test_frozen_input_and_no_grad(monkeypatch):
    m = layer(torch.bfloat16)
    x = torch.randn(6, 96)  # no requires_grad: only A and B get gradients
    monkeypatch.setattr(QLoRALinear, "fused", True)
    y = m(x)
    y.float().sum().backward()
    gA, gB = m.lora_A.grad.clone(), m.lora_B.grad.clone()
    m.lora_A.grad = m.lora_B.grad = None
    monkeypatch.setattr(QLoRALinear, "fused", False)
    y2 = m(x)
    y2.float().sum().backward()
    assert same_bits(y, y2) and same_bits(gA, m.lora_A.grad) and same_bits(gB, m.lora_B.grad)
    monkeypatch.setattr(QLoRALinear, "fused", True)
    with torch.no_grad():
        assert same_bits(m(x), y)


def test_no_dense_weight_is_kept_for_backward(monkeypatch):
    monkeypatch.setattr(QLoRALinear, "fused", True)
    model = add_adapters(_tiny_llama(2), "all-linear", r=4, alpha=8, quant_type="nf4", compute_dtype="fp32").train()
    x = torch.randint(0, 200, (2, 5))
    n_quant = sum(isinstance(m, QLoRALinear) for m in model.modules())
    assert _saved_weight_like_tensors(model, x) == []
    made, alive_mid, alive_end = _alive_after_forward(model, x)
    assert alive_mid == 0 and alive_end == 0
    assert n_quant < made <= 2 * n_quant  # once in forward, again in backward where x needs a gradient
    # the checks can fail: the same layer through ordinary autograd keeps every dense weight alive

    def naive(layer, x):
        w = layer.base_layer.weight.dequantize(layer.compute_dtype)
        base = nn.functional.linear(x.to(layer.compute_dtype), w).to(x.dtype)
        return base + layer.lora_forward(x).to(x.dtype)

    monkeypatch.setattr(fused_layer, "qlora_forward", naive)
    assert len(_saved_weight_like_tensors(model, x)) > 0
    assert _alive_after_forward(model, x)[1] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused few-token matmul runs on CUDA")
def test_few_tokens_without_grad_take_the_fused_matmul_on_cuda(monkeypatch):
    monkeypatch.setattr(QLoRALinear, "fused", True)
    monkeypatch.setattr(triton_kernels, "SMALL_M", 16)  # off by default (slower on the H200), checked anyway
    m = layer(torch.float16, device="cuda")
    calls = []
    original = triton_kernels.matmul_4bit
    monkeypatch.setattr(triton_kernels, "matmul_4bit", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(1, 3, 96, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        y = m(x)
    assert calls, "the fused path was not taken"
    w = m.base_layer.dequantized_weight(torch.float16).double()
    ref = x.double() @ w.T + m.base_layer.bias.double() + m.scaling * (x.double() @ m.lora_A.double().T) @ \
        m.lora_B.double().T
    assert rel_error(y, ref) < 2e-3
