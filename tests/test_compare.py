"""`compare`: the summary statistics, the spread rule, and a tiny real comparison that writes its tables."""

from __future__ import annotations

import csv
import statistics
import time

import pytest

from qlora_tutor import compare
from test_finetune import tiny_setup


def _row(method: str, seed: int, loss: float, score: float | None = None) -> dict:
    return {"method": method, "seed": seed, "loss": loss, "score": score, "trainable_params": 10,
            "weight_bytes": 100, "peak_memory_mb": 5.0 + seed, "train_seconds": 1.0 + seed}


def test_summary_is_mean_and_sample_std_and_judges_the_spread():
    losses = {"qlora_nf4_dq": [1.00, 1.02, 0.98], "qlora_fp4": [1.01, 0.99, 1.03], "qlora_nf4_dq_qv": [1.5, 1.52, 1.49]}
    rows = [_row(m, s, v, score=1 - v / 2) for m, vals in losses.items() for s, v in enumerate(vals)]
    summary = {s["method"]: s for s in compare.summarize(rows)}
    for m, vals in losses.items():
        assert summary[m]["loss_mean"] == pytest.approx(statistics.fmean(vals))
        assert summary[m]["loss_std"] == pytest.approx(statistics.stdev(vals))
        assert summary[m]["seeds"] == 3
    assert summary["qlora_nf4_dq"]["loss_vs_ref"] == "reference"
    assert summary["qlora_fp4"]["loss_vs_ref"] == "+0.010 (within spread)"
    assert summary["qlora_nf4_dq_qv"]["loss_vs_ref"].endswith("(beyond spread)")
    assert summary["qlora_nf4_dq_qv"]["score_vs_ref"].startswith("-0.25")
    table = compare.markdown_table(list(summary.values()))
    assert table.count("\n") == 2 + 3 and "1.503 ± 0.015" in table


def test_bad_requests_fail_before_training():
    with pytest.raises(ValueError, match="unknown method"):
        compare.method_config("qlora_int3", 0)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        compare.run_compare("unused", seeds=[0], methods=["qlora_nf4"])


def test_a_tiny_comparison_writes_csv_markdown_and_plot_and_resumes(tmp_path):
    root = tiny_setup()
    kw = dict(seeds=[0, 1], methods=["lora_fp32", "qlora_nf4_dq"], model=str(root / "model"), data=str(root / "data"),
              isolate=False, log=lambda s: None, steps=2, batch_size=4, r=4, max_length=64, eval_examples=4,
              generate_examples=2, max_new_tokens=3, warmup_steps=1, logging_steps=1)
    summary = compare.run_compare(tmp_path, **kw)
    assert [s["method"] for s in summary] == ["lora_fp32", "qlora_nf4_dq"]
    with open(tmp_path / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 4 and {r["seed"] for r in runs} == {"0", "1"}
    for s in summary:
        losses = [float(r["loss"]) for r in runs if r["method"] == s["method"]]
        assert s["loss_mean"] == pytest.approx(statistics.fmean(losses))
    lora, qlora = summary
    assert lora["trainable_params_mean"] == qlora["trainable_params_mean"]  # same adapters, different base
    assert qlora["weight_bytes_mean"] < lora["weight_bytes_mean"]          # the 4-bit base is smaller
    assert "| QLoRA NF4 + double quant, all linear |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    start = time.time()
    again = compare.run_compare(tmp_path, **kw)  # every run is already in runs.jsonl: nothing retrains
    assert time.time() - start < 10 and [s["loss_mean"] for s in again] == [s["loss_mean"] for s in summary]
