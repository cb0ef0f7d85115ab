"""Small pieces shared by the LoRA and QLoRA layer tests."""

from __future__ import annotations

import torch
import torch.nn as nn


class OneLinear(nn.Module):
    """A model holding one linear layer as `lin`, so that PEFT can wrap it by name."""

    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()
