"""How much GPU memory a fine-tune needs, estimated from the model's shape: the calculator (no torch needed).

`estimate()` adds up, byte by byte, what a training step keeps on the GPU for full fine-tuning, LoRA and QLoRA:
frozen weights, quantization constants, adapters, gradients, optimizer state and activations (modelled op by op
for a Llama-style decoder using PyTorch SDPA attention and the fp32 loss). It predicts the allocator's peak
(`torch.cuda.max_memory_allocated`), which was checked against measured peaks on an H200
(results/memory_cuda.md). `per_gpu_memory()` does the same arithmetic for one GPU among several (DDP, FSDP).
Measuring is in `measure.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from . import targets as lora_targets_rule
from .config import METHODS, check_quant_type, dtype_bytes

GB = 1e9  # reports use decimal gigabytes, as GPU vendors and the QLoRA paper do
GIB = 2**30  # cards are sold in GiB: a "24 GB" RTX 3090/4090 holds 24 GiB = 25.8e9 bytes
CUDA_CONTEXT_BYTES = int(0.6 * GB)  # driver context + kernels: on the card, NOT in max_memory_allocated
CUBLAS_WORKSPACE_BYTES = 64 * 2**20  # cuBLAS/cuBLASLt workspaces come from the caching allocator: counted

OPTIMIZERS = ("adamw_32bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
STRATEGIES = ("single", "ddp", "fsdp")


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
    check_quant_type(quant_type)  # the bytes do not depend on it, but a misspelt type is still an error
    nb = -(-n // blocksize)
    if double_quant:  # + the layer's own copy of the 256-entry 8-bit dynamic code table
        consts = nb + 4 * -(-nb // blocksize2) + 4 + 256 * 4
    else:
        consts = 4 * nb
    return (n + 1) // 2, consts + 16 * 4


def bits_per_param(quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                   blocksize2: int = 256) -> float:
    """Storage bits per weight, for a large matrix: 4 + 32/64 = 4.5 without DQ, 4 + 8/64 + 32/(64*256) with."""
    check_quant_type(quant_type)
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


# The linear layers of one Llama-style decoder layer, by their module path inside the layer (as transformers
# names them), so that LoRA targets are selected here by the same rule as in a real model (targets.py).
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def lora_target_names(lora_targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Short names (q_proj, ...) of the layers `lora_targets` selects in every decoder layer, by PEFT's rule:
    'all-linear', or names such as 'q_proj' or 'self_attn.q_proj'. An entry that selects nothing is an error."""
    chosen = lora_targets_rule.select(LAYER_LINEARS, lora_targets, what="Llama-style decoder layer")
    return tuple(path.rsplit(".", 1)[-1] for path in chosen)


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


@dataclass(frozen=True)
class _Step:
    """The validated settings of one training step, in the letters the formulas use."""

    shape: ModelShape
    method: str
    e: int                      # bytes per value of the weights and the computation
    a: int                      # bytes per value of the adapters
    r: int
    targets: tuple[str, ...]    # short names of the adapted linear layers (empty for full fine-tuning)
    tokens: int                 # batch_size * seq_len
    quant_type: str
    double_quant: bool
    gradient_checkpointing: bool
    optimizer: str
    master_weights: bool
    device: str

    @property
    def full(self) -> bool:
        return self.method == "full"


def _step(config: Any, method: str, weight_dtype: str, quant_type: str, double_quant: bool, lora_r: int,
          lora_targets: str | list[str], adapter_dtype: str, batch_size: int, seq_len: int,
          gradient_checkpointing: bool, optimizer: str, master_weights: bool, device: str) -> _Step:
    """Check every setting once, with an error that says what to use instead."""
    shape = model_shape(config)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    quant_type = check_quant_type(quant_type)
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
    return _Step(shape, method, e, a, lora_r, targets, batch_size * seq_len, quant_type, double_quant,
                 gradient_checkpointing, optimizer, master_weights, device)


