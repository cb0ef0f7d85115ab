"""The write-it-yourself checks of notebooks 01-04: each accepts a correct answer, says "not done yet" for an
untouched TODO, and rejects the usual wrong answers with a message that names the mistake."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qlora_tutor.exercises import double_quant, lora, nf4, qlora_layer
from qlora_tutor.exercises.base import DONE, NOT_DONE, WRONG

Q = torch.special.ndtri


def todo(*args, **kwargs):
    raise NotImplementedError


def rejected(verdict, *phrases):
    assert verdict.status == WRONG, verdict
    for phrase in phrases:
        assert phrase in verdict.message, verdict.message
    return True


# ------------------------------------------------------------------------------------------------ 01: NF4 levels

def nf4_levels(offset=0.9677083, n_pos=9, n_neg=8, normalise=True, dtype=torch.float32, drop=slice(None, -1)):
    pos = Q(torch.linspace(offset, 0.5, n_pos)[drop].double()).float()
    neg = -Q(torch.linspace(offset, 0.5, n_neg)[drop].double()).float()
    levels = torch.cat([neg, torch.zeros(1), pos]).sort().values
    return (levels / levels.max() if normalise else levels).to(dtype)


def test_nf4_levels_accepts_the_bitsandbytes_construction_and_float64_too():
    assert nf4.check_nf4_levels(nf4_levels).status == DONE
    def in_float64(offset=0.9677083):
        pos = Q(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
        neg = -Q(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
        levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
        return (levels / levels.max()).float()
    v = nf4.check_nf4_levels(in_float64)
    assert v.status == DONE and "bit for bit" in v.message  # within 1.2e-7, and says how to be exact
    assert nf4.check_nf4_levels(todo).status == NOT_DONE


def test_nf4_levels_rejects_the_usual_mistakes():
    def eq4_literally(offset=0.9677083):
        p = torch.arange(17, dtype=torch.float64) / 17
        return (0.5 * (Q(p[:-1]) + Q(p[1:]))).float()
    assert rejected(nf4.check_nf4_levels(eq4_literally), "±inf", "Eq. 4")
    assert rejected(nf4.check_nf4_levels(lambda offset=0.9677083: nf4_levels(offset, n_pos=8, n_neg=9)),
                    "extra level belongs on the positive side")
    assert rejected(nf4.check_nf4_levels(lambda offset=0.9677083: nf4_levels(offset, normalise=False)),
                    "largest level is 1.848", "divide")
    assert rejected(nf4.check_nf4_levels(lambda offset=0.9677083: nf4_levels(offset, drop=slice(1, None))),
                    "exactly 0", "drop 0.5")
    assert rejected(nf4.check_nf4_levels(lambda offset=0.9677083: nf4_levels(offset, n_pos=10)),  # off by one level
                    "9 positive", "NF4 has 8 positive")
    assert rejected(nf4.check_nf4_levels(lambda offset=0.9677083: nf4_levels()), "do not change with `offset`")
    assert rejected(nf4.check_nf4_levels(lambda offset=0.9677083: nf4_levels(offset).flip(0)), "ascending")
    assert rejected(nf4.check_nf4_levels(lambda offset=0.9677083: nf4_levels(offset, dtype=torch.float64)),
                    "dtype torch.float64")
    shifted = lambda offset=0.9677083: nf4_levels(offset + 0.001)  # a wrong offset: values, with the index
    assert rejected(nf4.check_nf4_levels(shifted), "level[", "but should be")


# -------------------------------------------------------------------------------------- 01: quantize/dequantize

def quantize_blockwise(w, levels, blocksize=64):
    blocks = w.reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax).unsqueeze(1)
    return torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2).reshape(-1), absmax


def test_quantize_blockwise_accepts_bucketize_and_argmin():
    assert nf4.check_quantize_blockwise(quantize_blockwise).status == DONE
    def by_argmin(w, levels, blocksize=64):  # division and argmin: ties may differ, and that is accepted
        blocks = w.reshape(-1, blocksize)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        return ((blocks / absmax).reshape(-1, 1) - levels).abs().argmin(dim=1).to(torch.uint8), absmax.flatten()
    assert nf4.check_quantize_blockwise(by_argmin).status == DONE
    assert nf4.check_quantize_blockwise(todo).status == NOT_DONE


def test_quantize_blockwise_rejects_the_usual_mistakes():
    def per_row(w, levels, blocksize=64):
        absmax = w.abs().amax(dim=1, keepdim=True)
        return torch.bucketize(w / absmax, (levels[:-1] + levels[1:]) / 2).reshape(-1), absmax.flatten()
    assert rejected(nf4.check_quantize_blockwise(per_row), "one value per row", "reshape(-1, blocksize)")

    def signed_max(w, levels, blocksize=64):
        blocks = w.reshape(-1, blocksize)
        absmax = blocks.amax(dim=1)
        return torch.bucketize(blocks / absmax[:, None], (levels[:-1] + levels[1:]) / 2).reshape(-1), absmax
    assert rejected(nf4.check_quantize_blockwise(signed_max), "largest |w|")

    def off_by_one(w, levels, blocksize=64):  # searches the levels instead of the midpoints between them
        blocks = w.reshape(-1, blocksize)
        absmax = blocks.abs().amax(dim=1)
        return torch.bucketize(blocks / absmax[:, None], levels).clamp(max=15).reshape(-1), absmax
    assert rejected(nf4.check_quantize_blockwise(off_by_one), "code[", "off by one", "codes differ")

    def values_not_codes(w, levels, blocksize=64):
        codes, absmax = quantize_blockwise(w, levels, blocksize)
        return levels[codes], absmax
    assert rejected(nf4.check_quantize_blockwise(values_not_codes), "index of the nearest level")

    def nf4_hardcoded(w, levels, blocksize=64):  # ignores the levels passed in (the int4 case catches it)
        from qlora_tutor.quant import codebook
        return quantize_blockwise(w, codebook("nf4"), blocksize)
    assert rejected(nf4.check_quantize_blockwise(nf4_hardcoded), "code[")

    def column_blocks(w, levels, blocksize=64):  # blocks down the columns, not along the flattened rows
        return quantize_blockwise(w.T.contiguous(), levels, blocksize)
    assert rejected(nf4.check_quantize_blockwise(column_blocks), "absmax[", "but should be")
    assert rejected(nf4.check_quantize_blockwise(lambda w, levels, blocksize=64: quantize_blockwise(w, levels)[0]),
                    "return two things")


def dequantize_blockwise(codes, absmax, levels, blocksize, shape):
    return (levels[codes.long()].view(-1, blocksize) * absmax[:, None]).view(shape)


def test_dequantize_blockwise():
    assert nf4.check_dequantize_blockwise(dequantize_blockwise).status == DONE
    assert nf4.check_dequantize_blockwise(todo).status == NOT_DONE
    repeat = lambda c, a, lv, bs, shape: (lv[c.long()] * a.repeat(bs)).view(shape)
    assert rejected(nf4.check_dequantize_blockwise(repeat), "repeat_interleave")
    divide = lambda c, a, lv, bs, shape: (lv[c.long()].view(-1, bs) / a[:, None]).view(shape)
    assert rejected(nf4.check_dequantize_blockwise(divide), "multiplies")
    flat = lambda c, a, lv, bs, shape: (lv[c.long()].view(-1, bs) * a[:, None]).reshape(-1)
    assert rejected(nf4.check_dequantize_blockwise(flat), "reshape to `shape`")
    bare = lambda c, a, lv, bs, shape: lv[c.long()].view(shape)
    assert rejected(nf4.check_dequantize_blockwise(bare), "bare levels")
    half = lambda c, a, lv, bs, shape: dequantize_blockwise(c, a, lv, bs, shape).half()
    assert rejected(nf4.check_dequantize_blockwise(half), "dtype torch.float16")


# ---------------------------------------------------------------------------------------------- 01: packing

def test_pack_codes():
    pack = lambda c: ((c[0::2] << 4) | c[1::2]).to(torch.uint8)
    assert nf4.check_pack_codes(pack).status == DONE
    assert nf4.check_pack_codes(lambda c: (c[0::2] * 16 + c[1::2]).to(torch.uint8)).status == DONE
    assert nf4.check_pack_codes(todo).status == NOT_DONE
    assert rejected(nf4.check_pack_codes(lambda c: ((c[1::2] << 4) | c[0::2]).to(torch.uint8)),
                    "swapped", "HIGH nibble")
    assert rejected(nf4.check_pack_codes(lambda c: (c[0::2].long() << 4) | c[1::2].long()), "torch.uint8")
    assert rejected(nf4.check_pack_codes(lambda c: c[0::2] | c[1::2]), "overlap")
    assert rejected(nf4.check_pack_codes(lambda c: c.clone()), "one byte holds two codes")


# --------------------------------------------------------------------------------------- 02: double quantization

def double_quantize(c2, code_map, blocksize=256, center=True, c1_from_centered=True):
    offset = c2.mean() if center else torch.zeros(())
    x = (c2 - offset).view(-1, blocksize)
    c1 = x.abs().amax(dim=1) if c1_from_centered else c2.view(-1, blocksize).abs().amax(dim=1)
    scaled = (x / c1[:, None]).reshape(-1)
    return (scaled[:, None] - code_map).abs().argmin(dim=1).to(torch.uint8), c1, offset


def test_double_quantize():
    assert double_quant.check_double_quantize(double_quantize).status == DONE
    assert double_quant.check_double_quantize(todo).status == NOT_DONE
    assert rejected(double_quant.check_double_quantize(lambda c2, m, bs=256: double_quantize(c2, m, bs, center=False)),
                    "offset is 0", "negative half")
    assert rejected(double_quant.check_double_quantize(lambda c2, m, bs=256: double_quantize(c2, m, 64)),
                    "blocks of 256 (not 64)")
    assert rejected(double_quant.check_double_quantize(
        lambda c2, m, bs=256: double_quantize(c2, m, bs, c1_from_centered=False)), "CENTERED")

    def linear_int8(c2, code_map, blocksize=256):  # an int8 grid instead of the dynamic map
        codes, c1, offset = double_quantize(c2, code_map, blocksize)
        scaled = ((c2 - offset).view(-1, blocksize) / c1[:, None]).reshape(-1)
        return (scaled * 127).round().to(torch.int64) + 128, c1, offset
    assert rejected(double_quant.check_double_quantize(linear_int8), "code[", "nearest to code")
    assert rejected(double_quant.check_double_quantize(lambda c2, m, bs=256: double_quantize(c2, m, bs)[:2]),
                    "three things")


def bits(n, blocksize, dq):
    return 4 + 8 / blocksize + 32 / (blocksize * 256) + 32 / n if dq else 4 + 32 / blocksize


def test_bits_per_param():
    assert double_quant.check_bits_per_param(bits).status == DONE
    assert double_quant.check_bits_per_param(todo).status == NOT_DONE
    no_c1 = lambda n, bs, dq: bits(n, bs, dq) - (32 / (bs * 256) if dq else 0)
    assert rejected(double_quant.check_bits_per_param(no_c1), "c1", "one per 256")
    no_offset = lambda n, bs, dq: bits(n, bs, dq) - (32 / n if dq else 0)
    assert rejected(double_quant.check_bits_per_param(no_offset), "offset")
    fp32_constants = lambda n, bs, dq: 4 + 32 / bs
    assert rejected(double_quant.check_bits_per_param(fp32_constants), "8 bits, not 32")
    codes_only = lambda n, bs, dq: 4.0
    assert rejected(double_quant.check_bits_per_param(codes_only), "only the codes")
    assert rejected(double_quant.check_bits_per_param(lambda n, bs, dq: "4.127"), "measured")  # a string is not 4.127...
    assert rejected(double_quant.check_bits_per_param(lambda n, bs, dq: None), "return a number")


# ------------------------------------------------------------------------------------------------ 03: LoRA forward

class LoRA(nn.Module):
    """The notebook's template with its forward filled in; `update` picks a right or a wrong adapter term."""

    update = staticmethod(lambda self, x: (self.alpha / self.r) * (x @ self.lora_A.T) @ self.lora_B.T)
    b_init = staticmethod(torch.zeros)

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.r, self.alpha = r, alpha
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(self.b_init(base.out_features, r))

    def forward(self, x):
        return self.base_layer(x) + self.update(self, x)


