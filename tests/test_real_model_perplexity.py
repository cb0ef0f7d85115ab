"""qlora_tutor.perplexity: the metric against float64 math, the data types against their definitions, the swap of
quantized weights undone bit for bit, and the held-out text (size, no code, stable)."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_tutor import perplexity as P
from qlora_tutor.quant import quantize
from real_model_helpers import smollm_dir  # noqa: F401  (fixture)


def tiny_llama(seed: int = 0, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_perplexity_equals_float64_reference_over_windows_and_batches():
    model = tiny_llama()
    windows = torch.randint(0, 300, (5, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows).logits.double(), dim=-1)
    nll = -logp[:, :-1].gather(-1, windows[:, 1:].unsqueeze(-1)).mean().item()
    for batch in (1, 2, 5):  # the ragged last batch must count its tokens right
        assert P.perplexity(model, windows, batch_size=batch) == pytest.approx(math.exp(nll), rel=1e-5)


def test_token_windows_cut_and_errors():
    class Tok:
        def __call__(self, text, add_special_tokens=False, verbose=True):
            return {"input_ids": [ord(c) for c in text]}
    w = P.token_windows(Tok(), "abcdefghij", window=4)
    assert w.tolist() == [[97, 98, 99, 100], [101, 102, 103, 104]]
    assert P.token_windows(Tok(), "abcdefghij", 4, max_windows=1).shape == (1, 4)
    with pytest.raises(ValueError, match="fewer than one window"):
        P.token_windows(Tok(), "abc", 4)
    with pytest.raises(ValueError, match="at least 2"):
        P.token_windows(Tok(), "abc", 1)
    with pytest.raises(ValueError, match="shape"):
        P.perplexity(tiny_llama(), torch.zeros(8, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_tensor_formula_against_its_definition(dtype):
    w = (torch.randn(37, 53, generator=torch.Generator().manual_seed(2)) * 0.03).to(dtype)
    got = P.per_tensor_int4(w)
    scale = w.double().abs().max() / 7
    want = (w.double() / scale).round().clamp(-7, 7) * scale
    assert got.dtype == dtype and torch.allclose(got.double(), want.to(dtype).double(), rtol=0, atol=0)
    assert len(torch.unique(got)) <= 15  # 4 bits, symmetric: -7 ... 7


@pytest.mark.parametrize("data_type", [d for d in P.DATA_TYPES if d != "baseline"])
def test_quantized_linears_swaps_and_restores_bit_for_bit(data_type):
    model = tiny_llama(tied=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = dict(P.linear_weights(model))
    assert "lm_head" not in layers and len(layers) == 2 * 7
    with P.quantized_linears(model, data_type) as info:
        for name, layer in layers.items():
            w = before[f"{name}.weight"]
            if data_type == "per_tensor":
                want = P.per_tensor_int4(w)
            else:
                qt, dq = {"nf4_dq": ("nf4", True), "nf4": ("nf4", False), "fp4": ("fp4", False),
                          "int4": ("int4", False)}[data_type]
                want = quantize(w, qt, 64, dq).dequantize()
            assert torch.equal(layer.weight, want), name
        assert torch.equal(model.lm_head.weight, before["lm_head.weight"])  # the head is not a quantized layer
        assert 0 < info["rel_error"] < 0.6
        assert info["bits_per_param"] == pytest.approx({"nf4_dq": 4.127, "per_tensor": 4.0}.get(data_type, 4.5),
                                                       abs=0.02)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} not restored"


def test_quantized_linears_restores_after_an_error():
    model = tiny_llama()
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with P.quantized_linears(model, "nf4"):
            raise RuntimeError("boom")
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, w)
    with pytest.raises(ValueError, match="unknown data type 'nf3'"):
        with P.quantized_linears(model, "nf3"):
            pass


def test_heldout_text_is_prose_stable_and_big_enough(smollm_dir):
    from transformers import AutoTokenizer
    a, b = P.stdlib_docstrings(), P.stdlib_docstrings()
    assert a.sha256 == b.sha256 and a.text == b.text and "PSF" in a.licence
    paragraphs = a.text.split("\n\n")
    assert len(set(paragraphs)) == len(paragraphs)
    assert not any(p.startswith((">>>", " ")) or "\n" in p for p in paragraphs)
    tokens = len(AutoTokenizer.from_pretrained(smollm_dir)(a.text, verbose=False)["input_ids"])
    assert tokens >= 20_000
    with pytest.raises(FileNotFoundError, match="sources"):
        P.stdlib_docstrings(("no_such_module_here",))


def test_on_the_real_model_nf4_costs_little_and_the_per_tensor_formula_a_lot(smollm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(smollm_dir).eval()
    windows = P.token_windows(AutoTokenizer.from_pretrained(smollm_dir), P.stdlib_docstrings().text, 256, 1)
    rows = {r["data_type"]: r["perplexity"] for r in P.table2(model, windows, ("baseline", "nf4", "per_tensor"),
                                                               log=lambda *_: None)}
    assert rows["baseline"] < rows["nf4"] < 2 * rows["baseline"] < rows["per_tensor"]
