"""Beyond one GPU: data parallel (DDP) and fully sharded data parallel (FSDP) for QLoRA.

The engines are PyTorch's, launched by `torchrun` or `accelerate launch`; the transformers Trainer joins them.
This module holds the small pieces around them: who am I (rank, world size), where does my copy of the model go,
which storage dtype lets FSDP shard 4-bit weights, how to launch, and what each GPU holds under DDP and FSDP,
built on `memory.estimate`.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from . import memory
from .paths import atomic_write_text

STRATEGIES = ("single", "ddp", "fsdp")
GIB = 2**30  # cards are sold in GiB: a "24 GB" RTX 3090/4090 holds 24 GiB = 25.8e9 bytes


# ================================================================================================================
# Who am I
# ================================================================================================================

@dataclass(frozen=True)
class RankInfo:
    """This process's place in a launch: torchrun and accelerate set RANK, LOCAL_RANK and WORLD_SIZE."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints; the others only train."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_info(env: Mapping[str, str] | None = None) -> RankInfo:
    """Read the launcher's environment variables (defaults: one process)."""
    env = os.environ if env is None else env
    try:
        info = RankInfo(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))
    except ValueError as err:
        raise ValueError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers ({err}); launch with torchrun or "
                         "accelerate launch, which set them") from None
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise ValueError(f"inconsistent launch environment: RANK={info.rank}, WORLD_SIZE={info.world_size}")
    return info


def device_map(info: RankInfo | None = None, cuda: bool | None = None) -> dict[str, int] | str:
    """Where this process loads its copy of the 4-bit model: its own GPU ({'': local_rank}) or the CPU.

    With one GPU per process, process k must load onto GPU k; `{'': 0}` everywhere would put every copy on GPU 0.
    """
    info = info or rank_info()
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return {"": info.local_rank} if cuda else "cpu"


def fsdp_enabled(env: Mapping[str, str] | None = None) -> bool:
    """True inside `accelerate launch` with an FSDP config (accelerate sets ACCELERATE_USE_FSDP)."""
    env = os.environ if env is None else env
    return env.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def quant_storage(compute_dtype: torch.dtype, fsdp: bool | None = None) -> torch.dtype:
    """The dtype the packed 4-bit codes are stored in (`bnb_4bit_quant_storage`).

    FSDP flattens each unit's parameters into one tensor of one float dtype, and cannot shard integers: uint8
    storage stops it. Stored as the compute dtype (bf16 packs 4 codes per element), the 4-bit weights shard like
    any other parameter; the bits are the same, only the container changes.
    """
    fsdp = fsdp_enabled() if fsdp is None else fsdp
    return compute_dtype if fsdp else torch.uint8


def _say(msg: str) -> None:
    """One write per line, so that lines of processes sharing a pipe do not interleave."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def adapter_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every trainable tensor (names, shapes, dtypes and bytes): equal on all ranks iff in sync."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            t = p.detach().to("cpu").contiguous()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_callback(log: Any = None) -> Any:
    """A Trainer callback that prints each rank's adapter fingerprint when training ends (replicas must agree)."""
    from transformers import TrainerCallback
    log = log or _say

    class AdapterFingerprint(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            if model is None:
                return
            info = rank_info()
            if fsdp_enabled():  # each rank holds a shard: fingerprint the gathered adapters
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
                with FSDP.summon_full_params(model, writeback=False):
                    fp = adapter_fingerprint(model)
            else:
                fp = adapter_fingerprint(model)
            log(f"rank {info.rank}/{info.world_size}: adapter fingerprint {fp}")

    return AdapterFingerprint()


def adapter_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """||a - b|| over all adapter tensors, relative to ||B|| of `b`: LoRA's B starts at zero, so its norm is what
    training learned. Robust where a max-abs difference is not: AdamW turns rounding noise in near-zero gradients
    into sign flips of single coordinates."""
    if sorted(a) != sorted(b):
        raise ValueError(f"the adapters hold different tensors: {sorted(set(a) ^ set(b))[:4]}")
    diff = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a) ** 0.5
    scale = sum(float((b[k].double() ** 2).sum()) for k in b if "lora_B" in k) ** 0.5
    if scale == 0:
        raise ValueError("the reference adapter's B matrices are all zero: it has not been trained")
    return diff / scale


_FINGERPRINT = re.compile(r"rank (\d+)/(\d+): adapter fingerprint ([0-9a-f]{64})")


def parse_fingerprints(output: str) -> dict[int, str]:
    """{rank: fingerprint} from a launch's output (lines may be glued to a progress bar's carriage returns)."""
    return {int(rank): fp for rank, _, fp in _FINGERPRINT.findall(output)}


# ================================================================================================================
# Launching
# ================================================================================================================

def free_port() -> int:
    """A TCP port nobody listens on, for the rendezvous of a local launch."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, args: Sequence[str], module: str = "qlora_tutor.cli",
                     port: int | None = None) -> list[str]:
    """`torchrun --nproc_per_node N -m module args...` on this machine (the same on CPUs and GPUs)."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()), "-m", module, *args]


