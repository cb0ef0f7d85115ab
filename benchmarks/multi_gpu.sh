#!/usr/bin/env bash
# QLoRA on one GPU vs data parallel (DDP) and FSDP on two: throughput and per-GPU peak memory, for notebook 08.
#
# Needs a machine with at least 2 CUDA GPUs and bitsandbytes installed (benchmarks/README.md says how to carry
# it to a machine without network), then: bash benchmarks/multi_gpu.sh.
# Everything is offline: the base model is a random-weight Llama of TinyLlama-1.1B's shape (hidden 2048,
# 22 layers, MLP 5632, 32 heads / 4 KV heads) built here with the embedded model's tokenizer; random weights
# cost the same memory and time as trained ones. Data: the embedded stories.
#
# Writes to $OUT (default results/multi_gpu_run): multi_gpu.md (the table), one log per case,
# nvidia-smi samples. Copy the table into results/multi_gpu.md with the machine and versions.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/multi_gpu_run}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/qlora-tutor-multi-gpu}
STEPS=${STEPS:-40}
BATCH=${BATCH:-8}          # per GPU; DDP and FSDP on 2 GPUs train a global batch of 2 x BATCH
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

NGPU=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
if [ "$NGPU" -lt 2 ]; then
    echo "multi_gpu.sh needs 2 GPUs, found $NGPU: nothing measured" | tee "$OUT/multi_gpu.md"
    exit 2
fi

# 1. the base model -------------------------------------------------------------------------------------------
"$PY" - "$WORK/model" <<'EOF'
import shutil, sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from qlora_tutor import data
out = sys.argv[1]
tok = AutoTokenizer.from_pretrained(data.embedded_model_dir())
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
tok.save_pretrained(out)
print(f"base model: random Llama, {sum(p.numel() for p in LlamaForCausalLM(cfg).parameters()) / 1e9:.2f} B parameters")
EOF

COMMON=(finetune --model "$WORK/model" --data stories --steps "$STEPS" --batch-size "$BATCH" --max-length 192
        --lora-dropout 0 --warmup-steps 0 --save-steps 0 --logging-steps 10 --eval-examples 8
        --generate-examples 0 --seed 0 --overwrite)

# 2. the three cases, each with nvidia-smi sampling every GPU's memory ---------------------------------------
run_case() {
    local name=$1; shift
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/smi_$name.csv" &
    local smi=$!
    local t0=$SECONDS
    "$@" --output "$WORK/$name" > "$OUT/log_$name.txt" 2>&1 || { kill "$smi"; echo "case $name FAILED:"; tail -30 "$OUT/log_$name.txt"; return 1; }
    kill "$smi"
    echo "$name $((SECONDS - t0))" >> "$OUT/wall_seconds.txt"
    echo "case $name done"
}
: > "$OUT/wall_seconds.txt"
status=0
CUDA_VISIBLE_DEVICES=0 run_case single "$PY" -m qlora_tutor.cli "${COMMON[@]}" || status=1
run_case ddp "$PY" -m accelerate.commands.launch --config_file configs/accelerate_ddp_2gpu.yaml \
    -m qlora_tutor.cli "${COMMON[@]}" || status=1
run_case fsdp "$PY" -m accelerate.commands.launch --config_file configs/accelerate_fsdp_qlora.yaml \
    -m qlora_tutor.cli "${COMMON[@]}" || status=1

# 3. the table -------------------------------------------------------------------------------------------------
"$PY" - "$OUT" "$WORK" "$STEPS" "$BATCH" <<'EOF'
import csv, json, sys
from pathlib import Path
from qlora_tutor import distributed, hardware, memory
out, work, steps, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cases = {"single": ("single", 1), "ddp": ("ddp", 2), "fsdp": ("fsdp", 2)}
wall = dict(line.split() for line in (out / "wall_seconds.txt").read_text().splitlines())
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
lines = [f"Machine: {torch.cuda.device_count()} x {gpu}; "
         + ", ".join(f"{k} {v}" for k, v in hardware.versions().items()),
         f"Base: random Llama, TinyLlama-1.1B shape; QLoRA NF4 + DQ, r 16 all-linear, {steps} steps, "
         f"batch {batch} per GPU, max length 192, bf16.", "",
         "| case | GPUs | global batch | wall s | train s | examples/s | speed-up | peak allocated, rank 0 (GB) "
         "| nvidia-smi max per GPU (GB) | predicted per GPU (GB) | replicas agree |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
base_rate = None
for name, (strategy, n) in cases.items():
    m = work / name / "metrics.json"
    if not m.is_file():
        lines.append(f"| {name} | {n} | {batch * n} | {wall.get(name, '-')} | failed (see log_{name}.txt) | | | | | | |")
        continue
    metrics = json.loads(m.read_text())
    rate = steps * batch * n / metrics["train_seconds"]
    base_rate = base_rate or rate
    smi = {}
    with open(out / f"smi_{name}.csv") as f:
        for row in csv.reader(f):
            if len(row) == 2 and row[1].strip().isdigit():
                smi[row[0].strip()] = max(smi.get(row[0].strip(), 0), int(row[1]) * 2**20 / 1e9)
    log = (out / f"log_{name}.txt").read_text()
    prints = distributed.parse_fingerprints(log)  # {rank: sha256 of that rank's adapter}
    agree = "-" if n == 1 else "one sharded copy" if strategy == "fsdp" else (
        "yes" if len(prints) == n and len(set(prints.values())) == 1
                                else f"NO ({len(set(prints.values()))} distinct of {len(prints)})")
    pred = distributed.per_gpu_memory(str(work / "model"), "qlora", strategy, n, per_device_batch=batch,
                                      seq_len=192, lora_r=16)
    lines.append(f"| {name} | {n} | {batch * n} | {wall.get(name, '-')} | {metrics['train_seconds']:.1f} | {rate:.1f} | "
                 f"{rate / base_rate:.2f}x | {metrics['peak_memory_bytes'] / 1e9:.2f} | "
                 f"{', '.join(f'{v:.2f}' for _, v in sorted(smi.items()))} | {pred.on_card / 1e9:.2f} | {agree} |")
(out / "multi_gpu.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
exit $status
