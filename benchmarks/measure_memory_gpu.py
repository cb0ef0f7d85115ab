"""Measured peak memory of real training steps vs `qlora_tutor.memory.estimate()`, per model size and method.

Random-initialised models of real shapes (weight values do not change memory): full fine-tuning (bf16 weights and
gradients, bitsandbytes AdamW with fp32 state), LoRA (PEFT, r=64 on all linear layers, on a frozen bf16 base) and
QLoRA (the same on a bitsandbytes NF4 + double-quantization base), each with and without gradient checkpointing,
batch 1 x seq 512. On CUDA the peak is torch.cuda.max_memory_allocated over 2 steps; on CPU (for testing the
script with --models tiny) it is the tracked tensor peak. Writes memory_<device>.csv and .md to --out.

    python benchmarks/measure_memory_gpu.py --out results            # on a GPU
    python benchmarks/measure_memory_gpu.py --device cpu --models tiny --seq-len 64 --out /tmp
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import subprocess
import sys
import time

import torch

from qlora_tutor import measure, memory as M
from qlora_tutor.hardware import versions
from qlora_tutor.paths import atomic_write_text

TINY = M.ModelShape("tiny", 128, 352, 2, 4, 2, 1000, tied_embeddings=True, qkv_bias=True)


def sdpa_backends(device: str) -> str:
    """Which fused SDPA kernels accept a causal bf16 call with and without GQA (a math fallback saves far more)."""
    if device != "cuda":
        return "cpu"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out = []
    q = torch.randn(1, 8, 64, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        for gqa in (False, True):
            k = kv if gqa else q
            try:
                with sdpa_kernel([be]):
                    torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=gqa)
                out.append(f"{name}{'+gqa' if gqa else ''}")
            except RuntimeError:
                pass
    return " ".join(out)


def run_cell(shape: M.ModelShape, method: str, gc_on: bool, args) -> dict:
    """Build, measure, estimate: one row of the table (run in a fresh process, see main)."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    baseline = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    t0 = time.time()
    model = measure.build_training_model(shape, method, dtype=dtype, lora_r=args.r, lora_alpha=16,
                                   gradient_checkpointing=gc_on, device=args.device)
    build_s = time.time() - t0
    if args.device == "cuda":
        torch.cuda.synchronize()
    t1 = time.time()
    got = measure.measure(model, batch_size=args.batch, seq_len=args.seq_len, steps=2, optimizer="adamw_32bit")
    step_s = (time.time() - t1) / 2
    saved = None
    if not gc_on:  # what autograd saves in one forward (independent count, compared with the estimate's).
        # After measure(): on the H200 (transformers 5.17) this probe's graph stayed allocated afterwards.
        ids = torch.randint(0, shape.vocab, (args.batch, args.seq_len), device=args.device)
        saved = measure.saved_activation_bytes(model, ids)
    est = M.estimate(shape, method, weight_dtype=args.dtype, lora_r=args.r, batch_size=args.batch,
                     seq_len=args.seq_len, gradient_checkpointing=gc_on, optimizer="adamw_32bit",
                     device=args.device)
    c = est.components
    peak = got.peak - baseline  # anything allocated before this cell's model is not this cell's
    row = dict(model=shape.name, params_b=round(shape.n_params / 1e9, 3), method=method,
               grad_ckpt="on" if gc_on else "off", measured_gb=round(peak / M.GB, 3),
               estimate_gb=round(est.total / M.GB, 3), error_pct=round(100 * (est.total / peak - 1), 1),
               weights_measured_gb=round(sum(got.parameter_bytes.values()) / M.GB, 3),
               weights_estimate_gb=round((c["frozen_weights"] + c["quantization_constants"] + c["adapter_weights"])
                                         / M.GB, 3),
               optimizer_measured_gb=round(got.optimizer_state / M.GB, 3),
               optimizer_estimate_gb=round(c["optimizer_state"] / M.GB, 3),
               saved_act_measured_gb="" if saved is None else round(saved / M.GB, 4),
               saved_act_estimate_gb="" if saved is None else round(est.details["saved_activations_no_gc"] / M.GB, 4),
               estimate_moment=est.details["peak_moment"], build_s=round(build_s, 1), step_s=round(step_s, 2),
               measured_bytes=peak, estimate_bytes=est.total, after_setup_bytes=got.after_setup,
               baseline_bytes=baseline, raw_max_memory_allocated=got.peak,
               saved_act_measured_bytes="" if saved is None else saved,
               saved_act_estimate_bytes=est.details["saved_activations_no_gc"],
               **{f"est_{k}": v for k, v in c.items()})
    return row


