"""Notebook 10's exercise checks accept the right answers and reject plausible wrong ones with a useful message."""

from __future__ import annotations

import pytest
import torch

from qlora_tutor.exercises import base
from qlora_tutor.exercises.kernels import check_bytes_moved, check_unpack_kernel
from qlora_tutor.triton_kernels import dequantize_bytes

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


def interpreted(fn):
    from triton.runtime.interpreter import InterpretedFunction
    return InterpretedFunction(fn)


def unpack_right(packed_ptr, high_ptr, low_ptr, n_bytes, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_bytes
    byte = tl.load(packed_ptr + offsets, mask=mask)
    tl.store(high_ptr + offsets, byte >> 4, mask=mask)
    tl.store(low_ptr + offsets, byte & 15, mask=mask)


def unpack_swapped(packed_ptr, high_ptr, low_ptr, n_bytes, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_bytes
    byte = tl.load(packed_ptr + offsets, mask=mask)
    tl.store(high_ptr + offsets, byte & 15, mask=mask)
    tl.store(low_ptr + offsets, byte >> 4, mask=mask)


def unpack_unmasked(packed_ptr, high_ptr, low_ptr, n_bytes, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    byte = tl.load(packed_ptr + offsets)
    tl.store(high_ptr + offsets, byte >> 4)
    tl.store(low_ptr + offsets, byte & 15)


def unpack_no_program_offset(packed_ptr, high_ptr, low_ptr, n_bytes, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)  # every program writes the first block
    mask = offsets < n_bytes
    byte = tl.load(packed_ptr + offsets, mask=mask)
    tl.store(high_ptr + offsets, byte >> 4, mask=mask)
    tl.store(low_ptr + offsets, byte & 15, mask=mask)


def unpack_wrong_shift(packed_ptr, high_ptr, low_ptr, n_bytes, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_bytes
    byte = tl.load(packed_ptr + offsets, mask=mask)
    tl.store(high_ptr + offsets, byte >> 3, mask=mask)
    tl.store(low_ptr + offsets, byte & 15, mask=mask)


def unpack_todo(packed_ptr, high_ptr, low_ptr, n_bytes, BLOCK: tl.constexpr):
    raise NotImplementedError


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_unpack_check_accepts_the_right_kernel():
    v = check_unpack_kernel(interpreted(unpack_right))
    assert v and "interpreter" in v.message


@pytest.mark.parametrize("fn,status,words", [
    (unpack_todo, base.NOT_DONE, "TODO"),
    (unpack_swapped, base.WRONG, "swapped"),
    (unpack_unmasked, base.WRONG, "past the end"),
    (unpack_no_program_offset, base.WRONG, "never written"),
    (unpack_wrong_shift, base.WRONG, "high nibbles"),
])
def test_unpack_check_rejects_wrong_kernels_with_a_reason(fn, status, words):
    v = check_unpack_kernel(interpreted(fn))
    assert v.status == status and words in str(v), str(v)


def test_unpack_check_explains_a_gpu_kernel_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET")  # so that triton.jit compiles for a GPU instead of interpreting
    v = check_unpack_kernel(triton.jit(unpack_right))
    assert v.status == base.WRONG and "TRITON_INTERPRET" in v.message
    assert "Triton kernel" in check_unpack_kernel(lambda x: x).message


def test_bytes_moved_check():
    assert check_bytes_moved(dequantize_bytes)
    assert check_bytes_moved(lambda n, bs, ob, dq: (_ for _ in ()).throw(NotImplementedError())).status == \
        base.NOT_DONE
    no_constants = check_bytes_moved(lambda n, bs, ob, dq: (n + 1) // 2 + n * ob)
    assert no_constants.status == base.WRONG and "block constants" in no_constants.message
    fp32_constants = check_bytes_moved(lambda n, bs, ob, dq: dequantize_bytes(n, bs, ob, False))
    assert fp32_constants.status == base.WRONG and "1 byte (uint8)" in fp32_constants.message
    no_nested = check_bytes_moved(lambda n, bs, ob, dq: (n + 1) // 2 + -(-n // bs) * (1 if dq else 4) + n * ob)
    assert no_nested.status == base.WRONG and "nested" in no_nested.message
    fp32_out = check_bytes_moved(lambda n, bs, ob, dq: dequantize_bytes(n, bs, 4, dq))
    assert fp32_out.status == base.WRONG and "not 4" in fp32_out.message
    assert "return a number" in check_bytes_moved(lambda *a: "many").message
