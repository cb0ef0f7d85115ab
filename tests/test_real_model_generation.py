"""Generation on a 4-bit model on the CPU dequantizes each weight once (generation.dequantize_once), and computes
bit for bit what bitsandbytes' own forward computes; the answers are the same tokens."""

from __future__ import annotations

import torch

from qlora_tutor import generation, models
from real_model_helpers import smollm_dir  # noqa: F401  (fixture)


def test_dequantize_once_is_bit_exact_and_restores(smollm_dir):
    from peft import get_peft_model
    from qlora_tutor import finetune
    base = models.load_base(str(smollm_dir), "qlora", torch.float32, "nf4", True)
    cfg = finetune.FinetuneConfig(model="smollm2-135m", r=4)
    lora = finetune.lora_config(cfg)
    lora.init_lora_weights = False
    torch.manual_seed(0)
    model = get_peft_model(finetune._prepare_base_only(base, cfg), lora).eval()
    tokenizer = models.load_tokenizer(str(smollm_dir))
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog, and then")["input_ids"]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with generation.dequantize_once(model) as n:
            fast = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert n == 210
    assert torch.equal(fast, ref) and torch.equal(again, ref)
    assert not any("forward" in vars(m) for m in model.modules())  # the layers' own forward is back
    with generation.dequantize_once(model, max_bytes=1000) as n:
        assert n == 0  # copies that would not fit: nothing changes
    example = {"instruction": "Write a short story about a fox named Milo.", "input": ""}
    slow = generation._generate(model, tokenizer, [example], 12, 1, False, ids.device)
    assert generation.generate(model, tokenizer, [example], max_new_tokens=12) == slow
