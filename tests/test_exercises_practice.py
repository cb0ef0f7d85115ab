"""The write-it-yourself checks of notebooks 05-08: each accepts the solution, reports an untouched TODO as not
done, and rejects plausible wrong answers with a message that says what is wrong."""

from __future__ import annotations

import functools

import pytest
import torch

from qlora_tutor import data, finetune, models
from qlora_tutor.exercises import adapters, base, distributed, finetuning, memory
from test_finetune import tiny_config


def todo(*args, **kwargs):
    raise NotImplementedError


def _wrong(verdict, *phrases):
    assert verdict.status == base.WRONG, verdict
    for p in phrases:
        assert p in verdict.message, f"{p!r} not in: {verdict.message}"


# ------------------------------------------------------------------------------------------------ 05: label mask
@functools.lru_cache(maxsize=None)
def _embedded():
    path = models.resolve_model("embedded")
    return models.load_tokenizer(path), data.load_examples("stories", "test")[:6]


def tokenize(example, tokenizer, max_length):
    prompt = data.prompt_ids(tokenizer, example["instruction"], example.get("input", ""))
    response = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response = response[: max_length - len(prompt)]
    return {"input_ids": prompt + response, "labels": [data.IGNORE_INDEX] * len(prompt) + response}


def test_label_mask_solution_passes_and_todo_is_not_done():
    tok, exs = _embedded()
    assert finetuning.check_label_mask(tokenize, tok, exs)
    assert finetuning.check_label_mask(todo, tok, exs).status == base.NOT_DONE


def test_label_mask_rejects_unmasked_shifted_missing_eos_and_untruncated():
    tok, exs = _embedded()

    def unmasked(ex, t, n):
        f = tokenize(ex, t, n)
        return {"input_ids": f["input_ids"], "labels": list(f["input_ids"])}

    def shifted(ex, t, n):
        f = tokenize(ex, t, n)
        return {"input_ids": f["input_ids"], "labels": f["labels"][1:] + [data.IGNORE_INDEX]}

    def no_eos(ex, t, n):
        prompt = data.prompt_ids(t, ex["instruction"], ex["input"])
        response = t(ex["output"], add_special_tokens=False)["input_ids"][: n - len(prompt)]
        return {"input_ids": prompt + response, "labels": [-100] * len(prompt) + response}

    def untruncated(ex, t, n):
        return tokenize(ex, t, 10_000)

    def mask_one_more(ex, t, n):
        f = tokenize(ex, t, n)
        k = f["labels"].count(-100)
        return {"input_ids": f["input_ids"], "labels": [-100] * (k + 1) + f["labels"][k + 1:]}

    _wrong(finetuning.check_label_mask(unmasked, tok, exs), "prompt is not masked", "-100")
    _wrong(finetuning.check_label_mask(shifted, tok, exs), "shifted by one")
    _wrong(finetuning.check_label_mask(no_eos, tok, exs), "EOS")
    _wrong(finetuning.check_label_mask(untruncated, tok, exs), "max_length")
    _wrong(finetuning.check_label_mask(mask_one_more, tok, exs), "labels are -100 but the prompt has")


# ----------------------------------------------------------------------------------- 05: TrainingArguments + Trainer
@functools.lru_cache(maxsize=None)
def _trainer_setup():
    import tempfile
    cfg = tiny_config(tempfile.mkdtemp(), method="lora", max_steps=7, batch_size=3, learning_rate=2e-3,
                      warmup_steps=3, logging_steps=5, save_steps=0)
    model_path, compute = finetune.check_config(cfg)
    tokenizer = models.load_tokenizer(model_path)
    model = finetune.prepare_for_training(models.load_base(model_path, "lora", compute), cfg)
    train, _ = finetune.load_splits(cfg)
    features = [data.tokenize_example(ex, tokenizer, cfg.max_length) for ex in train[:6]]
    return cfg, compute, model, tokenizer, features


def make_trainer(model, tokenizer, features, output_dir, **changes):
    from transformers import Trainer, TrainingArguments
    cfg, compute = _trainer_setup()[:2]
    settings = dict(output_dir=output_dir, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
                    learning_rate=cfg.learning_rate, lr_scheduler_type="constant_with_warmup",
                    warmup_steps=cfg.warmup_steps, max_grad_norm=0.3, optim="adamw_torch", logging_steps=5,
                    report_to="none")
    collator = changes.pop("collator", None) or data.DataCollator(tokenizer)
    settings.update(changes)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=features, data_collator=collator)


def test_trainer_solution_passes_and_todo_is_not_done():
    cfg, compute, model, tok, feats = _trainer_setup()
    assert finetuning.check_trainer(make_trainer, model, tok, feats, cfg, compute)
    assert finetuning.check_trainer(todo, model, tok, feats, cfg, compute).status == base.NOT_DONE


