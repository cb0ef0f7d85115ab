"""Training speed (tokens/s) of full fine-tuning, LoRA and QLoRA on one model, measured in one run.

QLoRA keeps the base in 4 bits and dequantizes every weight in every matmul (forward, and again in backward):
that is its price in time. Variants: full (all weights train), lora (PEFT on a frozen base), qlora-bnb
(bitsandbytes NF4+DQ Linear4bit + PEFT) and qlora-ours (qlora_tutor.qlora.add_adapters, pure PyTorch), each with
gradient checkpointing off and on. Same random tokens, same optimizer (bitsandbytes AdamW32bit), steps timed round-robin
across variants and checkpointing on/off (a busy machine slows all alike), medians after warm-up. Ratios are relative to LoRA without checkpointing.

    python benchmarks/bench_train_speed.py                         # CPU, small Llama, fp32
    python benchmarks/bench_train_speed.py --device cuda --model qwen2.5-1.5b --batch 4 --seq-len 512
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from qlora_tutor import measure, memory as M
from qlora_tutor.hardware import versions
from qlora_tutor.paths import atomic_write_text

SMALL = M.ModelShape("small-llama", 384, 1024, 4, 6, 6, 4000)


def build(shape: M.ModelShape, variant: str, dtype: torch.dtype, device: str, gc_on: bool, r: int):
    """One model per variant, random weights of `shape`, set up for training."""
    if variant != "qlora-ours":
        method = variant.split("-")[0]
        return measure.build_training_model(shape, method, dtype=dtype, lora_r=r, gradient_checkpointing=gc_on,
                                      device=device)
    from transformers import AutoModelForCausalLM
    from qlora_tutor.qlora import add_adapters
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(measure.llama_config(shape), dtype=dtype)
    add_adapters(model, "all-linear", r=r, alpha=16, quant_type="nf4", double_quant=True, compute_dtype=dtype)
    set_checkpointing(model, gc_on)
    return model


def one_step(model, opt, ids: torch.Tensor) -> float:
    """Seconds for one training step (forward, backward, optimizer step)."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t


def set_checkpointing(model, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_disable()
    model.train()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="small", help="'small' (4-layer Llama, 15M) or a memory.KNOWN_MODELS name")
    p.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="full,lora,qlora-bnb,qlora-ours")
    p.add_argument("--grad-ckpt", default="off,on")
    p.add_argument("--out", default=os.environ.get("OUT", "results"))
    args = p.parse_args(argv)
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    shape = SMALL if args.model == "small" else M.model_shape(args.model)
    tokens = args.batch * args.seq_len
    machine = (torch.cuda.get_device_name(0) if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    head = (f"machine: {machine}; " + ", ".join(f"{k} {v}" for k, v in versions().items()) +
            f"\nsettings: {shape.name} ({shape.n_params / 1e6:.0f}M params), {dtype_name}, batch {args.batch} x seq "
            f"{args.seq_len} = {tokens} tokens/step, LoRA r={args.r} on all linear layers, AdamW32bit, median of "
            f"{args.steps} steps after {args.warmup} warm-up")
    print(head, flush=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (args.batch, args.seq_len), generator=g).to(args.device)
    models = {}
    for variant in args.variants.split(","):
        try:
            model = build(shape, variant, dtype, args.device, False, args.r)
        except ImportError as err:  # e.g. qlora_tutor.qlora missing in an old checkout
            print(f"skip {variant}: {err}")
            continue
        opt = measure.make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw_32bit", lr=1e-5)
        models[variant] = (model, opt)
    # round-robin: every round times each variant once with checkpointing off and once on, so a machine whose
    # load changes during the run slows all of them alike
    gc_modes = args.grad_ckpt.split(",")
    times: dict[tuple[str, str], list[float]] = {(v, g): [] for g in gc_modes for v in models}
    for k in range(args.warmup + args.steps):
        for variant, (model, opt) in models.items():
            for gc_name in gc_modes:
                set_checkpointing(model, gc_name == "on")
                t = one_step(model, opt, ids)
                if k >= args.warmup:
                    times[(variant, gc_name)].append(t)
    rows = []
    for (variant, gc_name), ts in times.items():
        s = statistics.median(ts)
        rows.append(dict(variant=variant, grad_ckpt=gc_name, step_s=s, tokens_per_s=tokens / s))
        print(f"{variant:<11} GC {gc_name:<3} {1000 * s:9.1f} ms/step {tokens / s:10.0f} tokens/s", flush=True)
    ref = next((r for r in rows if r["variant"] == "lora" and r["grad_ckpt"] == "off"), rows[0])
    lines = ["| variant | grad ckpt | ms/step | tokens/s | time vs LoRA (GC off) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['grad_ckpt']} | {1000 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['step_s'] / ref['step_s']:.2f}x |")
    notes = []
    by = {(r["variant"], r["grad_ckpt"]): r["step_s"] for r in rows}
    for gc_name in args.grad_ckpt.split(","):
        if ("qlora-bnb", gc_name) in by and ("lora", gc_name) in by:
            notes.append(f"GC {gc_name}: QLoRA (bnb) step / LoRA step = "
                         f"{by[('qlora-bnb', gc_name)] / by[('lora', gc_name)]:.2f}")
        if ("full", gc_name) in by and ("lora", gc_name) in by:
            notes.append(f"GC {gc_name}: full step / LoRA step = {by[('full', gc_name)] / by[('lora', gc_name)]:.2f}")
    for v in ("lora", "qlora-bnb"):
        if (v, "on") in by and (v, "off") in by:
            notes.append(f"{v}: gradient checkpointing costs {100 * (by[(v, 'on')] / by[(v, 'off')] - 1):.0f}% "
                         "more time per step (one more forward)")
    text = "\n".join(["# Training speed: full vs LoRA vs QLoRA", "", *[f"- {h}" for h in head.splitlines()], "",
                      *lines, "", *[f"- {n}" for n in notes]]) + "\n"
    print("\n".join(lines + notes))
    path = os.path.join(args.out, f"train_speed_{'gpu' if args.device == 'cuda' else 'cpu'}.md")
    atomic_write_text(path, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