def _weight_part(s: _Step) -> dict[str, Any]:
    """What stays allocated all step long, and the gradients: weights (4-bit codes + constants for QLoRA),
    adapters, gradients and optimizer state, in bytes; plus the trainable numels they come from."""
    shape, e, a, r, L = s.shape, s.e, s.a, s.r, s.shape.layers
    h, V = shape.hidden, shape.vocab
    linears = shape.linears()
    lin_w = sum(fi * fo for _, fi, fo, _ in linears)
    biases = sum(fo for _, _, fo, b in linears if b)
    other = (2 * h) * L + h + V * h * (1 if shape.tied_embeddings else 2)  # norms + embeddings (+ lm_head)
    buffers = 2 * (shape.d // 2) * 4  # rotary inv_freq and original_inv_freq, fp32
    quant_consts = 0
    if s.method == "qlora":
        packed, consts = 0, 0
        for _, fi, fo, _ in linears:
            p_, c_ = quantized_bytes(fi * fo, s.quant_type, s.double_quant)
            packed, consts = packed + p_, consts + c_
        quant_consts = L * consts
        frozen = L * packed + (L * biases + other) * e + buffers
    elif s.method == "lora":
        frozen = (L * (lin_w + biases) + other) * e + buffers
    else:
        frozen = buffers
    n_all = L * (lin_w + biases) + other
    adapter_numels = [n for name, fi, fo, _ in linears if name in s.targets for n in (r * fi, fo * r)] * L
    adapters = a * sum(adapter_numels)
    if s.full:
        trainable = n_all * e
        full_numels = [fi * fo for _, fi, fo, _ in linears for _ in range(L)] + \
                      [fo for _, _, fo, b in linears if b for _ in range(L)] + [h] * (2 * L + 1) + \
                      [V * h] * (1 if shape.tied_embeddings else 2)
        grads = n_all * e
        opt = _optimizer_bytes(full_numels, s.optimizer) + (4 * n_all if s.master_weights and e != 4 else 0)
    else:
        trainable, grads = 0, adapters
        opt = _optimizer_bytes(adapter_numels, s.optimizer)
    return {"frozen": frozen, "quant_consts": quant_consts, "trainable": trainable, "adapters": adapters,
            "grads": grads, "opt": opt, "n_all": n_all, "adapter_numels": adapter_numels}


def _activation_part(s: _Step) -> dict[str, int]:
    """Bytes per token that autograd saves (per decoder layer, and around the layers), and the short-lived
    gradients of backward; modelled op by op for a Llama decoder with SDPA attention and an fp32 loss."""
    shape, e, a, r, full = s.shape, s.e, s.a, s.r, s.full
    h, i = shape.hidden, shape.intermediate
    qd, kvd, nh = shape.heads * shape.d, shape.kv_heads * shape.d, shape.heads
    tset = set(s.targets)
    cast = a != e  # PEFT casts each adapted layer's input to the adapter dtype: one copy per adapted layer

    def lora_saved(names: tuple[str, ...], width: int) -> int:
        hit = [n for n in names if n in tset]
        return len(hit) * (a * width if cast else 0) + len(hit) * a * r

    def x_in_saved(names: tuple[str, ...]) -> bool:  # a frozen linear saves its input only for an adapter
        return full or (not cast and any(n in tset for n in names))

    norm = 4 * h + 4 + (e * h if full else 0)  # fp32 copy of x and rsqrt (+ normalized x for the weight grad)
    layer = 2 * norm
    layer += e * h * (x_in_saved(("q_proj", "k_proj", "v_proj")) + x_in_saved(("gate_proj", "up_proj")))
    layer += e * (2 * qd + 2 * kvd) + 4 * nh           # SDPA saves q, k, v, output, logsumexp
    layer += 3 * e * i                                  # gate out (SiLU input), SiLU out, up out
    layer += e * i * x_in_saved(("down_proj",))         # the product a*u, down_proj's input
    layer += lora_saved(("q_proj", "k_proj", "v_proj"), h) + lora_saved(("o_proj",), qd)
    layer += lora_saved(("gate_proj", "up_proj"), h) + lora_saved(("down_proj",), i)
    # Backward through one layer: next to what the layer saved, the gradients of its wide (intermediate) tensors.
    # With adapters in fp32 the LoRA branch of gate/up produces fp32 gradients of width i (measured on CPU with
    # TensorMemoryTracker: 2*a*i + e*h per token); without adapters the MLP's three bf16 gradients dominate.
    if {"gate_proj", "up_proj"} & tset:
        layer_transient = 2 * max(a, e) * i + e * h
    else:
        layer_transient = 3 * e * i
    return {"layer": layer, "layer_transient": layer_transient,
            "final": norm + (e * h if full else 0),     # final norm (+ lm_head input when lm_head trains)
            "rope": 2 * shape.d * e,                    # cos and sin, shared by all layers
            "logits_saved": 4 * shape.vocab,            # log_softmax output, fp32
            "head_transient": 8 * shape.vocab,          # fp32 gradients of log_softmax output and input
            "no_grad_norm": 0 if (full or s.gradient_checkpointing) else 4 * h + 4}  # layer 0's input: no grad


def _peak_part(s: _Step, w: dict[str, Any], act: dict[str, int]) -> dict[str, Any]:
    """The allocator's peak: what stays allocated plus the largest of three moments of backward.

    Gradients grow while activations are freed, so the two do not peak together. Compared: the loss backward
    (all activations, fp32 logit gradients, no parameter gradients yet); backward through the last layer (its
    activations recomputed under checkpointing, head and one layer's gradients); the end of backward (layer 0
    with nearly all gradients; with tied embeddings the embedding's gradient and its sum with lm_head's are
    fresh copies).
    """
    shape, e, T, L, gc, full = s.shape, s.e, s.tokens, s.shape.layers, s.gradient_checkpointing, s.full
    h, V = shape.hidden, shape.vocab
    layer, ngn, grads = act["layer"], act["no_grad_norm"], w["grads"]
    saved_no_gc = T * (L * layer - ngn + act["rope"] + act["final"] + act["logits_saved"])
    kept = L * e * h if gc else L * layer - ngn  # checkpointing keeps each layer's input only
    head_moment = T * (kept + act["rope"] + act["final"] + act["logits_saved"] + act["head_transient"])
    layer_act = T * (kept + act["rope"] + (layer if gc else 0) + act["layer_transient"])
    head_grads = (V * h + h) * e if full else 0
    layer_moment = layer_act + head_grads + (grads - head_grads) // L
    embed_grad = V * h * e if (full and not shape.tied_embeddings) else 0  # arrives after layer 0
    layer0 = T * ((e * h if gc else 0) + act["rope"] + layer - ngn + act["layer_transient"])
    end_moment = max(grads - embed_grad - (grads - head_grads) // L + layer0,
                     grads + (2 * V * h * e if (full and shape.tied_embeddings) else 0))  # tied: two copies
    overhead = CUBLAS_WORKSPACE_BYTES if s.device == "cuda" else 0
    persistent = w["frozen"] + w["quant_consts"] + w["trainable"] + w["adapters"] + w["opt"] + overhead
    moments = {"loss backward": head_moment, "last layer backward": layer_moment, "end of backward": end_moment}
    moment = max(moments, key=moments.get)
    return {"peak": persistent + moments[moment], "moment": moment, "activations": max(head_moment, layer_act),
            "overhead": overhead, "saved_no_gc": saved_no_gc}


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
    s = _step(config, method, weight_dtype, quant_type, double_quant, lora_r, lora_targets, adapter_dtype,
              batch_size, seq_len, gradient_checkpointing, optimizer, master_weights, device)
    w = _weight_part(s)
    act = _activation_part(s)
    pk = _peak_part(s, w, act)
    components = {"frozen_weights": w["frozen"] + w["trainable"], "quantization_constants": w["quant_consts"],
                  "adapter_weights": w["adapters"], "gradients": w["grads"], "optimizer_state": w["opt"],
                  "activations": pk["activations"], "overhead": pk["overhead"]}
    notes = []
    if s.full:
        notes.append(f"full fine-tuning: {weight_dtype} weights and gradients, AdamW states "
                     f"{'8-bit' if '8bit' in optimizer else 'fp32'}" + (", fp32 master weights" if master_weights else ""))
    if optimizer.startswith("paged"):
        notes.append("paged optimizer: its state sits in CUDA unified memory and can spill to CPU RAM under pressure;"
                     " it is counted here but is not seen by max_memory_allocated")
    notes.append("activations and gradients do not peak together: the predicted peak takes the larger moment, "
                 "so it is less than the sum of the components")
    settings = dict(model=s.shape.name, method=method, weight_dtype=weight_dtype, quant_type=s.quant_type,
                    double_quant=double_quant, lora_r=lora_r, lora_targets=",".join(s.targets) or "-",
                    adapter_dtype=adapter_dtype, batch_size=batch_size, seq_len=seq_len,
                    gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, n_params=s.shape.n_params)
    details = {"peak": int(pk["peak"]), "peak_moment": pk["moment"], "saved_activations_no_gc": int(pk["saved_no_gc"]),
               "per_layer_per_token": int(act["layer"]),
               "trainable_params": int(sum(w["adapter_numels"]) if not s.full else w["n_all"])}
    notes.append(f"peak expected at: {pk['moment']}")
    return MemoryEstimate({k: int(v) for k, v in components.items()}, settings, details, notes)


# ================================================================================================================
# Memory per GPU
# ================================================================================================================

@dataclass
class PerGPUMemory:
    """What one GPU holds during a training step under a strategy, in bytes per component.

    `placement` says for each component whether it is replicated (every GPU has all of it), sharded (1/N each),
    gathered (a full copy of one unit, alive only while that unit computes) or offloaded (in CPU RAM).
    """

    strategy: str
    n_gpus: int
    components: dict[str, int]
    placement: dict[str, str]
    settings: dict[str, Any]
    peak: int                      # predicted allocator peak on one GPU (activations and gradients do not peak
    cpu_bytes: int = 0             # together, so it can be less than the sum); CPU RAM per process (offload)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Predicted allocator peak on one GPU (as estimate's total)."""
        return self.peak

    @property
    def on_card(self) -> int:
        """Allocator peak plus the CUDA context: what the card must have free."""
        return self.total + CUDA_CONTEXT_BYTES

    def fits(self, capacity_bytes: float) -> bool:
        return self.on_card <= capacity_bytes

    def report(self) -> str:
        s = self.settings
        title = (f"{s['model']} · {s['method']} · {self.strategy} on {self.n_gpus} GPU(s) · per-device batch "
                 f"{s['per_device_batch']} (global {s['global_batch']}) × seq {s['seq_len']}")
        rows = [(k.replace("_", " "), v, self.placement[k]) for k, v in self.components.items()]
        rows += [("sum of components", sum(self.components.values()), ""),
                 ("per GPU (allocator peak)", self.total, ""), ("+ CUDA context", self.on_card, "")]
        if self.cpu_bytes:
            rows.append(("CPU RAM per process", self.cpu_bytes, "(offloaded shards)"))
        return format_report(title, rows, self.notes)


def unit_bytes(config: Any, method: str = "qlora", *, weight_dtype: str = "bf16", adapter_dtype: str = "fp32",
               lora_r: int = 64, lora_targets: str | list[str] = "all-linear", quant_type: str = "nf4",
               double_quant: bool = True) -> dict[str, int]:
    """Bytes of FSDP's units: one decoder layer's parameters (frozen, adapters) and the root (embeddings, head, norm).

    FSDP wraps each decoder layer (and PEFT's wrap policy each LoRA matrix) as a unit it all-gathers on use; what
    no layer owns (embeddings, lm_head, final norm) belongs to the root unit, which stays gathered for the whole step.
    """
    shape = model_shape(config)
    quant_type = check_quant_type(quant_type)
    e = dtype_bytes(weight_dtype, "weight_dtype")
    a = dtype_bytes(adapter_dtype, "adapter_dtype")
    targets = lora_target_names(lora_targets) if method != "full" else ()
    layer_frozen = 2 * shape.hidden * e  # the two RMSNorm weights
    for name, fi, fo, bias in shape.linears():
        if method == "qlora":
            packed, _ = quantized_bytes(fi * fo, quant_type, double_quant)
            layer_frozen += packed
        else:
            layer_frozen += fi * fo * e
        layer_frozen += fo * e if bias else 0
    layer_adapter = sum(a * lora_r * (fi + fo) for name, fi, fo, _ in shape.linears() if name in targets)
    root = (shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2) + shape.hidden) * e
    if method == "full":  # everything trains: the "frozen" part is the trainable weights
        layer_frozen, layer_adapter = 0, layer_frozen
    return {"layer_frozen": layer_frozen, "layer_adapter": layer_adapter, "root": root, "layers": shape.layers}


