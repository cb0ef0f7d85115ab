"""What a paged optimizer does: AdamW state in CUDA unified memory, outside PyTorch's memory pool.

1. PyTorch's allocator is capped (torch.cuda.set_per_process_memory_fraction) just above what weights, gradients
   and activations need. A plain bitsandbytes AdamW32bit step must allocate its fp32 state from that pool: OOM.
2. PagedAdamW32bit allocates the same state with cudaMallocManaged (unified memory), which the cap does not
   cover: the step completes. max_memory_allocated does not see the state; the card's used memory does.
3. The state is pushed to CPU RAM by hand (cudaMemPrefetchAsync to the host, what the driver does under memory
   pressure), and the next optimizer step pages it back: device memory drops and returns, and that step is
   slower by the transfer.

What is NOT shown: the driver evicting pages by itself when the card is physically full. That needs more managed
memory than the card has free, which can hang the GPU (the machine's rules forbid it); here the managed state is
a few GB on a card with >100 GB free. On CPU there is no unified memory: the script explains and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from qlora_tutor.paths import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: paged optimizers need CUDA unified memory (bitsandbytes falls back to ordinary "
              "state on CPU). Nothing to show here; see the docstring for what the GPU run shows.")
        return 0
    import bitsandbytes as bnb

    lines: list[str] = []

    def say(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    gb = 1e9
    dev = torch.device("cuda")
    free0, total = torch.cuda.mem_get_info()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width, bias=False) for _ in range(args.layers)])
    model = model.to(dev, torch.bfloat16)
    x = torch.randn(args.tokens, args.width, device=dev, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    state_bytes = 8 * n
    say(f"machine: {torch.cuda.get_device_name(0)}, {total / gb:.0f} GB; torch {torch.__version__}, "
        f"bitsandbytes {bnb.__version__}")
    say(f"model: {args.layers} x Linear({args.width}, {args.width}) bf16 = {n / 1e6:.0f} M params "
        f"({2 * n / gb:.2f} GB); AdamW fp32 state = {state_bytes / gb:.2f} GB; managed memory asked for "
        f"= {state_bytes / gb:.2f} GB of {free0 / gb:.0f} GB free")
    if state_bytes > 0.5 * free0:
        say("refusing: the paged state would be more than half the free GPU memory")
        return 1

    def train_step(opt) -> float:
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return loss.item()

    # measure what one step needs without optimizer state: weights + grads + activations
    torch.cuda.reset_peak_memory_stats()
    model(x).float().pow(2).mean().backward()
    need = torch.cuda.max_memory_allocated()
    model.zero_grad(set_to_none=True)
    cap = need + 256 * 2**20
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total)
    say(f"cap: PyTorch's allocator limited to {cap / gb:.2f} GB (weights+grads+activations {need / gb:.2f} GB "
        f"+ 0.27 GB); the state needs {state_bytes / gb:.2f} GB more")

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
    free_before = torch.cuda.mem_get_info()[0]
    times = []
    for _ in range(3):
        t = time.perf_counter()
        train_step(opt)
        times.append(time.perf_counter() - t)
    free_after = torch.cuda.mem_get_info()[0]
    paged = [t for s in opt.state.values() for t in s.values() if getattr(t, "is_paged", False)]
    say(f"PagedAdamW32bit: 3 steps completed under the same cap; {len(paged)} paged state tensors, "
        f"{sum(t.nbytes for t in paged) / gb:.2f} GB")
    say(f"  max_memory_allocated {torch.cuda.max_memory_allocated() / gb:.2f} GB (state not in PyTorch's pool); "
        f"card memory used grew by {(free_before - free_after) / gb:.2f} GB (the state, resident on the GPU)")
    say(f"  step time with the state resident: {1000 * min(times[1:]):.1f} ms")

    write(args.out, lines)  # what is shown so far is kept even if the next part fails
    # push the state to CPU RAM, as the driver would under memory pressure, then step: it pages back
    err = to_host([t for t in paged])
    if err:
        say(f"  moving the state to CPU RAM by hand failed ({err}); the paging-back part is not shown")
    else:
        torch.cuda.synchronize()
        free_evicted = torch.cuda.mem_get_info()[0]
        t0 = time.perf_counter()
        train_step(opt)
        t_back = time.perf_counter() - t0
        free_back = torch.cuda.mem_get_info()[0]
        t0 = time.perf_counter()
        train_step(opt)
        t_res = time.perf_counter() - t0
        say(f"  state moved to CPU RAM (cudaMemPrefetchAsync to the host): GPU memory freed "
            f"{(free_evicted - free_after) / gb:.2f} GB")
        say(f"  next step paged it back in: GPU memory used again {(free_evicted - free_back) / gb:.2f} GB; "
            f"that step took {1000 * t_back:.1f} ms vs {1000 * t_res:.1f} ms resident "
            f"(+{1000 * (t_back - t_res):.1f} ms for {state_bytes / gb:.2f} GB over the host link)")
    torch.cuda.set_per_process_memory_fraction(1.0)
    write(args.out, lines)
    return 0


def write(out: str, lines: list[str]) -> None:
    if not out:
        return
    path = os.path.join(out, "paged_gpu.md")
    atomic_write_text(path, "# Paged optimizer demo (benchmarks/paged_optimizer_demo.py)\n\n"
                      + "\n".join(f"- {ln}" for ln in lines) + "\n\n" + __doc__.split("\n\n", 1)[1])


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
