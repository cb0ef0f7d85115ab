"""How much GPU memory a fine-tune needs: an estimate from the model's shape, and a measurement.

`estimate()` adds up, byte by byte, what a training step keeps on the GPU for full fine-tuning, LoRA and QLoRA:
frozen weights, quantization constants, adapters, gradients, optimizer state and activations (modelled op by op
for a Llama-style decoder using PyTorch SDPA attention and the fp32 loss). It predicts the allocator's peak
(`torch.cuda.max_memory_allocated`), which was checked against measured peaks on an H200
(benchmarks/results/memory_gpu.md). `measure()` runs real training steps and reports what was actually used.
"""

from __future__ import annotations

import json
import math
import os
import resource
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

GB = 1e9  # reports use decimal gigabytes, as GPU vendors and the QLoRA paper do
CUDA_CONTEXT_BYTES = int(0.6 * GB)  # driver context + kernels: on the card, NOT in max_memory_allocated
CUBLAS_WORKSPACE_BYTES = 64 * 2**20  # cuBLAS/cuBLASLt workspaces come from the caching allocator: counted

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw_32bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
_QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-style decoder that decide its memory."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0          # 0: hidden // heads
    tied_embeddings: bool = False
    qkv_bias: bool = False     # Qwen2 has biases on q, k and v

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """(name, in_features, out_features, has_bias) of the linear layers of one decoder layer."""
        h, i, qd, kvd, b = self.hidden, self.intermediate, self.heads * self.d, self.kv_heads * self.d, self.qkv_bias
        return [("q_proj", h, qd, b), ("k_proj", h, kvd, b), ("v_proj", h, kvd, b), ("o_proj", qd, h, False),
                ("gate_proj", h, i, False), ("up_proj", h, i, False), ("down_proj", i, h, False)]

    @property
    def n_params(self) -> int:
        per_layer = sum(fi * fo + (fo if b else 0) for _, fi, fo, b in self.linears()) + 2 * self.hidden
        emb = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + emb + self.hidden