def per_gpu_memory(config: Any, method: str = "qlora", strategy: str = "fsdp", n_gpus: int = 2, *,
                   per_device_batch: int = 1, cpu_offload: bool = False, prefetch: bool = True,
                   **estimate_kwargs: Any) -> PerGPUMemory:
    """Predict what each GPU holds when `n_gpus` GPUs train together with DDP or FSDP (FULL_SHARD).

    DDP: every GPU holds a full replica (weights, constants, adapters, gradients, optimizer state) plus its own
    activations, and the gradient buckets it all-reduces. FSDP: weights, adapters, gradients and optimizer state
    are split N ways; each GPU also holds the gathered root unit and one or two gathered decoder layers (the one
    computing and, with prefetch, the next), its own activations, and all quantization constants (bitsandbytes
    keeps them outside the parameters, so FSDP does not shard them). cpu_offload moves the shards to CPU RAM.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if not isinstance(n_gpus, int) or isinstance(n_gpus, bool) or n_gpus < 1:
        raise ValueError(f"n_gpus must be a positive integer, got {n_gpus!r}")
    if strategy == "single" and n_gpus != 1:
        raise ValueError(f"strategy 'single' means one GPU, got n_gpus={n_gpus}: use 'ddp' or 'fsdp'")
    if cpu_offload and strategy != "fsdp":
        raise ValueError("cpu_offload is an FSDP option (fsdp_offload_params): use strategy='fsdp'")
    if "batch_size" in estimate_kwargs:
        raise TypeError("pass per_device_batch (the batch each GPU computes), not batch_size")
    base = estimate(config, method, batch_size=per_device_batch, **estimate_kwargs)
    c = dict(base.components)
    n = n_gpus
    # what stays allocated all step long; the rest of the peak is activations and gradients at the peak moment
    persistent = ("frozen_weights", "quantization_constants", "adapter_weights", "optimizer_state", "overhead")
    transient = base.total - sum(c[k] for k in persistent)
    settings = {**base.settings, "per_device_batch": per_device_batch, "global_batch": per_device_batch * n,
                "strategy": strategy, "n_gpus": n, "cpu_offload": cpu_offload, "prefetch": prefetch}
    notes = [x for x in base.notes if not x.startswith("peak expected")]
    placement = {k: "replicated" for k in c}
    if strategy == "single" or (strategy == "ddp" and n == 1):
        return PerGPUMemory(strategy, n, c, placement, settings, base.total, 0, notes)
    if strategy == "ddp":
        c["communication_buffers"] = c["gradients"]  # DDP's reducer copies gradients into flat buckets
        placement["communication_buffers"] = "replicated"
        notes.append("DDP: each GPU holds the whole model; more GPUs raise throughput, not the model size that fits")
        return PerGPUMemory(strategy, n, c, placement, settings, base.total + c["gradients"], 0, notes)

    # ---- FSDP, FULL_SHARD ----------------------------------------------------------------------------------
    if n == 1:
        notes.append("FSDP on one GPU shards nothing (NO_SHARD): the same as a single GPU")
        return PerGPUMemory(strategy, n, c, placement, settings, base.total, 0, notes)
    kw = {k: estimate_kwargs[k] for k in ("weight_dtype", "adapter_dtype", "lora_r", "lora_targets", "quant_type",
                                          "double_quant") if k in estimate_kwargs}
    u = unit_bytes(config, method, **kw)
    cpu, full_grads = 0, c["gradients"]
    for k in ("frozen_weights", "adapter_weights", "gradients", "optimizer_state"):
        shard = -(-c[k] // n)
        if cpu_offload:
            cpu += shard
            c[k], placement[k] = 0, "offloaded to CPU"
        else:
            c[k], placement[k] = shard, f"sharded 1/{n}"
    if base.details.get("peak_moment") == "end of backward":  # the peak holds all gradients: now a shard
        transient -= full_grads - c["gradients"]
    in_flight = 2 if prefetch else 1
    unit = u["layer_frozen"] + u["layer_adapter"]
    # gathered: the root unit, in-flight decoder layers, and one layer's unsharded gradients before reduce-scatter
    c["gathered_units"] = u["root"] + in_flight * unit + u["layer_adapter"]
    placement["gathered_units"] = f"gathered (root + {in_flight} layer unit{'s' * (in_flight > 1)})"
    peak = sum(c[k] for k in persistent) + transient + c["gathered_units"]
    notes.append("quantization constants stay whole on every GPU: bitsandbytes keeps them beside the parameters, "
                 "not in them")
    notes.append("loading is not modelled: every process first loads the 4-bit model unless the loader places "
                 "shards directly (fsdp_cpu_ram_efficient_loading)")
    return PerGPUMemory(strategy, n, c, placement, settings, int(peak), cpu, notes)


def memory_table(models: Sequence[str], gpu_counts: Sequence[int], strategies: Sequence[str] = ("ddp", "fsdp"),
                 method: str = "qlora", **kwargs: Any) -> list[dict[str, Any]]:
    """Per-GPU memory for every model × strategy × GPU count, as rows (GB, allocator peak + CUDA context)."""
    rows = []
    for model in models:
        for strategy in strategies:
            row: dict[str, Any] = {"model": model, "strategy": strategy}
            for n in gpu_counts:
                est = per_gpu_memory(model, method, "single" if n == 1 else strategy, n, **kwargs)
                row[n] = est.on_card / GB
            rows.append(row)
    return rows
