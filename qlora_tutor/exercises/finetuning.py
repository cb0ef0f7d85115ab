"""Checks for notebook 05 (fine-tuning with transformers + PEFT + bitsandbytes): the label mask, and the
TrainingArguments + Trainer call that `finetune.train` makes."""

from __future__ import annotations

import tempfile
from typing import Any, Callable

import torch

from .. import data, finetune
from ..config import FinetuneConfig
from .base import check, expect, run, wrong


def _as_list(name: str, value: Any) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
        wrong(f"{name} should be a list of token ids (ints), got {type(value).__name__}")
    return list(value)


@check("the label mask")
def check_label_mask(fn: Callable[..., Any], tokenizer: Any, examples: list[dict]) -> str:
    """`fn(example, tokenizer, max_length)` must return input_ids and labels as `data.tokenize_example` does:
    prompt + response + EOS, labels -100 on the prompt, the response cut to fit max_length."""
    cases = [(ex, 256) for ex in examples[:4]]
    ex = examples[0]
    n_prompt = len(data.prompt_ids(tokenizer, ex["instruction"], ex.get("input", "")))
    cases.append((ex, n_prompt + 5))  # so short that the response must be cut (and then gets no EOS)
    for example, max_length in cases:
        got = run(fn, example, tokenizer, max_length)
        expect(isinstance(got, dict) and "input_ids" in got and "labels" in got,
               f"return a dict with 'input_ids' and 'labels', got {type(got).__name__}"
               + (f" with keys {sorted(got)}" if isinstance(got, dict) else ""))
        want = data.tokenize_example(example, tokenizer, max_length)
        ids, labels = _as_list("input_ids", got["input_ids"]), _as_list("labels", got["labels"])
        w_ids, w_labels = want["input_ids"], want["labels"]
        n_masked = sum(lab == data.IGNORE_INDEX for lab in w_labels)
        cut = f" (max_length={max_length}: the response must be cut to fit)" if max_length < 256 else ""
        if ids != w_ids:
            if len(ids) == len(w_ids) + 1 and ids[:-1] == w_ids:
                wrong(f"input_ids are one token too long{cut}: a cut response gets no EOS, and the total is max_length")
            if ids == w_ids[:-1] and w_ids[-1] == tokenizer.eos_token_id:
                wrong("input_ids end without EOS: append tokenizer.eos_token_id, or the model never learns to stop")
            if ids[:n_masked] != w_ids[:n_masked]:
                wrong(f"the prompt tokens differ: use data.prompt_ids(tokenizer, instruction, input), which adds "
                      f"BOS and the template (expected {n_masked} prompt tokens, starting {w_ids[:4]})")
            if len(ids) > max_length:
                wrong(f"{len(ids)} tokens but max_length={max_length}: cut the response to fit")
            first = next((i for i, (a, b) in enumerate(zip(ids, w_ids)) if a != b), min(len(ids), len(w_ids)))
            wrong(f"input_ids differ from position {first} on (you have {len(ids)} tokens, expected "
                  f"{len(w_ids)}){cut}: the response is tokenizer(output, add_special_tokens=False) + EOS")
        if len(labels) != len(ids):
            wrong(f"labels has {len(labels)} entries for {len(ids)} input_ids: one label per token")
        if labels == ids:
            wrong(f"the prompt is not masked: the first {n_masked} labels (the prompt) must be -100 "
                  "(data.IGNORE_INDEX), else the loss also trains the model to write prompts")
        if labels[:-1] == w_labels[1:] or labels[:-1] == ids[1:]:
            wrong("labels are shifted by one: give labels aligned with input_ids; the model shifts them itself "
                  "when it computes the loss")
        got_masked = sum(lab == data.IGNORE_INDEX for lab in labels)
        if got_masked != n_masked:
            wrong(f"{got_masked} labels are -100 but the prompt has {n_masked} tokens (BOS included): "
                  "mask exactly the prompt, nothing of the response")
        if labels != w_labels:
            first = next(i for i, (a, b) in enumerate(zip(labels, w_labels)) if a != b)
            wrong(f"labels[{first}] is {labels[first]} but should be {w_labels[first]}: after the prompt, the "
                  "labels are the response's token ids")
    return f"prompt masked, EOS appended, response cut to fit, on {len(cases)} examples"


