"""QLoRALinear and add_adapters against bitsandbytes + PEFT, float64 autograd, PEFT's parameter counts, and memory."""

import copy
import gc
import math

import pytest
import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef

from bnb_reference import bnb_cpu_dequant_misscales
from layer_helpers import OneLinear, rel_error
from qlora_tutor import hardware
from qlora_tutor.lora import LoRALinear
from qlora_tutor.counting import count_parameters, linear_weight_memory
from qlora_tutor.qlora import DequantLinear, QLoRALinear, QuantizedLinear, add_adapters
from qlora_tutor.quant import QuantizedTensor

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _bnb_peft(lin: nn.Linear, quant_type: str, r: int, alpha: float, rslora: bool, compute_dtype=torch.float32):
    """bitsandbytes Linear4bit (same weights, quantized on CPU) with PEFT's 4-bit LoRA layer on top."""
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                          compress_statistics=True, quant_type=quant_type)
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, compress_statistics=True,
                                 quant_type=quant_type, blocksize=64)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    wrapper = OneLinear(q.to("cpu"))  # .to() is where Params4bit quantizes
    wrapper.is_loaded_in_4bit = True  # what transformers sets; makes PEFT pick its bitsandbytes LoRA layer
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], use_rslora=rslora)
    model = peft.get_peft_model(wrapper, cfg)
    layer = model.base_model.model.lin
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and type(layer).__name__ == "Linear4bit"
    return model, layer


@pytest.mark.parametrize("quant_type,seed,in_f,out_f,r,alpha,bias,rslora", [
    ("nf4", 0, 64, 48, 8, 16, True, False), ("nf4", 1, 37, 23, 4, 8, True, True),  # 851 values: a partial block
    ("nf4", 2, 256, 130, 16, 16, False, False), ("fp4", 3, 128, 33, 8, 16, True, False),
    ("nf4", 4, 300, 7, 4, 8, True, False)])  # 300: not a multiple of 64, but bitsandbytes is right there
# Shapes avoid what bitsandbytes 0.50.2's C++ CPU dequantize_4bit mis-scales (in_features a multiple of 16 but not
# of the block size, e.g. 80, with enough rows; its pure-PyTorch backend is right): bnb_reference, quirk 3.
def test_matches_bitsandbytes_plus_peft(quant_type, seed, in_f, out_f, r, alpha, bias, rslora):
    assert not bnb_cpu_dequant_misscales((out_f, in_f), 64)
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    ours = QLoRALinear.from_linear(copy.deepcopy(lin), r, alpha, use_rslora=rslora, quant_type=quant_type,
                                   double_quant=True, blocksize=64, compute_dtype=torch.float32)
    with torch.no_grad():
        ours.lora_B.normal_()  # nonzero, so the adapter path is really compared
    ref, layer = _bnb_peft(lin, quant_type, r, alpha, rslora)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    # the frozen weight itself: our 4-bit format dequantizes to exactly bitsandbytes' values
    w_bnb = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    assert torch.equal(ours.base_layer.dequantized_weight(torch.float32), w_bnb)
    x = torch.randn(2, 5, in_f)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    assert rel_error(y1, y2) < 1e-6
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert rel_error(x1.grad, x2.grad) < 1e-6
    assert rel_error(ours.lora_A.grad, layer.lora_A["default"].weight.grad) < 1e-6
    assert rel_error(ours.lora_B.grad, layer.lora_B["default"].weight.grad) < 1e-6


