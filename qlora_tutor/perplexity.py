"""Perplexity on held-out English text, and the QLoRA paper's Table 2 on a real model: the same model with every
linear weight quantized by a different 4-bit data type (blocks of 64), then scored on the same tokens.

The text is the prose of Python's own standard-library docstrings (read from the source files with `ast`, never
imported): on every machine that runs this project, offline, written by CPython's contributors (PSF License 2.0),
not by us. Code examples, doctests and tables are left out; paragraphs are joined into single lines.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import math
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .quant import quantize

# Standard-library modules with long prose docstrings, in a fixed order (the text is their concatenation).
HELDOUT_MODULES = (
    "textwrap", "statistics", "difflib", "shutil", "tempfile", "tarfile", "logging/__init__", "threading",
    "inspect", "doctest", "email/message", "http/cookiejar",
)
MIN_WORDS = 8  # shorter paragraphs are mostly headings and one-line summaries


@dataclass(frozen=True)
class HeldOutText:
    """A text to measure perplexity on, with where it came from."""

    text: str
    source: str
    licence: str
    sha256: str

    def describe(self, tokenizer: Any | None = None) -> str:
        words = len(self.text.split())
        tokens = f", {len(tokenizer(self.text)['input_ids']):,} tokens" if tokenizer is not None else ""
        return f"{self.source}: {words:,} words{tokens}; licence {self.licence}; sha256 {self.sha256[:12]}"


def _prose(docstring: str) -> list[str]:
    """The prose paragraphs of a docstring, each on one line: no code, doctest, table or indented block."""
    out = []
    for para in re.split(r"\n\s*\n", docstring):
        lines = [line for line in para.splitlines() if line.strip()]
        if not lines or any(line.startswith((" ", "\t", ">>>", "...", "-", "*", "|", "+", "=")) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        letters = sum(c.isalpha() or c.isspace() for c in text)
        if len(text.split()) >= MIN_WORDS and letters >= 0.85 * len(text) and "::" not in text:
            out.append(text)
    return out


def stdlib_docstrings(modules: Sequence[str] = HELDOUT_MODULES) -> HeldOutText:
    """The prose of these standard-library modules' docstrings (module, classes, functions, in file order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    paragraphs: list[str] = []
    for name in modules:
        path = root / f"{name}.py"
        if not path.is_file():
            raise FileNotFoundError(f"the standard library's {name}.py is not at {path}: this Python installation "
                                    "ships without its sources; pass another text to perplexity()")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                                           ast.AsyncFunctionDef))]
        for node in nodes:
            for para in _prose(ast.get_docstring(node, clean=True) or ""):
                if para not in seen:
                    seen.add(para)
                    paragraphs.append(para)
    text = "\n\n".join(paragraphs)
    version = ".".join(map(str, sys.version_info[:3]))
    return HeldOutText(text=text, source=f"prose of the docstrings of {len(modules)} modules of Python {version}'s "
                       "standard library", licence="PSF License 2.0",
                       sha256=hashlib.sha256(text.encode()).hexdigest())


