"""Compare 4-bit quantization: bitsandbytes CUDA vs bitsandbytes CPU vs qlora_tutor.quant, and explain differences.

Usage (on a machine with a GPU and bitsandbytes): python benchmarks/gpu_quant_check.py [--size 4096] [--out FILE]
For every data type (nf4, fp4), double quantization on/off, input dtype and seed it counts differing packed codes,
absmax, offset and nested (second-level) constants. It then re-computes the CUDA results on the CPU with the
CUDA kernels' rules written out in PyTorch (decision trees with the kernels' decimal thresholds for 4 bits; the
7-step binary search of dQuantize<0> for the 8-bit constants) to show that those rules explain every difference.
Without a GPU it still runs the CPU-side comparisons (useful to test the script).
"""

from __future__ import annotations

import argparse
import platform

import torch

from qlora_tutor.quant import _dynamic_map_cpu, _quantize_8bit_cpu_rule, quantize

# Thresholds of bitsandbytes' CUDA dQuantizeNF4 (csrc/kernels.cu), listed low to high; `x > t` goes up.
CUDA_NF4_THRESHOLDS = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
                       -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
                       0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
                       0.5016634166240692, 0.6427869200706482, 0.8614784181118011]
# dQuantizeFP4 works on |x| with these decimal thresholds (float32), then adds the sign bit for x < 0.
CUDA_FP4_ABS_THRESHOLDS = [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333]
CUDA_FP4_LEAF = [0, 1, 6, 7, 4, 5, 2, 3]  # codes of |x| in increasing order: 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.reshape(-1).cpu()
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n]


