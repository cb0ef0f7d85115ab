"""Compute-dtype choice per device, and the errors a T4 user must see instead of a crash deep in training."""

import pytest
import torch

from qlora_tutor.check import cmp
from qlora_tutor.hardware import DeviceInfo, compute_dtype, detect, parse_dtype, set_seed

T4 = DeviceInfo("cuda", "Tesla T4", bf16=False, total_memory_gb=15.0)
H100 = DeviceInfo("cuda", "NVIDIA H100", bf16=True, total_memory_gb=80.0)
CPU = DeviceInfo("cpu", "x86_64", bf16=False, total_memory_gb=None)


@pytest.mark.parametrize("info,expected", [(T4, torch.float16), (H100, torch.bfloat16), (CPU, torch.float32)])
def test_auto_picks_what_the_paper_would_on_each_device(info, expected):
    assert compute_dtype(None, info) == expected
    assert compute_dtype("auto", info) == expected


def test_bf16_on_a_gpu_without_it_says_to_use_fp16():
    with pytest.raises(ValueError, match="fp16"):
        compute_dtype("bf16", T4)
    assert compute_dtype("fp16", T4) == torch.float16
    assert compute_dtype(torch.bfloat16, H100) == torch.bfloat16


@pytest.mark.parametrize("bad", ["float8", "int4", ""])
def test_unknown_dtype_names_are_rejected_with_the_valid_ones(bad):
    with pytest.raises(ValueError, match="bf16"):
        parse_dtype(bad)


def test_non_float_torch_dtype_is_a_type_error():
    with pytest.raises(TypeError):
        parse_dtype(torch.int8)


def test_detect_matches_torch():
    info = detect()
    assert info.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert str(info)  # printable for the notebooks' environment cell


def test_set_seed_repeats_random_draws():
    set_seed(123)
    a = torch.randn(5)
    set_seed(123)
    assert torch.equal(a, torch.randn(5))


def test_cmp_distinguishes_exact_close_and_different(capsys):
    x = torch.randn(10, dtype=torch.float64)
    assert cmp("same", x, x.clone())
    assert "exact" in capsys.readouterr().out
    assert cmp("close", x, x + 1e-12, rtol=1e-6, atol=1e-9)
    assert "close" in capsys.readouterr().out
    assert not cmp("different", x, x + 1.0)
    assert "DIFFERENT" in capsys.readouterr().out
    assert not cmp("shape", x, x[:5])
