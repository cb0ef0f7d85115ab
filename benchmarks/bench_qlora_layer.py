"""One QLoRA layer, ours against the libraries: qlora_tutor.qlora.QLoRALinear vs bitsandbytes Linear4bit + PEFT LoRA.

Same weights (NF4 + double quantization, block 64), same adapter (r=16, the same A and B), same input. Times the
forward pass and forward+backward (gradient to the input and to A, B), alternating the two implementations in
each round so a busy machine slows both alike; medians. Also a plain dense nn.Linear (16-bit/fp32 weight, no
quantization) as the floor: the difference is the price of dequantizing in every matmul.

    python benchmarks/bench_qlora_layer.py                      # CPU, fp32 compute
    python benchmarks/bench_qlora_layer.py --device cuda        # bf16 compute
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from qlora_tutor.check import cmp
from qlora_tutor.hardware import versions
from qlora_tutor.paths import atomic_write_text


def build(n_in: int, n_out: int, r: int, dtype: torch.dtype, device: str):
    """(ours, bnb+peft, dense) layers holding the same weights and adapter."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from qlora_tutor.qlora import QLoRALinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
    ours = QLoRALinear.from_linear(lin, r=r, alpha=16, quant_type="nf4", double_quant=True, compute_dtype=dtype)
    torch.nn.init.normal_(ours.lora_B, std=0.02)  # a non-zero adapter, so its path is really computed

    class Box(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=dtype, compress_statistics=True,
                                          quant_type="nf4", device="meta")
            w = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                  quant_type="nf4", blocksize=64, module=self.proj)
            self.proj.weight = w._quantize(device)

        def forward(self, x):
            return self.proj(x)

    ref = get_peft_model(Box(), LoraConfig(r=r, lora_alpha=16, target_modules=["proj"], lora_dropout=0.0))
    layer = ref.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    dense = torch.nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
    dense.weight.data.copy_(lin.weight.data)
    dense.weight.requires_grad_(False)
    return ours, ref, dense


def timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=512, help="batch x sequence length")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rounds", type=int, default=None, help="default 30 on CUDA, 5 on CPU")
    p.add_argument("--out", default=os.environ.get("OUT", "results"))
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    rounds = args.rounds or (30 if cuda else 5)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ours, ref, dense = build(args.in_features, args.out_features, args.r, dtype, args.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.in_features, generator=g).to(args.device, dtype)

    y_ours, y_ref = ours(x), ref(x)
    same = cmp("forward: ours vs bnb+PEFT", y_ours.float(), y_ref.float(), rtol=2e-2 if cuda else 1e-4,
               atol=1e-2 if cuda else 1e-4)

    def fwd(m):
        return lambda: m(x)

    def fwd_bwd(m):
        def run():
            xx = x.detach().requires_grad_(True)
            m(xx).float().square().mean().backward()
        return run

    layers = {"ours (QLoRALinear)": ours, "bnb Linear4bit + PEFT": ref, "dense, no quantization": dense}
    res: dict[tuple[str, str], list[float]] = {}
    for k in range(rounds + 2):  # 2 warm-up rounds
        for name, m in layers.items():
            for what, fn in (("forward", fwd(m)), ("forward+backward", fwd_bwd(m))):
                t = timed(fn, sync)
                if k >= 2:
                    res.setdefault((name, what), []).append(t)
    machine = (torch.cuda.get_device_name(0) if cuda
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    head = (f"machine: {machine}; " + ", ".join(f"{k} {v}" for k, v in versions().items()) +
            f"\nsettings: {args.out_features}x{args.in_features} weight, NF4+DQ block 64, LoRA r={args.r}, "
            f"{args.tokens} tokens, compute {str(dtype).replace('torch.', '')}, median of {rounds} rounds; "
            f"outputs agree: {same}")
    lines = ["| layer | forward ms | forward+backward ms | fwd+bwd vs dense |", "|---|---|---|---|"]
    dense_fb = statistics.median(res[("dense, no quantization", "forward+backward")])
    for name in layers:
        f = statistics.median(res[(name, "forward")])
        fb = statistics.median(res[(name, "forward+backward")])
        lines.append(f"| {name} | {1000 * f:.2f} | {1000 * fb:.2f} | {fb / dense_fb:.2f}x |")
    o = statistics.median(res[("ours (QLoRALinear)", "forward+backward")])
    b = statistics.median(res[("bnb Linear4bit + PEFT", "forward+backward")])
    note = f"ours / bitsandbytes+PEFT, forward+backward: {o / b:.2f}x"
    text = "\n".join(["# One QLoRA layer: ours vs bitsandbytes + PEFT", "",
                      *[f"- {h}" for h in head.splitlines()], "", *lines, "", f"- {note}"]) + "\n"
    print(text)
    path = os.path.join(args.out, f"qlora_layer_{'gpu' if cuda else 'cpu'}.md")
    atomic_write_text(path, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
