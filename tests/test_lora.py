"""LoRALinear against PEFT's LoRA layer and against float64 math: outputs, gradients, init, merge/unmerge, errors."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from layer_helpers import OneLinear, rel_error
from qlora_tutor.lora import LoRALinear, lora_scaling

peft = pytest.importorskip("peft")


def _pair(seed, in_f, out_f, r, alpha, rslora, bias=True, dropout=0.0):
    """Our layer and PEFT's on identical base weights and identical (random, nonzero) A and B."""
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    ours = LoRALinear(copy.deepcopy(base), r, alpha, dropout=dropout, use_rslora=rslora)
    with torch.no_grad():
        ours.lora_B.normal_()  # B = 0 at init would make every B-dependent check trivially pass
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["lin"], use_rslora=rslora)
    ref = peft.get_peft_model(OneLinear(copy.deepcopy(base)), cfg)
    lin = ref.base_model.model.lin
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(ours.lora_A)
        lin.lora_B["default"].weight.copy_(ours.lora_B)
    return ours, ref, lin


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("seed,in_f,out_f,r,alpha,bias", [
    (0, 37, 23, 5, 16, True), (1, 64, 96, 8, 8, False), (2, 13, 7, 1, 3.5, True), (3, 48, 48, 16, 32, True)])
def test_matches_peft_outputs_and_grads(rslora, seed, in_f, out_f, r, alpha, bias):
    ours, ref, lin = _pair(seed, in_f, out_f, r, alpha, rslora, bias)
    assert ours.scaling == pytest.approx(lin.scaling["default"])
    assert ours.scaling == pytest.approx(alpha / math.sqrt(r) if rslora else alpha / r)
    x = torch.randn(3, 5, in_f)
    g = torch.randn(3, 5, out_f)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    assert rel_error(y1, y2) < 1e-6
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert rel_error(x1.grad, x2.grad) < 1e-6
    assert rel_error(ours.lora_A.grad, lin.lora_A["default"].weight.grad) < 1e-6
    assert rel_error(ours.lora_B.grad, lin.lora_B["default"].weight.grad) < 1e-6
    # the frozen base gets no gradient, exactly as in PEFT
    assert ours.base_layer.weight.grad is None and not ours.base_layer.weight.requires_grad
    # the trainable set is the same as PEFT's: only A and B
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == ["lora_A", "lora_B"]
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in ref.parameters() if p.requires_grad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_float64_formula(seed):
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, written out in float64 from the paper's definition."""
    ours, _, _ = _pair(seed, 29, 17, 4, 12, False)
    x = torch.randn(11, 29)
    W, b = ours.base_layer.weight.double(), ours.base_layer.bias.double()
    A, B = ours.lora_A.double(), ours.lora_B.double()
    expect = x.double() @ (W + ours.scaling * B @ A).T + b
    assert rel_error(ours(x), expect) < 1e-6
    assert ours.delta_weight().shape == ours.base_layer.weight.shape == (17, 29)
    assert ours.lora_A.shape == (4, 29) and ours.lora_B.shape == (17, 4)


def test_dropout_only_on_adapter_input_same_as_peft():
    ours, ref, _ = _pair(5, 40, 24, 4, 8, False, dropout=0.3)
    ours.train(), ref.train()
    x = torch.randn(6, 40)
    torch.manual_seed(123)
    y1 = ours(x)
    torch.manual_seed(123)
    y2 = ref(x)
    assert rel_error(y1, y2) < 1e-6
    # dropout really acts in training (two draws differ) and never touches the base path
    assert not torch.allclose(ours(x), ours(x))
    with torch.no_grad():
        ours.lora_B.zero_()
    assert torch.equal(ours(x), ours.base_layer(x))
    ours.eval()
    with torch.no_grad():
        ours.lora_B.normal_()
    assert torch.equal(ours(x), ours(x))


@pytest.mark.parametrize("seed", [0, 1])
def test_merge_unmerge(seed):
    ours, ref, lin = _pair(seed, 33, 21, 6, 10, seed == 1)
    x = torch.randn(9, 33)
    w0 = ours.base_layer.weight.detach().clone()
    with torch.no_grad():
        y_unmerged = ours(x)
        ours.merge()
        assert ours.merged
        y_merged = ours(x)  # must not add the adapter a second time
        assert rel_error(y_merged, y_unmerged) < 1e-6
        assert rel_error(ours.base_layer.weight - w0, ours.delta_weight()) < 1e-5
        # PEFT's merged weight is the same matrix
        lin.merge()
        assert rel_error(ours.base_layer.weight, lin.base_layer.weight) < 1e-6
        with pytest.warns(UserWarning, match="already merged"):
            ours.merge()
        ours.unmerge()
        assert not ours.merged
        assert torch.allclose(ours.base_layer.weight, w0, rtol=0, atol=1e-6)
        assert rel_error(ours(x), y_unmerged) < 1e-6
        with pytest.warns(UserWarning, match="not merged"):
            ours.unmerge()


def test_step_zero_is_base_model_and_init_distribution():
    torch.manual_seed(0)
    base = nn.Linear(256, 80)
    layer = LoRALinear(copy.deepcopy(base), r=64, alpha=16)
    x = torch.randn(4, 256)
    assert torch.equal(layer.lora_B, torch.zeros(80, 64))
    assert torch.equal(layer(x), base(x))  # B = 0: the model is unchanged at step 0
    # A ~ U(-b, b) with b = gain·sqrt(3/fan_in), gain = sqrt(2/(1+a²)), a = sqrt(5)  =>  b = 1/sqrt(in)
    bound = math.sqrt(2 / (1 + 5)) * math.sqrt(3 / 256)
    assert bound == pytest.approx(1 / 16)
    a = layer.lora_A.detach().flatten()
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    assert _ks_uniform(a, bound) < 1.95 / math.sqrt(a.numel())  # Kolmogorov-Smirnov, 0.1% level
    # a wrong bound (kaiming with a=0, i.e. sqrt(6/in)) is rejected by the same test: it can fail
    assert _ks_uniform(a, math.sqrt(6 / 256)) > 1.95 / math.sqrt(a.numel())


