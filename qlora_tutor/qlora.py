"""The QLoRA layer: a frozen 4-bit base weight plus a trainable LoRA adapter, and the model surgery around it.

    y = dequant(W_4bit)·x + b + s·B·A·dropout(x)          (QLoRA paper, Eq. 5, with LoRA's scale s)

The base is a `quant.QuantizedTensor` (nf4/fp4/int4, optionally double-quantized). Each forward dequantizes it
to the compute dtype, multiplies, and drops the dense copy; backward dequantizes again (see `DequantLinear`).
`add_adapters` swaps the linear layers of any model (a transformers Llama included) for these layers.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused_layer, hardware
from .lora import LoRAAdapterMixin, LoRALinear, RankWarning, check_adapter_dtype, check_rank_alpha, rank_excess
from .quant import QuantizedTensor, check_blocksize, check_quant_type, quantize
from .targets import find_linear_targets, output_head_names


class DequantLinear(torch.autograd.Function):
    """y = x·dequant(W)ᵀ + b with a frozen quantized W.

    Why a custom Function: if we wrote `F.linear(x, qw.dequantize())` in ordinary autograd code, autograd would save
    the dense dequantized weight for the backward pass, so every layer's full-precision copy (2 bytes/param in bf16,
    4 in fp32, i.e. 4-8x the 4-bit weight) would stay alive from forward to backward: the memory QLoRA saves would
    come straight back. Here only the QuantizedTensor (already held by the module) is kept; backward dequantizes a
    second time. That costs one extra dequantization per layer; it is the same trade bitsandbytes' MatMul4Bit and
    torchao's NF4 linear make. W is frozen, so no gradient is computed for it; the input gets dL/dx = dL/dy·W.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: QuantizedTensor, bias: torch.Tensor | None,
                compute_dtype: torch.dtype) -> torch.Tensor:
        # Not save_for_backward: that is for tensors; the QuantizedTensor is a plain object the module owns anyway.
        ctx.qweight, ctx.compute_dtype = qweight, compute_dtype
        if not ctx.needs_input_grad[0]:  # a few tokens, no gradient (generation): one fused Triton kernel on CUDA
            out = fused_layer.small_matmul(x, qweight, bias, compute_dtype)
            if out is not None:
                return out
        w = qweight.dequantize(compute_dtype)  # temporary: freed when forward returns
        return F.linear(x, w, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = ctx.qweight.dequantize(ctx.compute_dtype)  # recomputed, not stored: see the class docstring
            grad_x = grad_out.to(w.dtype) @ w  # (..., out) @ (out, in) -> (..., in)
        return grad_x, None, None, None


def _device_of(fn, current: torch.device) -> torch.device:
    """Where Module._apply's function sends tensors (e.g. `.to('cuda')`), found by applying it to an empty probe."""
    return fn(torch.empty(0, device=current)).device


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored in 4 bits (like bitsandbytes' Linear4bit); no adapter.

    Input is cast to `compute_dtype`, the output back to the input's dtype. The bias (if any) stays a frozen
    parameter in its original dtype. The 4-bit weight is a plain attribute, not a parameter or buffer, so
    `state_dict()` does not contain it: save adapters (the trainable part), not the whole quantized model.
    """

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        if not isinstance(weight, QuantizedTensor):
            raise TypeError(f"QuantizedLinear holds a quant.QuantizedTensor (use QuantizedLinear.from_linear for an "
                            f"nn.Linear), got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"a linear weight is 2-D (out, in), got shape {tuple(weight.shape)}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
            raise ValueError(f"bias must be None or a tensor of {weight.shape[0]} values (one per output), got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        compute_dtype = hardware.parse_dtype(compute_dtype)
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        self.weight = weight  # not an nn.Parameter: a packed, frozen object (see _apply for device moves)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                    blocksize: int = 64, compute_dtype: torch.dtype | str | None = None) -> "QuantizedLinear":
        """Quantize `linear.weight` (on its device) and keep the bias; the original dense weight is not kept."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        quant_type = check_quant_type(quant_type)
        blocksize = check_blocksize(blocksize)
        dtype = hardware.compute_dtype(compute_dtype)
        qw = quantize(linear.weight.detach(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        return cls(qw, linear.bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = DequantLinear.apply(x.to(self.compute_dtype), self.weight, bias, self.compute_dtype)
        return out.to(x.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight this layer computes with (a new tensor; for inspection and merging, not for training)."""
        return self.weight.dequantize(dtype or self.compute_dtype)

    def _apply(self, fn, recurse: bool = True):
        # nn.Module.to()/cuda() only visit parameters and buffers; move the packed weight along with them.
        # Dtype casts (model.half()) deliberately leave the 4-bit storage alone.
        super()._apply(fn, recurse)
        device = _device_of(fn, self.weight.packed.device)
        if device != self.weight.packed.device:
            self.weight = self.weight.to(device)
        return self

    def extra_repr(self) -> str:
        qt = getattr(self.weight, "quant_type", "?")
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"storage={qt}, compute_dtype={self.compute_dtype}")


class QLoRALinear(LoRAAdapterMixin, nn.Module):
    """QLoRA's layer: a frozen QuantizedLinear base plus a LoRA adapter,  y = base(x) + s·B·A·dropout(x).

    The adapter is fp32 by default even when the compute dtype is fp16/bf16: with fp16 mixed precision the
    optimizer must see fp32 master weights (GradScaler refuses to unscale fp16 gradients), and small updates to
    A and B would round away in 16 bits. The adapter's output is cast to the base output's dtype before adding,
    as PEFT's LoRA layer for bitsandbytes 4-bit bases does (bit for bit the same outputs).
    """

    def __init__(self, base: QuantizedLinear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, QuantizedLinear):
            raise TypeError(f"QLoRALinear wraps a QuantizedLinear (use QLoRALinear.from_linear for an nn.Linear), "
                            f"got {type(base).__name__}")
        self.base_layer = base
        self._init_adapter(base.in_features, base.out_features, r, alpha, dropout, use_rslora,
                           dtype=adapter_dtype, device=base.weight.packed.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                    compute_dtype: torch.dtype | str | None = None,
                    adapter_dtype: torch.dtype = torch.float32) -> "QLoRALinear":
        """Quantize an nn.Linear's weight to 4 bits and put a fresh adapter (B = 0) on top of it."""
        check_rank_alpha(r, alpha, dropout)  # fail before spending time on quantization
        adapter_dtype = check_adapter_dtype(adapter_dtype)
        base = QuantizedLinear.from_linear(linear, quant_type, double_quant, blocksize, compute_dtype)
        return cls(base, r, alpha, dropout, use_rslora, adapter_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.base_layer.compute_dtype

    # True: base + adapter as one autograd node (fused_layer.py; same bits). Off by default: on the H200 it saved
    # 2% of a layer's forward+backward (results/triton/layer_gpu.md), and the module path is the one
    # notebook 04 takes apart.
    fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused_layer.qlora_forward(self, x)
        result = self.base_layer(x)
        # PEFT's order for 4-bit bases (its bitsandbytes LoRA layer): the adapter's output is rounded to the base
        # output's dtype, then added (LoRALinear, like PEFT's plain Linear, adds first and rounds once)
        return result + self.lora_forward(x).to(result.dtype)

    def merged_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain nn.Linear with weight dequant(W) + s·B·A (in `dtype`): the usual way to deploy a QLoRA adapter.

        Merging back into 4 bits would re-quantize W + ΔW and lose part of the small ΔW to rounding, so we don't.
        """
        with torch.no_grad():
            w = self.base_layer.dequantized_weight(torch.float32) + self.delta_weight().to(torch.float32)
            out = nn.Linear(self.in_features, self.out_features, bias=self.base_layer.bias is not None,
                            device=w.device, dtype=dtype)
            out.weight.copy_(w)
            if self.base_layer.bias is not None:
                out.bias.copy_(self.base_layer.bias)
        return out

    def extra_repr(self) -> str:
        return self._adapter_repr()


# ----------------------------------------------------------------------------------------------- model surgery

ADAPTER_LAYERS = (LoRALinear, QLoRALinear)


def find_targets(model: nn.Module, target_modules: str | list[str] | tuple[str, ...]) -> list[str]:
    """Full names of the nn.Linear modules that `target_modules` selects, by PEFT's rule (see `targets.py`):
    "all-linear" is every nn.Linear but the output head; "q_proj" hits every layer's attention query."""
    if any(isinstance(m, ADAPTER_LAYERS) for m in model.modules()):
        raise ValueError("this model already has LoRA adapters; call add_adapters once, on the plain model.")
    return find_linear_targets(model, target_modules)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _rng_states() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_states(states: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state_all(states[1])


def add_adapters(model: nn.Module, target_modules: str | list[str], r: int, alpha: float, dropout: float = 0.0,
                 quant_type: str | None = None, double_quant: bool = True,
                 compute_dtype: torch.dtype | str | None = None, use_rslora: bool = False,
                 blocksize: int = 64) -> nn.Module:
    """Swap the targeted nn.Linear layers for LoRA layers, freeze everything else, and return the model (in place).

    quant_type None: LoRALinear on the full-precision base (plain LoRA). quant_type 'nf4'/'fp4'/'int4': QLoRA, and,
    as transformers does with load_in_4bit, every other nn.Linear except the output head is quantized as well
    (frozen, no adapter), so the whole transformer body is stored in 4 bits. Embeddings, norms and the head stay
    as they are. compute_dtype None picks bf16/fp16/fp32 for this device (qlora_tutor.hardware.compute_dtype).

    All or nothing: every new layer is built before the first is swapped in, so an error on any layer (a NaN
    weight, say) leaves the model exactly as it was, unfrozen and without adapters, and a corrected call can
    follow. The price: the dense and the 4-bit copies of the swapped layers are both alive until the swap.
    """
    check_rank_alpha(r, alpha, dropout)
    if quant_type is not None:
        quant_type = check_quant_type(quant_type)
        blocksize = check_blocksize(blocksize)
    dtype = hardware.compute_dtype(compute_dtype)  # raises with the fix for bf16 on a T4/V100
    targets = find_targets(model, target_modules)
    heads = output_head_names(model)
    others = [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n not in targets and n not in heads] if quant_type else []
    too_small = []
    for name in targets:
        layer = model.get_submodule(name)
        excess = rank_excess(r, layer.in_features, layer.out_features)
        if excess:
            too_small.append((name, excess))
    if too_small:  # one warning for the model, not one per layer
        warnings.warn(f"LoRA: {len(too_small)} targeted layer(s) are narrower than r, e.g. {too_small[0][0]}: "
                      f"{too_small[0][1]}", RankWarning, stacklevel=2)
    frozen_before = [(p, p.requires_grad) for p in model.parameters()]
    rng_before = _rng_states()  # A's random init draws from it: a failed call must not shift a retry's numbers
    new: dict[str, nn.Module] = {}
    try:
        for name in targets:
            linear = model.get_submodule(name)
            with warnings.catch_warnings():  # said once above
                warnings.simplefilter("ignore", RankWarning)
                if quant_type is None:
                    new[name] = LoRALinear(linear, r, alpha, dropout, use_rslora)  # (freezes the wrapped linear)
                else:
                    new[name] = QLoRALinear.from_linear(linear, r, alpha, dropout, use_rslora, quant_type,
                                                        double_quant, blocksize, dtype)
        for name in others:
            new[name] = QuantizedLinear.from_linear(model.get_submodule(name), quant_type, double_quant, blocksize,
                                                    dtype)
    except BaseException:
        for p, requires_grad in frozen_before:  # undo what the layers built so far changed
            p.requires_grad_(requires_grad)
        _set_rng_states(rng_before)
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in new.items():  # setattr only: nothing here can fail half-way for a model find_targets accepted
        _set_module(model, name, layer)
    return model
