"""The embedded base model in data/: loads offline as a plain transformers folder, is small, writes stories."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_tutor import data, storyworld as sw

MODEL_DIR = data.embedded_model_dir()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def test_folder_is_a_small_standard_llama(model):
    files = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".py")) for f in files)  # no pickle, no remote code
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 20e6
    assert json.loads((MODEL_DIR / "config.json").read_text())["model_type"] == "llama"
    assert model.dtype == torch.float32 and all(torch.isfinite(p).all() for p in model.parameters())
    names = {n.rsplit(".", 1)[0].split(".")[-1] for n, _ in model.named_parameters()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names


def test_tokenizer_special_tokens_and_round_trip(tokenizer):
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    assert None not in ids and len(ids) == 4
    story = sw.generate_story(random.Random(11)).text
    enc = tokenizer(story)["input_ids"]
    assert enc[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in enc
    assert tokenizer.decode(enc, skip_special_tokens=True) == story
    prompt = data.format_prompt("Write a story about a fox named Pip.", "with input\nlines")
    assert tokenizer.decode(tokenizer(prompt)["input_ids"], skip_special_tokens=True) == prompt


def test_heldout_perplexity_is_low(model, tokenizer):
    """Fresh stories (a seed the corpus never used) are predicted well: measured 1.39 after pretraining."""
    texts = sw.generate_corpus(24, seed=987_654)
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]])
            out = model(input_ids=ids, labels=ids)
            nll += out.loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert math.exp(nll / count) < 1.6


def test_generates_whole_stories(model, tokenizer):
    torch.manual_seed(0)
    starts = ["", "Once upon a time, there was a brave fox named", "In the garden, there lived a"]
    enc = [tokenizer(s, return_tensors="pt")["input_ids"] for s in starts]
    for ids in enc:
        out = model.generate(ids, max_new_tokens=160, do_sample=True, temperature=0.8, top_p=0.95,
                             pad_token_id=tokenizer.pad_token_id)
        assert out[0, -1].item() == tokenizer.eos_token_id  # it stops by itself
        text = tokenizer.decode(out[0], skip_special_tokens=True)
        facts = sw.parse_story(text)
        assert text.endswith(sw.END) and text.count(sw.END) == 1, text
        assert None not in (facts["name"], facts["species"], facts["object"], facts["place"], facts["event"]), text
