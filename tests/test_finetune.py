"""End-to-end QLoRA on a tiny random Llama (built here, offline): files, atomic saves, exact reload, exact resume.

The tiny model and its first training run are built once per test session (`tiny_setup`, `trained_run`) and
shared with test_cli.py, test_merge.py and test_compare.py, so the whole file set stays within seconds.
"""

from __future__ import annotations

import atexit
import functools
import json
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_tutor import data, finetune, generation, paths

NAMES = ["Pip", "Tom", "Ann", "Bo", "Kit", "Lu"]
THINGS = ["kite", "ball", "hat", "cup", "drum"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_LAYERS = 2


def _example(rng: random.Random) -> dict:
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    return {"instruction": f"Write about {n} and a {t}.", "input": "", "output": f"{n} had a {t}. {n} liked it. The end."}


@functools.lru_cache(maxsize=None)
def tiny_setup() -> Path:
    """A folder with `model/` (random 2-layer Llama + a BPE tokenizer trained here) and `data/` (jsonl splits)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    root = Path(tempfile.mkdtemp(prefix="qlora-tutor-tests-"))
    atexit.register(shutil.rmtree, root, True)
    rng = random.Random(0)
    (root / "data").mkdir()
    for split, n in (("train", 64), ("test", 12)):
        rows = [_example(rng) for _ in range(n)]
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [data.format_prompt(r["instruction"]) + r["output"] for r in map(lambda _: _example(rng), range(200))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(root / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    return root


def tiny_config(output: Path | str, **overrides) -> finetune.FinetuneConfig:
    root = tiny_setup()
    settings = dict(model=str(root / "model"), data=str(root / "data"), output=str(output), r=4, lora_alpha=8,
                    lora_dropout=0.1, max_steps=4, batch_size=4, save_steps=2, logging_steps=1, warmup_steps=1,
                    eval_examples=8, generate_examples=4, max_new_tokens=6, max_length=64)
    return finetune.FinetuneConfig(**{**settings, **overrides})


@functools.lru_cache(maxsize=None)
def trained_run() -> tuple[Path, dict]:
    """One finished 4-step QLoRA run (checkpoints every 2 steps), shared by the tests."""
    out = tiny_setup() / "run-a"
    metrics = finetune.run(tiny_config(out), progress="none", log=lambda s: None)
    return out, metrics


# ----------------------------------------------------------------------------------------------------- output
def test_run_writes_peft_adapter_atomically_with_metrics_and_curve():
    out, metrics = trained_run()
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name], "temporary folders left behind"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    # 'all-linear' is resolved to every linear layer but lm_head (PEFT 0.21 lists full module paths)
    assert sorted(t.rsplit(".", 1)[-1] for t in config["target_modules"]) in (sorted(LINEARS),
                                                                             sorted(LINEARS * N_LAYERS))
    tensors = load_file(adapter / "adapter_model.safetensors")
    expected = {f"base_model.model.model.layers.{i}.{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}.lora_{ab}.weight"
                for i in range(N_LAYERS) for m in LINEARS for ab in "AB"}
    assert set(tensors) == expected
    assert all(tensors[k].abs().sum() > 0 for k in tensors if "lora_B" in k), "B stayed zero: nothing was trained"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["adapter"] == str(adapter) and saved["trainable_params"] == metrics["trainable_params"]
    assert [h["step"] for h in saved["loss_history"]] == [1, 2, 3, 4]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trainable_parameters_and_4bit_bytes_match_the_shapes():
    _, metrics = trained_run()
    cfg = json.loads((Path(tiny_setup()) / "model" / "config.json").read_text())
    h, i, heads, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    kv_dim = h // heads * kv
    shapes = [(h, h), (kv_dim, h), (kv_dim, h), (h, h), (i, h), (i, h), (h, i)] * N_LAYERS  # (out, in)
    r = 4
    assert metrics["trainable_params"] == sum(r * (o + n) for o, n in shapes)
    # NF4 + double quant: 4 bits per weight, one 8-bit absmax per 64, one fp32 absmax per 256 absmaxes, the fp32
    # offset (mean of the absmaxes), 16 fp32 code values and a 256-entry fp32 code table for the absmaxes; other
    # weights counted at 16 bits.
    linear_bytes = sum(o * n // 2 + o * n // 64 + 4 * -(-(o * n // 64) // 256) + 4 + 16 * 4 + 256 * 4
                       for o, n in shapes)
    other = metrics["total_params"] - sum(o * n for o, n in shapes)
    assert metrics["base_bytes_4bit"] == linear_bytes + 2 * other
    assert metrics["base_bytes_16bit"] == 2 * metrics["total_params"]


def test_atomic_save_dir_replaces_whole_folders_and_survives_a_crash(tmp_path):
    dest = tmp_path / "adapter"
    paths.atomic_save_dir(dest, lambda d: (d / "a.txt").write_text("old"))
    def crash(d: Path) -> None:
        (d / "a.txt").write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        paths.atomic_save_dir(dest, crash)
    assert (dest / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    paths.atomic_save_dir(dest, lambda d: (d / "b.txt").write_text("new"))
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"] and len(list(tmp_path.iterdir())) == 1


# ------------------------------------------------------------------------------------------ reload and resume
def test_reloading_the_adapter_on_the_4bit_base_reproduces_the_evaluation_exactly():
    out, metrics = trained_run()
    model, tokenizer, cfg = finetune.load_trained(out)
    _, test = finetune.load_splits(cfg)
    again = generation.evaluate(model, tokenizer, test[:cfg.eval_examples], None, cfg.generate_examples,
                                cfg.max_new_tokens, cfg.max_length, batch_size=finetune.eval_batch_size(cfg))
    assert again["loss"] == metrics["after"]["loss"]
    assert again["answers"] == metrics["after"]["answers"]
    with model.disable_adapter():  # the same check must notice a missing adapter
        base = generation.heldout_loss(model, tokenizer, test[:cfg.eval_examples], cfg.max_length)
    assert base != metrics["after"]["loss"] and base == pytest.approx(metrics["before"]["loss"], abs=1e-6)


def test_resume_after_an_interruption_ends_with_the_same_adapter():
    from transformers import TrainerCallback
    out_a, metrics_a = trained_run()
    out_b = tiny_setup() / "run-b"

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt("simulated Ctrl-C after the step-2 checkpoint")

    with pytest.raises(KeyboardInterrupt):
        finetune.run(tiny_config(out_b), progress="none", callbacks=[Interrupt()], log=lambda s: None)
    assert not (out_b / "adapter").exists()
    metrics_b = finetune.run(tiny_config(out_b), resume=True, progress="none", log=lambda s: None)
    a = load_file(out_a / "adapter" / "adapter_model.safetensors")
    b = load_file(out_b / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_b["loss_history"] == metrics_a["loss_history"]
    assert metrics_b["after"]["loss"] == metrics_a["after"]["loss"]


def test_resume_with_a_different_configuration_is_refused_before_training():
    out, _ = trained_run()
    with pytest.raises(ValueError, match=r"different configuration \(r: checkpoint 4 vs now 8"):
        finetune.prepare_output(tiny_config(out, r=8), resume=True)
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        finetune.prepare_output(tiny_config(tiny_setup() / "nothing-here"), resume=True)


def test_an_output_folder_holding_a_run_is_refused_unless_overwrite(tmp_path):
    out, _ = trained_run()
    with pytest.raises(ValueError, match="already holds a run: add --overwrite"):
        finetune.prepare_output(tiny_config(out))
    with pytest.raises(ValueError, match="not both"):
        finetune.prepare_output(tiny_config(out), overwrite=True, resume=True)
    (tmp_path / "notes.txt").write_text("my thesis")
    with pytest.raises(ValueError, match="holds no qlora-tutor run"):
        finetune.prepare_output(tiny_config(tmp_path), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "my thesis"


# --------------------------------------------------------------------------------------- generation and score
def test_prompt_ids_are_the_masked_prefix_of_a_training_example():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_setup() / "model")
    ex = {"instruction": "Write about Pip and a kite.", "input": "", "output": "Pip had a kite. The end."}
    feats = data.tokenize_example(ex, tok, 64)
    n_prompt = sum(1 for lab in feats["labels"] if lab == data.IGNORE_INDEX)
    assert data.prompt_ids(tok, ex["instruction"]) == feats["input_ids"][:n_prompt]


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    out, _ = trained_run()
    model, tok, cfg = finetune.load_trained(out)
    _, test = finetune.load_splits(cfg)
    prompts = [test[0], {"instruction": "Write about Kit, a very very long named thing, and a drum.", "input": ""}]
    together = generation.generate(model, tok, prompts, max_new_tokens=5, batch_size=2)
    alone = [generation.generate(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert together == alone


def test_evaluate_averages_the_scorer_over_the_generated_answers():
    out, _ = trained_run()
    model, tok, cfg = finetune.load_trained(out)
    _, test = finetune.load_splits(cfg)
    res = generation.evaluate(model, tok, test[:6], lambda ex, answer: len(answer) % 7 / 6, n_generate=3,
                              max_new_tokens=4)
    assert len(res["answers"]) == 3
    assert res["score"] == pytest.approx(sum(len(a) % 7 / 6 for a in res["answers"]) / 3)
