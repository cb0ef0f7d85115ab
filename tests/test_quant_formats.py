"""A new 4-bit data type is one entry in quant.FORMATS: quantize, both dequantize paths and the QLoRA layer then
work with it, checked against a float64 nearest-level reference."""

import pytest
import torch

from qlora_tutor import quant
from qlora_tutor.qlora import QLoRALinear


def _uniform_levels() -> torch.Tensor:  # 16 evenly spaced levels on [-1, 1], not symmetric around 0
    return torch.linspace(-1.0, 1.0, 16)


@pytest.fixture
def lin4(monkeypatch):
    monkeypatch.setitem(quant.FORMATS, "lin4", quant.Format(_uniform_levels))
    yield "lin4"


def _reference_codes(w: torch.Tensor, levels: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Nearest level (ties to the lower one) of each value scaled by its block's absmax, in float64."""
    flat = w.reshape(-1).double()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(1, keepdim=True).clamp(min=1e-38)
    scaled = (blocks.float() * (1.0 / absmax.float())).double().reshape(-1)[:n]  # bitsandbytes' fp32 x * (1/absmax)
    dist = (scaled[:, None] - levels.double()[None, :]).abs()
    return dist.argmin(1)  # argmin returns the first (lower) index on ties


@pytest.mark.parametrize("shape", [(64, 64), (37, 23), (5, 129)])
def test_a_new_format_quantizes_to_the_nearest_level(lin4, shape):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape)
    q = quant.quantize(w, lin4, 64)
    codes = torch.stack([q.packed >> 4, q.packed & 15], 1).reshape(-1)[:w.numel()].long()
    assert torch.equal(codes, _reference_codes(w, _uniform_levels(), 64))
    expect = (_uniform_levels()[codes].view(-1) * q.scales().repeat_interleave(64)[:w.numel()]).view(shape)
    assert torch.equal(q.dequantize(backend="torch"), expect)
    assert torch.equal(q.dequantize(), expect)  # the native kernel too, where it is built
    assert quant.codebook(lin4).tolist() == _uniform_levels().tolist()


def test_a_new_format_works_in_the_qlora_layer_but_not_in_bitsandbytes(lin4):
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(torch.nn.Linear(64, 32), r=4, alpha=8, quant_type=lin4, compute_dtype="fp32")
    assert layer(torch.randn(3, 64)).shape == (3, 32)
    with pytest.raises(ValueError, match="bitsandbytes has no lin4"):
        quant.quantize(torch.randn(64), lin4).to_bitsandbytes()
    with pytest.raises(ValueError, match="unknown quant_type 'lin5'"):
        quant.quantize(torch.randn(64), "lin5")
