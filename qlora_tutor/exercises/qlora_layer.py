"""Checks for notebook 04's exercise: the QLoRA layer's autograd Function (forward, and a backward that
dequantizes the 4-bit weight again instead of keeping the dense copy from forward).

The reference is `qlora.DequantLinear`. To see whether the learner's Function keeps the dense weight, the check
hands it a quantized weight that counts its `dequantize()` calls and remembers their results, then measures what
autograd saves (saved-tensor hooks), what the Function stores on `ctx`, and whether forward's dense weight is still
alive when forward has returned.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..qlora import DequantLinear
from ..quant import QuantizedTensor, quantize
from .base import check, compare, expect, run, wrong

_CASES = (  # (out, in), x shape, dtype, bias
    ((48, 128), (4, 128), torch.float32, True),
    ((64, 64), (2, 3, 64), torch.float32, False),   # square W: grad_out @ W and grad_out @ W.T have the same shape
    ((32, 128), (3, 128), torch.bfloat16, True),
)


class _CountingWeight:
    """A QuantizedTensor stand-in that counts dequantize() calls per phase and keeps weak references to results."""

    def __init__(self, qweight: QuantizedTensor):
        self._q = qweight
        self.phase = "forward"
        self.calls = {"forward": 0, "backward": 0}
        self.results: list[weakref.ref] = []

    def dequantize(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls[self.phase] += 1
        w = self._q.dequantize(*args, **kwargs)
        self.results.append(weakref.ref(w))
        return w

    def __getattr__(self, name: str) -> Any:  # shape, dtype, packed, ... as the real object has them
        return getattr(self._q, name)


def _hinted(fn):
    def call():
        try:
            return fn()
        except (RuntimeError, TypeError) as err:
            text = str(err)
            if "save_for_backward" in text or "_CountingWeight" in text:
                err.args = (f"{text}. The quantized weight is not a tensor: keep it as ctx.qweight = qweight",)
            elif "incorrect number of gradients" in text:
                err.args = (f"{text}. backward returns one gradient per input of forward: (grad_x, None, None)",)
            elif "dtype" in text:
                err.args = (f"{text}. Dequantize to the input's dtype: qweight.dequantize(x.dtype)",)
            elif "cannot be multiplied" in text:
                err.args = (f"{text}. Shapes: x (..., in), W (out, in), grad_out (..., out): y = x·Wᵀ and "
                            "grad_x = grad_out·W",)
            raise
    return call


@check("the QLoRA layer's autograd Function")
def check_dequant_linear(fn: type) -> str:
    """`fn` is a torch.autograd.Function with forward(ctx, x, qweight, bias) -> x·dequant(W)ᵀ + b (in x's dtype)
    and a backward that dequantizes W again and returns (grad_out·W, None, None); nothing dense kept in between."""
    if not (isinstance(fn, type) and issubclass(fn, torch.autograd.Function)):
        wrong("pass the class itself (a subclass of torch.autograd.Function), e.g. check_dequant_linear(MyDequantLinear)")
    notes = set()
    for i, (shape, x_shape, dtype, with_bias) in enumerate(_CASES):
        g = torch.Generator().manual_seed(700 + i)
        qw = quantize(torch.randn(shape, generator=g) * 0.05, "nf4", 64, double_quant=True)
        bias = (torch.randn(shape[0], generator=g) * 0.1).to(dtype) if with_bias else None
        x = torch.randn(x_shape, generator=g).to(dtype)
        counting = _CountingWeight(qw)
        saved: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        x1 = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = run(_hinted(lambda: fn.apply(x1, counting, bias)))
        where = f"(W {shape[0]}×{shape[1]}, x {tuple(x_shape)}, {str(dtype)[6:]})"
        expect(isinstance(y, torch.Tensor), f"forward should return a tensor, got {type(y).__name__}")
        expect(counting.calls["forward"] >= 1, "forward never called qweight.dequantize(...): dequantize the 4-bit "
                                               "weight to get the values to multiply with")
        x2 = x.clone().requires_grad_()
        y_ref = DequantLinear.apply(x2, qw, bias, dtype)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        expect(y.dtype == y_ref.dtype, f"the output has dtype {y.dtype}, expected {y_ref.dtype} (x's dtype) {where}")
        compare("output", y.detach(), y_ref.detach(), **tol)

        dense = shape[0] * shape[1] * torch.tensor([], dtype=dtype).element_size()
        if sum(saved) >= dense // 2:
            wrong(f"your Function saves {sum(saved):,} bytes for backward {where}: the dense weight is "
                  f"{dense:,} bytes. That copy, kept for every layer until backward, is the memory QLoRA saves. Keep only "
                  "the quantized weight (ctx.qweight = qweight) and dequantize again in backward")
        if sum(saved) > 0:
            notes.add("you save x, which backward does not need (W is frozen: no weight gradient)")
        kept = [k for k, v in vars(y.grad_fn).items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                and v.numel() >= shape[0] * shape[1] // 2]
        if kept:
            wrong(f"ctx.{kept[0]} holds a dense {tuple(getattr(y.grad_fn, kept[0]).shape)} tensor from forward: that "
                  "keeps the full-precision weight alive until backward. Store the quantized weight instead and "
                  "dequantize again in backward")
        alive = [r() for r in counting.results if r() is not None]
        if alive:
            wrong("the dense weight made in forward is still alive after forward returned: something keeps a "
                  "reference to it. Let it go; backward dequantizes again")

        counting.phase = "backward"
        grad_out = torch.randn(y_ref.shape, generator=g).to(dtype)
        run(_hinted(lambda: (y.float() * grad_out.float()).sum().backward()))
        (y_ref.float() * grad_out.float()).sum().backward()
        expect(counting.calls["backward"] >= 1,
               "backward did not dequantize the weight: it reused a dense copy from forward. Recompute it from the "
               "4-bit codes in backward (one more dequantization buys back the memory)")
        expect(x1.grad is not None, "x got no gradient: return grad_x as the first value of backward")
        if shape[0] == shape[1]:
            w = qw.dequantize(dtype)
            wrong_grad = grad_out @ w.T
            if torch.allclose(x1.grad.float(), wrong_grad.float(), **tol) and \
                    not torch.allclose(x1.grad.float(), x2.grad.float(), **tol):
                wrong("grad_x = grad_out·Wᵀ is transposed: y = x·Wᵀ, so grad_x = grad_out·W (shape (..., in))")
        expect(x1.grad.dtype == x2.grad.dtype, f"grad_x has dtype {x1.grad.dtype}, expected {x2.grad.dtype} {where}")
        compare("gradient of x", x1.grad, x2.grad, **tol)
    return ("equals qlora.DequantLinear (output and gradient of x, float32 and bfloat16); nothing dense is kept "
            "between forward and backward, which dequantizes again" + ("; note: " + "; ".join(notes) if notes else ""))
