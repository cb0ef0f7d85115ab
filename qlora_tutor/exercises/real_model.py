"""Checks for notebook 09 (a real model): perplexity from logits, masking the prompt out of the labels, and
llama.cpp's Q4_1 blocks (what SmolLM2's GGUF stores). Each check runs the learner's function on fresh inputs and
compares it with an independent reference."""

from __future__ import annotations

import math

import torch

from .base import check, compare, expect, run, wrong

IGNORE_INDEX = -100


def _perplexity_reference(logits: torch.Tensor, ids: torch.Tensor) -> float:
    lp = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return math.exp(nll.mean().item())


@check("perplexity from logits")
def check_perplexity(fn) -> str:
    """fn(logits (batch, length, vocab), ids (batch, length)) -> float: exp(mean cross-entropy of next tokens)."""
    g = torch.Generator().manual_seed(9)
    for batch, length, vocab in ((1, 2, 5), (3, 17, 50), (2, 64, 1000)):
        logits = torch.randn(batch, length, vocab, generator=g) * 3
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        got = run(fn, logits.clone(), ids.clone())
        if isinstance(got, torch.Tensor):
            expect(got.numel() == 1, f"return one number, got a tensor of shape {tuple(got.shape)}")
            got = got.item()
        expect(isinstance(got, (float, int)), f"return a float, got {type(got).__name__}")
        want = _perplexity_reference(logits, ids)
        if abs(got - want) > 1e-4 * want:
            shifted = math.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids.reshape(-1)).item())
            if abs(got - shifted) < 1e-4 * shifted:
                wrong("position t's logits predict token t+1: compare logits[:, :-1] with ids[:, 1:], not the "
                      "same positions")
            if abs(got - math.log(want)) < 1e-4:
                wrong(f"that is the mean cross-entropy ({got:.4f}); perplexity is its exponential")
            wrong(f"for shape {(batch, length, vocab)} got {got:.6g}, expected {want:.6g}")
    return "matches exp(mean next-token cross-entropy) in float64 on three shapes"


@check("mask the prompt")
def check_mask_prompt(fn) -> str:
    """fn(prompt_ids, response_ids, pad_id, length) -> (input_ids, labels): prompt then response then padding to
    `length`; labels -100 on the prompt and on the padding, the response's ids (end-of-turn included) elsewhere."""
    g = torch.Generator().manual_seed(3)
    cases = [(5, 4, 12), (1, 1, 2), (9, 6, 15), (3, 7, 10)]
    for n_prompt, n_resp, length in cases:
        pad = 2  # as in SmolLM2: the pad token IS the end-of-turn token
        prompt = torch.randint(3, 100, (n_prompt,), generator=g).tolist()
        response = torch.randint(3, 100, (n_resp - 1,), generator=g).tolist() + [pad]
        got = run(fn, list(prompt), list(response), pad, length)
        expect(isinstance(got, tuple) and len(got) == 2, "return a tuple (input_ids, labels)")
        ids, labels = (torch.as_tensor(x) for x in got)
        want_ids = torch.tensor(prompt + response + [pad] * (length - n_prompt - n_resp))
        want_labels = torch.tensor([IGNORE_INDEX] * n_prompt + response + [IGNORE_INDEX] * (length - n_prompt - n_resp))
        compare("input_ids", ids.long(), want_ids, check_dtype=False)
        if labels.shape == want_labels.shape and labels[n_prompt + n_resp - 1] == IGNORE_INDEX:
            wrong("the end-of-turn token at the end of the response is masked: with pad == end-of-turn, masking "
                  "every position whose id is pad_id masks it too, and the model never learns to stop. Mask the "
                  "padding by position, not by id")
        compare("labels", labels.long(), want_labels, check_dtype=False)
    return "prompt and padding masked, the response and its end-of-turn token kept, also when pad == end-of-turn"


def _q4_1_reference(block: bytes) -> torch.Tensor:
    import numpy as np
    d, m = np.frombuffer(block[:4], dtype=np.float16).astype(np.float32)
    q = np.frombuffer(block[4:20], dtype=np.uint8)
    codes = np.concatenate([q & 0x0F, q >> 4]).astype(np.float32)
    return torch.from_numpy(codes * d + m)


@check("dequantize a Q4_1 block")
def check_q4_1(fn, blocks: list[bytes] | None = None) -> str:
    """fn(block: 20 bytes) -> float32 tensor of 32 weights (llama.cpp's Q4_1: fp16 scale d, fp16 minimum m, then 16
    bytes of codes q, weight = d * q + m; byte j holds weight j in its low nibble and weight j + 16 in its high)."""
    import numpy as np
    g = np.random.default_rng(5)
    tests = list(blocks or [])
    for _ in range(4):  # fresh random blocks too
        d, m = np.array([g.uniform(0.001, 0.05), g.uniform(-0.5, 0.0)], dtype=np.float16)
        tests.append(d.tobytes() + m.tobytes() + g.integers(0, 256, 16, dtype=np.uint8).tobytes())
    for block in tests:
        got = run(fn, block)
        want = _q4_1_reference(block)
        if isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == torch.float32:
            swapped = _q4_1_reference(block[:4] + bytes(((b & 15) << 4) | (b >> 4) for b in block[4:]))
            if torch.allclose(got, swapped, atol=1e-6) and not torch.allclose(want, swapped):
                wrong("the nibbles are the wrong way round: the LOW nibble of byte j is weight j, the high nibble "
                      "weight j + 16 (bitsandbytes packs the other way, first element in the high nibble)")
            interleaved = torch.stack([want[:16], want[16:]], dim=1).reshape(-1)
            if torch.allclose(got, interleaved, atol=1e-6) and not torch.allclose(want, interleaved):
                wrong("byte j holds weights j and j + 16, not 2j and 2j + 1: put all low nibbles first, then all "
                      "high nibbles")
        compare("weights", got, want, atol=1e-6)
    return f"matches llama.cpp's layout on {len(tests)} blocks" + (" (real ones from the GGUF included)" if blocks else "")
