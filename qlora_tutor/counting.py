"""Counting parameters and bytes, one rule for every kind of weight: dense tensors, bitsandbytes' 4-bit
`Params4bit` (packed bytes plus a QuantState) and this package's `QuantizedTensor` (held by qlora.QuantizedLinear).

A 4-bit weight of shape (out, in) counts as out·in parameters, the values it stands for, not as its packed bytes.
(PEFT's print_trainable_parameters doubles a Params4bit's byte count, which matches for even sizes; some QLoRA
scripts halve the trainable count for 4-bit models, which is wrong for fp32 adapters.) Bytes are read from the
tensors' storage, and a storage shared by several weights counts once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from .targets import output_head_names


@dataclass(frozen=True)
class Weight:
    """One weight as stored: how many values it stands for, the tensors holding its data and its constants."""

    name: str
    numel: int
    data: tuple[torch.Tensor, ...]        # the values, or the packed 4-bit codes
    constants: tuple[torch.Tensor, ...]   # quantization constants and code tables (empty for dense weights)
    trainable: bool
    linear: bool                          # the weight of a linear layer (not a bias, embedding or norm)

    @property
    def quantized(self) -> bool:
        return bool(self.constants)


def quant_state_tensors(quant_state: Any) -> tuple[torch.Tensor, ...]:
    """Every tensor of a bitsandbytes QuantState that dequantization needs: absmax, code table, offset and the
    nested state's absmax and code table (double quantization)."""
    nested = getattr(quant_state, "state2", None)
    parts = (quant_state.absmax, quant_state.code, getattr(quant_state, "offset", None),
             getattr(nested, "absmax", None), getattr(nested, "code", None))
    return tuple(t for t in parts if isinstance(t, torch.Tensor))


def _is_packed(obj: Any) -> bool:
    """This package's QuantizedTensor (duck-typed, so this module does not depend on the from-scratch stack)."""
    return hasattr(obj, "packed") and callable(getattr(obj, "constants", None)) and not isinstance(obj, torch.Tensor)


def weights(model: nn.Module) -> Iterator[Weight]:
    """Every weight of `model` once (tied parameters once), with the module that owns it."""
    seen: set[int] = set()
    for mname, module in model.named_modules():
        linear = isinstance(module, nn.Linear)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}" if mname else pname
            qs = getattr(p, "quant_state", None)
            if qs is not None:  # bitsandbytes Params4bit: packed bytes; the real shape is in its QuantState
                yield Weight(name, math.prod(qs.shape), (p.data,), quant_state_tensors(qs), p.requires_grad,
                             linear and pname == "weight")
            else:
                yield Weight(name, p.numel(), (p,), (), p.requires_grad, linear and pname == "weight")
        packed = getattr(module, "weight", None)
        if _is_packed(packed) and id(packed) not in seen:  # our QuantizedLinear: a frozen 4-bit weight
            seen.add(id(packed))
            yield Weight(f"{mname}.weight" if mname else "weight", math.prod(packed.shape), (packed.packed,),
                         tuple(packed.constants()), False, True)


class _Storage:
    """Adds up storage bytes, each storage once."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()

    def __call__(self, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in self.seen:
                self.seen.add(key)
                total += st.nbytes()
        return total


@dataclass(frozen=True)
class ParamCount:
    """Trainable and total parameters; 4-bit weights counted as the parameters they represent (out·in)."""

    trainable: int
    total: int
    quantized: int  # of total, how many are stored in 4 bits

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.trainable_percent:.4f} || stored in 4 bits: {self.quantized:,}")


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable, total and 4-bit parameters of `model` (a 4-bit (out, in) weight is out·in parameters)."""
    trainable = total = quantized = 0
    for w in weights(model):
        total += w.numel
        trainable += w.numel if w.trainable else 0
        quantized += w.numel if w.quantized else 0
    return ParamCount(trainable, total, quantized)


def parameter_bytes(model: nn.Module, buffers: bool = True) -> dict[str, int]:
    """Exact bytes of a model's tensors, by role: trainable, frozen (packed 4-bit data and, unless `buffers` is
    False, buffers such as rotary tables) and quantization constants (absmax, nested absmax, offsets, code tables)."""
    out = {"trainable": 0, "frozen": 0, "quantization_constants": 0}
    count = _Storage()
    for w in weights(model):
        out["trainable" if w.trainable else "frozen"] += count(w.data)
        out["quantization_constants"] += count(w.constants)
    if buffers:
        out["frozen"] += count(list(model.buffers()))
    return out


def weight_bytes(model: nn.Module, other_bytes_per_value: int | None = None) -> int:
    """Bytes of the model's weights: 4-bit codes with their constants, and every other weight as stored, or, with
    `other_bytes_per_value=2`, as it would be stored in 16 bits (how it sits on a GPU)."""
    count, total = _Storage(), 0
    for w in weights(model):
        if w.quantized or other_bytes_per_value is None:
            total += count(w.data) + count(w.constants)
        else:
            total += w.numel * other_bytes_per_value
    return total


@dataclass(frozen=True)
class WeightMemory:
    """Parameters and bytes held by the weights of linear layers, counted from the tensors that hold them."""

    params: int
    nbytes: int

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.params if self.params else 0.0

    def __str__(self) -> str:
        return f"{self.params:,} params in {self.nbytes / 2**20:.3f} MiB = {self.bits_per_param:.3f} bits/param"


def _is_adapter(name: str) -> bool:
    """PEFT keeps its adapters as nn.Linear modules named ...lora_A.<adapter> / ...lora_B.<adapter>."""
    return ".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B."))


def linear_weight_memory(model: nn.Module, include_output_head: bool = False) -> WeightMemory:
    """Bytes held by the base weights of linear layers: dense, ours in 4 bits, or bitsandbytes' Linear4bit.

    4-bit weights count every tensor that dequantization needs. Adapters, biases and (unless asked) the output
    head are left out, so after QLoRA this is the frozen 4-bit body of the model.
    """
    heads = set() if include_output_head else output_head_names(model)
    params = nbytes = 0
    count = _Storage()
    for w in weights(model):
        module = w.name.rsplit(".", 1)[0]
        if not w.linear or _is_adapter(w.name) or module in heads or module.removesuffix(".base_layer") in heads:
            continue
        params += w.numel
        nbytes += count(w.data) + count(w.constants)
    return WeightMemory(params, nbytes)