@pytest.mark.parametrize("seed,quant_type,double_quant", [(0, "nf4", True), (1, "fp4", False), (2, "int4", True)])
def test_gradients_match_float64_reference(seed, quant_type, double_quant):
    """Grads of x, A and B against float64 autograd through y = x·Wdqᵀ + b + s·(x·Aᵀ)·Bᵀ."""
    torch.manual_seed(seed)
    lin = nn.Linear(72, 40)
    ours = QLoRALinear.from_linear(lin, 6, 12, quant_type=quant_type, double_quant=double_quant,
                                   compute_dtype=torch.float32)
    with torch.no_grad():
        ours.lora_B.normal_()
    x = torch.randn(3, 9, 72, requires_grad=True)
    g = torch.randn(3, 9, 40)
    (ours(x) * g).sum().backward()
    # reference, from the dequantized weight, entirely in float64
    W = ours.base_layer.dequantized_weight(torch.float32).double()
    b = ours.base_layer.bias.double()
    x64 = x.detach().double().requires_grad_()
    A64 = ours.lora_A.detach().double().requires_grad_()
    B64 = ours.lora_B.detach().double().requires_grad_()
    y64 = x64 @ W.T + b + ours.scaling * (x64 @ A64.T) @ B64.T
    (y64 * g.double()).sum().backward()
    assert rel_error(x.grad, x64.grad) < 1e-5
    assert rel_error(ours.lora_A.grad, A64.grad) < 1e-5
    assert rel_error(ours.lora_B.grad, B64.grad) < 1e-5
    assert ours.base_layer.bias.grad is None  # the base gets nothing


def test_dequant_linear_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    qw = _quantize_for_test(torch.randn(5, 64))
    x = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: DequantLinear.apply(t, qw, bias, torch.float64), (x,))


def _quantize_for_test(w: torch.Tensor) -> QuantizedTensor:
    from qlora_tutor.quant import quantize
    return quantize(w, quant_type="nf4", blocksize=64, double_quant=True)


# (rows, last dimension, block size): where bitsandbytes' AVX-512 path mis-scales and where it does not
QUIRK_CASES = [(33, 80, 64), (2, 80, 64), (4, 400, 64), (3, 64, 128), (3, 1040, 1024), (5, 48, 32),
               (9, 4096 + 16, 1024), (4, 300, 64), (2, 64, 128), (1, 80, 64), (7, 82, 64), (6, 96, 32), (5, 80, 2048),
               (3, 4096 + 16, 4096), (4, 81, 64), (3, 128, 64)]


