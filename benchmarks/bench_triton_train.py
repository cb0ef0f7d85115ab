"""A LLaMA-7B-shaped QLoRA training step on the GPU: our layers (Triton) vs bitsandbytes + PEFT vs plain LoRA.

    python benchmarks/bench_triton_train.py                       # llama-7b shape, batch 1 x 512, GC on, r 16

Random weights of the real shape (memory.KNOWN_MODELS["llama-7b"]: 32 layers, 4096 hidden, 11008 MLP), LoRA r=16
on every linear layer except the head, bf16, gradient checkpointing on, bitsandbytes AdamW32bit; one step =
forward, backward, optimizer step. Variants: lora (PEFT on the bf16 base), qlora-bnb (Linear4bit NF4+DQ + PEFT),
qlora-ours (qlora_tutor.qlora.add_adapters: Triton dequantize, one autograd node per layer) and the same model with
our PyTorch path (QLORA_TUTOR_TRITON=0, QLoRALinear.fused = False), the way it ran before. Steps alternate between
variants round by round; medians after warm-up. Uses benchmarks/bench_train_speed.py's builders.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_speed import build, one_step, set_checkpointing  # noqa: E402

from qlora_tutor import measure, memory as M  # noqa: E402
from qlora_tutor.hardware import versions  # noqa: E402
from qlora_tutor.paths import atomic_write_text  # noqa: E402
from qlora_tutor.qlora import QLoRALinear  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-7b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.environ.get("OUT", "results/triton"))
    args = p.parse_args(argv)
    import triton
    shape = M.model_shape(args.model)
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (args.batch, args.seq_len), generator=g).to("cuda")
    models = {}
    for variant in ("lora", "qlora-bnb", "qlora-ours"):
        model = build(shape, variant, dtype, "cuda", True, args.r)
        set_checkpointing(model, True)
        opt = measure.make_optimizer([q for q in model.parameters() if q.requires_grad], "adamw_32bit", lr=1e-5)
        models[variant] = (model, opt)
        print(f"built {variant}: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated", flush=True)
    # (variant name, model key, Triton on, one autograd node)
    runs = [("lora (PEFT, bf16 base)", "lora", True, True), ("qlora-bnb (Linear4bit + PEFT)", "qlora-bnb", True, True),
            ("qlora-ours (Triton, one autograd node)", "qlora-ours", True, True),
            ("qlora-ours, PyTorch path (before)", "qlora-ours", False, False)]
    default_fused = QLoRALinear.fused
    times: dict[str, list[float]] = {r[0]: [] for r in runs}
    peaks: dict[str, float] = {}
    for k in range(args.warmup + args.steps):
        for name, key, tri, fused in runs:
            os.environ["QLORA_TUTOR_TRITON"] = "1" if tri else "0"
            QLoRALinear.fused = fused
            model, opt = models[key]
            torch.cuda.reset_peak_memory_stats()
            t = one_step(model, opt, ids)
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30
            if k >= args.warmup:
                times[name].append(t)
            print(f"round {k} {name}: {1000 * t:.1f} ms", flush=True)
    os.environ["QLORA_TUTOR_TRITON"] = "1"
    QLoRALinear.fused = default_fused
    med = {name: statistics.median(ts) for name, ts in times.items()}
    tokens = args.batch * args.seq_len
    bnb = med["qlora-bnb (Linear4bit + PEFT)"]
    props = torch.cuda.get_device_properties(0)
    lines = ["# A LLaMA-7B-shaped QLoRA training step: ours (Triton) vs bitsandbytes + PEFT", "",
             f"- machine: {props.name}; " + ", ".join(f"{k} {v}" for k, v in versions().items())
             + f", triton {triton.__version__}",
             f"- settings: {shape.name} shape ({shape.n_params / 1e9:.2f} B params, random weights), bf16, batch "
             f"{args.batch} x {args.seq_len} tokens, LoRA r={args.r} on all linear layers, gradient checkpointing on, "
             f"AdamW32bit; median of {args.steps} steps after {args.warmup} warm-up, variants alternating",
             "- command: python benchmarks/bench_triton_train.py", "",
             "| variant | ms/step | tokens/s | vs qlora-bnb | peak GiB (all models resident) |", "|---|---|---|---|---|"]
    for name in times:
        lines.append(f"| {name} | {1000 * med[name]:.1f} | {tokens / med[name]:.0f} | {med[name] / bnb:.2f}x "
                     f"| {peaks[name]:.1f} |")
    o = med["qlora-ours (Triton, one autograd node)"]
    lines += ["", f"- qlora-ours / qlora-bnb: {o / bnb:.2f}x (target <= 0.9x)",
              f"- qlora-ours / lora: {o / med['lora (PEFT, bf16 base)']:.2f}x"]
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(os.path.join(args.out, "train_gpu.md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
