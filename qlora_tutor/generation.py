"""Batched greedy generation and evaluation (held-out loss, instruction score) for a causal LM.

Generation pads on the LEFT, so that every prompt in a batch ends at the same position and the new
tokens follow directly after it; training pads on the right. Greedy decoding makes scores repeatable.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.std import tqdm

from . import data

Scorer = Callable[[dict, str], float]
DEQUANTIZE_ONCE_MAX_BYTES = 2 * 2**30  # dense copies of the 4-bit weights kept during generation, at most


@contextlib.contextmanager
def dequantize_once(model: Any, max_bytes: int = DEQUANTIZE_ONCE_MAX_BYTES) -> Iterator[int]:
    """Inside the block, each bitsandbytes Linear4bit on the CPU multiplies by its weight dequantized once, not at
    every call. Yields how many layers were switched.

    bitsandbytes' CPU path dequantizes the whole weight at each forward call, then multiplies densely; greedy
    decoding makes one call per new token, so a 140-token answer dequantizes every weight 140 times. Here the
    same dequantized values go into the same dense product, computed once (the logits are bit for bit the same;
    tests/test_real_model_generation.py checks it). Only on the CPU (CUDA has fused 4-bit kernels), and only when
    the dense copies fit in `max_bytes`; otherwise nothing changes.
    """
    layers = []
    if "bitsandbytes" in sys.modules:
        import bitsandbytes as bnb
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cpu"
                  and getattr(m.weight, "quant_state", None) is not None
                  and not getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    if sum(4 * m.weight.quant_state.shape.numel() for m in layers) > max_bytes:
        layers = []
    for m in layers:
        dense = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)

        def forward(self, x, dense=dense):  # what Linear4bit.forward + gemm_4bit compute, with `dense` cached
            out_dtype = x.dtype
            if self.compute_dtype is not None:
                x = x.to(self.compute_dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, dense.to(x.dtype), bias).to(out_dtype)

        m.forward = types.MethodType(forward, m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            del m.forward


@torch.no_grad()
def generate(model: Any, tokenizer: Any, examples: Sequence[dict], max_new_tokens: int = 96,
             batch_size: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers to each example's prompt (instruction + input), in batches with left padding."""
    data.ensure_pad_token(tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with dequantize_once(model):
        answers = _generate(model, tokenizer, examples, max_new_tokens, batch_size, progress, device)
    model.train(was_training)
    return answers


def _generate(model: Any, tokenizer: Any, examples: Sequence[dict], max_new_tokens: int, batch_size: int,
              progress: bool, device: torch.device) -> list[str]:
    answers: list[str] = []
    for start in tqdm(range(0, len(examples), batch_size), desc="generating", disable=not progress):
        chunk = [data.prompt_ids(tokenizer, ex["instruction"], ex.get("input", "")) for ex in examples[start:start + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


@torch.no_grad()
def heldout_loss(model: Any, tokenizer: Any, examples: Sequence[dict], max_length: int = 256,
                 batch_size: int = 16) -> float:
    """Mean cross-entropy per response token over `examples` (prompt tokens masked, as in training)."""
    collate = data.DataCollator(tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with dequantize_once(model):  # each batch would dequantize every 4-bit weight again
        for start in range(0, len(examples), batch_size):
            feats = [data.tokenize_example(ex, tokenizer, max_length) for ex in examples[start:start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(feats).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       labels.reshape(-1), ignore_index=data.IGNORE_INDEX,
                                                       reduction="sum")
            total += losses.item()
            count += int((labels != data.IGNORE_INDEX).sum())
    model.train(was_training)
    return total / count if count else math.nan


def scorer_for(dataset: str) -> Scorer | None:
    """The automatic score for a data set: each embedded data set has one (score.SCORERS); others have none."""
    if str(dataset) not in data.EMBEDDED_DATASETS:
        return None
    from . import score
    return score.SCORERS[str(dataset)]


def evaluate(model: Any, tokenizer: Any, examples: Sequence[dict], scorer: Scorer | None,
             n_generate: int = 32, max_new_tokens: int = 96, max_length: int = 256,
             batch_size: int = 16, progress: bool = False) -> dict[str, Any]:
    """Held-out loss on `examples` and, when there is a scorer, the mean score of greedy answers to the first
    `n_generate` of them. Returns {'loss', 'score', 'answers'} ('score' None without a scorer)."""
    loss = heldout_loss(model, tokenizer, examples, max_length, batch_size)
    prompts = list(examples[:n_generate])
    answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress) if n_generate else []
    score = None
    if scorer is not None and answers:
        score = sum(scorer(ex, a) for ex, a in zip(prompts, answers)) / len(answers)
    return {"loss": loss, "score": score, "answers": answers}
