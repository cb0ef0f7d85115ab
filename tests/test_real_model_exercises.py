"""Notebook 09's checks accept a correct answer, say 'not done yet' for the untouched TODO, and reject plausible
wrong answers with a message that says what is wrong."""

from __future__ import annotations

import math

import numpy as np
import torch

from qlora_tutor.exercises import base
from qlora_tutor.exercises import real_model as ex


def todo(*args):
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------- perplexity
def good_perplexity(logits, ids):
    return math.exp(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                      ids[:, 1:].reshape(-1)).item())


def test_perplexity_check():
    assert ex.check_perplexity(todo).status == base.NOT_DONE
    assert ex.check_perplexity(good_perplexity)
    unshifted = lambda lg, ids: math.exp(torch.nn.functional.cross_entropy(  # noqa: E731
        lg.reshape(-1, lg.shape[-1]), ids.reshape(-1)).item())
    assert "t+1" in ex.check_perplexity(unshifted).message
    assert "exponential" in ex.check_perplexity(lambda lg, ids: math.log(good_perplexity(lg, ids))).message
    summed = lambda lg, ids: math.exp(torch.nn.functional.cross_entropy(  # noqa: E731
        lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item() / lg.shape[0])
    v = ex.check_perplexity(summed)
    assert v.status == base.WRONG and "expected" in v.message


# --------------------------------------------------------------------------------------------- masking
def good_mask(prompt, response, pad_id, length):
    n = len(prompt) + len(response)
    return prompt + response + [pad_id] * (length - n), [-100] * len(prompt) + response + [-100] * (length - n)


def test_mask_prompt_check():
    assert ex.check_mask_prompt(todo).status == base.NOT_DONE
    assert ex.check_mask_prompt(good_mask)

    def by_id(prompt, response, pad_id, length):  # the pad == EOS trap
        ids, _ = good_mask(prompt, response, pad_id, length)
        labels = [-100] * len(prompt) + [t if t != pad_id else -100 for t in ids[len(prompt):]]
        return ids, labels
    v = ex.check_mask_prompt(by_id)
    assert v.status == base.WRONG and "by position, not by id" in v.message

    def unmasked(prompt, response, pad_id, length):
        ids, labels = good_mask(prompt, response, pad_id, length)
        return ids, prompt + labels[len(prompt):]
    v = ex.check_mask_prompt(unmasked)
    assert v.status == base.WRONG and "labels[0]" in v.message

    def no_padding(prompt, response, pad_id, length):
        return prompt + response, [-100] * len(prompt) + response
    assert "shape" in ex.check_mask_prompt(no_padding).message


# ------------------------------------------------------------------------------------------------- Q4_1
def good_q4_1(block):
    d, m = np.frombuffer(block[:4], dtype=np.float16).astype(np.float32)
    q = np.frombuffer(block[4:], dtype=np.uint8)
    return torch.from_numpy(np.concatenate([q & 15, q >> 4]).astype(np.float32) * d + m)


def test_q4_1_check_against_real_gguf_blocks():
    import gguf
    from real_model_helpers import require_gguf
    reader = gguf.GGUFReader(str(require_gguf()))
    tensor = next(t for t in reader.tensors if t.name == "blk.3.attn_q.weight")
    raw = bytes(tensor.data.reshape(-1)[:40])
    reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1)[:64]
    assert np.array_equal(torch.cat([good_q4_1(raw[:20]), good_q4_1(raw[20:])]).numpy(), reference)
    assert ex.check_q4_1(good_q4_1, [raw[:20], raw[20:]])


def test_q4_1_check_rejects_wrong_layouts():
    assert ex.check_q4_1(todo).status == base.NOT_DONE
    assert ex.check_q4_1(good_q4_1)

    def high_first(block):
        d, m = np.frombuffer(block[:4], dtype=np.float16).astype(np.float32)
        q = np.frombuffer(block[4:], dtype=np.uint8)
        return torch.from_numpy(np.concatenate([q >> 4, q & 15]).astype(np.float32) * d + m)
    assert "wrong way round" in ex.check_q4_1(high_first).message

    def interleaved(block):
        d, m = np.frombuffer(block[:4], dtype=np.float16).astype(np.float32)
        q = np.frombuffer(block[4:], dtype=np.uint8)
        return torch.from_numpy(np.stack([q & 15, q >> 4], axis=1).reshape(-1).astype(np.float32) * d + m)
    assert "2j and 2j + 1" in ex.check_q4_1(interleaved).message

    def no_minimum(block):
        return good_q4_1(block) - torch.from_numpy(np.frombuffer(block[2:4], dtype=np.float16).astype(np.float32))
    v = ex.check_q4_1(no_minimum)
    assert v.status == base.WRONG and "weights[0]" in v.message

    def float64(block):
        return good_q4_1(block).double()
    assert "dtype torch.float64" in ex.check_q4_1(float64).message
