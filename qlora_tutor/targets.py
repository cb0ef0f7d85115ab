"""Which linear layers get LoRA adapters: one rule, PEFT's, for the from-scratch layers, the real stack and the
memory calculator alike.

- "all-linear": every linear layer except the output head (the model's output embedding, `lm_head`).
- a list of names (or a comma-separated string): a module is selected when its full name equals an entry or ends
  with "." + entry, so "q_proj" selects every layer's attention query and "self_attn.q_proj" does too.

The rule itself is string matching (no torch needed); `find_linear_targets` applies it to a model.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

ALL_LINEAR = "all-linear"


def parse_target_modules(target_modules: str | Sequence[str]) -> str | list[str]:
    """'all-linear' as is; 'q_proj,v_proj' or ['q_proj', 'v_proj'] as a list of names. Clear errors otherwise."""
    if isinstance(target_modules, str):
        if target_modules.strip().lower() == ALL_LINEAR:
            return ALL_LINEAR
        target_modules = [t.strip() for t in target_modules.split(",")]
    if not isinstance(target_modules, (list, tuple, set)) or not target_modules or \
            not all(isinstance(t, str) and t.strip() for t in target_modules):
        raise TypeError(f"target_modules must be 'all-linear' or a non-empty list of module names such as "
                        f"['q_proj', 'v_proj'] (or 'q_proj,v_proj'), got {target_modules!r}")
    return [t.strip() for t in target_modules]


def matches(name: str, targets: Iterable[str]) -> bool:
    """PEFT's rule for a list: the full module name, or a suffix of it after a dot, equals an entry."""
    return any(name == t or name.endswith("." + t) for t in targets)


def select(linear_names: Sequence[str], target_modules: str | Sequence[str],
           head_names: Iterable[str] = (), what: str = "model") -> list[str]:
    """The names among `linear_names` (full module names of linear layers) that `target_modules` selects.

    An entry that selects nothing is an error naming the layers there are, since PEFT would otherwise stop with
    a less helpful message, or (with other entries matching) silently train fewer layers than asked for.
    """
    targets = parse_target_modules(target_modules)
    heads = set(head_names)
    if targets == ALL_LINEAR:
        found = [n for n in linear_names if n not in heads]
        if not found:
            raise ValueError("target_modules='all-linear' found no linear layers (other than the output head).")
        return found
    for t in targets:
        if not any(matches(n, [t]) for n in linear_names):
            raise ValueError(f"target module {t!r} matches no module of this {what}. Its linear layers are "
                             f"named: {short_names(linear_names)} (or use 'all-linear').")
    return [n for n in linear_names if matches(n, targets)]


def short_names(names: Iterable[str]) -> str:
    """'k_proj', 'q_proj', ...: the distinct last parts of module names, for error messages."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    return ", ".join(repr(n) for n in short) if short else "(none)"


def output_head_names(model: Any) -> set[str]:
    """Names of the output head(s) that 'all-linear' skips: the model's output embedding (lm_head), as PEFT does."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or (head is None and name.split(".")[-1] == "lm_head"):
            heads.add(name)
    return heads


def find_linear_targets(model: Any, target_modules: str | Sequence[str]) -> list[str]:
    """Full names of the linear layers of `model` that `target_modules` selects (bitsandbytes' 4-bit and 8-bit
    layers are nn.Linear subclasses and count too); an entry naming a module that is not linear is an error."""
    import torch.nn as nn
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if n and isinstance(m, nn.Linear)]
    targets = parse_target_modules(target_modules)
    if targets != ALL_LINEAR:
        for t in targets:
            other = [n for n, m in modules.items() if n and matches(n, [t]) and not isinstance(m, nn.Linear)]
            if other:
                kind = type(modules[other[0]]).__name__
                raise TypeError(f"target module {t!r} matches {other[0]!r}, a {kind}, not an nn.Linear; LoRA here "
                                f"adapts linear layers only. Name linear layers instead: {short_names(linear)}.")
    return select(linear, targets, output_head_names(model), what=type(model).__name__)
