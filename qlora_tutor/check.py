"""One comparison helper, used wherever from-scratch code meets bitsandbytes or PEFT."""

from __future__ import annotations

import torch


def cmp(name: str, ours: torch.Tensor, reference: torch.Tensor, rtol: float = 1e-6, atol: float = 0.0) -> bool:
    """Print whether `ours` equals `reference` exactly, closely, or not at all, with the largest difference.

    Returns True when the two are exact or within tolerance, so a notebook can `assert cmp(...)`.
    """
    if ours.shape != reference.shape:
        print(f"{name:<32} | SHAPE MISMATCH: {tuple(ours.shape)} vs {tuple(reference.shape)}")
        return False
    a, b = ours.detach().cpu(), reference.detach().cpu()
    exact = a.dtype == b.dtype and torch.equal(a, b)
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    maxdiff = (a64 - b64).abs().max().item() if a.numel() else 0.0
    close = exact or torch.allclose(a64, b64, rtol=rtol, atol=atol)
    verdict = "exact" if exact else ("close" if close else "DIFFERENT")
    print(f"{name:<32} | {verdict:<9} | max abs diff {maxdiff:.3g}")
    return close