# The Trainer settings a learner must get right, with why each matters.
_TRAINER_FIELDS = {
    "max_steps": "the run's length (STEPS)",
    "per_device_train_batch_size": "examples per step (BATCH_SIZE)",
    "gradient_accumulation_steps": "1 here: one batch per optimizer step",
    "learning_rate": "2e-3 for LoRA on this tiny model (the paper: 2e-4 for 7B)",
    "lr_scheduler_type": "the paper's constant learning rate after warm-up ('constant_with_warmup'); the Trainer's "
                         "default 'linear' decays it to zero",
    "warmup_steps": "a short warm-up of 3 steps",
    "max_grad_norm": "the paper clips gradients at 0.3 (the Trainer's default is 1.0)",
    "weight_decay": "0.0, as the paper",
    "optim": "paged AdamW with 32-bit state ('paged_adamw_32bit') on CUDA; plain 'adamw_torch' on a CPU, "
             "where there is nothing to page",
    "fp16": "fp16 mixed precision exactly when the compute dtype is float16 (a T4 or V100)",
    "bf16": "bf16 mixed precision exactly when the compute dtype is bfloat16 (A100, H100, RTX 30xx+)",
}


def _value(v: Any) -> Any:
    return getattr(v, "value", v)  # enums (optimizer and scheduler names) as their strings


@check("TrainingArguments + Trainer")
def check_trainer(fn: Callable[..., Any], model: Any, tokenizer: Any, train_features: list[dict],
                  cfg: FinetuneConfig, compute: torch.dtype) -> str:
    """`fn(model, tokenizer, train_features, output_dir)` must return a transformers Trainer set up as
    `finetune.train` sets it up: the paper's settings, this model and data, and a collator that keeps the mask."""
    from transformers import Trainer
    out = tempfile.mkdtemp(prefix="qlora-tutor-exercise-")
    trainer = run(fn, model, tokenizer, train_features, out)
    expect(isinstance(trainer, Trainer), f"return the Trainer itself, got {type(trainer).__name__}")
    want = finetune.training_arguments(cfg, compute, out)
    for name, why in _TRAINER_FIELDS.items():
        got, expected = _value(getattr(trainer.args, name)), _value(getattr(want, name))
        if got != expected:
            wrong(f"TrainingArguments {name}={got!r}, expected {expected!r}: {why}")
    expect(trainer.model is model, "pass the PEFT model you built as model= (the adapters must be what trains)")
    expect(trainer.train_dataset is not None and len(trainer.train_dataset) == len(train_features),
           f"train_dataset should be the {len(train_features)} tokenized features")
    pair = [train_features[0], min(train_features[1:4], key=lambda f: len(f["input_ids"]))]
    try:
        batch = trainer.data_collator(pair)
    except Exception as err:  # noqa: BLE001  (the learner's collator)
        wrong(f"the data collator failed on two features of different length ({type(err).__name__}: {err}); "
              "data.DataCollator(tokenizer) pads input_ids, attention_mask and labels")
    expect("labels" in batch, "the collator's batch has no 'labels': the loss needs them")
    labels = torch.as_tensor(batch["labels"])
    for row, f in enumerate(pair):
        n = len(f["labels"])
        if labels[row, :n].tolist() != list(f["labels"]):
            wrong("the collator rewrote the labels (e.g. DataCollatorForLanguageModeling copies input_ids into "
                  "labels): the prompt's -100 mask is lost; use data.DataCollator(tokenizer)")
        if (labels[row, n:] != data.IGNORE_INDEX).any():
            wrong("padding positions must have label -100, or the loss trains on padding")
    return "the paper's settings, this model and data, and the mask kept through the collator"
