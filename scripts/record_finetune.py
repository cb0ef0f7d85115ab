"""Record a finished `qlora-tutor finetune` run as a result: a Markdown table and a JSON copy of its numbers.

    .venv/bin/python scripts/record_finetune.py --run runs/smollm-cpu --out results/real_model/cpu_finetune \
        --command "qlora-tutor finetune --model smollm2-135m ..."

Reads `<run>/metrics.json` (written by the run itself) and names the machine it is run on, so record on the machine
that trained. Writes `<out>.md` and `<out>.json` atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlora_tutor import finetune, hardware  # noqa: E402
from qlora_tutor.paths import atomic_write_text  # noqa: E402

def report(m: dict, command: str, machine: str, examples: int = 2) -> str:
    cfg, v = m["config"], m["versions"]
    phases = ", ".join(f"{label} {m['phase_seconds'][key]:.0f} s" for key, label in finetune.PHASES if key in m["phase_seconds"])
    lines = [
        f"# QLoRA fine-tune of {cfg['model']} on the {cfg['data']} skill",
        "",
        f"Machine: {machine}, {m['cpu_threads']} CPU threads, {m['device']}. Versions: "
        f"{hardware.versions_text(found=v)}.",
        "",
        f"Command: `{command}`",
        "",
        f"Settings: method {cfg['method']} {cfg['quant_type']}{' + double quantization' if cfg['double_quant'] else ''},"
        f" LoRA r={cfg['r']}, alpha={cfg['lora_alpha']:g}, dropout {cfg['lora_dropout']:g} on {cfg['target_modules']};"
        f" {cfg['max_steps']} steps x batch {cfg['batch_size']}, lr {cfg['learning_rate']:g}, max length"
        f" {cfg['max_length']}, gradient checkpointing {'on' if cfg['gradient_checkpointing'] else 'off'}, seed"
        f" {cfg['seed']}; held-out loss on {m['heldout_examples']} test examples, instruction score on"
        f" {cfg['generate_examples']} greedy answers of up to {cfg['max_new_tokens']} new tokens.",
        "",
        "| | held-out loss | instruction score |",
        "|---|---|---|",
        f"| base model (before) | {m['before']['loss']:.4f} | {m['before']['score']:.3f} |",
        f"| after {cfg['max_steps']} steps | {m['after']['loss']:.4f} | {m['after']['score']:.3f} |",
        "",
        f"Trainable parameters: {m['trainable_params']:,} of {m['total_params']:,}"
        f" ({100 * m['trainable_params'] / m['total_params']:.2f}%). Base weights {m['base_bytes_4bit'] / 2**20:.2f} MiB"
        f" in 4-bit against {m['base_bytes_16bit'] / 2**20:.2f} MiB in 16-bit. Growth of the process's resident memory"
        f" during training: {m['peak_memory_bytes'] / 2**30:.2f} GiB.",
        "",
        f"Time: {m['total_seconds']:.0f} s in all ({phases}).",
        "",
        "Loss during training: " + ", ".join(f"step {h['step']} {h['loss']:.3f}" for h in m["loss_history"]) + ".",
    ]
    for i in range(min(examples, len(m["before"].get("answers", [])), len(m["after"].get("answers", [])))):
        lines += ["", f"Answer {i + 1}, before: {m['before']['answers'][i]!r}", "",
                  f"Answer {i + 1}, after: {m['after']['answers'][i]!r}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="the run folder (holds metrics.json)")
    parser.add_argument("--out", required=True, type=Path, help="output path without suffix")
    parser.add_argument("--command", required=True, help="the command that made the run, as typed")
    args = parser.parse_args(argv)
    metrics_file = args.run / "metrics.json"
    if not metrics_file.is_file():
        raise SystemExit(f"{metrics_file}: no metrics (is {args.run} a finished `qlora-tutor finetune` run?)")
    m = json.loads(metrics_file.read_text())
    machine = hardware.cpu_name()
    keep = {k: m[k] for k in m if k not in ("model_path", "adapter", "loss_curve")}
    atomic_write_text(args.out.with_suffix(".json"),
                      json.dumps({"machine": machine, "command": args.command, **keep}, indent=2) + "\n")
    text = report(m, args.command, machine)
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