def _ks_uniform(samples: torch.Tensor, bound: float) -> float:
    """Kolmogorov-Smirnov distance between the samples and U(-bound, bound)."""
    x = samples.double().sort().values
    n = x.numel()
    cdf = ((x + bound) / (2 * bound)).clamp(0, 1)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())


def test_adapter_dtype_fp32_on_16bit_base():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    y = layer(torch.randn(2, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert lora_scaling(16, 32) == 2.0 and lora_scaling(16, 32, use_rslora=True) == 8.0


@pytest.mark.parametrize("r,alpha,dropout,err,msg", [
    (0, 16, 0.0, ValueError, "at least 1"),
    (-3, 16, 0.0, ValueError, "at least 1"),
    (2.5, 16, 0.0, TypeError, "positive int"),
    ("8", 16, 0.0, TypeError, "positive int"),
    (True, 16, 0.0, TypeError, "positive int"),
    (8, "16", 0.0, TypeError, "must be a number"),
    (8, None, 0.0, TypeError, "must be a number"),
    (8, float("nan"), 0.0, ValueError, "finite"),
    (8, float("inf"), 0.0, ValueError, "finite"),
    (8, 0, 0.0, ValueError, "alpha 0"),
    (8, -0.0, 0.0, ValueError, "alpha 0"),
    (8, 16, float("nan"), ValueError, "dropout"),
    (8, 16, 1.0, ValueError, "dropout"),
    (8, 16, -0.1, ValueError, "dropout"),
])
def test_bad_arguments(r, alpha, dropout, err, msg):
    with pytest.raises(err, match=msg):
        LoRALinear(nn.Linear(4, 4), r, alpha, dropout=dropout)


def test_rejects_non_linear_base():
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1), 2, 4)


# ---------------------------------------------------------------- 16-bit bases: the same bits as PEFT

def _pair16(seed, in_f, out_f, r, alpha, dtype, bias, adapter_dtype=None):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    ours = LoRALinear(copy.deepcopy(base), r, alpha, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        ours.lora_B.normal_()
    ref = peft.get_peft_model(OneLinear(copy.deepcopy(base)),
                              peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"]),
                              autocast_adapter_dtype=adapter_dtype is None)  # PEFT's default: fp32 adapters
    lin = ref.base_model.model.lin
    assert lin.lora_A["default"].weight.dtype == ours.lora_A.dtype
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(ours.lora_A)
        lin.lora_B["default"].weight.copy_(ours.lora_B)
    return ours, ref, lin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter", ["fp32", "same"])
@pytest.mark.parametrize("seed,in_f,out_f,r,alpha,bias", [(0, 37, 23, 5, 16, True), (1, 96, 80, 8, 16, False),
                                                         (2, 64, 130, 16, 8, True)])
def test_16bit_base_matches_peft_bit_for_bit(dtype, adapter, seed, in_f, out_f, r, alpha, bias):
    """PEFT adds the fp32 adapter output to the 16-bit base output in fp32 and rounds once; so do we."""
    from bnb_reference import assert_same_bits_as_peft
    ours, ref, lin = _pair16(seed, in_f, out_f, r, alpha, dtype, bias, None if adapter == "fp32" else dtype)
    x = torch.randn(4, 7, in_f).to(dtype)
    assert assert_same_bits_as_peft(ours, ref, lin, x).dtype == dtype


@pytest.mark.parametrize("adapter_dtype", [torch.int8, torch.uint8, torch.int64, torch.bool, torch.complex64,
                                           "int8", 8, "fp8"], ids=repr)
def test_adapter_dtype_must_be_floating_point(adapter_dtype):
    from qlora_tutor.qlora import QLoRALinear
    for make in (lambda: LoRALinear(nn.Linear(8, 8), 2, 4, adapter_dtype=adapter_dtype),
                 lambda: QLoRALinear.from_linear(nn.Linear(64, 8), 2, 4, compute_dtype="fp32",
                                                 adapter_dtype=adapter_dtype)):
        with pytest.raises((TypeError, ValueError), match="adapter_dtype"):
            make()


def test_adapter_dtype_by_name_or_dtype():
    assert LoRALinear(nn.Linear(8, 8), 2, 4, adapter_dtype="bf16").lora_A.dtype == torch.bfloat16
    assert LoRALinear(nn.Linear(8, 8), 2, 4, adapter_dtype=torch.float64).lora_B.dtype == torch.float64


@pytest.mark.parametrize("r,in_f,out_f,warns", [(9, 8, 16, True), (17, 32, 16, True), (8, 8, 16, False),
                                                (16, 32, 16, False), (64, 4096, 96, False)])
def test_a_rank_above_the_layer_is_said(r, in_f, out_f, warns):
    import warnings
    from qlora_tutor.lora import RankWarning
    from qlora_tutor.qlora import QLoRALinear
    makers = [lambda: LoRALinear(nn.Linear(in_f, out_f), r, 16)]
    if (in_f * out_f) % 2 == 0:
        makers.append(lambda: QLoRALinear.from_linear(nn.Linear(in_f, out_f), r, 16, compute_dtype="fp32"))
    for make in makers:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make()
        said = [w for w in caught if issubclass(w.category, RankWarning)]
        assert len(said) == int(warns), [str(w.message) for w in caught]
        if warns:
            assert f"use r <= {min(in_f, out_f)}" in str(said[0].message)