@torch._dynamo.config.patch(disable=True)  # bitsandbytes torch.compiles its PyTorch dequantize per shape: skip that
def test_bitsandbytes_cpu_dequant_misscales_exactly_where_predicted():
    """bitsandbytes' C++ CPU dequantize_4bit is wrong exactly where bnb_reference.bnb_cpu_dequant_misscales says
    (nowhere on a CPU without AVX-512); ours equals its pure-PyTorch backend everywhere."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    g = torch.Generator().manual_seed(5)
    seen = []
    for rows, n, blocksize in QUIRK_CASES:
        w = torch.randn(rows, n, generator=g) * torch.rand(rows, n, generator=g).mul(8).exp()  # blocks of varied scale
        packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        default = _dequantize_4bit_compute(packed.view(-1), state.absmax, state.code, blocksize, (rows, n),
                                           torch.float32).reshape(rows, n)
        ours = QuantizedTensor.from_bitsandbytes(packed, state)
        for backend in ("torch", "auto"):
            assert torch.equal(ours.dequantize(backend=backend), default), (rows, n, blocksize, backend)
        wrong = not torch.equal(bnb.functional.dequantize_4bit(packed, state).reshape(rows, n), default)
        seen.append((wrong, bnb_cpu_dequant_misscales((rows, n), blocksize)))
    if any(predicted for _, predicted in seen) and not any(wrong for wrong, _ in seen):
        pytest.skip("bitsandbytes' CPU dequantize_4bit no longer mis-scales: quirk 3 in bnb_reference can go")
    assert [w for w, _ in seen] == [p for _, p in seen], list(zip(QUIRK_CASES, seen))


def test_compute_dtype_bf16_on_cpu_matches_bitsandbytes():
    torch.manual_seed(3)
    lin = nn.Linear(128, 64)
    ours = QLoRALinear.from_linear(copy.deepcopy(lin), 8, 16, compute_dtype="bf16")
    assert ours.compute_dtype == torch.bfloat16 and ours.lora_A.dtype == torch.float32  # adapters stay fp32
    ref, layer = _bnb_peft(lin, "nf4", 8, 16, False, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        ours.lora_B.normal_()
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(6, 128, dtype=torch.bfloat16)
    y1, y2 = ours(x), ref(x)
    assert y1.dtype == y2.dtype == torch.bfloat16
    assert rel_error(y1, y2) < 1e-2  # bf16 has 8 significant bits; both round the same products


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", ["compute", "fp32"])
def test_16bit_compute_matches_bitsandbytes_plus_peft_bit_for_bit(dtype, input_dtype):
    """PEFT's 4-bit LoRA layer rounds the fp32 adapter output to the base output's dtype, then adds: so do we
    (unlike PEFT's plain Linear, which LoRALinear follows: see test_lora)."""
    from bnb_reference import assert_same_bits_as_peft
    torch.manual_seed(8)
    lin = nn.Linear(128, 64)
    ours = QLoRALinear.from_linear(copy.deepcopy(lin), 8, 16, compute_dtype=dtype)
    ref, layer = _bnb_peft(lin, "nf4", 8, 16, False, compute_dtype=dtype)
    with torch.no_grad():
        ours.lora_B.normal_()
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    assert layer.lora_A["default"].weight.dtype == ours.lora_A.dtype == torch.float32
    x = torch.randn(5, 9, 128).to(dtype if input_dtype == "compute" else torch.float32)
    assert_same_bits_as_peft(ours, ref, layer, x)


def test_quantized_linear_checks_what_it_is_given():
    from qlora_tutor.quant import quantize
    qw = quantize(torch.randn(8, 64))
    with pytest.raises(TypeError, match="QuantizedTensor"):
        QuantizedLinear(torch.randn(8, 64), None, torch.float32)
    with pytest.raises(ValueError, match="bias must be"):
        QuantizedLinear(qw, torch.randn(9), torch.float32)
    for bad in (torch.int8, torch.float64, "int8", None):
        with pytest.raises((TypeError, ValueError), match="dtype"):
            QuantizedLinear(qw, None, bad)
    assert QuantizedLinear(qw, None, "bf16").compute_dtype == torch.bfloat16


def test_module_moves_and_casts_keep_the_4bit_storage():
    torch.manual_seed(6)
    layer = QLoRALinear.from_linear(nn.Linear(64, 16), 4, 8, compute_dtype=torch.float32)
    x = torch.randn(3, 64)
    y = layer(x)
    layer.to("cpu").double()  # a dtype cast must not touch the packed codes; the bias and adapter follow it
    assert layer.base_layer.weight.packed.dtype == torch.uint8 and layer.lora_A.dtype == torch.float64
    assert layer.base_layer.weight.packed.device.type == "cpu"
    assert torch.allclose(layer(x.double()), y.double(), atol=1e-5)
    assert sorted(layer.state_dict()) == ["base_layer.bias", "lora_A", "lora_B"]


def test_merged_linear_equals_layer():
    torch.manual_seed(4)
    layer = QLoRALinear.from_linear(nn.Linear(96, 50), 4, 8, compute_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 96)
    assert rel_error(layer.merged_linear()(x), layer(x)) < 1e-6


# --------------------------------------------------------------------------------------------------- tiny Llama

def _tiny_llama(seed: int = 0, hidden: int = 96, inter: int = 160, layers: int = 2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # a transformers deprecation raised inside PEFT
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", ["down_proj"]])
@pytest.mark.parametrize("quant_type", [None, "nf4"])
def test_trainable_params_match_peft(targets, quant_type):
    base = _tiny_llama()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    ref_trainable, ref_total = ref.get_nb_trainable_parameters()
    ours = add_adapters(copy.deepcopy(base), targets, r=8, alpha=16, quant_type=quant_type, compute_dtype="fp32")
    c = count_parameters(ours)
    assert c.trainable == ref_trainable
    assert c.total == ref_total  # 4-bit weights count as the parameters they stand for
    adapted = {n.rsplit(".", 1)[0] for n, p in ours.named_parameters() if p.requires_grad}
    ref_adapted = {n.split(".lora_")[0].removeprefix("base_model.model.")
                   for n, p in ref.named_parameters() if p.requires_grad}
    assert adapted == ref_adapted  # the very same layers carry adapters
    assert not isinstance(ours.lm_head, (LoRALinear, QLoRALinear, QuantizedLinear))  # the head stays as it is
    if quant_type:
        # like load_in_4bit: every linear layer of the body is 4-bit, targeted or not
        assert not any(type(m) is nn.Linear for n, m in ours.named_modules() if n != "lm_head")


@pytest.mark.parametrize("quant_type", [None, "nf4"])
def test_a_few_steps_lower_the_loss(quant_type):
    model = add_adapters(_tiny_llama(1), ["q_proj", "v_proj"], r=8, alpha=16, quant_type=quant_type,
                         compute_dtype="fp32").train()
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (2, 10))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(math.isfinite(v) for v in losses)


def test_4bit_body_is_at_most_4_2_bits_per_param():
    model = add_adapters(_tiny_llama(hidden=256, inter=512), ["q_proj", "v_proj"], r=8, alpha=16,
                         quant_type="nf4", double_quant=True, compute_dtype="fp32")
    mem = linear_weight_memory(model)
    assert mem.params == sum(math.prod(m.weight.shape) for m in model.modules() if isinstance(m, QuantizedLinear))
    assert mem.bits_per_param <= 4.2, str(mem)
    # independent count: every tensor held by every QuantizedTensor, straight from its attributes
    tensors = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            stack = [m.weight]
            while stack:
                obj = stack.pop()
                if isinstance(obj, torch.Tensor):
                    tensors[(obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())] = obj
                elif isinstance(obj, (list, tuple)):
                    stack.extend(obj)
                elif isinstance(obj, dict):
                    stack.extend(obj.values())
                elif hasattr(obj, "__dict__"):
                    stack.extend(vars(obj).values())
    assert sum(k[1] for k in tensors) == mem.nbytes
    # and quant.py's own accounting (written separately) agrees
    assert mem.nbytes == sum(m.weight.nbytes for m in model.modules() if isinstance(m, QuantizedLinear))
    # without double quantization the fp32 absmax costs 0.5 bit/param more: the bound then fails, as it should
    plain = add_adapters(_tiny_llama(hidden=256, inter=512), ["q_proj"], 8, 16, quant_type="nf4",
                         double_quant=False, compute_dtype="fp32")
    assert linear_weight_memory(plain).bits_per_param > 4.4
    # the dense fp32 model for comparison: 32 bits per parameter
    assert linear_weight_memory(_tiny_llama(hidden=256, inter=512)).bits_per_param == 32.0


def _naive_apply(x, qweight, bias, compute_dtype):
    """What the custom Function avoids: ordinary autograd saves the dense dequantized weight for backward."""
    return torch.nn.functional.linear(x, qweight.dequantize(compute_dtype), bias)


def _saved_weight_like_tensors(model, x):
    """Run forward + backward; return how many saved tensors look like a dense frozen weight (shape out×in)."""
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, QuantizedLinear)}
    hits = []

    def pack(t):
        if t.is_floating_point() and tuple(t.shape) in shapes | {s[::-1] for s in shapes}:
            hits.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return hits


