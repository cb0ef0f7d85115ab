"""Checks for notebook 06 (memory): a QLoRA memory estimate worked out by hand, against `memory.estimate`."""

from __future__ import annotations

import random
from typing import Any, Callable

from .. import memory
from .base import check, expect, run, wrong

PARTS = ("frozen_weights", "quantization_constants", "adapter_weights", "gradients", "optimizer_state")

# What each part is, for a learner who got it wrong (QLoRA, NF4 + double quantization, fp32 adapters, AdamW 32-bit)
_HOW = {
    "frozen_weights": "0.5 byte per weight of the 7 linear layers of every decoder layer (4-bit codes), plus 2 bytes "
                      "(bf16) per value of what is not quantized: embeddings (and lm_head unless tied), norms, biases",
    "quantization_constants": "NF4 + double quantization: 8/64 + 32/(64·256) = 0.127 bit per quantized weight "
                              "(an 8-bit absmax per block of 64, an fp32 scale per 256 blocks), not 0.5 bit",
    "adapter_weights": "r·(in + out) values per adapted layer (A is r×in, B is out×r), 4 bytes each (fp32), on all "
                       "7 linear layers of every decoder layer",
    "gradients": "one fp32 gradient per adapter value (the frozen base gets none)",
    "optimizer_state": "AdamW keeps two fp32 states (m and v) per trainable value: 8 bytes each",
}

# Hints for the usual slips: (predicate on got/want, message)
_SLIPS = [
    (lambda k, g, w: k == "quantization_constants" and abs(g / w - 0.5 / 0.127) < 0.15,
     "this is the cost without double quantization (32/64 = 0.5 bit per weight): QLoRA quantizes the absmax "
     "constants again, down to 0.127 bit"),
    (lambda k, g, w: k == "optimizer_state" and abs(g / w - 0.5) < 0.01,
     "that is one fp32 state per value: AdamW keeps two (m and v)"),
    (lambda k, g, w: k == "optimizer_state" and abs(g / w - 0.25) < 0.01,
     "that is two 16-bit states: AdamW 32-bit keeps m and v in fp32, 8 bytes per trainable value"),
    (lambda k, g, w: k in ("adapter_weights", "gradients") and abs(g / w - 0.5) < 0.01,
     "that is 2 bytes per value: PEFT keeps the adapters (and so their gradients) in fp32"),
    (lambda k, g, w: k in ("adapter_weights", "gradients", "optimizer_state") and g / w > 20,
     "far too large: a LoRA pair has r·(in + out) values, not r·in·out"),
    (lambda k, g, w: k == "frozen_weights" and g < w * 0.97,
     "too small: are the embeddings counted at 4 bits? Only the linear layers inside the decoder layers are "
     "quantized; embeddings, lm_head and norms stay bf16"),
    (lambda k, g, w: k == "frozen_weights" and g > w * 1.3,
     "too large: the linear layers are stored in 4 bits (0.5 byte per weight), not 16"),
]


def _random_shape(rng: random.Random) -> memory.ModelShape:
    heads = rng.choice([8, 12, 16])
    kv = rng.choice([h for h in (1, 2, 4, heads) if heads % h == 0])
    head_dim = rng.choice([64, 128])
    return memory.ModelShape("random", hidden=heads * head_dim, intermediate=rng.choice([2, 3, 4]) * heads * head_dim
                             + 64 * rng.randrange(4), layers=rng.randrange(6, 30), heads=heads, kv_heads=kv,
                             vocab=rng.randrange(8_000, 160_000), tied_embeddings=rng.random() < 0.5)


@check("a QLoRA memory estimate by hand")
def check_memory_by_hand(fn: Callable[..., Any], rtol: float = 0.02) -> str:
    """`fn(shape, r)` returns bytes for each of PARTS of a QLoRA step (NF4 + DQ, bf16 compute, fp32 adapters r on
    all linear layers, AdamW 32-bit); compared with `memory.estimate` for LLaMA-7B, Qwen2.5-0.5B and two random
    shapes, within `rtol` (the calculator also counts small code tables and buffers: for the constants, each
    quantized layer's two code tables and offset, about 1 KB, are allowed on top)."""
    rng = random.Random()
    cases = [(memory.KNOWN_MODELS["llama-7b"], 64), (memory.KNOWN_MODELS["qwen2.5-0.5b"], 16),
             (_random_shape(rng), rng.choice([4, 8, 32])), (_random_shape(rng), rng.choice([16, 64]))]
    for shape, r in cases:
        got = run(fn, shape, r)
        expect(isinstance(got, dict), f"return a dict of bytes per part, got {type(got).__name__}")
        missing = [k for k in PARTS if k not in got]
        expect(not missing, f"missing parts: {', '.join(missing)} (keys: {', '.join(PARTS)})")
        want = memory.estimate(shape, "qlora", lora_r=r).components
        what = f"{shape.name} (hidden {shape.hidden}, {shape.layers} layers, vocab {shape.vocab}" + \
            (", tied embeddings" if shape.tied_embeddings else "") + f"), r={r}"
        for k in PARTS:
            g, w = got[k], want[k]
            expect(isinstance(g, (int, float)), f"{k} should be a number of bytes, got {type(g).__name__}")
            tables = 7 * shape.layers * (256 * 4 + 16 * 4 + 4) if k == "quantization_constants" else 0
            if abs(g - w) <= rtol * w + tables:
                continue
            slip = next((msg for test, msg in _SLIPS if w and g and test(k, g, w)), None)
            wrong(f"{k} for {what}: you have {g / 1e9:.4g} GB, the calculator {w / 1e9:.4g} GB "
                  f"({g / w:.3g}x). " + (slip or f"It is {_HOW[k]}"))
    return f"all five parts within {rtol:.0%} of the calculator, for {len(cases)} models"
