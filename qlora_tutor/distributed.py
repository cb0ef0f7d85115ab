"""Beyond one GPU: data parallel (DDP) and fully sharded data parallel (FSDP) for QLoRA.

The engines are PyTorch's, launched by `torchrun` or `accelerate launch`; the transformers Trainer joins them.
This module holds the small runtime pieces around them: who am I (rank, world size), where does my copy of the model
go, which storage dtype lets FSDP shard 4-bit weights, whether the replicas agree (adapter fingerprints), and how
to launch. What each GPU holds is arithmetic: `memory.per_gpu_memory`. FSDP-QLoRA checked on CPUs: `fsdp_check`.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch


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


def say(msg: str) -> None:
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
    log = log or say

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