def _alive_after_forward(model, x):
    """How many dequantized weights' memory is still allocated between forward and backward, and after backward.

    Tracks the storage (the actual memory), not the Python object: autograd may save a view such as Wᵀ.
    """
    refs = []
    original = QuantizedTensor.dequantize

    def tracking(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        refs.append(StorageWeakRef(out.untyped_storage()))
        return out

    QuantizedTensor.dequantize = tracking
    try:
        loss = model(input_ids=x, labels=x).loss
        gc.collect()
        alive_mid = sum(not r.expired() for r in refs)
        loss.backward()
        del loss
        gc.collect()
        made = len(refs)
        alive_end = sum(not r.expired() for r in refs)
    finally:
        QuantizedTensor.dequantize = original
    return made, alive_mid, alive_end


def test_no_dequantized_weight_is_kept_for_backward(monkeypatch):
    model = add_adapters(_tiny_llama(2), "all-linear", r=4, alpha=8, quant_type="nf4", compute_dtype="fp32").train()
    x = torch.randint(0, 200, (2, 5))
    quant_layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    n_quant = len(quant_layers)
    needs_grad = []  # layers whose input needs a gradient: only those dequantize again in backward
    hooks = [m.register_forward_pre_hook(lambda mod, args: needs_grad.append(args[0].requires_grad))
             for m in quant_layers]
    assert _saved_weight_like_tensors(model, x) == []
    needs_grad.clear()
    made, alive_mid, alive_end = _alive_after_forward(model, x)
    for h in hooks:
        h.remove()
    assert alive_mid == 0 and alive_end == 0
    # once per layer in forward, once more in backward where the input needs a gradient: recomputed, not stored
    assert len(needs_grad) == n_quant and 0 < sum(needs_grad) < n_quant
    assert made == n_quant + sum(needs_grad)
    # the same checks catch the naive version, so they can fail
    monkeypatch.setattr(DequantLinear, "apply", staticmethod(_naive_apply))
    assert len(_saved_weight_like_tensors(model, x)) >= sum(needs_grad)
    _, alive_mid, alive_end = _alive_after_forward(model, x)
    assert alive_mid >= sum(needs_grad) and alive_end == 0


# --------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(r=0), ValueError, "at least 1"),
    (dict(r=4.0), TypeError, "positive int"),
    (dict(alpha="16"), TypeError, "must be a number"),
    (dict(target_modules=["qproj"]), ValueError, r"matches no module.*'q_proj'"),
    (dict(target_modules=["mlp"]), TypeError, r"LlamaMLP.*not an nn.Linear"),
    (dict(target_modules=["layers"]), TypeError, "not an nn.Linear"),
    (dict(target_modules=[]), TypeError, "non-empty list"),
    (dict(target_modules=5), TypeError, "non-empty list"),
    (dict(quant_type="nf3"), ValueError, "quant_type"),
    (dict(compute_dtype="fp8"), ValueError, "unknown dtype"),
])
def test_bad_arguments(kwargs, err, msg):
    args = dict(target_modules=["q_proj"], r=4, alpha=8, quant_type="nf4") | kwargs
    with pytest.raises(err, match=msg):
        add_adapters(_tiny_llama(layers=1), **args)


