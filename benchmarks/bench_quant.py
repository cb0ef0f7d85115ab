"""Throughput of qlora_tutor.quant against bitsandbytes on one 4096x4096 tensor (quantize and dequantize).

Usage: python benchmarks/bench_quant.py [--device cpu|cuda] [--repeats 7] [--size 4096] [--threads N]
Prints M params/s (median of `repeats` wall-clock runs after a warm-up, best of two interleaved rounds) and the
ratio ours / bitsandbytes measured in the same run. On the CPU it also prints the ratio of process CPU time (all
threads), which a busy machine disturbs less than wall-clock time, and the load average before the run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from qlora_tutor.quant import quantize


def _timer(device: str):
    def run(fn, repeats: int) -> tuple[float, float]:
        fn()  # warm-up (allocator, lazy tables, kernels)
        wall, cpu = [], []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return statistics.median(wall), statistics.median(cpu)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--threads", type=int, default=None, help="torch (and OpenMP) threads; default: torch's")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # bitsandbytes' C++ kernels use OpenMP
        torch.set_num_threads(args.threads)

    import bitsandbytes
    import bitsandbytes.functional as F

    timed = _timer(args.device)
    torch.manual_seed(0)
    n = args.size * args.size
    cpu = platform.processor() or platform.machine()
    if args.device == "cuda":
        where = torch.cuda.get_device_name(0)
    else:
        try:
            where = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            where = cpu
        where += f", {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"device: {args.device} ({where})")
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, python {platform.python_version()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"tensor {args.size}x{args.size} = {n / 1e6:.1f} M params, {args.quant_type}, blocksize 64, "
          f"median of {args.repeats} after 1 warm-up; load average (1 min) before the run: {load:.2f}\n")
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
            }
            for step, (ours_fn, bnb_fn) in rows.items():
                t_ours, t_bnb = [], []
                for _ in range(2):  # interleave: ours, bnb, ours, bnb
                    t_ours.append(timed(ours_fn, args.repeats))
                    t_bnb.append(timed(bnb_fn, args.repeats))
                (a, ac), (b, bc) = min(t_ours), min(t_bnb)
                cpu_ratio = f"{bc / ac:.2f}" if args.device == "cpu" and ac > 0 else "-"
                print(f"| {str(dtype).replace('torch.', '')} | {'yes' if dq else 'no'} | {step} | {n / a / 1e6:,.0f} "
                      f"| {n / b / 1e6:,.0f} | {b / a:.2f} | {cpu_ratio} |", flush=True)


if __name__ == "__main__":
    main()
