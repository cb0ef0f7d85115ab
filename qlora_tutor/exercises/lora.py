"""Checks for notebook 03's exercises: LoRALinear.forward, and which factor gets a gradient at step 0 (why B = 0).

The forward is compared with PEFT's LoRA layer holding the same weights (outputs and the gradients of x, A, B);
the gradient question is answered by measuring the package's `LoRALinear`.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from ..lora import LoRALinear
from ..quiet import quiet_libraries
from .base import check, compare, expect, run, wrong

_CASES = ((24, 16, 4, 8.0, (5, 24)), (20, 20, 2, 3.0, (2, 3, 20)))  # in, out, r, alpha, x shape; one square W


class _OneLinear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _peft_layer(base: nn.Linear, r: int, alpha: float, A: torch.Tensor, B: torch.Tensor) -> nn.Module:
    with quiet_libraries():
        import peft
        model = peft.get_peft_model(_OneLinear(copy.deepcopy(base)),
                                    peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"]))
    lin = model.base_model.model.lin
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(A)
        lin.lora_B["default"].weight.copy_(B)
    return model


def _shape_hint(layer: nn.Module) -> Callable[[torch.Tensor], Any]:
    def call(x: torch.Tensor) -> Any:
        try:
            return layer(x)
        except RuntimeError as err:
            if "cannot be multiplied" in str(err) or "size mismatch" in str(err):
                err.args = (f"{err.args[0]}. Shapes: x (..., in), A (r, in), B (out, r); for rows of x the update "
                            "is x·Aᵀ·Bᵀ (ΔW = B·A has W's shape (out, in))",)
            raise
    return call


def _diagnose(y: torch.Tensor, base_out: torch.Tensor, x: torch.Tensor, base: nn.Linear, A: torch.Tensor,
              B: torch.Tensor, r: int, alpha: float) -> None:
    """Name the usual mistake if y equals one of its known wrong forms."""
    xab = (x @ A.T) @ B.T
    s = alpha / r
    right = base_out + s * xab
    forms = [
        (base_out + alpha * xab, "the adapter's part is r times too large: the scale is alpha / r, not alpha"),
        (base_out + xab, "the adapter's part is not scaled: multiply it by alpha / r"),
        (base_out + (r / alpha) * xab, "the scale is upside down: it is alpha / r"),
        (base_out + alpha / math.sqrt(r) * xab, "alpha / sqrt(r) is rsLoRA's scale; plain LoRA uses alpha / r"),
        (s * xab, "you return only the adapter's part: add the frozen layer's output base_layer(x)"),
        (right - base.bias, "the frozen layer's bias is missing: use self.base_layer(x) rather than x @ W.T"),
        (base_out, "the output is the frozen layer's alone: add the adapter's (alpha / r)·x·Aᵀ·Bᵀ"),
    ]
    if A.shape[1] == B.shape[0]:  # square W: x·(B·A) has the right shape but is the transposed update
        forms.append((base_out + s * (x @ (B @ A)), "you multiplied x by ΔW = B·A; nn.Linear computes x·Wᵀ, so the "
                      "update is x·ΔWᵀ = x·Aᵀ·Bᵀ (B·A is transposed in your product)"))
    if torch.allclose(y, right, rtol=1e-5, atol=1e-6):
        return
    for form, message in forms:
        if form.shape == y.shape and torch.allclose(y, form, rtol=1e-5, atol=1e-6):
            wrong(message)


@check("LoRALinear.forward")
def check_lora_forward(cls: Callable[..., nn.Module]) -> str:
    """`cls(base, r, alpha)` builds a layer with `base_layer`, `lora_A` (r, in) and `lora_B` (out, r); its forward
    must be base_layer(x) + (alpha / r)·x·Aᵀ·Bᵀ: checked against PEFT at step 0 and with trained-looking A and B."""
    with torch.random.fork_rng(devices=[]):  # seeded layers, and the notebook's random stream left as it was
        _check_lora_forward(cls)
    return "equals PEFT's LoRA layer (output, gradients of x, A and B); at step 0 it is exactly the frozen layer"


def _check_lora_forward(cls: Callable[..., nn.Module]) -> None:
    for i, (d_in, d_out, r, alpha, x_shape) in enumerate(_CASES):
        g = torch.Generator().manual_seed(500 + i)
        torch.manual_seed(500 + i)
        base = nn.Linear(d_in, d_out)
        layer = run(cls, copy.deepcopy(base), r, alpha)
        for name, shape in (("lora_A", (r, d_in)), ("lora_B", (d_out, r))):
            p = getattr(layer, name, None)
            expect(isinstance(p, torch.Tensor), f"the layer needs a parameter {name} of shape {shape}")
            expect(tuple(p.shape) == shape, f"{name} has shape {tuple(p.shape)}, expected {shape} (PEFT's layout)")
        expect(bool((layer.lora_B == 0).all()),
               "lora_B should start at zero: then ΔW = B·A = 0 and the layer equals the frozen one at step 0")
        x = torch.randn(x_shape, generator=g)
        with torch.no_grad():
            y0 = run(_shape_hint(layer), x)
            expect(isinstance(y0, torch.Tensor), f"forward should return a tensor, got {type(y0).__name__}")
            if y0.shape == base(x).shape and torch.allclose(y0, torch.zeros_like(y0)):
                wrong("at step 0 (B = 0) your layer returns zeros: the output must include the frozen layer's "
                      "base_layer(x); the adapter only adds to it")
            if y0.shape == base(x).shape and torch.allclose(y0, base(x) - base.bias, atol=1e-6):
                wrong("the frozen layer's bias is missing: use self.base_layer(x) rather than x @ W.T")
            compare("step-0 output", y0, base(x), rtol=1e-6, atol=1e-6)
        A = torch.randn(r, d_in, generator=g) * 0.3
        B = torch.randn(d_out, r, generator=g) * 0.3
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        ref = _peft_layer(base, r, alpha, A, B)
        x1 = x.clone().requires_grad_()
        x2 = x.clone().requires_grad_()
        y = run(_shape_hint(layer), x1)
        expect(isinstance(y, torch.Tensor), f"forward should return a tensor, got {type(y).__name__}")
        y_ref = ref(x2)
        with torch.no_grad():
            _diagnose(y.detach(), base(x), x, base, A, B, r, alpha)
        compare("output", y, y_ref.detach(), rtol=1e-5, atol=1e-6)
        grad_out = torch.randn(y_ref.shape, generator=g)
        run(lambda: (y * grad_out).sum().backward())
        (y_ref * grad_out).sum().backward()
        lin = ref.base_model.model.lin
        for name, got, want in (("lora_A", layer.lora_A.grad, lin.lora_A["default"].weight.grad),
                                ("lora_B", layer.lora_B.grad, lin.lora_B["default"].weight.grad),
                                ("x", x1.grad, x2.grad)):
            expect(got is not None, f"no gradient reached {name}: do not detach or use .data inside forward")
            compare(f"gradient of {name}", got, want, rtol=1e-5, atol=1e-6)
        w_grad = getattr(getattr(layer, "base_layer", None), "weight", None)
        expect(w_grad is None or w_grad.grad is None, "the frozen weight got a gradient: it should stay frozen")


_CONFIGS = {"B = 0, A random (LoRA's init)": ("random", "zero"), "A = 0, B random": ("zero", "random"),
            "A = B = 0": ("zero", "zero")}
_ANSWERS = ("A", "B", "both", "neither")


def _measured(a_init: str, b_init: str) -> str:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(600)
        layer = LoRALinear(nn.Linear(12, 8), r=3, alpha=6)
        with torch.no_grad():
            for p, how in ((layer.lora_A, a_init), (layer.lora_B, b_init)):
                p.copy_(torch.zeros_like(p) if how == "zero" else torch.randn_like(p))
        x = torch.randn(5, 12)
    (layer(x) ** 2).sum().backward()
    moved = [n for n, p in (("A", layer.lora_A), ("B", layer.lora_B)) if p.grad.abs().max() > 0]
    return {0: "neither", 2: "both"}.get(len(moved), moved[0] if moved else "neither")


_WHY = {"A": "∂L/∂A = s·Bᵀ·G·xᵀ is not 0 because B ≠ 0, while ∂L/∂B = s·G·(A·x)ᵀ is 0 because A = 0",
        "B": "∂L/∂B = s·G·(A·x)ᵀ is not 0 because A ≠ 0, while ∂L/∂A = s·Bᵀ·G·xᵀ is 0 because B = 0",
        "neither": "∂L/∂B = s·G·(A·x)ᵀ is 0 because A = 0 and ∂L/∂A = s·Bᵀ·G·xᵀ is 0 because B = 0: nothing ever "
                   "trains"}


@check("which factor gets a gradient at step 0")
def check_first_step_gradients(fn: Callable[[], dict]) -> str:
    """`fn()` returns, for each initialisation in _CONFIGS, the learner's prediction ("A", "B", "both" or
    "neither") of which LoRA factor gets a nonzero gradient in the first backward pass; checked by measuring."""
    answers = run(fn)
    expect(isinstance(answers, dict), f"return a dict from initialisation to answer, got {type(answers).__name__}")
    missing = [k for k in _CONFIGS if k not in answers]
    expect(not missing, f"answer every case: missing {missing}")
    for key, (a_init, b_init) in _CONFIGS.items():
        said = str(answers[key]).strip()
        said = next((a for a in _ANSWERS if a.lower() == said.lower()), said)
        expect(said in _ANSWERS, f"for {key!r} answer one of {', '.join(_ANSWERS)}; got {answers[key]!r}")
        truth = _measured(a_init, b_init)
        expect(said == truth, f"for {key!r} you said {said!r}, measured: {truth!r}. {_WHY[truth]}")
    return ("ΔW = s·B·A is 0 at step 0 whenever A or B is 0, so training starts from the pretrained model; but one "
            "factor must be nonzero, or no gradient ever flows. LoRA (and PEFT, for linear layers) zeroes B")
