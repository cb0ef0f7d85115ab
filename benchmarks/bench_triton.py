"""The Triton kernels on a GPU: bit-exactness on large tensors, then speed against bitsandbytes and the copy limit.

    python benchmarks/bench_triton.py                # everything, tables to results/triton/kernels_gpu.md
    python benchmarks/bench_triton.py --quick        # fewer exactness cases and sweeps, no torch.compile rung

1. Exactness: `dequantize(backend="triton")` against `backend="torch"` on the same GPU (NF4/FP4/Int4, double quant
   on/off, fp32/bf16/fp16, block sizes 32-4096, odd sizes, partial blocks, all-zero and tiny blocks): bits equal;
   `quantize(backend="triton")` against `backend="torch"`: every byte equal; the fused small-batch matmul against
   a float64 reference (relative error).
2. Dequantize throughput at 4096^2 and 8192^2 (NF4, block 64): bytes read + written per second for the ladder
   (PyTorch path, the plain PyTorch formula under torch.compile, the Triton kernel) and bitsandbytes' CUDA kernel,
   against a device-to-device copy measured in the same run. Timed with triton.testing.do_bench (CUDA events,
   L2 flushed between runs, median).
3. Quantize throughput (ours PyTorch, ours Triton, bitsandbytes) at 4096^2.
4. Small batches (generation): dequantize + matmul vs the fused Triton matmul vs bitsandbytes, 1-64 tokens.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time

import torch

from qlora_tutor import triton_kernels as tk
from qlora_tutor.fused_layer import small_matmul
from qlora_tutor.hardware import versions
from qlora_tutor.paths import atomic_write_text
from qlora_tutor.quant import quantize

LINES: list[str] = []
DEVICE = "cuda"
SIZES = (4096, 8192)            # dequantize tables
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # small-batch matmul (out, in)


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def bench(fn, quick: bool) -> float:
    """Median seconds per call (CUDA events, L2 cache flushed before each run)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10 if quick else 15, rep=30 if quick else 60,
                                   return_mode="median") * 1e-3