def scaled_like_cuda(w: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x * (1/absmax) in float32, block by block (the CUDA kernel's arithmetic)."""
    n = w.numel()
    x = torch.nn.functional.pad(w.reshape(-1).float().cpu(), (0, -n % blocksize)).view(-1, blocksize)
    return (x * (1.0 / absmax.cpu()).unsqueeze(1)).reshape(-1)[:n]


def cuda_rule_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    # bucketize(x, t) (right=False) counts the thresholds t < x, which is what a tree of `x > t` tests computes
    if quant_type == "nf4":
        return torch.bucketize(scaled, torch.tensor(CUDA_NF4_THRESHOLDS, dtype=torch.float32)).to(torch.uint8)
    level = torch.bucketize(scaled.abs(), torch.tensor(CUDA_FP4_ABS_THRESHOLDS, dtype=torch.float32))
    return (torch.tensor(CUDA_FP4_LEAF)[level] + 8 * (scaled < 0)).to(torch.uint8)


def cuda_rule_8bit(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """dQuantize<0>: 7-step binary search from pivot 127, then a midpoint test against the two neighbours."""
    pivot = torch.full_like(x, 127, dtype=torch.long)
    lower_p, upper_p = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = x > val
        lower_p, lower = torch.where(up, pivot, lower_p), torch.where(up, val, lower)
        upper_p, upper = torch.where(up, upper_p, pivot), torch.where(up, upper, val)
        pivot = torch.where(up, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_p == 255, code[255], upper)
    lower = torch.where(lower_p == 0, code[0], lower)
    up = x > val
    go_up = up & (x > (upper + val) * 0.5)
    go_down = ~up & (x < (lower + val) * 0.5)
    return torch.where(go_up, upper_p, torch.where(go_down, lower_p, pivot)).to(torch.uint8)


def nested_like_cuda(absmax: torch.Tensor, offset: torch.Tensor, blocksize: int = 256):
    x = absmax.cpu() - offset.cpu()
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, -n % blocksize)).view(-1, blocksize)
    nested = blocks.abs().amax(1)
    scaled = (blocks * (1.0 / nested).unsqueeze(1)).reshape(-1)[:n]
    return cuda_rule_8bit(scaled, _dynamic_map_cpu()), nested


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--fake-gpu", action="store_true", help="test the script: run the GPU branch on the CPU")
    args = parser.parse_args()

    import bitsandbytes
    import bitsandbytes.functional as F

    cuda = torch.cuda.is_available() or args.fake_gpu
    gpu = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [f"GPU: {torch.cuda.get_device_name(0) if gpu == 'cuda' else 'none (CPU-only run)'}; torch {torch.__version__}, "
             f"bitsandbytes {bitsandbytes.__version__}, python {platform.python_version()}",
             f"tensor {args.size}x{args.size} of N(0, 0.02^2) (seeds 0..{args.seeds - 1}), blocksize 64, nested 256",
             "",
             "| type | DQ | dtype | seed | codes CUDA!=CPU | of which ±0 sign | CUDA!=CUDA-rule | ours!=CPU "
             "| absmax CUDA!=CPU | offset CUDA-CPU (ulp) | nested absmax CUDA!=CPU | 8-bit codes CUDA!=CPU "
             "| 8-bit CUDA!=CUDA-rule | 8-bit CPU!=nearest | ours-on-GPU!=ours-CPU (bytes) |",
             "|---" * 15 + "|"]
    print("\n".join(lines), flush=True)
    n = args.size * args.size
    for quant_type in ("nf4", "fp4"):
        for dq in (False, True):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for seed in range(args.seeds):
                    g = torch.Generator().manual_seed(seed)
                    w = (torch.randn(args.size, args.size, generator=g) * 0.02).to(dtype)
                    p_cpu, s_cpu = F.quantize_4bit(w, quant_type=quant_type, compress_statistics=dq)
                    ours = quantize(w, quant_type, 64, dq)
                    c_cpu = unpack(p_cpu, n)
                    ours_diff = int((unpack(ours.packed, n) != c_cpu).sum())
                    row = {"codes": "-", "zero_sign": "-", "rule": "-", "absmax": "-", "offset": "-", "nested": "-",
                           "q8": "-", "q8rule": "-", "gpu_ours": "-"}
                    # CPU side: how often is the CPU 8-bit LUT rule not the nearest value?
                    q8_nearest = "-"
                    if dq:
                        raw = quantize(w, quant_type, 64, False).absmax  # the fp32 constants before DQ
                        x = raw - s_cpu.offset
                        q_lut, nested = _quantize_8bit_cpu_rule(x, 256)
                        code = _dynamic_map_cpu()
                        scaled = (torch.nn.functional.pad(x, (0, -x.numel() % 256)).view(-1, 256)
                                  * (1.0 / nested).unsqueeze(1)).reshape(-1)[:x.numel()]
                        nearest = (scaled.unsqueeze(1) - code).abs().argmin(1)
                        q8_nearest = int((nearest != q_lut.long()).sum())
                    if cuda:
                        wc = w.to(gpu)
                        p_gpu, s_gpu = F.quantize_4bit(wc, quant_type=quant_type, compress_statistics=dq)
                        c_gpu = unpack(p_gpu, n)
                        diff = c_gpu != c_cpu
                        zero_codes = ((c_gpu & 7) == 0) & ((c_cpu & 7) == 0)
                        row["codes"] = f"{int(diff.sum())} ({100 * diff.float().mean():.3f}%)"
                        row["zero_sign"] = str(int((diff & zero_codes).sum())) if quant_type == "fp4" else "-"
                        gpu_ours = quantize(wc, quant_type, 64, dq)
                        row["gpu_ours"] = str(int((gpu_ours.packed.cpu() != ours.packed).sum()))
                        if dq:
                            fp32_absmax_gpu = quantize(wc, quant_type, 64, False).absmax.cpu()
                            fp32_absmax_cpu = quantize(w, quant_type, 64, False).absmax
                            row["absmax"] = str(int((fp32_absmax_gpu != fp32_absmax_cpu).sum()))
                            oc, og = s_cpu.offset.cpu(), s_gpu.offset.cpu()
                            ulp = (og.view(torch.int32) - oc.view(torch.int32)).item()
                            row["offset"] = f"{ulp:+d}"
                            row["nested"] = str(int((s_gpu.state2.absmax.cpu() != s_cpu.state2.absmax).sum()))
                            row["q8"] = str(int((s_gpu.absmax.cpu() != s_cpu.absmax).sum()))
                            q8_rule, _ = nested_like_cuda(fp32_absmax_gpu, s_gpu.offset)
                            row["q8rule"] = str(int((q8_rule != s_gpu.absmax.cpu()).sum()))
                            rule_absmax = fp32_absmax_gpu
                        else:
                            row["absmax"] = str(int((s_gpu.absmax.cpu() != s_cpu.absmax).sum()))
                            rule_absmax = s_gpu.absmax.cpu()
                        rule = cuda_rule_4bit(scaled_like_cuda(w, rule_absmax, 64), quant_type)
                        row["rule"] = str(int((rule != c_gpu).sum()))
                    line = (f"| {quant_type} | {'yes' if dq else 'no'} | {str(dtype)[6:]} | {seed} | {row['codes']} "
                            f"| {row['zero_sign']} | {row['rule']} | {ours_diff} | {row['absmax']} | {row['offset']} "
                            f"| {row['nested']} | {row['q8']} | {row['q8rule']} | {q8_nearest} | {row['gpu_ours']} |")
                    lines.append(line)
                    print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
