"""Throughput of qlora_tutor.quant against bitsandbytes on one 4096x4096 tensor (quantize and dequantize).

Usage: python benchmarks/bench_quant.py [--device cpu|cuda] [--repeats 7] [--size 4096]
Prints M params/s (median of `repeats` timed runs after a warm-up) and the ratio ours / bitsandbytes, measured
in the same run with the two interleaved, so that a busy machine slows both alike.
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
    def run(fn, repeats: int) -> float:
        fn()  # warm-up (allocator, lazy tables, kernels)
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    args = parser.parse_args()

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
    print(f"tensor {args.size}x{args.size} = {n / 1e6:.1f} M params, {args.quant_type}, blocksize 64, "
          f"median of {args.repeats} after 1 warm-up\n")
    print(f"| dtype | double quant | step | ours (M params/s) | bitsandbytes (M params/s) | ours / bnb |")
    print(f"|---|---|---|---|---|---|")
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
                a, b = min(t_ours), min(t_bnb)
                print(f"| {str(dtype).replace('torch.', '')} | {'yes' if dq else 'no'} | {step} | {n / a / 1e6:,.0f} "
                      f"| {n / b / 1e6:,.0f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
