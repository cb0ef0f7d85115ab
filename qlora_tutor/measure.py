"""Measuring what a fine-tune really uses: peak memory of real training steps, and the models to measure.

`memory.py` predicts; this module measures. `measure()` runs real training steps and reports the peak
(`torch.cuda.max_memory_allocated` on a GPU; on a CPU a dispatch-level count of tensor bytes, which plays the role
of the allocator's statistics). `build_training_model` builds a randomly initialised model of a real shape set
up for full fine-tuning, LoRA or QLoRA as practitioners do; `PeakMemory` watches a block of code.
"""

from __future__ import annotations

import os
import resource
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .config import METHODS, check_quant_type
from .counting import parameter_bytes
from .memory import GB, OPTIMIZERS, model_shape
from .quiet import import_bitsandbytes, quiet_libraries
from .targets import parse_target_modules


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
    bnb = import_bitsandbytes()
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
    quant_type = check_quant_type(quant_type)
    bnb = import_bitsandbytes()
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
    with quiet_libraries():
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.requires_grad_(False)
            if gradient_checkpointing:
                model.enable_input_require_grads()
            model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                     target_modules=parse_target_modules(lora_targets),
                                                     bias="none", task_type="CAUSAL_LM"))
    model.train()
    return model


class PeakMemory:
    """Peak memory during a block: CUDA's allocator peak on a GPU, else the process's resident memory (sampled)."""

    def __enter__(self) -> "PeakMemory":
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = _rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())

    @property
    def used(self) -> int:
        """Bytes above what was in use when the block started."""
        return max(0, self.peak - self.start)


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the high-water mark
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
