"""A Colab T4 and a V100 (simulated: CUDA's device queries mocked) get fp16, all the way down to what the Trainer,
BitsAndBytesConfig and the adapters receive; an A100 or H100 gets bf16.

The mock makes `torch.cuda.is_bf16_supported()` answer True on every simulated GPU, as torch's default
(including_emulation=True) does on a real T4: the dtype must come from the compute capability instead.
"""

from __future__ import annotations

import contextlib
import types
from unittest import mock

import pytest
import torch

from qlora_tutor import finetune, hardware, models
from test_finetune import tiny_config

GPUS = {  # name, compute capability, GiB, the compute dtype 'auto' must pick
    "Tesla T4": ((7, 5), 15, torch.float16),
    "Tesla V100-SXM2-16GB": ((7, 0), 16, torch.float16),
    "NVIDIA A100-SXM4-40GB": ((8, 0), 40, torch.bfloat16),
    "NVIDIA H100 80GB HBM3": ((9, 0), 80, torch.bfloat16),
}


def _reset_accelerate() -> None:
    """TrainingArguments sets up accelerate's process-wide state: forget the simulated GPU afterwards."""
    from accelerate.state import AcceleratorState, PartialState
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@contextlib.contextmanager
def simulated_gpu(name: str):
    capability, gib, _ = GPUS[name]
    from transformers import Trainer, TrainingArguments  # noqa: F401  (imported before CUDA is faked)
    props = types.SimpleNamespace(name=name, total_memory=gib * 2**30, major=capability[0], minor=capability[1])
    _reset_accelerate()
    try:
        with mock.patch.object(torch.cuda, "is_available", return_value=True), \
                mock.patch.object(torch.cuda, "device_count", return_value=1), \
                mock.patch.object(torch.cuda, "get_device_properties", return_value=props), \
                mock.patch.object(torch.cuda, "get_device_capability", return_value=capability), \
                mock.patch.object(torch.cuda, "is_bf16_supported", return_value=True), \
                mock.patch.object(torch.cuda, "set_device"):
            yield
    finally:
        _reset_accelerate()


@pytest.mark.parametrize("name", GPUS)
def test_auto_dtype_follows_the_compute_capability_not_emulated_bf16(name):
    capability, _, want = GPUS[name]
    with simulated_gpu(name):
        info = hardware.detect()
        assert info.device == "cuda" and info.name == name
        assert info.bf16 == (want == torch.bfloat16)
        assert hardware.compute_dtype() == want
        assert ("NOT supported" in str(info)) == (want == torch.float16)


@pytest.mark.parametrize("name", ["Tesla T4", "Tesla V100-SXM2-16GB"])
def test_bf16_is_refused_up_front_on_turing_and_volta(name, tmp_path):
    with simulated_gpu(name):
        with pytest.raises(ValueError, match="fp16"):
            hardware.compute_dtype("bf16")
        with pytest.raises(ValueError, match="no bfloat16"):
            finetune.check_config(tiny_config(tmp_path / "run", dtype="bf16"))


@pytest.mark.parametrize("name", GPUS)
def test_trainer_arguments_get_the_right_mixed_precision(name, tmp_path):
    _, _, want = GPUS[name]
    with simulated_gpu(name):
        cfg = tiny_config(tmp_path / "run")
        _, compute = finetune.check_config(cfg)
        args = finetune.training_arguments(cfg, compute, str(tmp_path / "ckpt"))
        assert compute == want
        assert (args.fp16, args.bf16) == (want == torch.float16, want == torch.bfloat16)
        assert not args.use_cpu and "paged_adamw" in str(args.optim).lower()


@pytest.mark.parametrize("name", ["Tesla T4", "NVIDIA A100-SXM4-40GB"])
def test_bitsandbytes_config_gets_the_compute_dtype(name, tmp_path):
    """What load_base hands to from_pretrained on that GPU: the 4-bit config with its compute dtype."""
    _, _, want = GPUS[name]
    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return torch.nn.Linear(2, 2)

    with simulated_gpu(name):
        cfg = tiny_config(tmp_path / "run")
        model_path, compute = finetune.check_config(cfg)
        with mock.patch("transformers.AutoModelForCausalLM.from_pretrained", side_effect=fake_from_pretrained):
            models.load_base(model_path, "qlora", compute)
    q = seen["quantization_config"]
    assert q.bnb_4bit_compute_dtype == want and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert seen["device_map"] == {"": 0}


def test_adapters_stay_fp32_on_an_fp16_base_chosen_for_a_t4(tmp_path):
    """fp16 mixed precision needs fp32 trainable weights ('Attempting to unscale FP16 gradients' otherwise)."""
    with simulated_gpu("Tesla T4"):
        cfg = tiny_config(tmp_path / "run", method="lora")
        model_path, compute = finetune.check_config(cfg)
    assert compute == torch.float16
    base = models.load_base(model_path, "lora", compute)  # built on the CPU: only dtypes are looked at
    model = finetune.prepare_for_training(base, cfg)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}, trainable
    assert frozen == {torch.float16}


def test_capability_threshold():
    assert not hardware.has_native_bf16((7, 5)) and not hardware.has_native_bf16((7, 0))
    assert hardware.has_native_bf16((8, 0)) and hardware.has_native_bf16((8, 6)) and hardware.has_native_bf16((12, 0))
