"""Checks for notebook 07 (adapters in practice): merging a LoRA adapter into its base weight by hand, against
PEFT's `merge_and_unload`."""

from __future__ import annotations

import random
from typing import Any, Callable

import torch

from .base import _Wrong, check, compare, expect, run, wrong


def _peft_layer(n_in: int, n_out: int, r: int, alpha: float, seed: int) -> tuple[Any, torch.Tensor]:
    """A PEFT LoRA layer on a fresh nn.Linear with random (non-zero) A and B; and its merged weight by PEFT."""
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(n_in, n_out, bias=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    torch.manual_seed(seed)
    model = get_peft_model(One(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                              init_lora_weights=False))  # B random: a non-zero update
    layer = model.base_model.model.proj
    parts = (layer.base_layer.weight.detach().clone(), layer.lora_A["default"].weight.detach().clone(),
             layer.lora_B["default"].weight.detach().clone())
    merged = model.merge_and_unload().proj.weight.detach().clone()
    return parts, merged


@check("merging W + (alpha/r)·B·A")
def check_merge(fn: Callable[..., Any]) -> str:
    """`fn(weight, lora_A, lora_B, lora_alpha, r)` returns the merged weight; compared with PEFT's merge_and_unload
    on fresh layers whose input and output sizes differ (so a transposed product cannot pass)."""
    rng = random.Random()
    cases = [(rng.randrange(20, 60), rng.randrange(61, 120), r, alpha) for r, alpha in
             ((rng.choice([4, 8]), 16.0), (rng.choice([2, 3, 5]), 2.0 * rng.randrange(3, 9)))]
    for n_in, n_out, r, alpha in cases:
        (w, a, b), want = _peft_layer(n_in, n_out, r, alpha, rng.randrange(10**6))
        where = f"(layer {n_in} -> {n_out}: weight {tuple(w.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}, " \
                f"alpha={alpha:g}, r={r})"
        try:
            got = run(fn, w.clone(), a.clone(), b.clone(), alpha, r)
        except _Wrong as err:
            if "size of tensor" in str(err) or "cannot be multiplied" in str(err):
                wrong(f"{err}. The shapes {where}: the update B @ A is (out x r) @ (r x in) = out x in, "
                      "the shape of W; check the order of the product")
            raise
        expect(isinstance(got, torch.Tensor), f"return the merged weight as a tensor, got {type(got).__name__}")
        if tuple(got.shape) != tuple(want.shape):
            wrong(f"the merged weight has shape {tuple(got.shape)} but W is {tuple(w.shape)} {where}: "
                  "the update B @ A is (out x r) @ (r x in) = out x in, the shape of W")
        with torch.no_grad():
            ba = b @ a
            slips = {f"W + alpha·B·A (alpha={alpha:g} instead of alpha/r={alpha / r:g})": w + alpha * ba,
                     "W + B·A, without the alpha/r scale": w + ba,
                     f"W + (r/alpha)·B·A (r/alpha={r / alpha:g}, upside down)": w + (r / alpha) * ba,
                     "the update alone, (alpha/r)·B·A, without W": (alpha / r) * ba,
                     "W − (alpha/r)·B·A (that is unmerging)": w - (alpha / r) * ba}
        for name, value in slips.items():
            if torch.allclose(got.float(), value, rtol=1e-4, atol=1e-6):
                wrong(f"you computed {name} {where}; PEFT merges W + (alpha/r)·B·A")
        compare("merged weight", got, want, atol=1e-5, rtol=1e-4)
    return "equals PEFT's merge_and_unload on fresh layers (scale alpha/r, B·A of W's shape)"
