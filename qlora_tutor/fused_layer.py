"""The QLoRA layer's forward and backward as one autograd node: same arithmetic, far fewer steps per call.

    y = dequant(W)·x + b + s·B·A·dropout(x)

Written as modules (`QuantizedLinear` plus the adapter, as notebook 04 builds it) one call records about ten
autograd nodes (casts, two linears with their transposes, the scale, the add) and backward walks them one by one.
On a GPU each step is a kernel launch plus Python and autograd bookkeeping, and for one 4096x4096 layer with 512
tokens that bookkeeping costs more time than the arithmetic. Here forward computes the same tensors with the same
operations under one `autograd.Function`, and backward is written out: the products autograd would form, in the
same order and layout, so that outputs and gradients keep the same bits (tests compare them). As in
`qlora.DequantLinear`, the dense weight is not kept: backward dequantizes it again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qlora_tutor import triton_kernels
from qlora_tutor.quant import _device_tables


def small_matmul(x: torch.Tensor, qweight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 max_tokens: int | None = None) -> torch.Tensor | None:
    """x·dequant(W)ᵀ + b in one Triton kernel that never writes the dense W, for a few tokens without gradients
    (generation); None where it does not apply (then the caller dequantizes and multiplies).

    Dequantize + matmul writes and reads back 2 bytes per weight to multiply it with one token; this reads the
    0.5-byte code once. The sums run in another order than cuBLAS's, so the result agrees to rounding, not in bits:
    that is why training (gradients on) never takes this path.
    """
    limit = triton_kernels.SMALL_M if max_tokens is None else max_tokens
    tokens = x.numel() // max(1, x.shape[-1])
    if (tokens > limit or x.device.type != "cuda" or torch.is_grad_enabled() and x.requires_grad
            or torch.compiler.is_compiling() or x.dtype != compute_dtype or compute_dtype not in triton_kernels.OUT_DTYPES
            or len(qweight.shape) != 2 or not triton_kernels.available(x.device)):
        return None
    if compute_dtype == torch.bfloat16 and not triton_kernels.has_bf16(x.device):
        return None
    code, dynamic = _device_tables(qweight.quant_type, x.device)
    if qweight.double_quant:
        return triton_kernels.matmul_4bit(x, qweight.packed, code, qweight.shape[0], qweight.blocksize,
                                          qabsmax=qweight.absmax, dynamic_map=dynamic,
                                          nested_absmax=qweight.nested_absmax, offset=qweight.offset,
                                          nested_blocksize=qweight.nested_blocksize, bias=bias)
    return triton_kernels.matmul_4bit(x, qweight.packed, code, qweight.shape[0], qweight.blocksize,
                                      absmax=qweight.absmax, bias=bias)


class _QLoRAFunction(torch.autograd.Function):
    """y = (x_c·Wᵀ + b).to(out) + (s·(x_l·Aᵀ)·Bᵀ).to(out), with x_c the input in the compute dtype and x_l the
    adapter's input (dropout already applied). Gradients: x_c, x_l, A, B (W and b are frozen).
    x_l None means x_l is x_c (no dropout, one dtype): torch.compile refuses the same tensor passed twice."""

    @staticmethod
    def forward(ctx, x_c: torch.Tensor, x_l: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                bias: torch.Tensor | None, qweight, compute_dtype: torch.dtype, scaling: float,
                out_dtype: torch.dtype) -> torch.Tensor:
        ctx.shared = x_l is None
        x_l = x_c if x_l is None else x_l
        base = small_matmul(x_c, qweight, bias, compute_dtype) if not ctx.needs_input_grad[0] else None
        if base is None:
            w = qweight.dequantize(compute_dtype)
            base = F.linear(x_c, w, bias)
            del w  # the dense copy is a temporary (recomputed in backward)
        a = F.linear(x_l, lora_A)
        lora = F.linear(a, lora_B) * scaling
        ctx.save_for_backward(x_l, a, lora_A, lora_B)
        ctx.qweight, ctx.compute_dtype, ctx.scaling = qweight, compute_dtype, scaling
        return base.to(out_dtype) + lora.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x_l, a, lora_A, lora_B = ctx.saved_tensors
        need_xc, need_xl, need_A, need_B = ctx.needs_input_grad[:4]
        if ctx.shared:
            need_xl = need_xc
        grad_xc = grad_xl = grad_A = grad_B = None
        if need_xc:  # base: dL/dx = g·W, W dequantized again
            w = ctx.qweight.dequantize(ctx.compute_dtype)
            grad_xc = grad_y.to(ctx.compute_dtype).to(w.dtype) @ w
            del w
        if need_xl or need_A or need_B:
            # adapter, as autograd would: the casts, the scale, then the two products of each linear (2-D, folded)
            g = (grad_y.to(a.dtype) * ctx.scaling).reshape(-1, lora_B.shape[0])
            a2 = a.reshape(-1, a.shape[-1])
            if need_B:
                grad_B = g.t().mm(a2)
            if need_xl or need_A:
                grad_a = g.mm(lora_B)
                if need_A:
                    grad_A = grad_a.t().mm(x_l.reshape(-1, x_l.shape[-1]))
                if need_xl:
                    grad_xl = grad_a.mm(lora_A).view(x_l.shape)
        if ctx.shared:  # one input feeding both branches: autograd would add the two gradients, as here
            grad_xc, grad_xl = (None if grad_xc is None else grad_xc + grad_xl), None
        return grad_xc, grad_xl, grad_A, grad_B, None, None, None, None, None


def qlora_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """`QLoRALinear.forward` through one autograd node; same result and gradients as the module-by-module path."""
    base = layer.base_layer
    compute_dtype = base.compute_dtype
    bias = None if base.bias is None else base.bias.to(compute_dtype)
    x_c = x.to(compute_dtype)
    x_l = layer.lora_dropout(x.to(layer.lora_A.dtype))
    return _QLoRAFunction.apply(x_c, None if x_l is x_c else x_l, layer.lora_A, layer.lora_B, bias, base.weight,
                                compute_dtype, layer.scaling, x.dtype)
