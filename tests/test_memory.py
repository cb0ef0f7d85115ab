"""The memory estimate against the QLoRA paper's figures, exact byte counts of real small models, autograd's
saved tensors, a tensor-level peak measured on CPU, and clear errors on bad input."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_tutor import counting, measure, memory as M
from qlora_tutor.memory import GB, ModelShape, estimate

# awkward small shapes: GQA, tied embeddings with qkv bias (Qwen2-like), odd widths, head_dim != hidden/heads
SHAPES = [
    ModelShape("tiny-gqa", 96, 200, 2, 6, 2, 777),
    ModelShape("tiny-qwen", 64, 176, 2, 4, 1, 500, tied_embeddings=True, qkv_bias=True),
    ModelShape("tiny-mha", 80, 144, 3, 5, 5, 301, head_dim=24),
]


# ---------------------------------------------------------------------------------------------- paper figures
def test_nf4_double_quant_bits_per_param_match_paper():
    # paper §3: 32/64 = 0.5 bit of constants without DQ; 8/64 + 32/(64*256) = 0.127 with DQ -> 4.127 bits
    assert M.bits_per_param("nf4", True) == pytest.approx(4.127, abs=5e-4)
    assert M.bits_per_param("nf4", False) == 4.5
    n = 4096 * 11008  # a real LLaMA-7B MLP weight: byte counts as stored give the same figure
    packed, consts = M.quantized_bytes(n, "nf4", True)
    # (+0.0002 bit: the per-layer code tables and offset, 1092 bytes)
    assert 8 * (packed + consts) / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=3e-4)
    packed, consts = M.quantized_bytes(n, "nf4", False)
    assert 8 * (packed + consts) / n == pytest.approx(4.5, abs=1e-4)


def test_paper_65b_qlora_fits_48gb_and_full_needs_over_780gb():
    # paper §1: QLoRA 65B "<48GB" (batch 1, seq 512, gradient checkpointing, paged AdamW, LoRA r=64 on all linear
    # layers with bf16 adapters as in the paper's qlora.py); 16-bit full fine-tuning ">780GB" (bf16 weights and
    # gradients + fp32 AdamW m and v = 12 bytes per parameter, plus activations)
    q = estimate("llama-65b", "qlora", lora_r=64, lora_targets="all-linear", adapter_dtype="bf16",
                 optimizer="paged_adamw_32bit", batch_size=1, seq_len=512, gradient_checkpointing=True)
    assert 40 * GB < q.on_card < 48 * GB
    f = estimate("llama-65b", "full", weight_dtype="bf16", optimizer="adamw_32bit", gradient_checkpointing=True)
    assert f.total > 780 * GB
    assert f.components["optimizer_state"] == 8 * f.settings["n_params"]
    # DQ saves ~0.373 bit/param, "approximately 3 GB for a 65B model" (paper §1)
    no_dq = estimate("llama-65b", "qlora", double_quant=False)
    saved = no_dq.components["quantization_constants"] - q.components["quantization_constants"]
    assert saved == pytest.approx(0.373 * 65e9 / 8, rel=0.03)


def test_known_parameter_counts():
    # published sizes: LLaMA 6.7B / 13.0B / 32.5B / 65.2B, Llama-2 70B 69.0B, Mistral 7.24B, Qwen2.5 0.49B / 1.54B
    expected = {"llama-7b": 6.74e9, "llama-13b": 13.0e9, "llama-33b": 32.5e9, "llama-65b": 65.2e9,
                "llama-2-70b": 69.0e9, "mistral-7b": 7.24e9, "qwen2.5-0.5b": 0.494e9, "qwen2.5-1.5b": 1.54e9}
    for name, n in expected.items():
        assert M.KNOWN_MODELS[name].n_params == pytest.approx(n, rel=0.01), name


# ---------------------------------------------------------------------------------------------- exact counts
def _est(shape, method, dt, **kw):
    return estimate(shape, method, weight_dtype=dt, device="cpu", **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_weights_adapters_constants_exact(shape, method):
    for dt, tdt, qt, dq, r, targets in [("bf16", torch.bfloat16, "nf4", True, 8, "all-linear"),
                                        ("fp32", torch.float32, "fp4", False, 3, ["q_proj", "down_proj"])]:
        model = measure.build_training_model(shape, method, dtype=tdt, lora_r=r, lora_targets=targets, quant_type=qt,
                                       double_quant=dq, gradient_checkpointing=False)
        got = counting.parameter_bytes(model)
        est = _est(shape, method, dt, lora_r=r, lora_targets=targets, quant_type=qt, double_quant=dq)
        c = est.components
        assert got["quantization_constants"] == c["quantization_constants"]
        if method == "full":
            assert got["trainable"] + got["frozen"] == c["frozen_weights"]
            assert got["trainable"] == c["gradients"]
        else:
            assert got["frozen"] == c["frozen_weights"]
            assert got["trainable"] == c["adapter_weights"] == c["gradients"]
            n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert n_trainable == est.details["trainable_params"]


@pytest.mark.parametrize("optimizer", ["adamw_32bit", "adamw_8bit"])
def test_optimizer_state_exact(optimizer):
    shape = ModelShape("opt", 128, 256, 1, 4, 4, 300)  # tensors on both sides of bnb's 4096-value 8-bit cut-off
    for method, r in (("full", 8), ("lora", 4), ("lora", 40)):
        model = measure.build_training_model(shape, method, dtype=torch.float32, lora_r=r, gradient_checkpointing=False)
        got = measure.measure(model, seq_len=8, steps=1, optimizer=optimizer)
        est = _est(shape, method, "fp32", lora_r=r, optimizer=optimizer, seq_len=8)
        assert got.optimizer_state == est.components["optimizer_state"], (method, r)


# ---------------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("seed", [0, 1])
def test_saved_activations_match_autograd(seed):
    # independent reference: the distinct tensors autograd saves (saved_tensors_hooks), counted byte by byte;
    # the estimate leaves out a few integer tensors (token ids, labels): allow 32 bytes per token
    torch.manual_seed(seed)
    for k, shape in enumerate(SHAPES):
        T = int(torch.randint(17, 70, ()).item())
        for method in ("full", "lora", "qlora"):
            dt, tdt = (("bf16", torch.bfloat16), ("fp32", torch.float32))[(k + seed) % 2]
            model = measure.build_training_model(shape, method, dtype=tdt, lora_r=4, gradient_checkpointing=False)
            ids = torch.randint(0, shape.vocab, (1, T))
            got = measure.saved_activation_bytes(model, ids)
            want = _est(shape, method, dt, lora_r=4, seq_len=T,
                        gradient_checkpointing=False).details["saved_activations_no_gc"]
            assert abs(got - want) <= 32 * T, (shape.name, method, dt, got, want)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_peak_matches_tracked_cpu_peak(method):
    # CPU stand-in for max_memory_allocated: parameters + peak of live tensor storages over 2 training steps
    shape = SHAPES[1]
    for gc, dt, tdt in ((False, "bf16", torch.bfloat16), (True, "fp32", torch.float32)):
        model = measure.build_training_model(shape, method, dtype=tdt, lora_r=8, gradient_checkpointing=gc)
        got = measure.measure(model, batch_size=2, seq_len=24, steps=2)
        est = _est(shape, method, dt, lora_r=8, batch_size=2, seq_len=24, gradient_checkpointing=gc)
        assert est.total == pytest.approx(got.peak, rel=0.04), (method, gc, est.total, got.peak)
        assert got.rss_peak > got.peak  # the process holds far more than its tensors


def test_gradient_checkpointing_and_qlora_shrink_memory():
    big = [estimate("llama-7b", m, gradient_checkpointing=gc) for m in ("full", "lora", "qlora") for gc in (0, 1)]
    full_off, full_on, lora_off, lora_on, q_off, q_on = (e.total for e in big)
    assert full_on <= full_off and lora_on < lora_off and q_on < q_off  # full: gradients set the peak
    assert q_on < lora_on < full_on
    # activations grow linearly with batch*seq when nothing else changes
    a1 = estimate("llama-7b", "qlora", batch_size=1, seq_len=512, gradient_checkpointing=False)
    a4 = estimate("llama-7b", "qlora", batch_size=2, seq_len=1024, gradient_checkpointing=False)
    assert a4.components["activations"] == pytest.approx(4 * a1.components["activations"], rel=1e-6)


def test_tracker_counts_exactly():
    with measure.TensorMemoryTracker() as tr:
        a = torch.empty(1000, dtype=torch.float32)
        b = torch.empty(500, dtype=torch.bfloat16)
        v = a.view(10, 100).t()  # a view: no new storage
        assert tr.live == 4000 + 1000
        del b
        assert tr.live == 4000 and tr.peak == 5000
        c = torch.empty(3000, dtype=torch.uint8)
    assert tr.peak == 7000 and tr.live == 7000
    del a, v, c


def test_report_and_dict():
    est = estimate("mistral-7b", "qlora", optimizer="paged_adamw_8bit")
    text = est.report()
    assert "mistral-7b" in text and "GB" in text and "paged" in text
    d = est.as_dict()
    assert d["total"] == est.total and d["on_card"] > est.total
    assert est.total <= sum(est.components.values())
    assert math.isfinite(est.total / GB)


def test_config_sources(tmp_path):
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    a = estimate(cfg, "lora", lora_r=4)
    cfg.save_pretrained(tmp_path)
    b = estimate(tmp_path, "lora", lora_r=4)
    c = estimate(str(tmp_path / "config.json"), "lora", lora_r=4)
    assert a.total == b.total == c.total


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(config="llama-8b"), "llama-7b"),            # unknown name lists the known ones
    (dict(method="prefix"), "qlora, lora, full"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=-2), "batch_size"),
    (dict(seq_len=0), "seq_len"),
    (dict(lora_r=5000), "smallest side"),             # r larger than a layer
    (dict(lora_r=0), "lora_r"),
    (dict(optimizer="adam"), "adamw_32bit"),
    (dict(weight_dtype="int8"), "bf16"),
    (dict(quant_type="int4"), "nf4"),
    (dict(lora_targets=["qkv"]), "q_proj"),
])
def test_bad_input_is_explained(kwargs, match):
    args = dict(config="llama-7b", method="qlora") | kwargs
    with pytest.raises(ValueError, match=match):
        estimate(args.pop("config"), args.pop("method"), **args)


def test_bad_config_type_and_measure_input():
    with pytest.raises(TypeError, match="PretrainedConfig"):
        estimate(42, "lora")
    with pytest.raises(TypeError, match="nn.Module or a callable"):
        measure.measure("model")
    with pytest.raises(ValueError, match="steps"):
        measure.measure(lambda: None, steps=0)
