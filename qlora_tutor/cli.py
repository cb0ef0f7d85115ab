"""The `qlora-tutor` command: finetune, evaluate, generate, merge, compare.

Every knob has a help line a learner can act on. The parser is built from `config` alone (no torch, no
transformers), so `--help` is instant; heavy imports happen inside the commands. Bad input stops with one clear
line before any long work.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from . import __version__
from .config import SAVE_DTYPES, FinetuneConfig, Range

_FORMATTER = argparse.RawDescriptionHelpFormatter
_SEED = Range(0, 2**32 - 1, integer=True)
_COUNT = Range(0, integer=True)      # how many (0 allowed)
_POSITIVE = Range(1, integer=True)   # how many (at least one)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the same one-line form as every other error of the command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_knobs(p: argparse.ArgumentParser, group_names: tuple[str, ...]) -> None:
    """One option per FinetuneConfig field of these groups, with the flags, help and choices given there."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(FinetuneConfig):
        meta = f.metadata
        if meta.get("group") not in group_names:
            continue
        g = p if meta["group"] == "model and data" else groups.setdefault(
            meta["group"], p.add_argument_group(meta["group"]))
        flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
        if meta.get("switch"):  # True / False / None (auto): an on flag and an off flag
            on, off = flags
            g.add_argument(on, dest=f.name, action="store_true", default=f.default, help=meta["help"])
            g.add_argument(off, dest=f.name, action="store_false", default=f.default, help=f"turn {on} off")
        elif isinstance(f.default, bool):  # a feature that is on by default: its flag turns it off
            g.add_argument(*flags, dest=f.name, action="store_false", help=meta["help"])
        else:
            options = {"type": type(f.default), **meta["argparse"]}
            if meta.get("valid") is not None:  # numbers: parsed and range-checked by the field's own Range
                options["type"] = meta["valid"].parser(options["type"], flags[0])
            g.add_argument(*flags, dest=f.name, default=f.default, help=meta["help"], **options)


def _finetune_args(p: argparse.ArgumentParser) -> None:
    _add_knobs(p, ("model and data",))
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint "
                   "(same settings needed; --steps may grow)")
    _add_knobs(p, ("method and quantization", "LoRA adapters", "training", "evaluation"))


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import run
    names = {f.name for f in fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})
    run(cfg, overwrite=args.overwrite, resume=args.resume)
    return 0


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _add_run_and_model(p)
    p.add_argument("--data", default=None, help="data set whose test split is used (default: the run's)")
    p.add_argument("--show", type=_COUNT.parser(int, "--show"), default=3,
                   help="print this many prompts with their answers (default: 3)")
    _add_knobs(p, ("evaluation",))


def _add_run_and_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", help="a run folder (from finetune) or its adapter folder; leave out to use "
                   "the base model alone")
    p.add_argument("--model", default=None, help="base model (default: the one the run was trained on; "
                   "'embedded' when there is no RUN)")


def _load_run_or_base(args: argparse.Namespace) -> tuple:
    """(model, tokenizer, config) of the run named on the command line, or of the base model alone."""
    from .finetune import configure_threads, load_trained, load_untrained
    if args.run:
        model, tokenizer, cfg = load_trained(args.run, model=args.model)
    else:
        cfg = FinetuneConfig(model=args.model or "embedded")
        model, tokenizer = load_untrained(cfg)
    configure_threads(model, cfg.threads)  # entry points set the thread count, loaders do not
    return model, tokenizer, cfg


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from . import generation
    from .finetune import load_splits
    model, tokenizer, cfg = _load_run_or_base(args)
    if args.data:
        cfg.data = args.data
    _, test = load_splits(cfg)
    res = generation.evaluate(model, tokenizer, test[:args.eval_examples], generation.scorer_for(cfg.data),
                              args.generate_examples, args.max_new_tokens, cfg.max_length, progress=True)
    for ex, answer in list(zip(test, res["answers"]))[:args.show]:
        print(f"--- {ex['instruction']}\n{answer}\n")
    score = "n/a" if res["score"] is None else f"{res['score']:.3f}"
    print(f"held-out loss {res['loss']:.4f} on {min(len(test), args.eval_examples)} examples; "
          f"score {score} on {len(res['answers'])} prompts")
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    _add_run_and_model(p)
    p.add_argument("--prompt", action="append", required=True, help="the instruction (repeat for several)")
    p.add_argument("--input", default="", help="optional input text shown under the instruction")
    p.add_argument("--compare", action="store_true", help="also print the base model's answer (adapter disabled)")
    p.add_argument("--max-new-tokens", type=_POSITIVE.parser(int, "--max-new-tokens"), default=128,
                   help="longest answer in tokens (default: %(default)s)")