def variant(update=None, b_init=None, forward=None):
    attrs = {}
    if update:
        attrs["update"] = staticmethod(update)
    if b_init:
        attrs["b_init"] = staticmethod(b_init)
    if forward:
        attrs["forward"] = forward
    return type("Variant", (LoRA,), attrs)


def test_lora_forward_accepts_the_solution_and_equivalent_forms():
    assert lora.check_lora_forward(LoRA).status == DONE
    via_delta = variant(lambda self, x: x @ ((self.alpha / self.r) * self.lora_B @ self.lora_A).T)
    assert lora.check_lora_forward(via_delta).status == DONE
    via_flinear = variant(lambda self, x: F.linear(F.linear(x, self.lora_A), self.lora_B) * self.alpha / self.r)
    assert lora.check_lora_forward(via_flinear).status == DONE

    class Todo(LoRA):
        def forward(self, x):
            raise NotImplementedError
    assert lora.check_lora_forward(Todo).status == NOT_DONE


def test_lora_forward_rejects_the_usual_mistakes():
    ab = lambda self, x: (x @ self.lora_A.T) @ self.lora_B.T
    assert rejected(lora.check_lora_forward(variant(lambda self, x: self.alpha * ab(self, x))), "r times too large",
                    "alpha / r")
    assert rejected(lora.check_lora_forward(variant(ab)), "not scaled")
    assert rejected(lora.check_lora_forward(variant(lambda self, x: self.alpha / math.sqrt(self.r) * ab(self, x))),
                    "rsLoRA")
    transposed = variant(lambda self, x: (self.alpha / self.r) * x @ (self.lora_B @ self.lora_A))
    assert rejected(lora.check_lora_forward(transposed), "ΔW = B·A has W's shape")  # the non-square case: shapes
    square_only = lora._CASES
    try:  # only the square case: the shapes fit, and the message must still say it is transposed
        lora._CASES = (square_only[1],)
        assert rejected(lora.check_lora_forward(transposed), "transposed")
    finally:
        lora._CASES = square_only
    only_adapter = variant(forward=lambda self, x: (self.alpha / self.r) * (x @ self.lora_A.T) @ self.lora_B.T)
    assert rejected(lora.check_lora_forward(only_adapter), "returns zeros", "base_layer(x)")
    no_bias = variant(forward=lambda self, x: x @ self.base_layer.weight.T + LoRA.update(self, x))
    assert rejected(lora.check_lora_forward(no_bias), "bias is missing")
    detached = variant(lambda self, x: (self.alpha / self.r) * (x @ self.lora_A.detach().T) @ self.lora_B.detach().T)
    assert rejected(lora.check_lora_forward(detached), "no gradient reached lora_A")
    assert rejected(lora.check_lora_forward(variant(b_init=torch.randn)), "lora_B should start at zero")