# ----------------------------------------------------------------------------------------------- perplexity
def token_windows(tokenizer: Any, text: str, window: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """The text's tokens cut into non-overlapping windows of `window` tokens (the ragged end is dropped)."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens (one to read, one to predict), got {window}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])  # longer than
    # the model's context on purpose: verbose=False silences that warning, the windows are short enough
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {window}: give a longer text "
                         "or a smaller window")
    windows = ids[: n * window].view(n, window)
    return windows if max_windows is None else windows[:max_windows]


@torch.no_grad()
def perplexity(model: Any, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) over every window (each window read from its first token)."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a (n, length >= 2) tensor of token ids, got shape {tuple(windows.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


# ----------------------------------------------------------------------------------------------- data types
def per_tensor_int4(w: torch.Tensor) -> torch.Tensor:
    """The formula many tutorials show: one scale for the whole tensor, scale = max|W| / 7, round(W / scale)."""
    scale = w.float().abs().max() / 7
    return ((w.float() / scale).round().clamp(-7, 7) * scale).to(w.dtype)


def _blockwise(quant_type: str, double_quant: bool = False) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, int]]:
    def apply(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
        q = quantize(w, quant_type, blocksize, double_quant)
        return q.dequantize(w.dtype), q.nbytes * 8
    return apply


def _per_tensor(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    return per_tensor_int4(w), 4 * w.numel() + 32  # 4-bit codes and one fp32 scale


# name -> (label, function(weight, blocksize) -> (dequantized weight, bits stored)); the paper's Table 2 rows first
DATA_TYPES: dict[str, tuple[str, Callable | None]] = {
    "baseline": ("no re-quantization (the model as loaded)", None),
    "nf4_dq": ("NF4 + double quantization", _blockwise("nf4", True)),
    "nf4": ("NF4", _blockwise("nf4")),
    "fp4": ("FP4 (E2M1)", _blockwise("fp4")),
    "int4": ("Int4 (blockwise absmax)", _blockwise("int4")),
    "per_tensor": ("per-tensor round(w/scale), scale = max|W|/7", _per_tensor),
}


def linear_weights(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers the paper quantizes: every nn.Linear but the output head (tied to the embedding here)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


@contextlib.contextmanager
def quantized_linears(model: torch.nn.Module, data_type: str, blocksize: int = 64) -> Iterator[dict[str, float]]:
    """Inside the block every linear weight holds its quantize -> dequantize round trip; restored on exit.

    Yields {'bits_per_param', 'rel_error'}: bits stored per weight (codes and constants) and the pooled relative
    RMS error ||Q(W) - W|| / ||W|| over all these weights.
    """
    if data_type not in DATA_TYPES:
        raise ValueError(f"unknown data type {data_type!r}: use one of {', '.join(DATA_TYPES)}")
    fn = DATA_TYPES[data_type][1]
    layers = linear_weights(model)
    if not layers:
        raise ValueError("the model has no linear layers to quantize")
    originals = {name: layer.weight.data for name, layer in layers}
    bits = err = norm = 0.0
    numel = sum(w.numel() for w in originals.values())
    try:
        for name, layer in layers:
            w = originals[name]
            if fn is None:
                bits += 8 * w.element_size() * w.numel()
                continue
            deq, stored = fn(w, blocksize)
            err += (deq.double() - w.double()).pow(2).sum().item()
            norm += w.double().pow(2).sum().item()
            bits += stored
            layer.weight.data = deq
        yield {"bits_per_param": bits / numel, "rel_error": math.sqrt(err / norm) if norm else 0.0}
    finally:
        for name, layer in layers:
            layer.weight.data = originals[name]


def table2(model: torch.nn.Module, windows: torch.Tensor, data_types: Sequence[str] = tuple(DATA_TYPES),
           blocksize: int = 64, batch_size: int = 4, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Perplexity of `model` with all linear weights in each data type (the paper's Table 2 protocol, one model)."""
    rows = []
    for name in data_types:
        with quantized_linears(model, name, blocksize) as info:
            ppl = perplexity(model, windows, batch_size)
        rows.append({"data_type": name, "label": DATA_TYPES[name][0], "perplexity": ppl, **info})
        log(f"{DATA_TYPES[name][0]:<46} {info['bits_per_param']:6.3f} bits  rel. error {info['rel_error']:.4f}  "
            f"perplexity {ppl:8.3f}")
    return rows


def format_table(rows: Sequence[dict[str, Any]], baseline_label: str | None = None) -> str:
    """A Markdown table of `table2`'s rows, with each perplexity's change against the first row's."""
    base = rows[0]["perplexity"]
    lines = ["| data type | bits / weight | weight error (rel. RMS) | perplexity | vs first row |",
             "|---|---|---|---|---|"]
    for r in rows:
        label = baseline_label if (baseline_label and r["data_type"] == "baseline") else r["label"]
        ratio = r["perplexity"] / base
        change = f"x{ratio:,.0f}" if ratio > 10 else f"{100 * (ratio - 1):+.1f}%"
        lines.append(f"| {label} | {r['bits_per_param']:.3f} | {r['rel_error']:.4f} | {r['perplexity']:,.3f} | "
                     f"{change} |")
    return "\n".join(lines)
