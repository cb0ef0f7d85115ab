"""Merging on the real model: SmolLM2 with a (random, non-zero) QLoRA adapter, merged into the dequantized 4-bit
weights, computes what base + adapter computes (fp32: to float rounding; saved in bf16: to bf16 rounding); and
llama.cpp's Q4_1 round trip used to measure merging in place."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from qlora_tutor import finetune, merge, models, perplexity, real_model
from real_model_helpers import smollm_dir  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def trained_run(smollm_dir, tmp_path_factory):
    """A saved run whose adapter has random non-zero A and B (as after training), without spending time training."""
    from peft import get_peft_model
    run = tmp_path_factory.mktemp("run")
    cfg = finetune.FinetuneConfig(model="smollm2-135m", r=4, lora_alpha=8, output=str(run))
    base = models.load_base(str(smollm_dir), "qlora", torch.float32, "nf4", True)
    lora = finetune.lora_config(cfg)
    lora.init_lora_weights = False  # B random too: the update is not zero
    torch.manual_seed(0)
    peft_model = get_peft_model(finetune._prepare_base_only(base, cfg), lora).eval()
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.mul_(0.3)  # an update of a realistic size: a few % of the weights
    (run / "adapter").mkdir()
    peft_model.save_pretrained(run / "adapter")
    (run / "adapter" / "run_config.json").write_text(json.dumps(asdict(cfg)))
    return run, peft_model


def test_merged_model_computes_base_plus_adapter(trained_run):
    run, peft_model = trained_run
    tokenizer = models.load_tokenizer(str(real_model.ensure_model()))
    text = perplexity.stdlib_docstrings().text[:2000]
    ids = perplexity.token_windows(tokenizer, text, 96, 1)
    merged, _, cfg = merge.merged_model(run, "dequantized")
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits.double()
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            no_adapter = base(input_ids=ids).logits.double()
        got32 = merged(input_ids=ids).logits.double()
        got16 = merged.to(torch.bfloat16)(input_ids=ids).logits.double()
    update = (ref - no_adapter).norm()
    assert update > 0.05 * ref.norm(), "the adapter changes the logits (the test would be empty otherwise)"
    assert (got32 - ref).norm() < 1e-4 * ref.norm()          # fp32 merge: float rounding only
    err16 = (got16 - ref).norm()
    assert err16 < 0.03 * ref.norm() and err16 < 0.2 * update  # bf16: rounding, much smaller than the update
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight


def test_q4_1_round_trip_is_a_4_bit_grid_per_block_of_32():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 96, generator=g) * 0.05
    back = real_model.q4_1_round_trip(w)
    assert back.shape == w.shape and back.dtype == w.dtype
    for block, orig in zip(back.reshape(-1, 32), w.reshape(-1, 32)):
        assert len(torch.unique(block)) <= 16
        step = (orig.max() - orig.min()) / 15
        assert (block - orig).abs().max() <= step * 0.5 + 1e-3 * step + 1e-4  # nearest level (fp16 scale rounding)
    assert torch.equal(real_model.q4_1_round_trip(back), back) or (real_model.q4_1_round_trip(back) - back).abs().max() < 1e-3
    with pytest.raises(ValueError, match="multiple of 32"):
        real_model.q4_1_round_trip(torch.zeros(3, 40))
