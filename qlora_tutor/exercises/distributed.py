"""Checks for notebook 08 (beyond one GPU): what one GPU holds under FSDP, worked out by hand from the single-GPU
estimate, against `memory.per_gpu_memory`."""

from __future__ import annotations

import random
from typing import Any, Callable

from .. import memory
from .base import check, expect, run, wrong

PARTS = ("frozen_weights", "quantization_constants", "adapter_weights", "gradients", "optimizer_state",
         "activations")
SHARDED = ("frozen_weights", "adapter_weights", "gradients", "optimizer_state")

_WHY = {
    "frozen_weights": "FSDP splits every parameter N ways, the 4-bit weights (in their float storage) included",
    "adapter_weights": "the adapters are parameters too: 1/N each",
    "gradients": "gradients are reduce-scattered: each GPU keeps the 1/N it owns",
    "optimizer_state": "each GPU updates only its own 1/N of the parameters, so it keeps only that AdamW state",
    "quantization_constants": "they stay whole on every GPU: bitsandbytes keeps the absmax constants beside the "
                              "parameter (in its quant_state), not in it, so FSDP never sees them",
    "activations": "they stay whole: each GPU computes its own per-device batch through the whole model",
}


@check("what one GPU holds under FSDP")
def check_fsdp_share(fn: Callable[..., Any]) -> str:
    """`fn(single, n_gpus)` takes `estimate(...).components` for one GPU and returns each of PARTS for one of
    n_gpus GPUs under FSDP (FULL_SHARD, no offload); compared with `memory.per_gpu_memory` for fresh settings."""
    rng = random.Random()
    cases = [("llama-2-70b", 2, 8), ("llama-13b", rng.choice([3, 4, 6]), 16),
             (rng.choice(["llama-7b", "llama-3-8b", "qwen2.5-1.5b"]), rng.choice([5, 7, 8]), rng.choice([8, 64]))]
    for model, n, r in cases:
        single = memory.estimate(model, "qlora", lora_r=r).components
        got = run(fn, dict(single), n)
        expect(isinstance(got, dict), f"return a dict of bytes per part, got {type(got).__name__}")
        missing = [k for k in PARTS if k not in got]
        expect(not missing, f"missing parts: {', '.join(missing)} (keys: {', '.join(PARTS)})")
        want = memory.per_gpu_memory(model, "qlora", "fsdp", n, lora_r=r).components
        for k in PARTS:
            g, w = got[k], want[k]
            expect(isinstance(g, (int, float)), f"{k} should be a number of bytes, got {type(g).__name__}")
            if abs(g - w) <= max(1.0, 1e-9 * w):
                continue
            if k in SHARDED and abs(g - single[k]) <= 1:
                wrong(f"{k} on {n} GPUs ({model}, r={r}): you kept all {single[k] / 1e9:.3g} GB on every GPU, "
                      f"as DDP would. {_WHY[k]}")
            if k not in SHARDED and abs(g - single[k] / n) <= 1:
                wrong(f"{k} on {n} GPUs ({model}, r={r}): you divided it by {n}, but {_WHY[k]}")
            wrong(f"{k} on {n} GPUs ({model}, r={r}): you have {g / 1e9:.4g} GB, expected {w / 1e9:.4g} GB: "
                  f"{_WHY[k]}")
    return f"matches per_gpu_memory for {len(cases)} models and GPU counts"
