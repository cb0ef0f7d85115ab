"""Full fine-tuning vs LoRA vs QLoRA variants on the same data and budget, over several seeds.

The question is the paper's (its Tables 3 and 4): does a 4-bit NF4 base with LoRA on all linear layers learn
as well as 16/32-bit LoRA and full fine-tuning? A difference only counts when it exceeds the seed-to-seed
spread, so each method runs with several seeds and the table says whether mean ± std intervals overlap.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from . import finetune, hardware, paths
from .config import FinetuneConfig
from .paths import atomic_write_text

# The variants compared: name → (settings that differ from the finetune defaults, description). Full fine-tuning
# gets its own, lower learning rate (as in the paper, which re-tuned its full fine-tuning baselines); everything
# else shares data and budget.
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "full_fp32": ({"method": "full", "learning_rate": 3e-4}, "full fine-tuning, fp32 weights"),
    "lora_fp32": ({"method": "lora"}, "LoRA, all linear, fp32 base"),
    "qlora_nf4_dq": ({"method": "qlora", "quant_type": "nf4", "double_quant": True},
                     "QLoRA NF4 + double quant, all linear"),
    "qlora_nf4": ({"method": "qlora", "quant_type": "nf4", "double_quant": False}, "QLoRA NF4, all linear"),
    "qlora_fp4": ({"method": "qlora", "quant_type": "fp4", "double_quant": False}, "QLoRA FP4, all linear"),
    "qlora_nf4_dq_qv": ({"method": "qlora", "quant_type": "nf4", "double_quant": True,
                         "target_modules": "q_proj,v_proj"}, "QLoRA NF4 + DQ, q_proj,v_proj only"),
}
REFERENCE = "qlora_nf4_dq"
_KEEP = ("loss", "score", "trainable_params", "weight_bytes", "peak_memory_mb", "train_seconds")


def method_config(name: str, seed: int, **overrides: Any) -> FinetuneConfig:
    """The finetune config of one comparison run (no checkpoints, nothing saved)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown method {name!r}: choose from {list(VARIANTS)}")
    settings = {**VARIANTS[name][0], **overrides, "seed": seed, "save_steps": 0}
    if "steps" in settings:
        settings["max_steps"] = settings.pop("steps")
    return FinetuneConfig(**settings)