def accelerate_command(config_file: str | os.PathLike, args: Sequence[str],
                       module: str = "qlora_tutor.cli") -> list[str]:
    """`accelerate launch --config_file CONFIG -m module args...`."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"accelerate config {config_file} not found: see configs/accelerate_*.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.fspath(config_file),
            "-m", module, *args]


def launch(cmd: Sequence[str], timeout: float = 600, threads_per_process: int = 1,
           env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a launch command, capture its output, and raise with the output's tail if it fails.

    Each process gets `threads_per_process` CPU threads (two processes on two cores: one each).
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process), **(env or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # never inherit a launch
        full_env.pop(key, None)
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"launch failed with exit code {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return proc


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
        """Predicted allocator peak on one GPU (as memory.estimate's total)."""
        return self.peak

    @property
    def on_card(self) -> int:
        """Allocator peak plus the CUDA context: what the card must have free."""
        return self.total + memory.CUDA_CONTEXT_BYTES

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
        return memory.format_report(title, rows, self.notes)


def unit_bytes(config: Any, method: str = "qlora", *, weight_dtype: str = "bf16", adapter_dtype: str = "fp32",
               lora_r: int = 64, lora_targets: str | list[str] = "all-linear", quant_type: str = "nf4",
               double_quant: bool = True) -> dict[str, int]:
    """Bytes of FSDP's units: one decoder layer's parameters (frozen, adapters) and the root (embeddings, head, norm).

    FSDP wraps each decoder layer (and PEFT's wrap policy each LoRA matrix) as a unit it all-gathers on use; what
    no layer owns (embeddings, lm_head, final norm) belongs to the root unit, which stays gathered for the whole step.
    """
    shape = memory.model_shape(config)
    e = memory.dtype_bytes(weight_dtype, "weight_dtype")
    a = memory.dtype_bytes(adapter_dtype, "adapter_dtype")
    targets = memory.lora_target_names(lora_targets) if method != "full" else ()
    layer_frozen = 2 * shape.hidden * e  # the two RMSNorm weights
    for name, fi, fo, bias in shape.linears():
        if method == "qlora":
            packed, _ = memory.quantized_bytes(fi * fo, quant_type, double_quant)
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
    base = memory.estimate(config, method, batch_size=per_device_batch, **estimate_kwargs)
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
                row[n] = est.on_card / memory.GB
            rows.append(row)
    return rows


_COLORS = {"frozen_weights": "#4c72b0", "quantization_constants": "#8172b2", "adapter_weights": "#55a868",
           "gradients": "#8c8c8c", "optimizer_state": "#c44e52", "activations": "#dd8452", "overhead": "#cccccc",
           "communication_buffers": "#937860", "gathered_units": "#64b5cd"}


def plot_per_gpu(estimates: Sequence[PerGPUMemory], capacity_bytes: float | None = None, ax: Any = None) -> Any:
    """Stacked bars, one per estimate: what one GPU holds, component by component (GB), with the card's size."""
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    seen: set[str] = set()
    for x, est in enumerate(estimates):
        bottom = 0.0
        for k, v in est.components.items():
            if v <= 0:
                continue
            ax.bar(x, v / memory.GB, bottom=bottom, color=_COLORS.get(k, "#999999"), width=0.6,
                   label=k.replace("_", " ") if k not in seen else None)
            seen.add(k)
            bottom += v / memory.GB
        ax.plot([x - 0.3, x + 0.3], [est.on_card / memory.GB] * 2, color="black", lw=1)  # predicted peak + context
    if capacity_bytes:
        ax.axhline(capacity_bytes / memory.GB, color="red", ls="--", lw=1,
                   label=f"card ({capacity_bytes / memory.GB:.1f} GB)")
    ax.set_xticks(range(len(estimates)), [f"{e.strategy}\n{e.n_gpus} GPU" + "s" * (e.n_gpus > 1) +
                                          (" + offload" if e.settings.get("cpu_offload") else "")
                                          for e in estimates])
    ax.set_ylabel("GB per GPU")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


# ================================================================================================================
# FSDP-QLoRA on the CPU: the sharding mechanism, checked without GPUs
# ================================================================================================================

def _tiny_qlora(folder: str, storage: torch.dtype, seed: int) -> torch.nn.Module:
    """A 2-layer Llama from `folder`, loaded in 4-bit by transformers with `storage` as the codes' container,
    with LoRA on every linear layer (B made non-zero so that every adapter gets a gradient)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    dtype = torch.float32 if storage == torch.uint8 else storage  # the other weights share the storage dtype
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=storage)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=dtype, device_map="cpu")
    torch.manual_seed(seed + 1)  # the same LoRA A on every rank and in the reference
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed + 2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02, generator=g)
    return model


def _fsdp_step(storage: torch.dtype, folder: str, ids: torch.Tensor, info: RankInfo, seed: int,
               lr: float = 0.5) -> dict[str, Any]:
    """Shard one copy with FSDP, step it on this rank's rows of `ids`; step an unsharded copy on all rows."""
    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    ref, model = _tiny_qlora(folder, storage, seed), _tiny_qlora(folder, storage, seed)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    out: dict[str, Any] = {"storage": str(storage).replace("torch.", ""), "rank": info.rank,
                           "world_size": info.world_size, "param_dtypes": dtypes}
    try:  # the Trainer's recipe: FSDP1, flat parameters, PEFT's policy (decoder layers + each LoRA matrix)
        fsdp = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"),
                    use_orig_params=False)
    except ValueError as err:  # uint8 storage: "Cannot flatten integer dtype tensors"
        return {**out, "error": str(err)}
    rows = ids.shape[0] // info.world_size
    mine = ids[info.rank * rows: (info.rank + 1) * rows]
    opt = torch.optim.SGD([p for p in fsdp.parameters() if p.requires_grad], lr=lr)
    loss = fsdp(input_ids=mine, labels=mine).loss
    loss.backward()  # FSDP reduce-scatters the gradients: each rank keeps the average for its shard
    opt.step()
    before = {n: p.detach().float().clone() for n, p in ref.named_parameters() if p.requires_grad}
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p -= lr * p.grad
    losses = [torch.zeros(()) for _ in range(info.world_size)]
    dist.all_gather(losses, loss.detach().float())
    with FSDP.summon_full_params(fsdp):
        got = {n.replace("_fsdp_wrapped_module.", ""): p.detach().float().clone()
               for n, p in fsdp.named_parameters() if "lora_" in n}
    want = {n: p.detach().float() for n, p in ref.named_parameters() if p.requires_grad}
    if sorted(got) != sorted(want):
        raise RuntimeError(f"FSDP changed the adapter names: {sorted(set(got) ^ set(want))[:4]}")
    return {**out, "shard_bytes": sum(p.numel() * p.element_size() for p in fsdp.parameters()),
            "full_bytes": sum(p.numel() * p.element_size() for p in ref.parameters()),
            "loss_mean": float(torch.stack(losses).mean()), "ref_loss": float(ref_loss), "n_adapters": len(want),
            "adapter_max_diff": max((got[n] - want[n]).abs().max().item() for n in want),
            "moved": max((want[n] - before[n]).abs().max().item() for n in want)}