def _cmd_generate(args: argparse.Namespace) -> int:
    from . import generation
    for i, prompt in enumerate(args.prompt, start=1):
        if not prompt.strip():
            raise ValueError(f"--prompt number {i} is empty: give the instruction to answer, e.g. "
                             "--prompt \"Write a short story about a fox named Pip.\"")
    model, tokenizer, _ = _load_run_or_base(args)
    examples = [{"instruction": p, "input": args.input} for p in args.prompt]
    answers = generation.generate(model, tokenizer, examples, args.max_new_tokens)
    base_answers = None
    if args.compare and args.run:
        with model.disable_adapter():
            base_answers = generation.generate(model, tokenizer, examples, args.max_new_tokens)
    for i, ex in enumerate(examples):
        print(f"### {ex['instruction']}")
        if base_answers is not None:
            print(f"[base model]\n{base_answers[i]}\n[fine-tuned]")
        print(f"{answers[i]}\n")
    return 0


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder (from finetune) or its adapter folder")
    p.add_argument("--output", required=True, help="folder for the merged model (config, safetensors, tokenizer)")
    p.add_argument("--base", choices=("dequantized", "original"), default="dequantized", help=(
        "dequantized: the 4-bit weights the adapter was trained against, dequantized (reproduces the fine-tuned "
        "model's outputs); original: the base model's full-precision weights (default: %(default)s)"))
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, default="bf16", help=(
        "dtype of the saved weights: bf16 (wide range, the paper's) or fp16 (for GPUs without bf16) "
        "(default: %(default)s)"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing model in --output")


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_adapter
    merge_adapter(args.run, args.output, base=args.base, save_dtype=args.save_dtype, overwrite=args.overwrite)
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="base model (default: %(default)s)")
    p.add_argument("--data", default="stories", help="data set (default: %(default)s)")
    p.add_argument("--output", default="runs/compare", help="folder for the tables and plot (default: %(default)s)")
    p.add_argument("--seeds", type=_SEED.parser(int, "--seeds"), nargs="+", default=[0, 1, 2],
                   help="seeds per method (default: 0 1 2)")
    p.add_argument("--steps", type=_POSITIVE.parser(int, "--steps"), default=None,
                   help="optimizer steps per run (default: the finetune default)")
    p.add_argument("--batch-size", type=_POSITIVE.parser(int, "--batch-size"), default=None,
                   help="examples per step (default: the finetune default)")
    p.add_argument("--methods", nargs="+", default=None, help="subset of methods to run (default: all)")
    p.add_argument("--generate-examples", type=_COUNT.parser(int, "--generate-examples"), default=None,
                   help="prompts scored per run")
    p.add_argument("--eval-examples", type=_POSITIVE.parser(int, "--eval-examples"), default=None,
                   help="held-out examples for the loss per run")
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help=(
        "run every training in this process (faster start; peak memory less clean) instead of one process each"))


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare
    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "generate_examples", "eval_examples")
                 if getattr(args, k) is not None}
    run_compare(args.output, seeds=args.seeds, methods=args.methods, model=args.model, data=args.data,
                isolate=args.isolate, **overrides)
    return 0