def test_bf16_on_gpu_without_bf16_says_use_fp16(monkeypatch):
    t4 = hardware.DeviceInfo("cuda", "Tesla T4", False, 15.0)
    monkeypatch.setattr(hardware, "detect", lambda: t4)
    with pytest.raises(ValueError, match="Use fp16"):
        add_adapters(_tiny_llama(layers=1), ["q_proj"], 4, 8, quant_type="nf4", compute_dtype="bf16")
    with pytest.raises(ValueError, match="Use fp16"):
        QLoRALinear.from_linear(nn.Linear(8, 8), 2, 4, compute_dtype=torch.bfloat16)


def test_adding_twice_and_wrapping_non_linear_are_errors():
    model = add_adapters(_tiny_llama(layers=1), ["q_proj"], 4, 8)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_adapters(model, ["v_proj"], 4, 8)
    with pytest.raises(TypeError, match="nn.Linear"):
        QLoRALinear.from_linear(nn.Embedding(10, 4), 2, 4)
    with pytest.raises(TypeError, match="QuantizedLinear"):
        QLoRALinear(nn.Linear(4, 4), 2, 4)


# --------------------------------------------------------------------------------------------------- all or nothing

def _snapshot(model):
    """Everything add_adapters could change: which module sits at each name, every tensor's bits and requires_grad."""
    return ({n: id(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}, torch.get_rng_state())


def _assert_unchanged(model, before):
    modules, params, rng = _snapshot(model)
    assert modules == before[0], "modules were swapped"
    assert params.keys() == before[1].keys()
    for n, (t, requires_grad) in params.items():
        assert requires_grad == before[1][n][1], f"{n}: requires_grad changed"
        assert torch.equal(t.nan_to_num(), before[1][n][0].nan_to_num()), f"{n}: values changed"
    assert torch.equal(rng, before[2]), "the random state moved: a retry would start from other numbers"
    assert not any(isinstance(m, (LoRALinear, QLoRALinear, QuantizedLinear)) for m in model.modules())


def _with_a_partly_frozen_embedding(model):
    model.model.embed_tokens.weight.requires_grad_(False)  # a user's own choice, to be kept as it is
    return model


@pytest.mark.parametrize("quant_type,targets,bad_layer", [
    ("nf4", ["q_proj", "v_proj"], "model.layers.0.self_attn.v_proj"),  # the second target
    ("nf4", ["q_proj", "v_proj"], "model.layers.1.mlp.down_proj"),  # the last non-target layer quantized
    ("fp4", "all-linear", "model.layers.1.self_attn.o_proj"),
])
def test_a_failing_layer_leaves_the_model_as_it_was_and_a_retry_works(quant_type, targets, bad_layer):
    model = _with_a_partly_frozen_embedding(_tiny_llama(3))
    clean = add_adapters(_with_a_partly_frozen_embedding(_tiny_llama(3)), targets, 4, 8, quant_type=quant_type,
                         compute_dtype="fp32")
    weight = model.get_submodule(bad_layer).weight
    good = weight.detach().clone()
    with torch.no_grad():
        weight[3, 5] = float("nan")
    torch.manual_seed(11)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="NaN"):
        add_adapters(model, targets, 4, 8, quant_type=quant_type, compute_dtype="fp32")
    _assert_unchanged(model, before)
    with torch.no_grad():
        weight.copy_(good)
    torch.manual_seed(11)
    add_adapters(model, targets, 4, 8, quant_type=quant_type, compute_dtype="fp32")  # no "already has adapters"
    again = _with_a_partly_frozen_embedding(_tiny_llama(3))
    torch.manual_seed(11)
    add_adapters(again, targets, 4, 8, quant_type=quant_type, compute_dtype="fp32")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, p in clean.named_parameters() if p.requires_grad]
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), f"{n}: the retry differs from a first call with the same seed"