def test_first_step_gradients():
    right = {"B = 0, A random (LoRA's init)": "B", "A = 0, B random": "A", "A = B = 0": "neither"}
    assert lora.check_first_step_gradients(lambda: right).status == DONE
    assert lora.check_first_step_gradients(todo).status == NOT_DONE
    both = {**right, "B = 0, A random (LoRA's init)": "both"}
    assert rejected(lora.check_first_step_gradients(lambda: both), "you said 'both'", "measured: 'B'", "because B = 0")
    stuck = {**right, "A = B = 0": "B"}
    assert rejected(lora.check_first_step_gradients(lambda: stuck), "nothing ever trains")
    assert rejected(lora.check_first_step_gradients(lambda: {**right, "A = B = 0": "?"}), "answer one of")
    assert rejected(lora.check_first_step_gradients(lambda: {"A = B = 0": "neither"}), "missing")


# ------------------------------------------------------------------------------------- 04: the QLoRA Function

KEEP = []


def function(forward, backward):
    return type("Fn", (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def fwd(ctx, x, qweight, bias):
    ctx.qweight = qweight
    return F.linear(x, qweight.dequantize(x.dtype), bias)


def bwd(ctx, grad_out):
    return grad_out @ ctx.qweight.dequantize(grad_out.dtype), None, None


def test_dequant_linear_accepts_the_recomputing_function():
    assert qlora_layer.check_dequant_linear(function(fwd, bwd)).status == DONE
    def fwd_saving_x(ctx, x, qweight, bias):  # saves x needlessly: accepted, with a note
        ctx.save_for_backward(x)
        return fwd(ctx, x, qweight, bias)
    v = qlora_layer.check_dequant_linear(function(fwd_saving_x, bwd))
    assert v.status == DONE and "does not need" in v.message
    assert qlora_layer.check_dequant_linear(function(todo, todo)).status == NOT_DONE
    assert qlora_layer.check_dequant_linear(function(fwd, todo)).status == NOT_DONE


def test_dequant_linear_catches_a_backward_that_keeps_the_dense_weight():
    def fwd_save(ctx, x, qweight, bias):
        w = qweight.dequantize(x.dtype)
        ctx.save_for_backward(w)
        return F.linear(x, w, bias)
    def bwd_saved(ctx, grad_out):
        (w,) = ctx.saved_tensors
        return grad_out @ w, None, None
    assert rejected(qlora_layer.check_dequant_linear(function(fwd_save, bwd_saved)), "saves", "dense weight",
                    "dequantize again in backward")

    def fwd_ctx(ctx, x, qweight, bias):
        ctx.w = qweight.dequantize(x.dtype)
        return F.linear(x, ctx.w, bias)
    assert rejected(qlora_layer.check_dequant_linear(function(fwd_ctx, lambda ctx, g: (g @ ctx.w, None, None))),
                    "ctx.w holds a dense")

    def fwd_global(ctx, x, qweight, bias):  # hidden from autograd and ctx: the weakref still sees it
        KEEP[:] = [qweight.dequantize(x.dtype)]
        return F.linear(x, KEEP[0], bias)
    assert rejected(qlora_layer.check_dequant_linear(function(fwd_global, lambda ctx, g: (g @ KEEP[0], None, None))),
                    "still alive")
    KEEP.clear()


def test_dequant_linear_rejects_other_mistakes():
    transposed = lambda ctx, g: (g @ ctx.qweight.dequantize(g.dtype).T, None, None)
    assert rejected(qlora_layer.check_dequant_linear(function(fwd, transposed)), "grad_out·W")
    float32_only = lambda ctx, x, qw, bias: (setattr(ctx, "qweight", qw), F.linear(x, qw.dequantize(), bias))[1]
    v = qlora_layer.check_dequant_linear(function(float32_only, bwd))
    assert rejected(v, "qweight.dequantize(x.dtype)")
    two_grads = lambda ctx, g: (g @ ctx.qweight.dequantize(g.dtype), None)
    assert rejected(qlora_layer.check_dequant_linear(function(fwd, two_grads)), "(grad_x, None, None)")
    no_bias = lambda ctx, x, qw, bias: fwd(ctx, x, qw, None)
    assert rejected(qlora_layer.check_dequant_linear(function(no_bias, bwd)), "output[")
    def save_qweight(ctx, x, qweight, bias):
        ctx.save_for_backward(qweight)
        return F.linear(x, qweight.dequantize(x.dtype), bias)
    assert rejected(qlora_layer.check_dequant_linear(function(save_qweight, bwd)), "ctx.qweight = qweight")
    assert rejected(qlora_layer.check_dequant_linear(fwd), "torch.autograd.Function")


@pytest.mark.parametrize("check", [nf4.check_nf4_levels, nf4.check_quantize_blockwise, nf4.check_dequantize_blockwise,
                                   nf4.check_pack_codes, double_quant.check_double_quantize,
                                   double_quant.check_bits_per_param, lora.check_lora_forward,
                                   lora.check_first_step_gradients, qlora_layer.check_dequant_linear])
def test_a_crash_in_the_learners_code_is_reported_not_raised(check):
    def crash(*args, **kwargs):
        raise ZeroDivisionError("oops")
    v = check(crash)
    assert v.status == WRONG and ("ZeroDivisionError" in v.message or "Function" in v.message)


def test_checks_leave_the_notebooks_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lora.check_lora_forward(LoRA)
    lora.check_first_step_gradients(lambda: {})
    nf4.check_quantize_blockwise(quantize_blockwise)
    qlora_layer.check_dequant_linear(function(fwd, bwd))
    assert torch.equal(torch.rand(3), expected)