def test_trainer_rejects_default_clipping_linear_decay_and_a_collator_that_unmasks():
    from transformers import DataCollatorForLanguageModeling
    cfg, compute, model, tok, feats = _trainer_setup()
    check = functools.partial(finetuning.check_trainer, model=model, tokenizer=tok, train_features=feats, cfg=cfg,
                              compute=compute)

    def default_clip(m, t, f, out):
        return make_trainer(m, t, f, out, max_grad_norm=1.0)

    def linear(m, t, f, out):
        return make_trainer(m, t, f, out, lr_scheduler_type="linear")

    def lm_collator(m, t, f, out):
        return make_trainer(m, t, f, out, collator=DataCollatorForLanguageModeling(t, mlm=False))

    def other_model(m, t, f, out):
        return make_trainer(models.load_base(_trainer_setup()[0].model, "lora", compute), t, f, out)

    _wrong(check(default_clip), "max_grad_norm=1.0", "0.3")
    _wrong(check(linear), "lr_scheduler_type='linear'", "constant")
    _wrong(check(lm_collator), "rewrote the labels", "-100")
    _wrong(check(other_model), "PEFT model")
    _wrong(check(lambda m, t, f, out: make_trainer(m, t, f, out).args), "return the Trainer")


# ---------------------------------------------------------------------------------------- 06: memory by hand
def by_hand(shape, r, *, dq=True, embed_4bit=False, adam_states=2, adapter_bytes=4, rank_product=False):
    L, h, V = shape.layers, shape.hidden, shape.vocab
    lin = [(fi, fo, b) for _, fi, fo, b in shape.linears()]
    n4 = L * sum(fi * fo for fi, fo, _ in lin)
    rest = V * h * (1 if shape.tied_embeddings else 2) + (2 * L + 1) * h + L * sum(fo for _, fo, b in lin if b)
    frozen = n4 / 2 + rest * (0.5 if embed_4bit else 2)
    consts = n4 * ((8 / 64 + 32 / (64 * 256)) if dq else 32 / 64) / 8
    per_pair = (lambda fi, fo: r * fi * fo) if rank_product else (lambda fi, fo: r * (fi + fo))
    adapters = L * sum(per_pair(fi, fo) for fi, fo, _ in lin) * adapter_bytes
    return {"frozen_weights": frozen, "quantization_constants": consts, "adapter_weights": adapters,
            "gradients": adapters, "optimizer_state": adapters / adapter_bytes * 4 * adam_states}


def test_memory_by_hand_solution_passes_and_todo_is_not_done():
    assert memory.check_memory_by_hand(by_hand)
    assert memory.check_memory_by_hand(todo).status == base.NOT_DONE


@pytest.mark.parametrize("slip,phrase", [
    (dict(dq=False), "without double quantization"),
    (dict(embed_4bit=True), "embeddings counted at 4 bits"),
    (dict(adam_states=1), "AdamW keeps two"),
    (dict(adapter_bytes=2), "fp32"),
    (dict(rank_product=True), "r·(in + out)"),
])
def test_memory_by_hand_names_the_slip(slip, phrase):
    _wrong(memory.check_memory_by_hand(lambda s, r: by_hand(s, r, **slip)), phrase)
    _wrong(memory.check_memory_by_hand(lambda s, r: {k: v for k, v in by_hand(s, r).items() if k != "gradients"}),
           "missing parts: gradients")


# ---------------------------------------------------------------------------------------- 07: merging by hand
def merge(weight, lora_A, lora_B, lora_alpha, r):
    return weight + (lora_alpha / r) * (lora_B @ lora_A)


def test_merge_solution_passes_and_todo_is_not_done():
    assert adapters.check_merge(merge)
    assert adapters.check_merge(todo).status == base.NOT_DONE


def test_merge_rejects_alpha_instead_of_alpha_over_r_transposed_and_unscaled():
    _wrong(adapters.check_merge(lambda w, a, b, alpha, r: w + alpha * (b @ a)), "instead of alpha/r")
    _wrong(adapters.check_merge(lambda w, a, b, alpha, r: w + (alpha / r) * (a.T @ b.T)), "shape")
    _wrong(adapters.check_merge(lambda w, a, b, alpha, r: w + b @ a), "without the alpha/r scale")
    _wrong(adapters.check_merge(lambda w, a, b, alpha, r: (alpha / r) * (b @ a)), "without W")
    _wrong(adapters.check_merge(lambda w, a, b, alpha, r: (w + (alpha / r) * (b @ a)).half()), "dtype")


# ------------------------------------------------------------------------------------- 08: FSDP share by hand
SHARDED = ("frozen_weights", "adapter_weights", "gradients", "optimizer_state")


def fsdp_share(single, n):
    return {k: v / n if k in SHARDED else v for k, v in single.items()}


def test_fsdp_share_solution_passes_and_todo_is_not_done():
    assert distributed.check_fsdp_share(fsdp_share)
    assert distributed.check_fsdp_share(todo).status == base.NOT_DONE


def test_fsdp_share_rejects_dividing_everything_and_dividing_nothing():
    _wrong(distributed.check_fsdp_share(lambda s, n: {k: v / n for k, v in s.items()}),
           "divided it by", "quantization_constants", "beside the parameter")
    _wrong(distributed.check_fsdp_share(lambda s, n: dict(s)), "as DDP would")
    no_act = lambda s, n: {**fsdp_share(s, n), "activations": s["activations"] / n}  # noqa: E731
    _wrong(distributed.check_fsdp_share(no_act), "activations", "per-device batch")
    assert torch.__version__  # the checks need no GPU
