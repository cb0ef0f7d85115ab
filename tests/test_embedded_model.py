"""The embedded base model in data/: loads offline as a plain transformers folder, is small, writes stories."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_tutor import data, models, storyworld as sw

MODEL_DIR = models.embedded_model_dir()


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
    """Fresh stories (a seed the corpus never used) are predicted well: 1.42 on 2,000 after pretraining."""
    texts = sw.generate_stories(32, seed=987_654)
    enc = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, enc))
    ids = torch.tensor([e + [tokenizer.pad_token_id] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    labels = ids.masked_fill(mask == 0, -100)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert math.exp(nll.item()) < 1.6


def test_generates_whole_stories(model, tokenizer):
    """Sampled continuations are complete Story World stories: all elements present, 'The end.' reached."""
    torch.manual_seed(0)
    for start, key, value in [("Once upon a time, there was a brave fox named", "species", "fox"),
                              ("In the garden, there lived a", "place", "garden")]:
        ids = tokenizer(start, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=150, do_sample=True, temperature=0.8, top_p=0.95,
                             pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0], skip_special_tokens=True)
        assert sw.END in text, text
        story = text[: text.index(sw.END) + len(sw.END)]
        facts = sw.parse_story(story)
        assert None not in (facts["name"], facts["species"], facts["object"], facts["place"], facts["event"]), text
        assert facts[key] == value, story  # it continues what it was given
