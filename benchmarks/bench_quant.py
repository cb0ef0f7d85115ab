"""Throughput of qlora_tutor.quant against bitsandbytes on one 4096x4096 tensor (quantize and dequantize).

Usage: python benchmarks/bench_quant.py [--device cpu|cuda] [--repeats 15] [--size 4096] [--threads N]
       [--warm-memory] [--alloc N]
Prints M params/s (median of `repeats` wall-clock runs after a warm-up, ours and bitsandbytes alternating run by
run) and the ratio ours / bitsandbytes measured in the same run. On the CPU it also prints the ratio of process
CPU time (all threads), which a busy machine disturbs less than wall-clock time; it also counts OpenMP threads
spin-waiting after a parallel region, so for the millisecond-long dequantize it says little.

Dequantize is timed twice: `q.dequantize()` as a caller gets it (on the CPU the one-pass C kernel of
qlora_tutor/dequant4.c when it built, see the status line) and `q.dequantize(backend="torch")`, the PyTorch code
the notebooks explain. Both return a fresh tensor, as bitsandbytes does; on Linux a fresh 32-64 MiB tensor usually
comes straight from the OS, and mapping its pages is most of the time. --warm-memory tells glibc to keep and reuse
freed memory instead (mallopt), so that what is left is the kernels' own time. --alloc N first times N fresh
64 MiB outputs with 4 KiB pages and with the 2 MiB-page advice the native path gives them (median, p90, max).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from qlora_tutor import hardware, native
from qlora_tutor.quant import quantize


def _keep_freed_memory() -> str:
    """glibc: never hand big blocks back to the OS (no mmap, no trimming), so a new tensor reuses mapped pages."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "not glibc: --warm-memory has no effect"
    m_trim_threshold, m_mmap_max = -1, -4  # from malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    return "glibc keeps freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"


def _paired(ours, bnb, repeats: int, device: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median (wall, CPU) seconds of each function, run alternately (ours, bnb, ours, ...) after one warm-up each,
    so that both see the same machine: on a shared box memory bandwidth drifts over seconds."""
    def once(fn) -> tuple[float, float]:
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    ours(), bnb()  # warm-up (allocator, lazy tables, kernels, the native build)
    runs = [(once(ours), once(bnb)) for _ in range(repeats)]
    median = (lambda xs: (statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs)))
    return median([r[0] for r in runs]), median([r[1] for r in runs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--threads", type=int, default=None, help="torch (and OpenMP) threads; default: torch's")
    parser.add_argument("--warm-memory", action="store_true", help="reuse freed memory (time the kernels alone)")
    parser.add_argument("--alloc", type=int, default=0, metavar="N",
                        help="also time N fresh 64 MiB outputs (empty + fill), with and without the huge-page advice")
    args = parser.parse_args()
    memory = _keep_freed_memory() if args.warm_memory else "default allocator (fresh outputs come from the OS)"
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # bitsandbytes' C++ kernels use OpenMP
        torch.set_num_threads(args.threads)

    import bitsandbytes
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    n = args.size * args.size
    if args.device == "cuda":
        where = torch.cuda.get_device_name(0)
    else:
        where = f"{hardware.cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"device: {args.device} ({where})")
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, python {platform.python_version()}")
    if args.device == "cpu":
        print(f"native dequantize: {native.status()}; memory: {memory}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"tensor {args.size}x{args.size} = {n / 1e6:.1f} M params, {args.quant_type}, blocksize 64, "
          f"median of {args.repeats} alternating runs after 1 warm-up; "
          f"load average (1 min) before the run: {load:.2f}\n")
    if args.alloc and args.device == "cpu":  # first, while this process has touched little memory
        _allocation_report(n, args.alloc)
        print()
    print("| dtype | double quant | step | ours (M params/s) | bitsandbytes (M params/s) | ours / bnb (wall) "
          "| ours / bnb (CPU time) |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(args.size, args.size, device=args.device).mul_(0.02).to(dtype)
        for dq in (False, True):
            q = quantize(w, args.quant_type, 64, dq)
            packed, state = F.quantize_4bit(w, blocksize=64, quant_type=args.quant_type, compress_statistics=dq)
            assert torch.equal(q.packed, packed.reshape(-1)) or args.device == "cuda"
            rows = {
                "quantize": (lambda: quantize(w, args.quant_type, 64, dq),
                             lambda: F.quantize_4bit(w, blocksize=64, quant_type=args.quant_type,
                                                     compress_statistics=dq)),
                "dequantize": (lambda: q.dequantize(), lambda: F.dequantize_4bit(packed, state)),
                "dequantize, PyTorch path": (lambda: q.dequantize(backend="torch"),
                                             lambda: F.dequantize_4bit(packed, state)),
            }
            if args.device == "cuda":  # there the default already is the PyTorch path
                del rows["dequantize, PyTorch path"]
            for step, (ours_fn, bnb_fn) in rows.items():
                (a, ac), (b, bc) = _paired(ours_fn, bnb_fn, args.repeats, args.device)
                cpu_ratio = f"{bc / ac:.2f}" if args.device == "cpu" and ac > 0 else "-"
                print(f"| {str(dtype).replace('torch.', '')} | {'yes' if dq else 'no'} | {step} | {n / a / 1e6:,.0f} "
                      f"| {n / b / 1e6:,.0f} | {b / a:.2f} | {cpu_ratio} |", flush=True)


def _allocation_report(n_values: int, repeats: int) -> None:
    """Distribution of the time to get and first write a fresh fp32 output, as dequantize does: with 4 KiB pages
    and with the 2 MiB-page advice of `native.empty`. Median, 90th percentile and maximum, alternating."""
    if not native.available():
        print("\n(no native library: the huge-page advice is not available)")
        return
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for huge in (True, False):
            t0 = time.perf_counter()
            native.empty(n_values, torch.float32, huge_pages=huge).fill_(1.0)
            times[huge].append(1e3 * (time.perf_counter() - t0))
    print(f"fresh {n_values * 4 / 2**20:.0f} MiB fp32 output, empty + fill, {repeats} runs each (ms):")
    print("| pages | median | 90th percentile | max |\n|---|---|---|---|")
    for huge in (False, True):
        ts = sorted(times[huge])
        print(f"| {'2 MiB (advised)' if huge else '4 KiB (default)'} | {statistics.median(ts):.1f} "
              f"| {ts[int(0.9 * (len(ts) - 1))]:.1f} | {ts[-1]:.1f} |")


if __name__ == "__main__":
    main()
