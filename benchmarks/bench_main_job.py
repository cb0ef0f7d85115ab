"""Where the main job's time goes on a CPU, and which settings make it faster, measured in one run.

The main job is `qlora-tutor finetune` with its defaults (the embedded model, stories, QLoRA NF4 + double
quantization, r=16 on all linear layers, batch 8). Its phases: load, evaluation before (held-out loss + greedy
generation of 32 answers), 250 training steps, evaluation after, save. This script times the two costly ones,
training steps and generation, under each variant: CPU threads 1 or 2, gradient checkpointing on or off.
Variants alternate in rounds (a busy machine slows all alike) and the table gives medians and ratios.

    python benchmarks/bench_main_job.py --rounds 5 --steps 6
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from qlora_tutor import data, finetune, generation, models
from qlora_tutor.config import FinetuneConfig
from qlora_tutor.hardware import cpu_name, versions
from qlora_tutor.paths import atomic_write_text


def _train_seconds(model, opt, batches, threads: int) -> float:
    """Seconds per optimizer step (forward, backward, clip, AdamW) over `batches`, with `threads` CPU threads."""
    torch.set_num_threads(threads)
    model.train()
    t = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - t) / len(batches)


def _generate_seconds(model, tokenizer, prompts, threads: int, max_new_tokens: int) -> float:
    torch.set_num_threads(threads)
    t = time.perf_counter()
    generation.generate(model, tokenizer, prompts, max_new_tokens, batch_size=32)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=6, help="training steps per variant and round")
    p.add_argument("--prompts", type=int, default=32, help="prompts generated per variant and round")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--out", default="results/main_job/threads_and_checkpointing_cpu.md",
                   help="write the table here (markdown; default: %(default)s)")
    args = p.parse_args()

    cfg = FinetuneConfig()
    model_path, compute = finetune.check_config(cfg)
    train, test = finetune.load_splits(cfg)
    tokenizer = models.load_tokenizer(model_path)
    base = models.load_base(model_path, cfg.method, compute, cfg.quant_type, cfg.double_quant)
    model = finetune.prepare_for_training(base, cfg)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.learning_rate)
    collate = data.DataCollator(tokenizer)
    feats = [data.tokenize_example(ex, tokenizer, cfg.max_length) for ex in train[: cfg.batch_size * args.steps]]
    batches = [collate(feats[i:i + cfg.batch_size]) for i in range(0, len(feats), cfg.batch_size)]
    prompts = test[: args.prompts]

    variants = [("train", t, gc) for gc in (True, False) for t in (1, 2)] + [("generate", t, None) for t in (1, 2)]
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    loads = [os.getloadavg()[0]]
    _train_seconds(model, opt, batches[:1], 1)  # warm-up
    for _ in range(args.rounds):
        for v in variants:
            kind, threads, gc = v
            if kind == "train":
                (model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                 if gc else model.gradient_checkpointing_disable())
                times[v].append(_train_seconds(model, opt, batches, threads))
            else:
                times[v].append(_generate_seconds(model, tokenizer, prompts, threads, args.max_new_tokens))
        loads.append(os.getloadavg()[0])

    med = {v: statistics.median(s) for v, s in times.items()}
    ref_train, ref_gen = med[("train", 1, True)], med[("generate", 1, None)]
    lines = ["# The main job's costly phases on a CPU: threads and gradient checkpointing", "",
             f"- machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores; "
             + ", ".join(f"{k} {v}" for k, v in versions().items()),
             f"- load average (1 min) during the run: {min(loads):.1f} to {max(loads):.1f}",
             f"- command: python benchmarks/bench_main_job.py --rounds {args.rounds} --steps {args.steps} "
             f"--prompts {args.prompts} --max-new-tokens {args.max_new_tokens}",
             "- variants alternate within each round; medians over rounds", "",
             "| phase | threads | grad ckpt | seconds | vs 1 thread, ckpt on |", "|---|---|---|---|---|"]
    for v in variants:
        kind, threads, gc = v
        ref = ref_train if kind == "train" else ref_gen
        unit = "per step" if kind == "train" else f"for {len(prompts)} prompts"
        lines.append(f"| {kind} | {threads} | {'-' if gc is None else 'on' if gc else 'off'} | "
                     f"{med[v]:.3f} {unit} | {med[v] / ref:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