def host_overhead(fn, n: int = 100) -> float:
    """Seconds of host (Python + launch) time per call, from back-to-back calls without synchronising."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return host


def weights(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(shape, device=DEVICE, generator=g) * 0.02).to(dtype)


# ------------------------------------------------------------------------------------------------ 1. exactness

def exactness(quick: bool) -> bool:
    say("## 1. Exactness on the GPU (Triton against our PyTorch path on the same device)")
    say("")
    say("| what | type | DQ | dtype | block | shape | differing (of all) |")
    say("|---|---|---|---|---|---|---|")
    cases = []
    for qt in ("nf4", "fp4", "int4"):
        for dq in (False, True):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                cases.append((qt, dq, dtype, 64, (4096, 4096)))
    for bs in (32, 128, 256, 1024, 4096):
        cases.append(("nf4", True, torch.bfloat16, bs, (4097, 4095)))
    cases += [("fp4", False, torch.float16, 4096, (1_000_001,)), ("nf4", True, torch.float32, 64, (8192, 8192)),
              ("nf4", False, torch.bfloat16, 64, (33, 17))]
    if quick:
        cases = cases[::4]
    ok = True
    for i, (qt, dq, dtype, bs, shape) in enumerate(cases):
        w = weights(shape, dtype, seed=i)
        flat = w.view(-1)
        flat[: 3 * bs] = 0                      # whole blocks of zeros
        flat[3 * bs: 4 * bs] *= 1e-30           # tiny scales (subnormal products in fp16 and bf16 ranges)
        q_t = quantize(w, qt, bs, dq, backend="torch")
        q_k = quantize(w, qt, bs, dq, backend="triton")
        fields = [f for f in ("packed", "absmax", "nested_absmax", "offset") if getattr(q_t, f) is not None]
        diff_q = sum(int((bits(getattr(q_t, f).reshape(-1)) != bits(getattr(q_k, f).reshape(-1))).sum())
                     for f in fields)
        ok &= diff_q == 0
        name = str(dtype).replace("torch.", "")
        say(f"| quantize | {qt} | {'yes' if dq else 'no'} | {name} | {bs} | {tuple(shape)} | {diff_q} "
            f"(of {sum(getattr(q_t, f).numel() for f in fields):,}) |")
        for out in (torch.float32, torch.bfloat16, torch.float16) if not quick else (dtype,):
            ref = q_t.dequantize(out, backend="torch")
            got = q_t.dequantize(out, backend="triton")
            diff = int((bits(ref) != bits(got)).sum())
            ok &= diff == 0
            say(f"| dequantize -> {str(out).replace('torch.', '')} | {qt} | {'yes' if dq else 'no'} | {name} | {bs} "
                f"| {tuple(shape)} | {diff} (of {ref.numel():,}) |")
    # the fused small-batch matmul: not the same sums as cuBLAS, so a float64 reference and a relative error
    say("")
    say("| fused matmul | tokens | shape | dtype | DQ | rel. error vs float64 | dequant + F.linear rel. error |")
    say("|---|---|---|---|---|---|---|")
    for m, (n_out, k), dtype, dq in [(1, (4096, 4096), torch.bfloat16, True), (7, (11008, 4096), torch.float16, False),
                                     (16, (4096, 11008), torch.bfloat16, True), (3, (1000, 999), torch.float32, True)]:
        w = weights((n_out, k), dtype)
        q = quantize(w, "nf4", 64, dq)
        x = weights((m, k), dtype, seed=1) * 50
        bias = weights((n_out,), dtype, seed=2)
        dense = q.dequantize(dtype)
        ref = x.double() @ dense.double().T + bias.double()
        with torch.no_grad():
            got = small_matmul(x, q, bias, dtype, max_tokens=64)
        base = torch.nn.functional.linear(x, dense, bias)
        err = float((got.double() - ref).norm() / ref.norm())
        err_base = float((base.double() - ref).norm() / ref.norm())
        ok &= err <= max(2 * err_base, 1e-6)
        say(f"| small_matmul | {m} | {n_out}x{k} | {str(dtype).replace('torch.', '')} | {'yes' if dq else 'no'} "
            f"| {err:.2e} | {err_base:.2e} |")
    say("")
    say(f"all exact: {ok}")
    say("")
    return ok


# ------------------------------------------------------------------------------------------------ 2. dequantize

def copy_bandwidth(n: int, quick: bool) -> float:
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), quick)
    return 4 * n / t  # read 2n bytes + write 2n bytes


def dequant_bytes(q, out_dtype: torch.dtype) -> int:
    """Bytes the dequantize must move: the packed codes, the constants, and the output it writes."""
    return tk.dequantize_bytes(q.numel, q.blocksize, torch.empty(0, dtype=out_dtype).element_size(), q.double_quant,
                               q.nested_blocksize)


def dequantize_tables(quick: bool, rows_csv: list[dict], args_tune: bool = False) -> None:
    import bitsandbytes.functional as bf

    from qlora_tutor.triton_kernels import dequantize_reference
    say("## 2. Dequantize throughput (NF4, block 64)")
    say("")
    sizes = SIZES
    copies = {s: copy_bandwidth(s * s, quick) for s in sizes}
    for s in sizes:
        say(f"- device copy of a {s}x{s} bf16 tensor: {copies[s] / 1e12:.2f} TB/s (read + written bytes / time)")
    say("")
    say("Tile sweep (8192x8192, bf16 out, double quant): packed bytes per program x warps -> TB/s")
    say("")
    w = weights((sizes[-1], sizes[-1]), torch.bfloat16)
    q = quantize(w, "nf4", 64, True)
    from qlora_tutor.quant import _device_tables
    code, dmap = _device_tables("nf4", w.device)
    best, best_cfg = 0.0, (tk.TILE_BYTES, tk.NUM_WARPS)
    nb = dequant_bytes(q, torch.bfloat16)
    out = torch.empty(q.numel, dtype=torch.bfloat16, device=DEVICE)
    say("| tile bytes | warps | TB/s |")
    say("|---|---|---|")
    for tile in ((1024, 2048, 4096, 8192) if not quick else (1024, 2048, 4096)):
        for warps in ((4, 8) if not quick else (4,)):
            fn = (lambda tile=tile, warps=warps: tk.dequantize_4bit(
                q.packed, code, q.numel, 64, torch.bfloat16, qabsmax=q.absmax, dynamic_map=dmap,
                nested_absmax=q.nested_absmax, offset=q.offset, out=out, tile_bytes=tile, num_warps=warps))
            bw = nb / bench(fn, quick)
            say(f"| {tile} | {warps} | {bw / 1e12:.2f} |")
            if bw > best:
                best, best_cfg = bw, (tile, warps)
    say("")
    if args_tune:
        tk.TILE_BYTES, tk.NUM_WARPS = best_cfg
    say(f"best: {best_cfg[0]} bytes, {best_cfg[1]} warps; the tables below use {tk.TILE_BYTES} bytes, "
        f"{tk.NUM_WARPS} warps")
    del w, q, out
    say("")
    say("| size | out dtype | DQ | method | time (us) | TB/s moved | % of copy | vs bitsandbytes | host us/call |")
    say("|---|---|---|---|---|---|---|---|---|")
    for s in sizes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for dq in (False, True):
                w = weights((s, s), dtype)
                q = quantize(w, "nf4", 64, dq)
                packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
                nb = dequant_bytes(q, dtype)
                methods = {"bitsandbytes (CUDA)": lambda: bf.dequantize_4bit(packed, state),
                           "ours, PyTorch path": lambda: q.dequantize(dtype, backend="torch"),
                           "ours, Triton kernel": lambda: q.dequantize(dtype, backend="triton")}
                if not dq and dtype == torch.bfloat16 and not quick:  # the ladder's middle rung, compiled
                    code = _device_tables("nf4", w.device)[0]
                    compiled = torch.compile(dequantize_reference)
                    methods["plain PyTorch formula, torch.compile"] = (
                        lambda: compiled(q.packed, q.absmax, code, 64, q.numel, dtype))
                times = {name: bench(fn, quick) for name, fn in methods.items()}
                bnb_t = times["bitsandbytes (CUDA)"]
                for name, t in times.items():
                    host = host_overhead(methods[name])
                    row = dict(size=s, dtype=str(dtype).replace("torch.", ""), double_quant=dq, method=name,
                               us=t * 1e6, tbps=nb / t / 1e12, copy_pct=100 * nb / t / copies[s],
                               vs_bnb=bnb_t / t, host_us=host * 1e6)
                    rows_csv.append(row)
                    say(f"| {s}x{s} | {row['dtype']} | {'yes' if dq else 'no'} | {name} | {row['us']:.1f} "
                        f"| {row['tbps']:.2f} | {row['copy_pct']:.0f}% | {row['vs_bnb']:.2f}x | {row['host_us']:.1f} |")
                del w, q, packed, state
    say("")


# ------------------------------------------------------------------------------------------------ 3. quantize

def quantize_table(quick: bool) -> None:
    import bitsandbytes.functional as bf
    say("## 3. Quantize throughput (NF4, block 64, 4096x4096)")
    say("")
    say("| in dtype | DQ | method | time (us) | M params/s | vs bitsandbytes |")
    say("|---|---|---|---|---|---|")
    n = 4096 * 4096
    for dtype in (torch.bfloat16, torch.float32):
        for dq in (False, True):
            w = weights((4096, 4096), dtype)
            methods = {"bitsandbytes (CUDA)": lambda: bf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                                       compress_statistics=dq),
                       "ours, PyTorch path": lambda: quantize(w, "nf4", 64, dq, backend="torch"),
                       "ours, Triton kernel": lambda: quantize(w, "nf4", 64, dq, backend="triton")}
            times = {name: bench(fn, quick) for name, fn in methods.items()}
            for name, t in times.items():
                say(f"| {str(dtype).replace('torch.', '')} | {'yes' if dq else 'no'} | {name} | {t * 1e6:.1f} "
                    f"| {n / t / 1e6:,.0f} | {times['bitsandbytes (CUDA)'] / t:.2f}x |")
    say("")


# ------------------------------------------------------------------------------------------------ 4. small batches

def small_batch_table(quick: bool, tune: bool = False) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    say("## 4. Few tokens (generation): y = x W^T, NF4 + DQ, bf16")
    say("")
    say("Config sweep (4096x4096, 1 token): BLOCK_N, BLOCK_K, warps, stages -> us")
    say("")
    n0, k0 = SHAPES[0]
    w = weights((n0, k0), torch.bfloat16)
    q = quantize(w, "nf4", 64, True)
    x1 = weights((1, k0), torch.bfloat16, seed=3)
    say("| BLOCK_N | BLOCK_K | warps | stages | us |")
    say("|---|---|---|---|---|")
    from qlora_tutor.quant import _device_tables
    code, dmap = _device_tables("nf4", w.device)
    configs = [(16, 128, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (16, 256, 4, 4), (32, 64, 4, 4)]
    best = None
    for bn, bk, warps, stages in (configs if not quick else configs[:2]):
        fn = (lambda bn=bn, bk=bk, warps=warps, stages=stages: tk.matmul_4bit(
            x1, q.packed, code, n0, 64, qabsmax=q.absmax, dynamic_map=dmap, nested_absmax=q.nested_absmax,
            offset=q.offset, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages))
        t = bench(fn, quick)
        say(f"| {bn} | {bk} | {warps} | {stages} | {t * 1e6:.1f} |")
        if best is None or t < best[0]:
            best = (t, (bn, bk, warps, stages))
    say("")
    if tune:
        tk.MATMUL_CONFIG.update(zip(("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), best[1]))
    say(f"best: {best[1]}; the table below uses {tk.MATMUL_CONFIG}")
    say("")
    say("| shape (out x in) | tokens | dequantize + F.linear (us) | fused Triton (us) | bitsandbytes (us) "
        "| fused vs dequant+linear | fused vs bnb | wall us/call: ours dispatch, bnb |")
    say("|---|---|---|---|---|---|---|---|")
    for n_out, k in SHAPES:
        w = weights((n_out, k), torch.bfloat16)
        q = quantize(w, "nf4", 64, True)
        layer = bnb.nn.Linear4bit(k, n_out, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                  quant_type="nf4", device="meta")
        p = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64,
                              module=layer)
        layer.weight = p._quantize(DEVICE)
        for m in ((1, 4, 16, 64) if not quick else (1, 16)):
            x = weights((m, k), torch.bfloat16, seed=4)
            with torch.no_grad():
                unfused = lambda: torch.nn.functional.linear(x, q.dequantize(torch.bfloat16))
                fused = lambda: small_matmul(x, q, None, torch.bfloat16, max_tokens=64)
                ref = lambda: layer(x)
                t_u, t_f, t_b = bench(unfused, quick), bench(fused, quick), bench(ref, quick)
                wall_f, wall_b = host_overhead(fused), host_overhead(ref)
            say(f"| {n_out}x{k} | {m} | {t_u * 1e6:.1f} | {t_f * 1e6:.1f} | {t_b * 1e6:.1f} | {t_u / t_f:.2f}x "
                f"| {t_b / t_f:.2f}x | {wall_f * 1e6:.1f}, {wall_b * 1e6:.1f} |")
        del w, q, layer, p
    say("")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="exact,dequant,quant,small", help="comma list of sections")
    p.add_argument("--tune", action="store_true", help="use the best swept configs for the rest of the run")
    p.add_argument("--out", default=os.environ.get("OUT", "results/triton"))
    args = p.parse_args(argv)
    import bitsandbytes
    import triton
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    say("# Triton kernels on the GPU: exactness and speed")
    say("")
    say(f"- machine: {props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability {props.major}."
        f"{props.minor}), host CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    say("- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + f", triton {triton.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}, CUDA {torch.version.cuda}")
    say(f"- command: python benchmarks/bench_triton.py{' --quick' if args.quick else ''}{' --tune' if args.tune else ''}"
        f"{' --only ' + args.only if args.only != p.get_default('only') else ''}")
    say(f"- {tk.status()}")
    say("")
    rows: list[dict] = []
    sections = args.only.split(",")
    ok = True
    if "exact" in sections:
        ok = exactness(args.quick)
    if "dequant" in sections:
        dequantize_tables(args.quick, rows, args.tune)
    if "quant" in sections:
        quantize_table(args.quick)
    if "small" in sections:
        small_batch_table(args.quick, args.tune)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "kernels_gpu.md"), "\n".join(LINES) + "\n")
    if rows:
        path = os.path.join(args.out, "dequant_gpu.csv")
        with open(path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()})
        os.replace(path + ".tmp", path)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
