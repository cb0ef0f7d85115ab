"""LoRA from scratch: a frozen linear layer plus a trainable low-rank update  y = W·x + b + s·B·(A·x).

Shapes follow PEFT (and the paper's W: out×in convention): W is (out, in), A is (r, in), B is (out, r),
so ΔW = s·B·A is (out, in) like W. The scale s is alpha/r (LoRA) or alpha/sqrt(r) (rsLoRA).
A starts Kaiming-uniform like nn.Linear, B starts at zero, so at step 0 the model is exactly the base model.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import canonical_dtype


def check_rank_alpha(r: object, alpha: object, dropout: object = 0.0) -> None:
    """Raise a clear error for a rank that is not a positive int, a non-numeric alpha or a bad dropout."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"LoRA rank r must be a positive int, got {r!r} ({type(r).__name__}); e.g. r=8 or r=16.")
    if r < 1:
        raise ValueError(f"LoRA rank r must be at least 1, got {r}; typical values are 8, 16 or 64.")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"lora alpha must be a number, got {alpha!r} ({type(alpha).__name__}); "
                        "e.g. alpha=16 (the scale applied to B·A is alpha/r).")
    if not math.isfinite(float(alpha)):
        raise ValueError(f"lora alpha must be finite, got {alpha}.")
    if float(alpha) == 0:
        raise ValueError("lora alpha 0 makes the scale alpha/r zero: the adapter would add nothing and B would never "
                         "get a gradient; use alpha > 0, e.g. alpha = r or 2r (16 for r=8).")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"lora dropout must be a probability in [0, 1), got {dropout!r}; e.g. 0.0, 0.05 or 0.1.")


class RankWarning(UserWarning):
    """r is larger than a layer's smaller side: the extra ranks add parameters but no capacity."""


def rank_excess(r: int, in_features: int, out_features: int) -> str | None:
    """Why rank r wastes parameters on an (out, in) layer, or None: B·A has rank at most min(in, out)."""
    side = min(int(in_features), int(out_features))
    if r <= side:
        return None
    return (f"r={r} is larger than the layer's smaller side min(in={in_features}, out={out_features}) = {side}: "
            f"B·A has rank at most {side}, so {r - side} of the ranks add parameters but no capacity; use r <= {side}")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The scale s multiplying B·A: alpha/r (Hu et al. 2021) or alpha/sqrt(r) (rsLoRA, Kalajdzievski 2023)."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def check_adapter_dtype(dtype: object) -> torch.dtype:
    """The adapter's dtype as a floating-point torch.dtype ('fp32', 'bf16', 'fp16' are accepted too); a clear
    error otherwise: A and B are trained, and only floating-point tensors can have gradients."""
    if isinstance(dtype, str):
        dtype = getattr(torch, canonical_dtype(dtype, "adapter_dtype"))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"adapter_dtype must be a floating-point dtype (torch.float32, the usual choice, or "
                        f"torch.bfloat16 / torch.float16), got {dtype!r}: the adapter is trained, and only "
                        "floating-point tensors have gradients")
    return dtype


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters live in fp32 when the base is 16-bit (fp16 AMP cannot unscale fp16 gradients), else in the base dtype."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class LoRAAdapterMixin:
    """The trainable part, shared by LoRALinear and qlora.QLoRALinear: lora_A (r, in), lora_B (out, r), scale s.

    The parameters sit directly on the layer (`layer.lora_A`, `layer.lora_B`), where PEFT users look for them.
    """

    def _init_adapter(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                      use_rslora: bool, dtype: torch.dtype, device: torch.device | None) -> None:
        check_rank_alpha(r, alpha, dropout)
        dtype = check_adapter_dtype(dtype)
        self.in_features, self.out_features = int(in_features), int(out_features)
        excess = rank_excess(int(r), in_features, out_features)
        if excess:
            warnings.warn(f"LoRA: {excess}", RankWarning, stacklevel=3)
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        self.scaling = lora_scaling(self.r, self.alpha, self.use_rslora)
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, dtype=dtype, device=device))
        self.lora_dropout = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A like nn.Linear's default (Kaiming-uniform, a=√5, i.e. U(±1/sqrt(in))), B = 0, so ΔW = 0 at the start."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """s·B·A·dropout(x), computed in the adapter's dtype (the caller casts the result back)."""
        x = x.to(self.lora_A.dtype)
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·A in the adapter's dtype, shape (out, in): the same shape as the frozen weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def _adapter_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:.4g}, rslora={self.use_rslora}, adapter_dtype={self.lora_A.dtype}")


class LoRALinear(LoRAAdapterMixin, nn.Module):
    """A frozen nn.Linear plus a LoRA adapter:  y = base(x) + s·B·A·dropout(x).

    With a 16-bit base and the fp32 adapter, the sum is formed in fp32 and rounded once to the base's dtype, as
    PEFT's LoRA Linear does (rounding the adapter's output first would differ in about a quarter of the values).

    `merge()` folds ΔW into the base weight (inference with no extra cost); `unmerge()` takes it out again.
    While merged, forward is just base(x) and the adapter gets no gradient.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 adapter_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}.")
        check_rank_alpha(r, alpha, dropout)
        adapter_dtype = default_adapter_dtype(base.weight.dtype) if adapter_dtype is None else \
            check_adapter_dtype(adapter_dtype)
        self.base_layer = base
        for p in base.parameters():  # weight and bias stay frozen (PEFT's bias="none")
            p.requires_grad_(False)
        self._init_adapter(base.in_features, base.out_features, r, alpha, dropout, use_rslora,
                           dtype=adapter_dtype, device=base.weight.device)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:  # ΔW is already inside base_layer.weight: adding the adapter again would count it twice
            return result
        # PEFT's order: add in the wider of the two dtypes (the fp32 adapter's, over a 16-bit base), round once
        return (result + self.lora_forward(x)).to(result.dtype)

    @torch.no_grad()
    def _add_delta(self, sign: float) -> None:
        w = self.base_layer.weight
        acc = torch.promote_types(w.dtype, torch.float32)  # never add in 16-bit
        w.copy_((w.to(acc) + sign * self.delta_weight().to(acc)).to(w.dtype))

    def merge(self) -> None:
        """W ← W + s·B·A. Afterwards the layer costs one matmul, exactly like the original linear layer."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged, nothing done.", stacklevel=2)
            return
        self._add_delta(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """W ← W − s·B·A, giving back the base weight (up to fp32 rounding; lossy if the base is 16-bit)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged, nothing done.", stacklevel=2)
            return
        self._add_delta(-1.0)
        self.merged = False

    def extra_repr(self) -> str:
        return f"{self._adapter_repr()}, merged={self.merged}"
