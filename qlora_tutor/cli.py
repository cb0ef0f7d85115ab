"""The `qlora-tutor` command: finetune, evaluate, generate, merge, compare.

Every knob has a help line a learner can act on. Heavy imports (torch, transformers) happen inside the
commands, so `--help` is instant. Bad input stops with one clear line before any long work.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from . import __version__

_FORMATTER = argparse.RawDescriptionHelpFormatter


def _defaults() -> dict:
    from .finetune import FinetuneConfig
    return {f.name: f.default for f in fields(FinetuneConfig)}


def _add_model_data(p: argparse.ArgumentParser, d: dict) -> None:
    p.add_argument("--model", default=d["model"], help=(
        "base model: 'embedded' (the project's own tiny Llama in data/, works offline), a local folder with "
        "config.json and weights, or a hub id. Models that fit a free Colab T4 in 4-bit: Qwen/Qwen2.5-0.5B-Instruct, "
        "Qwen/Qwen2.5-1.5B, TinyLlama/TinyLlama-1.1B-Chat-v1.0. (default: %(default)s)"))
    p.add_argument("--data", default=d["data"], help=(
        "instruction data: 'stories' or 'qa' (embedded, offline), a .jsonl file with instruction/input/output, "
        "a local folder (train.jsonl/test.jsonl or a hub-style data set), or a hub id in Alpaca or Guanaco "
        "('### Human: ... ### Assistant: ...') format (default: %(default)s)"))


def _finetune_parser(sub: argparse._SubParsersAction) -> None:
    d = _defaults()
    p = sub.add_parser("finetune", formatter_class=_FORMATTER, help="fine-tune a model with QLoRA (the main job)",
                       description=(
        "Load a base model in 4-bit (NF4 + double quantization), attach LoRA adapters to every linear layer,\n"
        "train them with the transformers Trainer, and save the adapter (a few MB) to OUTPUT/adapter.\n"
        "Prints the trainable parameters, the base model's bytes in 4-bit vs 16-bit, the held-out loss and\n"
        "instruction score before and after, and the time. On a laptop CPU the defaults take a few minutes.\n\n"
        "example:  qlora-tutor finetune --output runs/demo\n"
        "          qlora-tutor finetune --model Qwen/Qwen2.5-0.5B-Instruct --data stories --output runs/qwen"))
    _add_model_data(p, d)
    p.add_argument("--output", default=d["output"], help="folder for the adapter, checkpoints, metrics.json and "
                   "loss_curve.png (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint "
                   "(same settings needed; --steps may grow)")
    g = p.add_argument_group("method and quantization")
    g.add_argument("--method", choices=("qlora", "lora", "full"), default=d["method"], help=(
        "qlora: 4-bit frozen base + LoRA (the paper). lora: LoRA on a 16-bit (GPU) / 32-bit (CPU) base. "
        "full: train every weight (needs much more memory and a lower --lr, e.g. 1e-4). (default: %(default)s)"))
    g.add_argument("--quant-type", choices=("nf4", "fp4"), default=d["quant_type"], help=(
        "4-bit data type: nf4 puts its 16 levels at quantiles of a normal distribution, matching how weights are "
        "spread; fp4 is a tiny float format (bitsandbytes' own default). (default: %(default)s)"))
    g.add_argument("--no-double-quant", dest="double_quant", action="store_false", help=(
        "keep the per-block scale constants in 32-bit instead of quantizing them to 8-bit (double quantization "
        "saves ~0.37 bit per parameter, ~3 GB on a 65B model, at no measurable quality cost)"))
    g.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default=d["dtype"], help=(
        "compute dtype: weights are dequantized to it for each matmul. auto = bf16 on GPUs that have it, fp16 on "
        "T4/V100 (adapters kept in fp32 so mixed precision works), fp32 on CPU. (default: %(default)s)"))
    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--r", "--lora-r", dest="r", type=int, default=d["r"], help=(
        "rank of each adapter: the update B·A has rank r. 8-64 is usual; the paper found r matters little when "
        "all linear layers are adapted. Under torchrun write --lora-r (torchrun takes --r for one of its own "
        "options). (default: %(default)s)"))
    g.add_argument("--lora-alpha", type=float, default=d["lora_alpha"], help=(
        "the adapter's output is multiplied by alpha/r. Raising alpha acts like raising the learning rate of the "
        "adapters; keep alpha fixed and tune --lr (common: alpha = r or 2r; the paper used r=64, alpha=16). "
        "(default: %(default)s)"))
    g.add_argument("--lora-dropout", type=float, default=d["lora_dropout"], help=(
        "dropout on the adapter's input only (the base path is untouched); 0.05-0.1 helps small models against "
        "overfitting (default: %(default)s)"))
    g.add_argument("--target-modules", default=d["target_modules"], help=(
        "which linear layers get adapters: 'all-linear' (the paper: needed to match full fine-tuning) or a comma "
        "list such as 'q_proj,v_proj' (what many tutorials do) (default: %(default)s)"))
    g = p.add_argument_group("training")
    g.add_argument("--steps", dest="max_steps", type=int, default=d["max_steps"], help=(
        "optimizer steps; each sees --batch-size x --grad-accum examples (default: %(default)s)"))
    g.add_argument("--lr", dest="learning_rate", type=float, default=d["learning_rate"], help=(
        "learning rate. LoRA on a tiny model likes 1e-3..3e-3; 7B-13B models in the paper: 2e-4; full "
        "fine-tuning: 1e-5..1e-4 (default: %(default)s)"))
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help=(
        "examples per step; lower it if you run out of memory and raise --grad-accum to compensate "
        "(default: %(default)s)"))
    g.add_argument("--grad-accum", type=int, default=d["grad_accum"], help=(
        "add up gradients of this many batches before each update: same result as a bigger batch, same memory "
        "(default: %(default)s)"))
    g.add_argument("--max-length", type=int, default=d["max_length"], help=(
        "longest example in tokens (prompt + answer); longer answers are cut. Memory grows with it. "
        "(default: %(default)s)"))
    g.add_argument("--warmup-steps", type=int, default=d["warmup_steps"], help=(
        "steps over which the learning rate rises from 0; then it stays constant (the paper's schedule) "
        "(default: %(default)s)"))
    g.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"], help=(
        "clip the gradient's norm to this value; the paper's 0.3 keeps updates stable (default: %(default)s)"))
    g.add_argument("--optim", default=d["optim"], help=(
        "optimizer name for the transformers Trainer. auto = paged_adamw_32bit on CUDA (its state sits in "
        "unified memory: evicted to CPU RAM when the GPU runs short and paged back for the update, so a memory "
        "spike does not crash the run) and adamw_torch on CPU, where there is nothing to page (default: %(default)s)"))
    g.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", help=(
        "keep all activations instead of recomputing them in the backward pass: faster, but more memory"))
    g.add_argument("--seed", type=int, default=d["seed"], help="random seed (same seed, same machine: same run)")
    g.add_argument("--threads", type=int, default=d["threads"], help=(
        "CPU threads for torch. 0 = auto: 1 thread for small models on a CPU (their matrices are too small to "
        "split; extra threads mostly wait on each other, badly so when other programs share the cores), "
        "torch's default otherwise (default: %(default)s)"))
    g.add_argument("--train-examples", type=int, default=d["train_examples"], help=(
        "use only the first N training examples (default: all)"))
    g.add_argument("--save-steps", type=int, default=d["save_steps"], help=(
        "write a checkpoint every N steps so --resume can continue after an interruption; 0 = none "
        "(default: %(default)s)"))
    g.add_argument("--logging-steps", type=int, default=d["logging_steps"], help=(
        "record the training loss every N steps (the loss curve) (default: %(default)s)"))
    _add_eval_args(p, d)
    p.set_defaults(func=_cmd_finetune)


def _add_eval_args(p: argparse.ArgumentParser, d: dict) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-examples", type=int, default=d["eval_examples"], help=(
        "held-out examples for the loss (default: %(default)s)"))
    g.add_argument("--generate-examples", type=int, default=d["generate_examples"], help=(
        "held-out prompts answered (greedy) and scored; generation is the slow part on a CPU (default: %(default)s)"))
    g.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"], help=(
        "longest generated answer in tokens (default: %(default)s)"))


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, run
    names = {f.name for f in fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})
    run(cfg, overwrite=args.overwrite, resume=args.resume)
    return 0


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    d = _defaults()
    p = sub.add_parser("evaluate", formatter_class=_FORMATTER, help="held-out loss and score of a trained adapter",
                       description=(
        "Load the base model exactly as it was trained (4-bit for QLoRA), put the saved adapter on it, and\n"
        "measure the held-out loss and the instruction score. Without RUN, the base model alone is measured.\n\n"
        "example:  qlora-tutor evaluate runs/demo --show 3"))
    p.add_argument("run", nargs="?", help="a run folder (from finetune) or its adapter folder")
    p.add_argument("--model", default=None, help="base model (default: the one the run was trained on; "
                   "'embedded' when there is no RUN)")
    p.add_argument("--data", default=None, help="data set whose test split is used (default: the run's)")
    p.add_argument("--show", type=int, default=3, help="print this many prompts with their answers (default: 3)")
    _add_eval_args(p, d)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from . import generation
    from .finetune import FinetuneConfig, load_splits, load_untrained, load_trained
    if args.run:
        model, tokenizer, cfg = load_trained(args.run, model=args.model)
        if args.data:
            cfg.data = args.data
    else:
        cfg = FinetuneConfig(model=args.model or "embedded", data=args.data or "stories")
        model, tokenizer = load_untrained(cfg)
    _, test = load_splits(cfg)
    res = generation.evaluate(model, tokenizer, test[:args.eval_examples], generation.scorer_for(cfg.data),
                              args.generate_examples, args.max_new_tokens, cfg.max_length, progress=True)
    for ex, answer in list(zip(test, res["answers"]))[:args.show]:
        print(f"--- {ex['instruction']}\n{answer}\n")
    score = "n/a" if res["score"] is None else f"{res['score']:.3f}"
    print(f"held-out loss {res['loss']:.4f} on {min(len(test), args.eval_examples)} examples; "
          f"score {score} on {len(res['answers'])} prompts")
    return 0


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", formatter_class=_FORMATTER, help="answer your own instruction with a trained adapter",
                       description=(
        "Answer an instruction (greedy decoding) with the base model + a trained adapter; --compare also shows\n"
        "the base model's answer, so you can see what fine-tuning changed.\n\n"
        "example:  qlora-tutor generate runs/demo --prompt \"Write a short story about a fox named Pip.\" --compare"))
    p.add_argument("run", nargs="?", help="a run folder (from finetune) or its adapter folder; "
                   "leave out to use the base model alone")
    p.add_argument("--prompt", action="append", required=True, help="the instruction (repeat for several)")
    p.add_argument("--input", default="", help="optional input text shown under the instruction")
    p.add_argument("--model", default=None, help="base model (default: the run's, or 'embedded')")
    p.add_argument("--compare", action="store_true", help="also print the base model's answer (adapter disabled)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default: %(default)s)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from . import generation
    from .finetune import FinetuneConfig, load_trained, load_untrained
    if args.run:
        model, tokenizer, _ = load_trained(args.run, model=args.model)
    else:
        model, tokenizer = load_untrained(FinetuneConfig(model=args.model or "embedded"))
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


def _merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", formatter_class=_FORMATTER, help="fold an adapter into a 16-bit model for deployment",
                       description=(
        "Write a standalone model with the adapter folded in: W' = W + (alpha/r)·B·A, saved as 16-bit\n"
        "safetensors that loads with plain transformers (no peft, no bitsandbytes).\n\n"
        "Why not merge into the 4-bit weights? W' would have to be quantized again to 4 bits: the small update\n"
        "is mostly rounded away or distorted (the 4-bit grid is coarse), so the merged model no longer computes\n"
        "what you trained. Here the base is dequantized (or loaded in full precision), the update is added in\n"
        "32-bit, and the result is stored in 16-bit, whose rounding error is ~100x smaller than 4-bit's.\n\n"
        "example:  qlora-tutor merge runs/demo --output runs/demo-merged"))
    p.add_argument("run", help="a run folder (from finetune) or its adapter folder")
    p.add_argument("--output", required=True, help="folder for the merged model (config, safetensors, tokenizer)")
    p.add_argument("--base", choices=("dequantized", "original"), default="dequantized", help=(
        "dequantized: the 4-bit weights the adapter was trained against, dequantized (reproduces the fine-tuned "
        "model's outputs); original: the base model's full-precision weights (default: %(default)s)"))
    p.add_argument("--save-dtype", choices=("bf16", "fp16"), default="bf16", help=(
        "dtype of the saved weights: bf16 (wide range, the paper's) or fp16 (for GPUs without bf16) "
        "(default: %(default)s)"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing model in --output")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_adapter
    merge_adapter(args.run, args.output, base=args.base, save_dtype=args.save_dtype, overwrite=args.overwrite)
    return 0


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", formatter_class=_FORMATTER, help="full FT vs LoRA vs QLoRA variants, several seeds",
                       description=(
        "Train, on the same data and step budget: full fine-tuning, LoRA on a 16/32-bit base, QLoRA NF4 + double\n"
        "quantization, QLoRA NF4, QLoRA FP4, and QLoRA with adapters on q_proj,v_proj only. Each with several\n"
        "seeds; reports held-out loss, instruction score, trainable parameters, weight bytes, peak memory and\n"
        "time as mean ± std, and whether each difference to QLoRA NF4+DQ exceeds the seed-to-seed spread.\n"
        "Writes OUTPUT/compare.csv, compare.md, compare.png and runs.csv.\n\n"
        "example:  qlora-tutor compare --output results/compare --seeds 0 1 2 --steps 60"))
    p.add_argument("--model", default="embedded", help="base model (default: %(default)s)")
    p.add_argument("--data", default="stories", help="data set (default: %(default)s)")
    p.add_argument("--output", default="results/compare", help="folder for the tables and plot (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per method (default: 0 1 2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the finetune default)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default: the finetune default)")
    p.add_argument("--methods", nargs="+", default=None, help="subset of methods to run (default: all)")
    p.add_argument("--generate-examples", type=int, default=None, help="prompts scored per run")
    p.add_argument("--eval-examples", type=int, default=None, help="held-out examples for the loss per run")
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help=(
        "run every training in this process (faster start; peak memory less clean) instead of one process each"))
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare
    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "generate_examples", "eval_examples")
                 if getattr(args, k) is not None}
    run_compare(args.output, seeds=args.seeds, methods=args.methods, model=args.model, data=args.data,
                isolate=args.isolate, **overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-tutor", formatter_class=_FORMATTER,
        description="QLoRA Tutor: 4-bit quantized low-rank fine-tuning, from first principles to the real stack.\n\n"
                    "start here:  qlora-tutor finetune --output runs/demo\n"
                    "each command explains its knobs:  qlora-tutor finetune --help",
    )
    parser.add_argument("--version", action="version", version=f"qlora-tutor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_finetune_parser, _evaluate_parser, _generate_parser, _merge_parser, _compare_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"qlora-tutor {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
