"""One QLoRA layer on the GPU, step by step from our PyTorch layer to the Triton one, against bitsandbytes + PEFT.

    python benchmarks/bench_triton_layer.py        # 4096x4096, NF4+DQ block 64, r=16, 512 tokens, bf16

Same weights, adapter and input as benchmarks/bench_qlora_layer.py (its `build`), same timing: wall-clock forward
and forward+backward (gradient to the input and to A, B) with a synchronise around each call, implementations
alternating in every round, medians. Rows:
- ours, PyTorch dequantize (QLORA_TUTOR_TRITON=0), module path (QLoRALinear.fused = False): the layer as it was;
- ours, Triton dequantize, module path: only the kernel changed (the default);
- ours, Triton + one autograd node (QLoRALinear.fused = True, qlora_tutor/fused_layer.py);
- that one under torch.compile(fullgraph=True);
- bitsandbytes Linear4bit + PEFT LoRA; a dense bf16 nn.Linear without adapter (the floor).
Also checks on this GPU that the variants give the same bits (outputs and gradients), and profiles one
forward+backward of ours and of bitsandbytes (time per kernel, from torch.profiler).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_qlora_layer import build  # noqa: E402  (same layers as the existing layer benchmark)

from qlora_tutor.hardware import versions  # noqa: E402
from qlora_tutor.paths import atomic_write_text  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


class Variant:
    """A layer plus the switches that select one of our code paths while it runs."""

    def __init__(self, module, fused: bool | None = None, triton: bool = True, layer=None):
        self.module, self.fused, self.triton, self.layer = module, fused, triton, layer or module

    def __enter__(self):
        if self.fused is not None:
            type(self.layer).fused = self.fused
        os.environ["QLORA_TUTOR_TRITON"] = "1" if self.triton else "0"
        return self.module

    def __exit__(self, *exc):
        os.environ["QLORA_TUTOR_TRITON"] = "1"
        return False


def _device_us(event) -> float:
    """Self GPU time of a profiler row in us (the attribute was renamed in torch 2.4)."""
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0) or 0


def fwd_bwd(m, x):
    xx = x.detach().requires_grad_(True)
    y = m(xx)
    y.float().square().mean().backward()
    return y, xx.grad


def grads(m, x, adapter):
    for p in adapter:
        p.grad = None
    y, gx = fwd_bwd(m, x)
    return [y, gx] + [p.grad.clone() for p in adapter]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script (TRITON_INTERPRET=1)")
    p.add_argument("--out", default=os.environ.get("OUT", "results/triton"))
    args = p.parse_args(argv)
    import triton
    dtype = torch.bfloat16
    ours, ref, dense = build(args.in_features, args.out_features, args.r, dtype, args.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.in_features, generator=g).to(args.device, dtype)
    adapter = [ours.lora_A, ours.lora_B]

    # same bits: module path with the PyTorch dequantize (the reference) vs Triton vs one autograd node
    results = {}
    for name, (fused, tri) in {"torch, modules": (False, False), "triton, modules": (False, True),
                               "triton, fused": (True, True)}.items():
        with Variant(ours, fused, tri) as m:
            results[name] = grads(m, x, adapter)
    type(ours).fused = True
    compiled = torch.compile(ours, fullgraph=True)
    results["triton, fused, compiled"] = grads(compiled, x, adapter)
    base = results["torch, modules"]
    lines_exact = []
    for name, got in results.items():
        same = [torch.equal(a.view(torch.int16) if a.element_size() == 2 else a.view(torch.int32),
                            b.view(torch.int16) if b.element_size() == 2 else b.view(torch.int32))
                for a, b in zip(got, base)]
        err = [float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp(min=1e-30)) for a, b in zip(got, base)]
        lines_exact.append(f"| {name} | " + " | ".join(f"{'same bits' if s else f'{e:.1e}'}" for s, e in zip(same, err))
                           + " |")

    variants = {
        "ours, PyTorch dequantize, module path (before)": Variant(ours, False, False),
        "ours, Triton dequantize, module path (default)": Variant(ours, False, True),
        "ours, Triton + one autograd node (fused = True)": Variant(ours, True, True),
        "ours, fused, torch.compile(fullgraph=True)": Variant(compiled, True, True, layer=ours),
        "bnb Linear4bit + PEFT": Variant(ref),
        "dense bf16 nn.Linear, no adapter": Variant(dense),
    }
    res: dict[tuple[str, str], list[float]] = {}
    for k in range(args.rounds + 3):
        for name, v in variants.items():
            with v as m:
                for what, fn in (("forward", lambda: m(x)), ("forward+backward", lambda: fwd_bwd(m, x))):
                    t = timed(fn)
                    if k >= 3:
                        res.setdefault((name, what), []).append(t)
    med = {key: statistics.median(ts) for key, ts in res.items()}
    bnb_fb = med[("bnb Linear4bit + PEFT", "forward+backward")]
    dense_fb = med[("dense bf16 nn.Linear, no adapter", "forward+backward")]
    machine = torch.cuda.get_device_properties(0).name if args.device == "cuda" else "CPU (trial run)"
    out = ["# One QLoRA layer on the GPU: from our PyTorch layer to the Triton one", "",
           f"- machine: {machine}; " + ", ".join(f"{k} {v}" for k, v in versions().items())
           + f", triton {triton.__version__}",
           f"- settings: {args.out_features}x{args.in_features} weight, NF4+DQ block 64, LoRA r={args.r} (fp32 "
           f"adapter), {args.tokens} tokens, compute bf16, median of {args.rounds} rounds after 3 warm-up",
           "- command: python benchmarks/bench_triton_layer.py", "",
           "| layer | forward ms | forward+backward ms | fwd+bwd vs bnb+PEFT | fwd+bwd vs dense |",
           "|---|---|---|---|---|"]
    for name in variants:
        f, fb = med[(name, "forward")], med[(name, "forward+backward")]
        out.append(f"| {name} | {1000 * f:.3f} | {1000 * fb:.3f} | {fb / bnb_fb:.2f}x | {fb / dense_fb:.2f}x |")
    out += ["", "Against the PyTorch-dequantize module path (output, dL/dx, dL/dA, dL/dB): same bits, or the relative "
            "difference", "", "| variant | y | dL/dx | dL/dA | dL/dB |", "|---|---|---|---|---|", *lines_exact, ""]

    # where the time goes: one profiled forward+backward each (after the warm-up above)
    from torch.profiler import ProfilerActivity, profile
    for name in ("ours, Triton + one autograd node (fused = True)", "bnb Linear4bit + PEFT"):
        with variants[name] as m:
            for _ in range(3):
                fwd_bwd(m, x)
            _sync()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(10):
                    fwd_bwd(m, x)
                _sync()
        events = [e for e in prof.key_averages() if _device_us(e) > 0]
        kernels = sorted(events, key=lambda e: -_device_us(e))[:12]
        total = sum(_device_us(e) for e in events) / 10
        out += [f"Profile, {name}: GPU kernel time per forward+backward {total / 1000:.3f} ms "
                f"(wall {1000 * med[(name, 'forward+backward')]:.3f} ms); top kernels, us per forward+backward:", "",
                "| kernel | calls | us |", "|---|---|---|"]
        for e in kernels:
            out.append(f"| {e.key[:90].replace('|', '/')} | {e.count / 10:g} | {_device_us(e) / 10:.1f} |")
        out.append("")
    o = med[("ours, Triton + one autograd node (fused = True)", "forward+backward")]
    d = med[("ours, Triton dequantize, module path (default)", "forward+backward")]
    out += [f"- ours / bitsandbytes+PEFT, forward+backward: {d / bnb_fb:.2f}x (default), {o / bnb_fb:.2f}x "
            "(fused = True); target <= 0.8x",
            f"- ours / dense bf16, forward+backward: {d / dense_fb:.2f}x (default), {o / dense_fb:.2f}x (fused)"]
    text = "\n".join(out) + "\n"
    print(text)
    atomic_write_text(os.path.join(args.out, "layer_gpu.md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
