"""Merging: the merged 16-bit model computes what base + adapter computed; merging into 4-bit weights does not."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from qlora_tutor import finetune, merge, models
from test_finetune import tiny_setup, trained_run


@pytest.fixture(scope="module")
def qlora_model():
    out, _ = trained_run()
    model, tokenizer, cfg = finetune.load_trained(out)
    return out, model


def _ids(seed: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (3, 17), generator=g)


@torch.no_grad()
def test_merged_model_computes_what_the_4bit_base_plus_adapter_computed(qlora_model):
    out, model = qlora_model
    merged, _, _ = merge.merged_model(out, base="dequantized")
    assert not any("Linear4bit" in type(m).__name__ or hasattr(m, "lora_A") for m in merged.modules())
    for seed in range(3):
        x = _ids(seed, model.config.vocab_size)
        reference, ours = model(input_ids=x).logits, merged(input_ids=x).logits
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            assert (model(input_ids=x).logits - reference).abs().max() > 1e-3, "the adapter changed nothing"


@torch.no_grad()
def test_dequantized_base_is_bitsandbytes_dequantize(qlora_model):
    import bitsandbytes.functional as bnbf
    out, model = qlora_model
    merged, _, _ = merge.merged_model(out, base="dequantized")
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    w = layer.base_layer.weight
    expected = bnbf.dequantize_4bit(w.data, w.quant_state).float() + layer.get_delta_weight("default")
    torch.testing.assert_close(merged.model.layers[1].mlp.down_proj.weight, expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_merge_onto_the_original_weights_matches_peft_on_the_fp32_base(qlora_model):
    from peft import PeftModel
    out, _ = qlora_model
    merged, _, cfg = merge.merged_model(out, base="original")
    base = models.load_base(cfg.model, "lora", torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    x = _ids(7, base.config.vocab_size)
    torch.testing.assert_close(merged(input_ids=x).logits, peft_model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_saved_merged_model_is_16bit_safetensors_and_loads_without_peft(qlora_model, tmp_path):
    from transformers import AutoModelForCausalLM
    out, model = qlora_model
    dest = merge.merge_adapter(out, tmp_path / "merged", save_dtype="bf16", log=lambda s: None)
    files = list(dest.glob("*.safetensors"))
    assert files and not list(dest.glob("*.bin"))
    with safe_open(str(files[0]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert "quantization_config" not in json.loads((dest / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    x = _ids(3, model.config.vocab_size)
    with torch.no_grad():
        diff = (loaded(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()
    assert diff < 0.05, f"bf16 storage should only add bf16 rounding, got {diff}"
    with pytest.raises(ValueError, match="already holds a model"):
        merge.merge_adapter(out, dest, log=lambda s: None)


@torch.no_grad()
def test_merging_into_4bit_weights_in_place_loses_much_more_than_16bit_storage(qlora_model):
    out, model = qlora_model
    err = merge.requantization_error(model)
    assert err["requant_4bit"] > 20 * err["round_16bit"], err
    # the same seen in outputs: PEFT's in-place merge re-quantizes W + ΔW to 4 bits
    merged_16, _, _ = merge.merged_model(out, base="dequantized")
    in_place = copy.deepcopy(model).merge_and_unload()
    x = _ids(11, model.config.vocab_size)
    reference = model(input_ids=x).logits
    err_16 = (merged_16.to(torch.bfloat16).float()(input_ids=x).logits - reference).abs().max().item()
    err_4 = (in_place(input_ids=x).logits - reference).abs().max().item()
    assert err_4 > 3 * err_16, (err_4, err_16)


def test_a_full_fine_tune_has_nothing_to_merge(tmp_path):
    run = tmp_path / "full"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "model" / "run_config.json").write_text(json.dumps({"method": "full", "model": str(tiny_setup() / "model")}))
    with pytest.raises(ValueError, match="no adapter to merge"):
        merge.merged_model(run)
