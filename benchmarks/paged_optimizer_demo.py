"""What a paged optimizer does: AdamW state in CUDA unified memory, outside PyTorch's memory pool, and where it is.

1. PyTorch's allocator is capped (torch.cuda.set_per_process_memory_fraction) just above what weights, gradients
   and activations need. A plain bitsandbytes AdamW32bit step must allocate its fp32 state from that pool: OOM.
2. PagedAdamW32bit allocates the same state with cudaMallocManaged (unified memory), which the cap does not
   cover: the step completes. max_memory_allocated does not see the state; the device's used memory does.
3. The state is moved to CPU RAM by hand (cudaMemPrefetchAsync to the host, what the driver does by itself under
   memory pressure), and the next optimizer step pages it back. Where the state is at each moment is read three
   ways: the device's used memory (cudaMemGetInfo and nvidia-smi), the time the CPU takes to read the state (RAM
   speed when it is in CPU RAM; every page must first come over the link when it is on the GPU), and the time of
   the next optimizer step (slower by the transfer when the state must come back).

What is NOT shown: the driver evicting pages by itself when the card is physically full. That needs more managed
memory than the card has free, which can hang the GPU; here the managed state is a few GB on a card with >100 GB
free. On CPU there is no unified memory: the script explains and exits.

    python benchmarks/paged_optimizer_demo.py --out results     # on a CUDA machine with bitsandbytes
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from qlora_tutor.paths import atomic_write_text

GB = 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for paged_gpu.md")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: paged optimizers need CUDA unified memory (bitsandbytes falls back to ordinary "
              "state on CPU). Nothing to show here; see the docstring for what the GPU run shows.")
        return 0
    import bitsandbytes as bnb

    lines: list[str] = []
    rows: list[tuple[str, str, str, str, str]] = []

    def say(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    dev = torch.device("cuda")
    free0, total = torch.cuda.mem_get_info()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width, bias=False) for _ in range(args.layers)])
    model = model.to(dev, torch.bfloat16)
    x = torch.randn(args.tokens, args.width, device=dev, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    state_bytes = 8 * n
    say(f"machine: {torch.cuda.get_device_name(0)}, {total / GB:.0f} GB; torch {torch.__version__}, "
        f"bitsandbytes {bnb.__version__}, driver {_smi('driver_version')}")
    say(f"model: {args.layers} x Linear({args.width}, {args.width}) bf16 = {n / 1e6:.0f} M params "
        f"({2 * n / GB:.2f} GB); AdamW fp32 state = {state_bytes / GB:.2f} GB; managed memory asked for "
        f"= {state_bytes / GB:.2f} GB of {free0 / GB:.0f} GB free")
    if state_bytes > 0.5 * free0:
        say("refusing: the paged state would be more than half the free GPU memory")
        return 1

    def train_step(opt) -> float:
        t = time.perf_counter()
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    # what one step needs without optimizer state: weights + grads + activations
    torch.cuda.reset_peak_memory_stats()
    model(x).float().pow(2).mean().backward()
    need = torch.cuda.max_memory_allocated()
    model.zero_grad(set_to_none=True)
    cap = need + 256 * 2**20
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total)
    say(f"cap: PyTorch's allocator limited to {cap / GB:.2f} GB (weights+grads+activations {need / GB:.2f} GB "
        f"+ 0.27 GB); the state needs {state_bytes / GB:.2f} GB more")

    opt = bnb.optim.AdamW32bit(model.parameters(), lr=1e-5)
    try:
        train_step(opt)
        say("plain AdamW32bit: completed (unexpected: the cap was not tight)")
    except torch.OutOfMemoryError as err:
        say(f"plain AdamW32bit: OutOfMemoryError ({str(err).splitlines()[0][:90]}...)")
    del opt
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()

    opt = bnb.optim.PagedAdamW32bit(model.parameters(), lr=1e-5)
    torch.cuda.reset_peak_memory_stats()
    used0 = _used()
    times = [train_step(opt) for _ in range(3)]
    paged = [t for s in opt.state.values() for t in s.values() if getattr(t, "is_paged", False)]
    paged_bytes = sum(t.nbytes for t in paged)
    say(f"PagedAdamW32bit: 3 steps completed under the same cap; {len(paged)} paged state tensors, "
        f"{paged_bytes / GB:.2f} GB; max_memory_allocated {torch.cuda.max_memory_allocated() / GB:.2f} GB "
        "(the state is not in PyTorch's pool)")
    resident_step = min(times[1:])

    def moment(name: str, step_s: float | None) -> None:
        used = _used()
        rows.append((name, f"{(used[0] - used0[0]) / GB:+.2f}", f"{used[1] - used0[1]:+,.0f}" if used[1] is not None
                     else "n/a", f"{1000 * _cpu_read(paged):.0f}" if name != "-" else "",
                     f"{1000 * step_s:.1f}" if step_s is not None else ""))

    # the CPU reads of `moment` move pages too, so each moment is read once, in this order:
    moment("after 3 steps: state resident on the GPU", resident_step)       # CPU read pulls it to the host
    rows[-1] = rows[-1][:3] + (rows[-1][3] + " (pulls every page over)",) + rows[-1][4:]
    write(args.out, lines, rows)
    back = train_step(opt)                                                  # pages it back to the GPU
    moment("after the CPU read, one step paged it back", back)
    err = to_host(paged)
    if err:
        say(f"moving the state to CPU RAM by hand failed ({err}); the rest is not shown")
    else:
        torch.cuda.synchronize()
        time.sleep(1.0)
        moment("after cudaMemPrefetchAsync to the host (+1 s)", None)
        back2 = train_step(opt)
        steady = train_step(opt)
        moment("next step: paged back in", back2)
        rows.append(("the step after that: resident again", "", "", "", f"{1000 * steady:.1f}"))
    torch.cuda.set_per_process_memory_fraction(1.0)
    write(args.out, lines, rows)
    for r in rows:
        print(" | ".join(r))
    return 0


def _smi(field: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"


def _used() -> tuple[int, float | None]:
    """Device memory in use: (total - free from cudaMemGetInfo in bytes, nvidia-smi memory.used in MiB)."""
    free, total = torch.cuda.mem_get_info()
    smi = _smi("memory.used")
    return total - free, float(smi) if smi.replace(".", "").isdigit() else None


def _cpu_read(paged: list[torch.Tensor]) -> float:
    """Seconds for the CPU to read every paged state tensor once (they are CPU tensors over managed memory)."""
    t = time.perf_counter()
    for s in paged:
        s.sum()
    return time.perf_counter() - t


def write(out: str, lines: list[str], rows: list[tuple[str, ...]]) -> None:
    if not out:
        return
    table = ("| moment | device memory used vs before the state (cudaMemGetInfo, GB) | nvidia-smi memory.used "
             "vs before (MiB) | CPU reads the whole state (ms) | optimizer step (ms) |\n|---|---|---|---|---|\n"
             + "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n")
    atomic_write_text(os.path.join(out, "paged_gpu.md"),
                      "# Paged optimizer demo (benchmarks/paged_optimizer_demo.py)\n\n"
                      + "\n".join(f"- {ln}" for ln in lines) + "\n\n" + table + "\n"
                      + __doc__.split("\n\n", 1)[1])


def to_host(tensors: list[torch.Tensor]) -> str:
    """Migrate managed-memory tensors to CPU RAM with cudaMemPrefetchAsync; '' on success, else the error.

    bitsandbytes' own prefetch_tensor(to_cpu=True) passes device -1, which CUDA 13's cudaMemPrefetchAsync
    (it takes a cudaMemLocation) rejects with 'invalid device ordinal' and bitsandbytes then exits the process.
    """
    import ctypes

    class MemLocation(ctypes.Structure):  # struct cudaMemLocation { enum cudaMemLocationType type; int id; }
        _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]

    try:
        rt = ctypes.CDLL(f"libcudart.so.{torch.version.cuda.split('.')[0]}")
    except OSError as e:
        return f"libcudart not found: {e}"
    cuda13 = int(torch.version.cuda.split(".")[0]) >= 13
    for t in tensors:
        if cuda13:  # cudaMemLocationTypeHost = 2
            code = rt.cudaMemPrefetchAsync(ctypes.c_void_p(t.data_ptr()), ctypes.c_size_t(t.nbytes),
                                           MemLocation(2, 0), ctypes.c_uint(0), ctypes.c_void_p(0))
        else:  # CUDA 12: (ptr, count, dstDevice, stream) with cudaCpuDeviceId = -1
            code = rt.cudaMemPrefetchAsync(ctypes.c_void_p(t.data_ptr()), ctypes.c_size_t(t.nbytes),
                                           ctypes.c_int(-1), ctypes.c_void_p(0))
        if code != 0:
            return f"cudaMemPrefetchAsync returned CUDA error {code}"
    return ""


if __name__ == "__main__":
    sys.exit(main())