@pytest.mark.parametrize("quant_type", [None, "nf4"])
@pytest.mark.parametrize("error", [RuntimeError("out of memory"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_an_error_or_interrupt_half_way_rolls_back(monkeypatch, quant_type, error):
    import qlora_tutor.qlora as qlora_module
    calls = []

    def third_call_fails(build):
        def wrapped(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise error
            return build(*args, **kwargs)
        return wrapped

    if quant_type is None:  # the third LoRALinear (the first two froze their linear layers)
        monkeypatch.setattr(qlora_module, "LoRALinear", third_call_fails(LoRALinear))
    else:  # the third quantized layer
        real = QuantizedLinear.from_linear.__func__
        monkeypatch.setattr(QuantizedLinear, "from_linear",
                            classmethod(lambda cls, *a, **k: third_call_fails(real)(cls, *a, **k)))
    model = _with_a_partly_frozen_embedding(_tiny_llama(4))
    before = _snapshot(model)
    with pytest.raises(type(error)):
        add_adapters(model, "all-linear", 4, 8, quant_type=quant_type, compute_dtype="fp32")
    assert len(calls) == 3
    _assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs", [dict(blocksize=48), dict(blocksize=2**64), dict(quant_type="nf5"),
                                    dict(double_quant="no"), dict(compute_dtype="int8"), dict(r=0)], ids=repr)
def test_bad_arguments_leave_the_model_unfrozen(kwargs):
    model = _with_a_partly_frozen_embedding(_tiny_llama(5, layers=1))
    before = _snapshot(model)
    with pytest.raises((ValueError, TypeError)):
        add_adapters(model, ["q_proj", "v_proj"], **(dict(r=4, alpha=8, quant_type="nf4") | kwargs))
    _assert_unchanged(model, before)


def test_a_meta_model_is_refused_and_left_as_it_was():
    with torch.device("meta"):
        model = _tiny_llama(layers=1)
    before = ({n: id(m) for n, m in model.named_modules()}, {n: p.requires_grad for n, p in model.named_parameters()})
    with pytest.raises(ValueError, match="meta device"):
        add_adapters(model, ["q_proj"], 4, 8, quant_type="nf4", compute_dtype="fp32")
    assert before == ({n: id(m) for n, m in model.named_modules()},
                      {n: p.requires_grad for n, p in model.named_parameters()})


def test_add_adapters_says_once_when_r_is_above_some_layers():
    import warnings
    from qlora_tutor.lora import RankWarning
    model = _tiny_llama(layers=2)  # k_proj and v_proj are 96 -> 48: narrower than r = 64
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_adapters(model, "all-linear", 64, 64)
    said = [str(w.message) for w in caught if issubclass(w.category, RankWarning)]
    assert len(said) == 1 and "4 targeted layer(s)" in said[0] and "use r <= 48" in said[0], said