def run_one(cfg: FinetuneConfig, data_root: str | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration (embedded model and data read from `data_root`); the table's numbers."""
    m = finetune.run(cfg, save=False, eval_before=False, progress="none", log=lambda s: None, data_root=data_root)
    return {"loss": m["after"]["loss"], "score": m["after"]["score"], "trainable_params": m["trainable_params"],
            "weight_bytes": m["weight_bytes_stored"], "peak_memory_mb": m["peak_memory_bytes"] / 2**20,
            "train_seconds": m["train_seconds"]}


def _run_isolated(cfg: FinetuneConfig, data_root: str | None) -> dict[str, Any]:
    """`run_one` in a fresh Python process, so each run's peak memory is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, "-m", "qlora_tutor.compare", json.dumps(asdict(cfg)), str(out),
                               data_root or ""], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compare run failed ({cfg.method}, seed {cfg.seed}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def _fingerprint(paths: Sequence[Path]) -> str:
    """A short hash of the files under `paths`, so cached runs of changed inputs are never reused."""
    h = hashlib.sha256()
    for root in paths:
        for f in sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def frozen_inputs(model: str, data: str):
    """Copy the model and data to a private folder for the whole comparison, so every run trains on the same
    files even if someone rebuilds data/ meanwhile. Yields (model, data, data_root, fingerprint) for the runs:
    'embedded', 'stories' and 'qa' keep their names and are read from `data_root`, the copy."""
    from . import data as data_module
    tmp = Path(tempfile.mkdtemp(prefix="qlora-tutor-compare-"))
    try:
        sources, model_arg, data_arg, data_root = [], model, data, None
        embedded = (["embedded-model"] if model == "embedded" else []) + (
            [data] if data in data_module.EMBEDDED_DATASETS else [])
        if embedded:
            root = paths.data_dir()
            for name in embedded:
                sources.append(Path(shutil.copytree(root / name, tmp / name)))
            data_root = str(tmp)
        if model != "embedded" and Path(model).exists():
            model_arg = str(shutil.copytree(model, tmp / "model"))
            sources.append(Path(model_arg))
        if data not in data_module.EMBEDDED_DATASETS and Path(data).exists():
            src = Path(data)
            data_arg = str(shutil.copytree(src, tmp / "data") if src.is_dir() else shutil.copy(src, tmp / src.name))
            sources.append(Path(data_arg))
        yield model_arg, data_arg, data_root, _fingerprint(sources) if sources else f"{model}|{data}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summarize(rows: Sequence[dict[str, Any]], reference: str = REFERENCE) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per method; for loss and score, whether the difference to `reference`
    exceeds the seed-to-seed spread (|Δmean| > std_a + std_b: the mean ± std intervals do not overlap)."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    out = []
    for name, runs in by_method.items():
        s: dict[str, Any] = {"method": name, "description": VARIANTS[name][1] if name in VARIANTS else name,
                             "seeds": len(runs)}
        for key in _KEEP:
            vals = [r[key] for r in runs if r.get(key) is not None and not _isnan(r[key])]
            s[f"{key}_mean"] = statistics.fmean(vals) if vals else None
            s[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None)
        out.append(s)
    ref = next((s for s in out if s["method"] == reference), None)
    for s in out:
        for key in ("loss", "score"):
            if s is ref:
                s[f"{key}_vs_ref"] = "reference"
                continue
            if ref is None or s[f"{key}_mean"] is None or ref[f"{key}_mean"] is None:
                s[f"{key}_vs_ref"] = "n/a"
                continue
            delta = s[f"{key}_mean"] - ref[f"{key}_mean"]
            beyond = abs(delta) > s[f"{key}_std"] + ref[f"{key}_std"]
            s[f"{key}_vs_ref"] = f"{delta:+.3f} ({'beyond' if beyond else 'within'} spread)"
    return out


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (mean ± std over seeds)."""
    head = ("| method | held-out loss | Δ loss vs QLoRA NF4+DQ | instruction score | Δ score vs QLoRA NF4+DQ | "
            "trainable params | weight MiB | peak memory MiB | train s |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {s['description']} | {_pm(s['loss_mean'], s['loss_std'])} | {s['loss_vs_ref']} | "
             f"{_pm(s['score_mean'], s['score_std'])} | {s['score_vs_ref']} | "
             f"{s['trainable_params_mean']:,.0f} | {s['weight_bytes_mean'] / 2**20:.2f} | "
             f"{_pm(s['peak_memory_mb_mean'], s['peak_memory_mb_std'], 0)} | "
             f"{_pm(s['train_seconds_mean'], s['train_seconds_std'], 1)} |" for s in summary]
    return head + "\n".join(lines) + "\n"


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def run_compare(output: str | Path, seeds: Sequence[int] = (0, 1, 2), methods: Sequence[str] | None = None,
                model: str = "embedded", data: str = "stories", isolate: bool = True, log: Any = print,
                **overrides: Any) -> list[dict[str, Any]]:
    """Run every method with every seed, then write runs.csv, compare.csv, compare.md and compare.png to `output`.

    Finished runs are kept in runs.jsonl, so an interrupted comparison with the same settings picks up where it
    stopped. Returns the summary rows.
    """
    from . import plots
    from tqdm.std import tqdm
    methods = list(methods or VARIANTS)
    for name in methods:
        method_config(name, 0)  # unknown names fail here, before any training
    if len(seeds) < 2:
        raise ValueError("compare needs at least 2 seeds to measure the seed-to-seed spread (3 or more is better)")
    for name in methods:  # every method's settings, and every seed, before the first run
        finetune.check_config(method_config(name, seeds[0], model=model, data=data, **overrides))
    for seed in seeds:
        method_config(methods[0], seed, model=model, data=data, **overrides).check()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    done_file = out / "runs.jsonl"
    done: dict[tuple[str, int], dict] = {}
    if done_file.is_file():
        for line in done_file.read_text().splitlines():
            r = json.loads(line)
            done[(r["method"], r["seed"])] = r
    rows = []
    jobs = [(name, seed) for name in methods for seed in seeds]
    with frozen_inputs(model, data) as (model_arg, data_arg, data_root, fingerprint):
        for name, seed in tqdm(jobs, desc="compare", unit="run"):
            cfg = method_config(name, seed, model=model_arg, data=data_arg, **overrides)
            settings = {**asdict(cfg), "model": model, "data": data, "inputs_fingerprint": fingerprint}
            if (name, seed) in done and done[(name, seed)]["config"] == settings:
                rows.append(done[(name, seed)])
                continue
            t = time.time()
            result = _run_isolated(cfg, data_root) if isolate else run_one(cfg, data_root)
            row = {"method": name, "seed": seed, **result, "wall_seconds": time.time() - t, "config": settings}
            rows.append(row)
            with done_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"{name} seed {seed}: loss {row['loss']:.4f} score {row['score']} ({row['wall_seconds']:.0f} s)")
    summary = summarize(rows)
    flat = [{k: v for k, v in r.items() if k != "config"} for r in rows]
    atomic_write_text(out / "runs.csv", _csv(flat))
    atomic_write_text(out / "compare.csv", _csv(summary))
    base = method_config(REFERENCE, 0, model=model, data=data, **overrides)
    note = (f"Machine: {hardware.detect()}. Versions: {hardware.versions()}.\n"
            f"Inputs: model {model}, data {data}, copied once for all runs; fingerprint {fingerprint} "
            "(sha256 of their files, first 16 hex digits).\n"
            f"Same data ({data}) and budget for every method: {base.max_steps} steps × batch {base.batch_size}, "
            f"max_length {base.max_length}, lr {base.learning_rate} (full fine-tuning: "
            f"{VARIANTS['full_fp32'][0]['learning_rate']}), LoRA r {base.r}, alpha {base.lora_alpha}, dropout "
            f"{base.lora_dropout}; seeds {list(seeds)}. Loss on {base.eval_examples} held-out examples, score on "
            f"{base.generate_examples} held-out prompts (greedy, {base.max_new_tokens} new tokens).\n"
            "Weight MiB (1 MiB = 2**20 bytes): the model's weights as stored in memory (4-bit codes + constants; other weights fp32 on "
            "CPU). Peak memory: resident memory above the process's start (CPU) or CUDA's allocator peak.\n"
            "'beyond spread' = |Δ mean| > std_method + std_reference (the mean ± std intervals do not overlap).\n"
            "Train seconds and peak memory depend on what else runs on the machine: on a shared CPU they vary more "
            "between runs than between methods.\n")
    atomic_write_text(out / "compare.md", "# Method comparison\n\n" + markdown_table(summary) + "\n" + note)
    plots.comparison(summary, out / "compare.png")
    log(markdown_table(summary))
    log(f"written: {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'runs.csv'}, {out / 'compare.png'}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """The worker of one isolated run: python -m qlora_tutor.compare '<config json>' result.json [data_root]."""
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = FinetuneConfig(**json.loads(args[0]))
    atomic_write_text(args[1], json.dumps(run_one(cfg, args[2] if len(args) > 2 and args[2] else None)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