def fsdp_qlora_check(storages: Sequence[str] = ("uint8", "bf16"), seed: int = 0,
                     log: Any = _say) -> list[dict[str, Any]]:
    """FSDP-QLoRA on CPUs, inside a torchrun launch (gloo): for each 4-bit storage dtype ('uint8', 'bf16',
    'fp32'), try to shard a tiny QLoRA model as the Trainer would and take one SGD step on this rank's share of
    a batch; compare loss and adapters with an unsharded copy stepped on the whole batch.

    accelerate refuses FSDP without an accelerator, so this calls torch's FSDP directly, with the same wrapping.
    """
    import tempfile
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    names = {"uint8": torch.uint8, "fp32": torch.float32, "bf16": torch.bfloat16}
    bad = [s for s in storages if s not in names]
    if bad:
        raise ValueError(f"unknown storage {bad}: use 'uint8', 'bf16' or 'fp32'")
    info = rank_info()
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, cfg.vocab_size, (2 * info.world_size, 12), generator=torch.Generator().manual_seed(seed))
    results = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(folder)  # before joining the group: saving then happens on every rank
        dist.init_process_group("gloo")
        try:
            for s in storages:
                r = _fsdp_step(names[s], folder, ids, info, seed)
                results.append(r)
                if "error" in r:
                    log(f"rank {info.rank}/{info.world_size} · {s} storage ({', '.join(r['param_dtypes'])} "
                        f"parameters): FSDP refuses: {r['error']}")
                else:
                    log(f"rank {info.rank}/{info.world_size} · {s} storage ({', '.join(r['param_dtypes'])}): holds "
                        f"{r['shard_bytes']:,} of {r['full_bytes']:,} parameter bytes; mean loss {r['loss_mean']:.6f} "
                        f"vs unsharded {r['ref_loss']:.6f}; adapters after one step differ by "
                        f"{r['adapter_max_diff']:.1e} (the step moved them {r['moved']:.1e})")
        finally:
            dist.destroy_process_group()
    return results


if __name__ == "__main__":  # python -m torch.distributed.run --nproc_per_node 2 -m qlora_tutor.distributed ...
    import argparse
    import json
    parser = argparse.ArgumentParser(prog="python -m qlora_tutor.distributed",
                                     description="FSDP-QLoRA on CPUs: run under torchrun with 2 or more processes")
    parser.add_argument("command", choices=["fsdp-check"])
    parser.add_argument("--storage", default="uint8,bf16", help="comma list of uint8, bf16, fp32")
    parser.add_argument("--json", help="write each rank's results to JSON.rankN.json")
    a = parser.parse_args()
    results = fsdp_qlora_check(a.storage.split(","))
    if a.json:
        path = f"{a.json}.rank{rank_info().rank}.json"
        atomic_write_text(path, json.dumps(results))