# Shapes from the published config.json files on the Hugging Face Hub (hidden_size, intermediate_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size, tie_word_embeddings):
# huggyllama/llama-7b, -13b, -30b, -65b (LLaMA 1; "33B" in the QLoRA paper is llama-30b), meta-llama/Llama-2-70b-hf,
# mistralai/Mistral-7B-v0.1, meta-llama/Meta-Llama-3-8B, Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B.
KNOWN_MODELS: dict[str, ModelShape] = {s.name: s for s in [
    ModelShape("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, tied_embeddings=True, qkv_bias=True),
    ModelShape("qwen2.5-1.5b", 1536, 8960, 28, 12, 2, 151936, tied_embeddings=True, qkv_bias=True),
    ModelShape("llama-7b", 4096, 11008, 32, 32, 32, 32000),
    ModelShape("mistral-7b", 4096, 14336, 32, 32, 8, 32000),
    ModelShape("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),
    ModelShape("llama-13b", 5120, 13824, 40, 40, 40, 32000),
    ModelShape("llama-33b", 6656, 17920, 60, 52, 52, 32000),
    ModelShape("llama-65b", 8192, 22016, 80, 64, 64, 32000),
    ModelShape("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
]}


def model_shape(config: Any) -> ModelShape:
    """A ModelShape from a known name, a transformers config, a dict, or a local config.json (file or folder)."""
    if isinstance(config, ModelShape):
        return config
    if isinstance(config, str) and config.lower() in KNOWN_MODELS:
        return KNOWN_MODELS[config.lower()]
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"unknown model {config!r}: use a local config.json (file or folder) or one of "
                             f"{', '.join(KNOWN_MODELS)}")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    if not isinstance(config, dict):
        if not hasattr(config, "to_dict"):
            raise TypeError(f"config must be a name, a path, a dict or a transformers PretrainedConfig, "
                            f"not {type(config).__name__}")
        config = config.to_dict()
    try:
        h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return ModelShape(
            name=str(config.get("_name_or_path") or config.get("model_type") or "custom"),
            hidden=h, intermediate=int(config["intermediate_size"]), layers=int(config["num_hidden_layers"]),
            heads=heads, kv_heads=int(config.get("num_key_value_heads") or heads), vocab=int(config["vocab_size"]),
            head_dim=int(config.get("head_dim") or h // heads),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", False)) or config.get("model_type") == "qwen2")
    except KeyError as err:
        raise ValueError(f"config lacks {err}: estimate() knows Llama-style decoders (Llama, Mistral, Qwen2)") from None


def quantized_bytes(n: int, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                    blocksize2: int = 256) -> tuple[int, int]:
    """(packed 4-bit data, quantization constants) in bytes for one weight of n values, as bitsandbytes stores it.

    Constants: fp32 absmax per block of 64; with double quantization uint8 absmax + fp32 absmax per 256 blocks
    + the fp32 mean (offset). Each layer's code tables are counted too (16 and 256 fp32 values).
    """
    nb = -(-n // blocksize)
    if double_quant:  # + the layer's own copy of the 256-entry 8-bit dynamic code table
        consts = nb + 4 * -(-nb // blocksize2) + 4 + 256 * 4
    else:
        consts = 4 * nb
    return (n + 1) // 2, consts + 16 * 4


def bits_per_param(quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                   blocksize2: int = 256) -> float:
    """Storage bits per weight, for a large matrix: 4 + 32/64 = 4.5 without DQ, 4 + 8/64 + 32/(64*256) with."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
    return 4 + 32 / blocksize


def _optimizer_bytes(numels: list[int], optimizer: str) -> int:
    """AdamW keeps two states (m, v) per trainable value: fp32 (8 B), or bnb 8-bit blockwise (2 B + fp32 absmax
    per 256 values) for tensors of at least 4096 values (bnb's min_8bit_size; smaller ones stay 32-bit)."""
    total = 0
    for n in numels:
        if optimizer.endswith("8bit") and n >= 4096:
            total += 2 * n + 2 * 4 * -(-n // 256)
        else:
            total += 8 * n
    if optimizer.endswith("8bit") and any(n >= 4096 for n in numels):
        total += 2 * 256 * 4  # the signed and unsigned 8-bit code tables, shared by all tensors
    return total


def lora_target_names(lora_targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The linear-layer names LoRA adapts: 'all-linear' or a list of names from LINEAR_NAMES, checked."""
    if isinstance(lora_targets, str):
        if lora_targets == "all-linear":
            return LINEAR_NAMES
        lora_targets = [lora_targets]
    bad = [t for t in lora_targets if t not in LINEAR_NAMES]
    if bad or not lora_targets:
        raise ValueError(f"unknown LoRA target(s) {bad or lora_targets}: use 'all-linear' or names from "
                         f"{', '.join(LINEAR_NAMES)}")
    return tuple(lora_targets)


def dtype_bytes(name: str, what: str = "dtype") -> int:
    """Bytes per value of 'bf16', 'fp16' or 'fp32' (also 'torch.bfloat16' ...); `what` names it in the error."""
    key = str(name).lower().replace("torch.", "")
    if key not in _DTYPE_BYTES:
        raise ValueError(f"unknown {what} {name!r}: use 'bf16', 'fp16' or 'fp32'")
    return _DTYPE_BYTES[key]


@dataclass
class MemoryEstimate:
    """Bytes per component of one training step's peak, plus the settings that produced them."""

    components: dict[str, int]
    settings: dict[str, Any]
    details: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Predicted allocator peak (torch.cuda.max_memory_allocated), in bytes."""
        return self.details["peak"]

    @property
    def on_card(self) -> int:
        """What the card must hold: the allocator peak plus the CUDA context (about 0.6 GB, not in the peak)."""
        return self.total + CUDA_CONTEXT_BYTES

    def as_dict(self) -> dict[str, Any]:
        return {**self.components, "total": self.total, "on_card": self.on_card, **self.settings}

    def report(self) -> str:
        """A readable table in GB (1 GB = 1e9 bytes)."""
        s = self.settings
        title = (f"{s['model']} · {s['method']} · {s['optimizer']} · batch {s['batch_size']} × seq {s['seq_len']}"
                 f" · gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}")
        rows = [(k.replace("_", " "), v, "") for k, v in self.components.items()]
        rows += [("sum of components", sum(self.components.values()), ""),
                 ("predicted peak (allocator)", self.total, ""), ("+ CUDA context (on card)", self.on_card, "")]
        return format_report(title, rows, self.notes)


def format_report(title: str, rows: list[tuple[str, float, str]], notes: list[str]) -> str:
    """The layout of every memory report: a title, one line per (label, bytes, remark) in GB, then the notes."""
    lines = [title]
    for label, value, remark in rows:
        lines.append(f"  {label:<28}{value / GB:>9.2f} GB" + (f"  {remark}" if remark else ""))
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


def estimate(config: Any, method: str, *, weight_dtype: str = "bf16", quant_type: str = "nf4",
             double_quant: bool = True, lora_r: int = 64, lora_targets: str | list[str] = "all-linear",
             adapter_dtype: str = "fp32", batch_size: int = 1, seq_len: int = 512,
             gradient_checkpointing: bool = True, optimizer: str = "adamw_32bit",
             master_weights: bool = False, device: str = "cuda") -> MemoryEstimate:
    """Predict the peak memory of a training step of `method` ('full', 'lora' or 'qlora') for a decoder config.

    weight_dtype is the dtype of the (non-quantized) weights and of the computation; adapters are fp32 by default
    (PEFT upcasts them); full fine-tuning keeps gradients in weight_dtype and AdamW state in fp32 (optionally an
    fp32 master copy). device='cpu' skips the cuBLAS workspace so the estimate matches a CPU tensor count.
    """
    shape = model_shape(config)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if quant_type not in _QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}: use 'nf4' or 'fp4'")
    for name, val in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    e = dtype_bytes(weight_dtype, "weight_dtype")
    a = dtype_bytes(adapter_dtype, "adapter_dtype")
    targets = lora_target_names(lora_targets) if method != "full" else ()
    if method != "full":
        if not isinstance(lora_r, int) or isinstance(lora_r, bool) or lora_r <= 0:
            raise ValueError(f"lora_r must be a positive integer, got {lora_r!r}")
        for name, fi, fo, _ in shape.linears():
            if name in targets and lora_r > min(fi, fo):
                raise ValueError(f"lora_r={lora_r} is larger than {name}'s smallest side min({fi}, {fo}) = "
                                 f"{min(fi, fo)}: a rank-r update of that layer needs r <= {min(fi, fo)}")

    h, i, L, V, T, r = shape.hidden, shape.intermediate, shape.layers, shape.vocab, batch_size * seq_len, lora_r
    qd, kvd, nh = shape.heads * shape.d, shape.kv_heads * shape.d, shape.heads
    linears = shape.linears()

    # ---- weights -------------------------------------------------------------------------------------------
    lin_w = sum(fi * fo for _, fi, fo, _ in linears)
    biases = sum(fo for _, _, fo, b in linears if b)
    other = (2 * h) * L + h + V * h * (1 if shape.tied_embeddings else 2)  # norms + embeddings (+ lm_head)
    buffers = 2 * (shape.d // 2) * 4  # rotary inv_freq and original_inv_freq, fp32
    quant_consts = 0
    if method == "qlora":
        packed, consts = 0, 0
        for _, fi, fo, _ in linears:
            p_, c_ = quantized_bytes(fi * fo, quant_type, double_quant)
            packed, consts = packed + p_, consts + c_
        quant_consts = L * consts
        frozen = L * packed + (L * biases + other) * e + buffers
    elif method == "lora":
        frozen = (L * (lin_w + biases) + other) * e + buffers
    else:
        frozen = buffers
    n_all = L * (lin_w + biases) + other

    adapter_numels = [n for name, fi, fo, _ in linears if name in targets for n in (r * fi, fo * r)] * L
    adapters = a * sum(adapter_numels)

    if method == "full":
        trainable = n_all * e
        full_numels = [fi * fo for _, fi, fo, _ in linears for _ in range(L)] + \
                      [fo for _, _, fo, b in linears if b for _ in range(L)] + [h] * (2 * L + 1) + \
                      [V * h] * (1 if shape.tied_embeddings else 2)
        grads = n_all * e
        opt = _optimizer_bytes(full_numels, optimizer) + (4 * n_all if master_weights and e != 4 else 0)
    else:
        trainable = 0
        grads = adapters
        opt = _optimizer_bytes(adapter_numels, optimizer)

    # ---- activations, per token, bytes ----------------------------------------------------------------------
    full = method == "full"
    tset = set(targets)
    cast = a != e  # PEFT casts each adapted layer's input to the adapter dtype: one copy per adapted layer

    def lora_saved(names: tuple[str, ...], width: int) -> int:
        hit = [n for n in names if n in tset]
        return len(hit) * (a * width if cast else 0) + len(hit) * a * r

    norm = 4 * h + 4 + (e * h if full else 0)  # fp32 copy of x and rsqrt (+ normalized x for the weight grad)
    x_in_saved = lambda names: full or (not cast and any(n in tset for n in names))  # noqa: E731
    layer = 2 * norm
    layer += e * h * (x_in_saved(("q_proj", "k_proj", "v_proj")) + x_in_saved(("gate_proj", "up_proj")))
    layer += e * (2 * qd + 2 * kvd) + 4 * nh           # SDPA saves q, k, v, output, logsumexp
    layer += 3 * e * i                                  # gate out (SiLU input), SiLU out, up out
    layer += e * i * x_in_saved(("down_proj",))         # the product a*u, down_proj's input
    layer += lora_saved(("q_proj", "k_proj", "v_proj"), h) + lora_saved(("o_proj",), qd)
    layer += lora_saved(("gate_proj", "up_proj"), h) + lora_saved(("down_proj",), i)
    final = norm + (e * h if full else 0)               # final norm (+ lm_head input when lm_head trains)
    rope = 2 * shape.d * e                              # cos and sin, shared by all layers
    logits_saved = 4 * V                                 # log_softmax output, fp32
    head_transient = 8 * V                               # fp32 gradients of log_softmax output and input
    # Backward through one layer: next to what the layer saved, the gradients of its wide (intermediate) tensors.
    # With adapters in fp32 the LoRA branch of gate/up produces fp32 gradients of width i (measured on CPU with
    # TensorMemoryTracker: 2*a*i + e*h per token); without adapters the MLP's three bf16 gradients dominate.
    if {"gate_proj", "up_proj"} & tset:
        layer_transient = 2 * max(a, e) * i + e * h
    else:
        layer_transient = 3 * e * i
    no_grad_norm = 0 if (full or gradient_checkpointing) else 4 * h + 4  # layer 0's input needs no gradient
    saved_no_gc = T * (L * layer - no_grad_norm + rope + final + logits_saved)
    kept = L * e * h if gradient_checkpointing else L * layer - no_grad_norm  # GC keeps each layer's input

    # Gradients grow while activations are freed, so the two do not peak together. Three moments are compared:
    # the loss backward (all activations, fp32 logit gradients, no parameter gradients yet); backward through
    # the last layer (its activations recomputed under GC, head and one layer's gradients); the end of backward
    # (layer 0 with nearly all gradients; with tied embeddings the embedding's gradient and its sum with lm_head's
    # are fresh copies).
    head_moment = T * (kept + rope + final + logits_saved + head_transient)
    layer_act = T * (kept + rope + (layer if gradient_checkpointing else 0) + layer_transient)
    head_grads = (V * h + h) * e if full else 0
    layer_moment = layer_act + head_grads + (grads - head_grads) // L
    # backward through layer 0: nearly all gradients exist, and layer 0's activations (recomputed under GC)
    embed_grad = V * h * e if (full and not shape.tied_embeddings) else 0  # arrives after layer 0
    layer0 = T * ((e * h if gradient_checkpointing else 0) + rope + layer - no_grad_norm + layer_transient)
    end_moment = max(grads - embed_grad - (grads - head_grads) // L + layer0,
                     grads + (2 * V * h * e if (full and shape.tied_embeddings) else 0))  # tied: two copies
    act_peak = max(head_moment, layer_act)

    overhead = CUBLAS_WORKSPACE_BYTES if device == "cuda" else 0
    persistent = frozen + quant_consts + trainable + adapters + opt + overhead
    peak = persistent + max(head_moment, layer_moment, end_moment)
    moment = ["loss backward", "last layer backward", "end of backward"][
        [head_moment, layer_moment, end_moment].index(max(head_moment, layer_moment, end_moment))]

    components = {"frozen_weights": frozen + trainable, "quantization_constants": quant_consts,
                  "adapter_weights": adapters, "gradients": grads, "optimizer_state": opt,
                  "activations": act_peak, "overhead": overhead}
    notes = []
    if method == "full":
        notes.append(f"full fine-tuning: {weight_dtype} weights and gradients, AdamW states "
                     f"{'8-bit' if '8bit' in optimizer else 'fp32'}" + (", fp32 master weights" if master_weights else ""))
    if optimizer.startswith("paged"):
        notes.append("paged optimizer: its state sits in CUDA unified memory and can spill to CPU RAM under pressure;"
                     " it is counted here but is not seen by max_memory_allocated")
    notes.append("activations and gradients do not peak together: the predicted peak takes the larger moment, "
                 "so it is less than the sum of the components")
    settings = dict(model=shape.name, method=method, weight_dtype=weight_dtype, quant_type=quant_type,
                    double_quant=double_quant, lora_r=r, lora_targets=",".join(targets) or "-",
                    adapter_dtype=adapter_dtype, batch_size=batch_size, seq_len=seq_len,
                    gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, n_params=shape.n_params)
    details = {"peak": int(peak), "peak_moment": moment, "saved_activations_no_gc": int(saved_no_gc), "per_layer_per_token": int(layer),
               "trainable_params": int(sum(adapter_numels) if method != "full" else n_all)}
    notes.append(f"peak expected at: {moment}")
    return MemoryEstimate({k: int(v) for k, v in components.items()}, settings, details, notes)


# ================================================================================================================
# Measuring
# ================================================================================================================

def parameter_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Exact bytes of a model's tensors, by role: trainable, frozen (incl. packed 4-bit data and buffers) and
    bitsandbytes quantization constants (absmax, nested absmax, offsets, code tables). Shared storage counts once."""
    seen: set[int] = set()
    out = {"trainable": 0, "frozen": 0, "quantization_constants": 0}

    def add(t: torch.Tensor | None, key: str) -> None:
        if t is None or not isinstance(t, torch.Tensor):
            return
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            return
        seen.add(ptr)
        out[key] += t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p, "trainable" if p.requires_grad else "frozen")
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                add(t, "quantization_constants")
            if getattr(qs, "state2", None) is not None:
                add(qs.state2.absmax, "quantization_constants")
                add(qs.state2.code, "quantization_constants")
    for b in model.buffers():
        add(b, "frozen")
    return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in an optimizer's state tensors (shared tables such as bnb's quantization maps count once)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


class TensorMemoryTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of tensor storages created while active and alive, and their peak: on a CPU this plays
    the role of CUDA's allocator statistics (no rounding, no fragmentation). Tensors made before entering are
    not counted: add the parameters yourself."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: only storages the op created are new
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n == 0 or key in self._sizes or key in inputs:
                    continue
                self._sizes[key] = n
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live


def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward pass with labels (loss included),
    excluding parameters and the quantized weights: an independent count of what 'activations' means."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in params and t.device.type != "meta":
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, input_ids)
    del loss
    return sum(seen.values())


def _loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    # only the loss is kept (as the HF Trainer does): the logits are freed before backward
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float = 1e-4) -> torch.optim.Optimizer:
    """AdamW with fp32 state (bitsandbytes' fused 32-bit kernel on CUDA, torch's AdamW on fp32 params on CPU
    would keep state in the param dtype, so bnb is used everywhere it runs), 8-bit or paged, by name."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    import bitsandbytes as bnb
    cls = {"adamw_32bit": bnb.optim.AdamW32bit, "adamw_8bit": bnb.optim.AdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr)


@dataclass
class MeasuredMemory:
    """What measure() found, with what each number is."""

    device: str
    peak: int                    # CUDA: max_memory_allocated; CPU: parameters + peak of tracked tensors
    parameter_bytes: dict[str, int]
    optimizer_state: int
    after_setup: int             # memory before the first step (weights on the device)
    rss_peak: int | None = None  # CPU only: the process's peak resident set size (everything Python holds)
    steps: int = 0

    def report(self) -> str:
        lines = [f"measured on {self.device} over {self.steps} training steps"]
        for k, v in self.parameter_bytes.items():
            lines.append(f"  {'parameters: ' + k:<34}{v / GB:>9.3f} GB  (exact tensor bytes)")
        lines.append(f"  {'optimizer state':<34}{self.optimizer_state / GB:>9.3f} GB  (exact tensor bytes)")
        what = "torch.cuda.max_memory_allocated" if self.device == "cuda" else "parameters + tracked tensor peak"
        lines.append(f"  {'peak':<34}{self.peak / GB:>9.3f} GB  ({what})")
        if self.rss_peak is not None:
            lines.append(f"  {'process peak RSS':<34}{self.rss_peak / GB:>9.3f} GB  (getrusage: Python, libraries, "
                         "allocator caches, everything)")
        return "\n".join(lines)


def measure(model_or_fn: torch.nn.Module | Callable[[], Any], *, batch_size: int = 1, seq_len: int = 512,
            steps: int = 2, optimizer: str = "adamw_32bit", lr: float = 1e-4, seed: int = 0) -> MeasuredMemory:
    """Run `steps` real training steps (forward with labels, backward, optimizer step) and report peak memory.

    Pass a causal LM (its trainable parameters are optimized on random tokens) or a function that runs one step.
    The model is put in train() mode, because gradient checkpointing only acts there.
    """
    for name, val in (("batch_size", batch_size), ("seq_len", seq_len), ("steps", steps)):
        if not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    if isinstance(model_or_fn, torch.nn.Module):
        model = model_or_fn
        model.train()
        dev = next(model.parameters()).device
        vocab = model.get_input_embeddings().num_embeddings
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(dev)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters: add adapters or unfreeze it first")
        opt = make_optimizer(params, optimizer, lr)

        def step() -> None:
            _loss(model, ids).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        pbytes = parameter_bytes(model)
    elif callable(model_or_fn):
        model, opt, step, dev, pbytes = None, None, model_or_fn, None, {}
    else:
        raise TypeError(f"measure() takes a torch.nn.Module or a callable, not {type(model_or_fn).__name__}")

    device = dev.type if dev is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        rss = None
    else:
        base = sum(pbytes.values())
        after = base
        with TensorMemoryTracker() as tracker:
            for _ in range(steps):
                step()
        peak = base + tracker.peak
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return MeasuredMemory(device, int(peak), pbytes, optimizer_state_bytes(opt) if opt else 0, int(after),
                          rss, steps)


def llama_config(config: Any, **overrides: Any):
    """A transformers config (LlamaConfig, or Qwen2Config for qkv-bias shapes) for a known name or ModelShape."""
    from transformers import LlamaConfig, Qwen2Config
    s = model_shape(config)
    kw = dict(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
              num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab, head_dim=s.d,
              tie_word_embeddings=s.tied_embeddings, max_position_embeddings=4096)
    kw.update(overrides)
    cfg = Qwen2Config(**kw) if s.qkv_bias else LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def quantize_linears(model: torch.nn.Module, *, quant_type: str = "nf4", double_quant: bool = True,
                     compute_dtype: torch.dtype = torch.bfloat16, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Swap every nn.Linear (except `skip`) for a bitsandbytes Linear4bit holding the same weights, quantized in
    place on the weights' device (fast, no checkpoint on disk). Returns how many layers were swapped."""
    import bitsandbytes as bnb
    if quant_type not in _QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}: use 'nf4' or 'fp4'")
    todo = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.split(".")[-1] not in skip]
    for name, lin in todo:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                compute_dtype=compute_dtype, compress_statistics=double_quant,
                                quant_type=quant_type, device="meta")
        w = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=double_quant,
                              quant_type=quant_type, blocksize=64, module=new)
        new.weight = w._quantize(lin.weight.device)
        if lin.bias is not None:
            new.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        setattr(parent, name.rsplit(".", 1)[-1], new)
        del lin, w
    return len(todo)


def build_training_model(config: Any, method: str, *, dtype: torch.dtype = torch.bfloat16, lora_r: int = 64,
                         lora_alpha: int = 16, lora_targets: str | list[str] = "all-linear",
                         quant_type: str = "nf4", double_quant: bool = True, gradient_checkpointing: bool = True,
                         device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised causal LM of a real shape, set up for `method` as practitioners do it: full (all
    weights train), lora (PEFT on a frozen `dtype` base) or qlora (bitsandbytes NF4+DQ base + PEFT).
    Weight values do not change memory, so random weights measure memory as well as real ones."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    cfg = config if hasattr(config, "to_dict") else llama_config(config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if method == "qlora":
        quantize_linears(model, quant_type=quant_type, double_quant=double_quant, compute_dtype=dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method != "full":
        model.requires_grad_(False)
        if gradient_checkpointing:
            model.enable_input_require_grads()
        targets = list(lora_target_names(lora_targets))
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                 target_modules=targets, bias="none", task_type="CAUSAL_LM"))
    model.train()
    return model
