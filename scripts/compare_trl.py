"""Our data pipeline against TRL's SFTTrainer on the same batch: same tokens, same masked labels, same loss.

TRL is not a dependency of qlora-tutor; install it to run this (`pip install --no-deps trl`, it needs nothing
that qlora-tutor does not already install):

    .venv/bin/python scripts/compare_trl.py       # writes results/real_model/trl_first_step.md

The model: SmolLM2-135M-Instruct in NF4 + double quantization (bitsandbytes), as `qlora-tutor finetune --model
smollm2-135m` loads it; a LoRA adapter starts with B = 0, so the first step's loss is the base model's loss on the
batch. Both pipelines get the same 8 training examples of the stories skill as prompt-completion conversations;
TRL applies the chat template itself and masks the prompt with its `completion_mask`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlora_tutor import data, finetune, hardware  # noqa: E402
from qlora_tutor.config import FinetuneConfig  # noqa: E402
from qlora_tutor.paths import atomic_write_text  # noqa: E402
from qlora_tutor.quiet import hide_library_notices  # noqa: E402


def trl_batch(model, cfg: FinetuneConfig, examples: list[dict], tokenizer) -> tuple[dict, object]:
    """TRL's SFTTrainer's own tokenization and collation of `examples` (its dataset map, its collator), and the
    trainer (its model: `model` with a fresh LoRA adapter of `cfg`'s settings, attached by TRL through PEFT)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    rows = [{"prompt": [{"role": "user", "content": data.user_message(ex["instruction"], ex.get("input", ""))}],
             "completion": [{"role": "assistant", "content": ex["output"]}]} for ex in examples]
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, max_length=cfg.max_length, per_device_train_batch_size=len(rows),
                         report_to=[], completion_only_loss=True, use_cpu=True, dataset_num_proc=None)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=finetune.lora_config(cfg))
        features = [trainer.train_dataset[i] for i in range(len(rows))]
        return trainer.data_collator(features), trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--output", default=str(ROOT / "results" / "real_model" / "trl_first_step.md"))
    args = parser.parse_args(argv)
    hide_library_notices()
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed (it is not a dependency of qlora-tutor): install it with "
                         "`pip install --no-deps trl`, then run this again") from None
    torch.manual_seed(0)

    cfg = FinetuneConfig(model="smollm2-135m", data="stories", max_length=args.max_length)
    model, tokenizer = finetune.load_untrained(cfg)
    examples = data.load_examples("stories", "train")[: args.examples]

    ours = data.DataCollator(tokenizer)([data.tokenize_example(ex, tokenizer, args.max_length) for ex in examples])
    theirs, trainer = trl_batch(model, cfg, examples, tokenizer)
    t_ids, t_mask = theirs["input_ids"], theirs["attention_mask"]
    t_labels = theirs["labels"]

    rows = []
    same_prefix = True
    extra_tokens = []
    for i in range(len(examples)):
        o = ours["input_ids"][i][ours["attention_mask"][i].bool()].tolist()
        t = t_ids[i][t_mask[i].bool()].tolist()
        same_prefix &= t[: len(o)] == o
        extra_tokens.append(tokenizer.decode(t[len(o):]))
        ol = ours["labels"][i][ours["attention_mask"][i].bool()].tolist()
        tl = t_labels[i][t_mask[i].bool()].tolist()
        rows.append((len(o), len(t), sum(x != -100 for x in ol), sum(x != -100 for x in tl), ol == tl[: len(ol)]))

    model = trainer.model.eval()  # base + a fresh LoRA adapter (B = 0): the base's output; no dropout
    with torch.no_grad():
        loss_ours = model(**{k: ours[k] for k in ("input_ids", "attention_mask", "labels")}).loss.item()
        loss_trl = model(input_ids=t_ids, attention_mask=t_mask, labels=t_labels).loss.item()
        # TRL's batch with the label of every token after our end-of-turn masked: our labels, on TRL's tokens
        trimmed = t_labels.clone()
        for i, (n_ours, *_rest) in enumerate(rows):
            pos = t_mask[i].bool().nonzero().flatten()
            trimmed[i, pos[n_ours:]] = -100
        loss_trimmed = model(input_ids=t_ids, attention_mask=t_mask, labels=trimmed).loss.item()

    extra = sorted(set(extra_tokens))
    lines = [
        "# Our data pipeline against TRL's SFTTrainer, first step",
        "",
        f"SmolLM2-135M-Instruct in NF4 + double quantization (bitsandbytes), the first {len(examples)} training examples "
        f"of the stories skill as prompt-completion conversations, max length {args.max_length}. Ours: "
        "`data.tokenize_example` + `data.DataCollator`; TRL: `SFTTrainer`'s own dataset tokenization and collator "
        "(`completion_only_loss=True`). Loss: the model's mean cross-entropy over the labels, as the Trainer's first "
        "step computes it (a fresh LoRA adapter adds zero).",
        "",
        "| example | tokens, ours | tokens, TRL | learned tokens, ours | learned tokens, TRL | our labels = TRL's on our tokens |",
        "|---|---|---|---|---|---|",
        *[f"| {i} | {a} | {b} | {c} | {d} | {'yes' if e else 'no'} |" for i, (a, b, c, d, e) in enumerate(rows)],
        "",
        f"Our tokens are a prefix of TRL's in every example: {'yes' if same_prefix else 'no'}. What TRL has after "
        f"them: {', '.join(repr(x) for x in extra)} (the newline SmolLM2's template writes after `<|im_end|>`), "
        "learned as one more completion token.",
        "",
        "| loss on the batch | value |",
        "|---|---|",
        f"| ours | {loss_ours:.6f} |",
        f"| TRL's batch | {loss_trl:.6f} |",
        f"| TRL's batch, labels after our end-of-turn masked | {loss_trimmed:.6f} |",
        "",
        f"Ours against TRL's trimmed batch: difference {abs(loss_ours - loss_trimmed):.2e}; TRL's extra newline moves "
        f"the mean by {loss_trl - loss_ours:+.4f}.",
        "",
        f"Machine: {hardware.cpu_name()}. Versions: {hardware.versions_text()}, trl {trl.__version__}.",
        "Command: `.venv/bin/python scripts/compare_trl.py`",
    ]
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.output, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