def write_tables(rows: list[dict], header: str, args) -> list[str]:
    """memory_<device>.csv (every number) and .md (the table), written atomically."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    base = os.path.join(args.out, f"memory_{args.device}")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\r\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(base + ".csv", buf.getvalue())
    cols = ["model", "method", "grad_ckpt", "measured_gb", "estimate_gb", "error_pct", "weights_measured_gb",
            "optimizer_measured_gb", "saved_act_measured_gb", "saved_act_estimate_gb", "step_s"]
    lines = ["# Peak training memory: measured vs estimated", "", *[f"- {ln}" for ln in header.splitlines()], "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    worst = max((abs(r["error_pct"]) for r in rows if "error_pct" in r), default=float("nan"))
    lines += ["", f"Largest |error|: {worst}% (GB = 1e9 bytes)."]
    atomic_write_text(base + ".md", "\n".join(lines) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen2.5-1.5b,llama-7b", help="comma-separated names, or 'tiny'")
    p.add_argument("--methods", default="full,lora,qlora")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--out", default=os.environ.get("OUT", "results"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: model:method:gc, prints a JSON row
    args = p.parse_args(argv)
    if args.one:
        name, method, gc_on = args.one.split(":")
        shape = TINY if name == "tiny" else M.model_shape(name)
        try:
            row = run_cell(shape, method, gc_on == "on", args)
        except torch.OutOfMemoryError as err:  # say why a cell is missing rather than dying
            row = dict(model=name, method=method, grad_ckpt=gc_on, measured_gb="OOM",
                       estimate_moment=str(err).splitlines()[0][:80])
        print("ROW " + json.dumps(row), flush=True)
        return 0
    shapes = [TINY if m == "tiny" else M.model_shape(m) for m in args.models.split(",")]
    machine = (torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or platform.machine())
    vers = versions()
    header = (f"machine: {machine}; " + ", ".join(f"{k} {v}" for k, v in vers.items()) +
              f"\nsettings: batch {args.batch} x seq {args.seq_len}, {args.dtype} weights/compute, LoRA r={args.r} "
              "alpha=16 on all 7 linear layers (fp32 adapters, PEFT default), AdamW with fp32 state (bitsandbytes "
              "AdamW32bit), 2 steps, random tokens, model.train(), SDPA attention, non-reentrant checkpointing; each "
              "cell in a fresh process"
              f"\nSDPA kernels available: {sdpa_backends(args.device)}"
              f"\npeak = {'torch.cuda.max_memory_allocated' if args.device == 'cuda' else 'tracked tensor peak'};"
              " estimate = qlora_tutor.memory.estimate() (allocator peak, CUDA context excluded)")
    print(header, flush=True)
    rows = []
    for shape in shapes:
        for method in args.methods.split(","):
            for gc_on in ("off", "on"):
                # each cell in a fresh process: nothing left over from an earlier model can add to its peak
                cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{shape.name}:{method}:{gc_on}",
                       "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch),
                       "--seq-len", str(args.seq_len), "--r", str(args.r)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                found = [ln[4:] for ln in res.stdout.splitlines() if ln.startswith("ROW ")]
                row = json.loads(found[0]) if found else dict(
                    model=shape.name, method=method, grad_ckpt=gc_on, measured_gb="failed",
                    estimate_moment=(res.stderr.strip().splitlines() or ["?"])[-1][:120])
                rows.append(row)
                print({k: v for k, v in row.items() if not k.startswith("est_")}, flush=True)
                write_tables(rows, header, args)  # after every cell: a run cut short keeps what it measured
    lines = write_tables(rows, header, args)
    print("\n".join(lines[-len(rows) - 4:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