# The subcommands: name, one-line help, description with an example, its arguments, what it runs.
_COMMANDS = [
    ("finetune", "fine-tune a model with QLoRA (the main job)",
     ("Load a base model in 4-bit (NF4 + double quantization), attach LoRA adapters to every linear layer,\n"
      "train them with the transformers Trainer, and save the adapter (only the LoRA matrices) to OUTPUT/adapter.\n"
      "Prints the trainable parameters, the base model's bytes in 4-bit vs 16-bit, the held-out loss and\n"
      "instruction score before and after, and the time. On a laptop CPU the defaults take a few minutes.\n\n"
      "example:  qlora-tutor finetune --output runs/demo\n"
      "          qlora-tutor finetune --model Qwen/Qwen2.5-0.5B-Instruct --data stories --output runs/qwen"),
     _finetune_args, _cmd_finetune),
    ("evaluate", "held-out loss and score of a trained adapter",
     ("Load the base model exactly as it was trained (4-bit for QLoRA), put the saved adapter on it, and\n"
      "measure the held-out loss and the instruction score. Without RUN, the base model alone is measured.\n\n"
      "example:  qlora-tutor evaluate runs/demo --show 3"),
     _evaluate_args, _cmd_evaluate),
    ("generate", "answer your own instruction with a trained adapter",
     ("Answer an instruction (greedy decoding) with the base model + a trained adapter; --compare also shows\n"
      "the base model's answer, so you can see what fine-tuning changed.\n\n"
      "example:  qlora-tutor generate runs/demo --prompt \"Write a short story about a fox named Pip.\" --compare"),
     _generate_args, _cmd_generate),
    ("merge", "fold an adapter into a 16-bit model for deployment",
     ("Write a standalone model with the adapter folded in: W' = W + (alpha/r)·B·A, saved as 16-bit\n"
      "safetensors that loads with plain transformers (no peft, no bitsandbytes).\n\n"
      "Why not merge into the 4-bit weights? W' would have to be quantized again to 4 bits: the small update\n"
      "is mostly rounded away or distorted (the 4-bit grid is coarse), so the merged model no longer computes\n"
      "what you trained. Here the base is dequantized (or loaded in full precision), the update is added in\n"
      "32-bit, and the result is stored in 16-bit, whose rounding error is ~100x smaller than 4-bit's.\n\n"
      "example:  qlora-tutor merge runs/demo --output runs/demo-merged"),
     _merge_args, _cmd_merge),
    ("compare", "full FT vs LoRA vs QLoRA variants, several seeds",
     ("Train, on the same data and step budget: full fine-tuning, LoRA on a 16/32-bit base, QLoRA NF4 + double\n"
      "quantization, QLoRA NF4, QLoRA FP4, and QLoRA with adapters on q_proj,v_proj only. Each with several\n"
      "seeds; reports held-out loss, instruction score, trainable parameters, weight bytes, peak memory and\n"
      "time as mean ± std, and whether each difference to QLoRA NF4+DQ exceeds the seed-to-seed spread.\n"
      "Writes OUTPUT/compare.csv, compare.md, compare.png and runs.csv.\n\n"
      "example:  qlora-tutor compare --output runs/compare --seeds 0 1 2 --steps 60"),
     _compare_args, _cmd_compare),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qlora-tutor", formatter_class=_FORMATTER,
        description="QLoRA Tutor: 4-bit quantized low-rank fine-tuning, from first principles to the real stack.\n\n"
                    "start here:  qlora-tutor finetune --output runs/demo\n"
                    "each command explains its knobs:  qlora-tutor finetune --help",
    )
    parser.add_argument("--version", action="version", version=f"qlora-tutor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_line, description, add_arguments, command in _COMMANDS:
        p = sub.add_parser(name, formatter_class=_FORMATTER, help=help_line, description=description)
        add_arguments(p)
        p.set_defaults(func=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:  # bad input, a missing/unwritable/damaged file: one line
        print(f"qlora-tutor {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .finetune import TrainingDiverged
        if not isinstance(e, TrainingDiverged):
            raise
        print(f"qlora-tutor {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    """An exception as one line: OSError's text and file (e.g. 'Permission denied: runs/x'), others as they say."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
