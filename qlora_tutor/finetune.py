"""QLoRA fine-tuning with the real stack: transformers loads the base in 4-bit through bitsandbytes, PEFT adds
LoRA adapters, the transformers Trainer trains them. The same code does LoRA on a 16/32-bit base and full
fine-tuning, so that `compare` can put the three side by side on the same data and budget.

A run has phases, each a function below: check (every option, the model's files, the data, the output folder:
all before the model loads or a file is written), load, evaluate, train, evaluate again, save (the adapter is
written atomically). A run can be resumed from its newest complete checkpoint. `--overwrite` keeps the old run
aside until the new one has its first checkpoint (or ends), and puts it back if the new one fails before. A run
whose loss, gradients or weights stop being finite stops with `TrainingDiverged`; nothing non-finite is saved.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from . import data, distributed, generation, hardware, models, paths, plots
from .config import FinetuneConfig, check_values
from .counting import count_parameters, weight_bytes
from .measure import PeakMemory
from .paths import atomic_save_dir, atomic_write_text
from .quiet import quiet_libraries
from .targets import parse_target_modules

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class TrainingDiverged(RuntimeError):
    """The training loss, the gradients or the trainable weights stopped being finite (NaN or inf)."""


# ------------------------------------------------------------------------------------------- checks up front
def check_config(cfg: FinetuneConfig, info: hardware.DeviceInfo | None = None,
                 data_root: str | os.PathLike | None = None, warn: Log = _stderr) -> tuple[str, torch.dtype]:
    """Validate everything cheap to validate; returns (model path, compute dtype). Raises ValueError/TypeError/
    FileNotFoundError naming the option or file and the fix; `warn` hears about settings that work but badly."""
    check_values(cfg)  # every option against its declared range and choices (config.py), the method included
    info = info or hardware.detect()
    dtype = hardware.compute_dtype(cfg.dtype, info)
    if info.device == "cpu" and dtype == torch.float16:
        warn("warning: --dtype fp16 on a CPU is emulated and runs about 11x slower than fp32, with less precision; "
             "leave --dtype on auto (fp32 on a CPU) unless you are checking fp16 behaviour.")
    check_optim(cfg.optim)
    model_path = models.resolve_model(cfg.model, data_root)
    model_config = models.load_model_config(model_path)
    if cfg.method != "full":
        models.check_targets(model_config, cfg.target_modules, r=cfg.r, warn=warn)
    context = getattr(model_config, "max_position_embeddings", None)
    if isinstance(context, int) and cfg.max_length > context:
        raise ValueError(f"max_length (--max-length) {cfg.max_length} is longer than the model's context "
                         f"({context} positions, max_position_embeddings): use at most {context}")
    return model_path, dtype


def check_optim(name: str) -> None:
    """'auto' or an optimizer name the transformers Trainer knows (its OptimizerNames)."""
    with quiet_libraries():   # the first import of transformers' Trainer side imports PEFT, then bitsandbytes
        from transformers.training_args import OptimizerNames
    known = [o.value for o in OptimizerNames]
    if name != "auto" and name not in known:
        usual = [o for o in ("adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "sgd") if o in known]
        raise ValueError(f"optim (--optim) {name!r} is not an optimizer the transformers Trainer knows: use 'auto' "
                         f"or one of {', '.join(usual)} (all: transformers.training_args.OptimizerNames)")


def check_prompts(examples: list[dict], tokenizer: Any, max_length: int, what: str) -> None:
    """Every prompt leaves room for at least one answer token within max_length; else an error naming the
    longest prompt, where it is, and the --max-length it needs."""
    longest, where = 0, ""
    for ex in examples:
        n = len(data.prompt_ids(tokenizer, ex["instruction"], ex.get("input", "")))
        if n > longest:
            longest, where = n, ex.get("_where", "an example")
    if longest >= max_length:
        raise ValueError(f"max_length (--max-length) {max_length} leaves no room for an answer: the longest "
                         f"{what} prompt is {longest} tokens ({where}). Use --max-length {longest + 1} or more "
                         "(answers longer than what is left are cut), or shorten that example.")


def load_splits(cfg: FinetuneConfig, data_root: str | os.PathLike | None = None) -> tuple[list[dict], list[dict]]:
    """Training and held-out examples. A single file with no test split is split 90/10 (deterministically)."""
    source = data.resolve_dataset(cfg.data, data_root)
    if isinstance(source, str) and not models.looks_like_hub_id(source):
        raise FileNotFoundError(f"data set {cfg.data!r} not found: give 'stories', 'qa', a .jsonl file, a folder or a hub id")
    train = data.load_examples(source, "train")
    if isinstance(source, Path) and source.is_file():
        cut = max(1, len(train) // 10)
        train, test = train[:-cut], train[-cut:]
        if not train:
            raise ValueError(f"data set {cfg.data}: too few examples to hold some out for evaluation")
    else:
        test = data.load_examples(source, "test")
    if cfg.train_examples is not None:
        train = train[: cfg.train_examples]
    return train, test


# ------------------------------------------------------------------------------------------- the model to train
def eval_batch_size(cfg: FinetuneConfig) -> int:
    """Prompts per generation batch: generous, since each decoding step dequantizes every 4-bit weight once
    for the whole batch, so bigger batches cost little more per step."""
    return max(cfg.batch_size, 32)


def configure_threads(model: Any, requested: int = 0) -> int:
    """Set torch's CPU thread count: `requested`, or for 0 (auto) one thread when a small model runs on a CPU.

    The embedded model's matrices are tiny (256 x 704): splitting each product over threads costs more in
    synchronisation than it saves, and when other programs share the cores the threads wait on each other
    (measured on a busy 2-core machine: 4-bit generation 20x slower with 2 threads than with 1).
    Entry points (the CLI, `run`, notebooks) call this; loaders do not.
    """
    if requested:
        torch.set_num_threads(requested)
    elif not torch.cuda.is_available() and count_parameters(model).total < SMALL_MODEL:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def lora_config(cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig
    return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=parse_target_modules(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


SMALL_MODEL = 50_000_000  # parameters: below this, a CPU run uses one thread and no gradient checkpointing


def use_gradient_checkpointing(cfg: FinetuneConfig, model: Any) -> bool:
    """cfg.gradient_checkpointing, or for None (auto): on with CUDA or a large model, off for a small model on
    a CPU. Recomputing activations saves memory a small CPU run does not need and costs a second forward pass
    (about half the step time of the embedded model); the numbers come out the same (tests check the adapter
    bit for bit), since the recomputation replays the same random dropout masks."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    return torch.cuda.is_available() or count_parameters(model).total >= SMALL_MODEL


def prepare_for_training(model: Any, cfg: FinetuneConfig) -> Any:
    """Freeze/cast/checkpoint as each method needs, then wrap with LoRA (not for full fine-tuning)."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    gc_kwargs = {"use_reentrant": False}
    checkpointing = use_gradient_checkpointing(cfg, model)
    with quiet_libraries():
        if cfg.method == "qlora" and distributed.fsdp_enabled():
            # FSDP flattens a layer's weights into one tensor of one dtype: keep the norms in the storage dtype
            # (no fp32 cast), freeze the base and checkpoint as prepare_model_for_kbit_training would
            model.requires_grad_(False)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
                model.enable_input_require_grads()
        elif cfg.method == "qlora":
            # freezes the base, casts non-4-bit weights (norms, embeddings) to fp32, turns on checkpointing
            model = prepare_model_for_kbit_training(model, checkpointing, gc_kwargs)
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        if cfg.method == "full":
            return model
        hardware.set_seed(cfg.seed)  # the LoRA A matrices start random: make that repeatable
        return get_peft_model(model, lora_config(cfg))  # adapters in fp32 even on a 16-bit base (autocast_adapter_dtype)


# --------------------------------------------------------------------------------------- a saved run, reloaded
def read_run_config(path: str | Path) -> FinetuneConfig:
    """A saved run_config.json as a FinetuneConfig, checked; a damaged file is an error that names it."""
    path = Path(path)
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}): it is not the JSON a run writes. Train the run again, or "
                         "restore the file from a copy.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is damaged: it should hold the run's settings as one JSON object")
    unknown = sorted(set(raw) - {f.name for f in fields(FinetuneConfig)})
    if unknown:
        raise ValueError(f"{path} holds settings this version of qlora-tutor does not know ({', '.join(unknown)}): "
                         "it was written by another version, or it is damaged")
    try:
        return FinetuneConfig(**raw).check()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is damaged: {e}") from None


def check_artifact(folder: Path, method: str) -> None:
    """The saved adapter (or full model) in `folder` is whole: its config parses and its weights file is
    complete (sizes and header checked, nothing loaded); an error names the damaged file."""
    if method == "full":
        models.check_model_folder(folder)
        return
    config = folder / "adapter_config.json"
    try:
        json.loads(config.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config} is damaged ({e}): train the run again or restore the file") from None
    models.check_safetensors(folder / "adapter_model.safetensors")


def load_trained(run_or_adapter: str | Path, model: str | None = None,
                 dtype: str | None = None) -> tuple[Any, Any, FinetuneConfig]:
    """A trained run back in memory: base loaded exactly as for training, then the saved adapter (or full model)."""
    from peft import PeftModel
    folder = find_artifact(run_or_adapter)
    cfg = read_run_config(folder / "run_config.json")
    if model:
        cfg.model = model
    if dtype:
        cfg.dtype = dtype
    check_artifact(folder, cfg.method)
    model_path, compute = check_config(cfg)
    tokenizer = models.load_tokenizer(model_path)
    if cfg.method == "full":
        return models.load_base(str(folder), "full", compute).eval(), tokenizer, cfg
    base = _prepare_base_only(models.load_base(model_path, cfg.method, compute, cfg.quant_type, cfg.double_quant), cfg)
    with quiet_libraries():
        return PeftModel.from_pretrained(base, str(folder)).eval(), tokenizer, cfg


def load_untrained(cfg: FinetuneConfig) -> tuple[Any, Any]:
    """The base model alone, loaded as `cfg` would train it (4-bit for qlora), for a before-training look."""
    model_path, compute = check_config(cfg)
    tokenizer = models.load_tokenizer(model_path)
    base = _prepare_base_only(models.load_base(model_path, cfg.method, compute, cfg.quant_type, cfg.double_quant), cfg)
    return base.eval(), tokenizer


def _prepare_base_only(model: Any, cfg: FinetuneConfig) -> Any:
    """The same dtype casts as training (so a reload computes bit for bit the same), without LoRA or checkpointing."""
    from peft import prepare_model_for_kbit_training
    if cfg.method == "qlora":
        with quiet_libraries():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def find_artifact(path: str | Path) -> Path:
    """The folder holding a saved adapter (or full model): the path itself, or `<run>/adapter` / `<run>/model`."""
    p = Path(path)
    if p.is_file():
        raise NotADirectoryError(f"{p} is a file: give the run folder (from finetune) or its adapter folder")
    for candidate in (p, p / "adapter", p / "model"):
        if (candidate / "run_config.json").is_file() and (
                (candidate / "adapter_config.json").is_file() or (candidate / "config.json").is_file()):
            return candidate
    if not p.exists():
        raise paths.no_such_path(str(path), "run")
    raise FileNotFoundError(f"no trained adapter found in {p} (looked for adapter_config.json there and in "
                            f"{p / 'adapter'}); train one with `qlora-tutor finetune --output {p}`")


# ------------------------------------------------------------------------------------------ the output folder
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None when it is complete). The Trainer writes the
    weights, optimizer, scheduler and random state first and trainer_state.json last, so a save cut short
    lacks trainer_state.json or holds a truncated file; each file is checked from its size and header."""
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return "trainer_state.json is missing: the save was interrupted"
    try:
        state = json.loads(state_file.read_text())
        step = int(state["global_step"])
    except (ValueError, KeyError, TypeError):
        return "trainer_state.json is damaged"
    m = _CHECKPOINT.match(folder.name)
    if m and int(m[1]) != step:
        return f"trainer_state.json says step {step}, not {m[1]}"
    weights = [folder / n for n in ("adapter_model.safetensors", "model.safetensors") if (folder / n).is_file()]
    if not weights and not any(folder.glob("*.safetensors.index.json")) and not any(folder.glob("pytorch_model_fsdp*")):
        return "it holds no weights file"
    for f in sorted(folder.glob("*.safetensors")):
        try:
            models.check_safetensors(f)
        except ValueError:
            return f"{f.name} is truncated or damaged"
    if not (folder / "optimizer.pt").exists() and not any(folder.glob("optimizer*")):
        return "optimizer.pt is missing"
    for f in sorted([*folder.glob("*.pt"), *folder.glob("*.pth")]):
        if not zipfile.is_zipfile(f):
            return f"{f.name} is truncated or damaged"
    return None


def newest_complete_checkpoint(out: Path) -> tuple[Path | None, list[str]]:
    """The complete checkpoint with the highest step in `out`/checkpoints, and one line for each folder
    skipped on the way (newer but incomplete, or not named checkpoint-<step>)."""
    notes: list[str] = []
    found = []
    folder = out / "checkpoints"
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not p.is_dir() or not p.name.startswith("checkpoint"):
            continue
        m = _CHECKPOINT.match(p.name)
        if m:
            found.append((int(m[1]), p))
        else:
            notes.append(f"skipped {p}: not a checkpoint name (the Trainer writes checkpoint-<step>)")
    for _, p in sorted(found, reverse=True):
        problem = checkpoint_problem(p)
        if problem is None:
            return p, notes
        notes.append(f"skipped {p}: {problem}")
    return None, notes


def artifact_name(method: str) -> str:
    """The folder inside a run that holds its result: `model` for full fine-tuning, `adapter` otherwise."""
    return "model" if method == "full" else "adapter"


def _has_progress(out: Path, method: str) -> bool:
    """Whether the run in `out` got far enough to be worth keeping: a complete checkpoint or a saved result."""
    return (out / artifact_name(method)).is_dir() or newest_complete_checkpoint(out)[0] is not None


@dataclass
class OutputPlan:
    """What a run will do with its output folder, decided before anything is changed."""

    out: Path
    resume_from: Path | None = None
    replace: bool = False          # --overwrite of an earlier run: kept aside until the new one has a checkpoint
    notes: list[str] = field(default_factory=list)  # what the checks found (checkpoints skipped, folders repaired)


_RUN_FILES = {"run_config.json", "before.json", "checkpoints", "adapter", "model", "metrics.json", "loss_curve.png"}


def recover_output(out: Path) -> list[str]:
    """Repair what a killed run left around `out`, and say what was done: finish or roll back an interrupted
    adapter swap, remove stale temporary copies, and settle an interrupted --overwrite (the old run is put back
    when the new one never reached a checkpoint, and dropped when it did)."""
    notes: list[str] = []
    for kind in ("adapter", "model"):
        notes += paths.recover_dir(out / kind)
    for aside, pid in paths.siblings(out, "replaced"):
        if pid is not None and not paths.is_stale(aside, pid):
            continue  # another run is replacing it right now
        saved = aside / "run_config.json"
        method = json.loads(saved.read_text()).get("method", "qlora") if saved.is_file() else "qlora"
        if out.is_dir() and _has_progress(out, method):
            shutil.rmtree(aside, ignore_errors=True)
            notes.append(f"removed the run that {out} replaced (kept in {aside.name}): the new run had reached a checkpoint")
        elif out.is_dir() and not set(p.name for p in out.iterdir()) <= _RUN_FILES:
            notes.append(f"left {aside.name} (an earlier run of {out}) alone: {out} holds files no run writes")
        else:
            if out.is_dir():
                shutil.rmtree(out)
            os.rename(aside, out)
            notes.append(f"put back the earlier run in {out}: the run that was replacing it stopped before its "
                         "first checkpoint")
    notes += paths.clean_stale(out)
    return notes


def prepare_output(cfg: FinetuneConfig, overwrite: bool = False, resume: bool = False) -> OutputPlan:
    """Check the output folder before training and decide what to do with it; changes nothing.

    A folder holding another run is refused unless `overwrite` (replace it once the new run has its first
    checkpoint) or `resume` (continue it from its newest complete checkpoint, which needs the same
    configuration and more --steps than that checkpoint). A non-empty folder that is not a run is never touched.
    """
    out = Path(cfg.output)
    if overwrite and resume:
        raise ValueError("choose --overwrite (start again) or --resume (continue), not both")
    paths.check_writable_dir(out, "output folder (--output)")
    saved = out / "run_config.json"
    plan = OutputPlan(out)
    if resume:
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {out} holds no run to resume (no run_config.json); drop --resume")
        old = read_run_config(saved)
        diff = {k: (v, getattr(cfg, k)) for k, v in old.identity().items() if getattr(cfg, k) != v}
        if diff:
            listing = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"--resume: the run in {out} was made with a different configuration ({listing}). "
                             "Use the same settings, or --overwrite / another --output to start a new run.")
        checkpoint, plan.notes = newest_complete_checkpoint(out)
        if checkpoint is None:
            skipped = f" ({'; '.join(plan.notes)})" if plan.notes else ""
            raise FileNotFoundError(f"--resume: {out} has no complete checkpoint{skipped}; they are saved every "
                                    "--save-steps. Start again with --overwrite.")
        step = int(_CHECKPOINT.match(checkpoint.name)[1])
        if step >= cfg.max_steps:
            done = "has finished" if step == cfg.max_steps else "is past"
            raise ValueError(f"--resume: the run in {out} {done} --steps {cfg.max_steps} (its newest checkpoint is "
                             f"at step {step}): there is nothing left to train. To train longer, give more --steps "
                             f"than {step}; to start again, --overwrite.")
        plan.resume_from = checkpoint
        return plan
    if out.exists() and any(out.iterdir()):
        if not saved.is_file():
            raise ValueError(f"output folder {out} is not empty and holds no qlora-tutor run: choose another --output")
        if not overwrite:
            raise ValueError(f"output folder {out} already holds a run: add --overwrite to replace it, "
                             "--resume to continue it, or choose another --output")
        plan.replace = True
    return plan


def _claim_output(plan: OutputPlan) -> Path | None:
    """Make the output folder ready: an old run replaced by --overwrite is renamed aside (returned) for
    `_settle_replaced` to drop or put back."""
    out = plan.out
    aside = None
    if plan.replace:
        aside = out.parent / f".{out.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, aside)
    out.mkdir(parents=True, exist_ok=True)
    return aside


def _settle_replaced(aside: Path | None, out: Path, method: str, succeeded: bool, log: Log) -> None:
    """When the run ends or fails: drop the run kept aside if the new one succeeded or has a checkpoint;
    otherwise put it back, so a failed --overwrite loses nothing."""
    if aside is None or not aside.exists():
        return
    if succeeded or _has_progress(out, method):
        shutil.rmtree(aside, ignore_errors=True)
        if not succeeded:
            log(f"the earlier run in {out} was replaced: the new run has a checkpoint (continue it with --resume)")
        return
    shutil.rmtree(out, ignore_errors=True)
    os.rename(aside, out)
    log(f"the earlier run in {out} was put back: the new run stopped before its first checkpoint")


def _drop_replaced_at_first_checkpoint(aside: Path | None, log: Log) -> Any:
    """A Trainer callback: once the new run's first checkpoint is written, the run it replaces is deleted."""
    from transformers import TrainerCallback

    class DropReplaced(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if aside is not None and aside.exists():
                shutil.rmtree(aside, ignore_errors=True)
                log(f"checkpoint at step {state.global_step} written: the run it replaces was deleted")

    return DropReplaced()


# ------------------------------------------------------------------------------------------------- training
def resolved_optim(cfg: FinetuneConfig) -> str:
    """The optimizer 'auto' stands for: paged AdamW (32-bit state) on CUDA, plain AdamW on a CPU."""
    if cfg.optim != "auto":
        return cfg.optim
    return "paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch"


def training_arguments(cfg: FinetuneConfig, compute: torch.dtype, output_dir: str) -> Any:
    """The Trainer's settings: the paper's max grad norm 0.3 and constant schedule after a short warm-up.

    On CUDA the optimizer is paged AdamW (32-bit state): its state lives in CUDA unified memory, which the driver
    evicts to CPU RAM when the GPU runs short and pages back for the update step, so a memory spike does not
    crash the run. On a CPU there is nothing to page; plain AdamW is used.
    """
    from transformers import TrainingArguments
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=output_dir, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant_with_warmup", warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm,
        weight_decay=0.0, optim=resolved_optim(cfg), seed=cfg.seed, data_seed=cfg.seed,
        bf16=cuda and compute == torch.bfloat16, fp16=cuda and compute == torch.float16, use_cpu=not cuda,
        logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or cfg.max_steps, save_total_limit=2, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=cuda,
    )


def _progress_callback(mode: str, log: Log) -> Any:
    """A progress bar (mode 'bar'), one printed line per logging step ('print', for notebooks), or nothing."""
    from tqdm.std import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.time()
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step") \
                if mode == "bar" else None

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{logs['loss']:.3f}")
                elif mode == "print":
                    log(f"step {state.global_step:>4}/{state.max_steps}  loss {logs['loss']:.4f}  "
                        f"({time.time() - self.t0:.0f} s)")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return Progress()


_TRY = ("Try a lower --lr, keep --max-grad-norm at 0.3 (the paper's), compute in fp32 or bf16 instead of fp16 "
        "(--dtype), and check the base model's weights and the data.")


def _finite_guard() -> Any:
    """A Trainer callback that stops the run when the gradients (before the optimizer step) or the trainable
    weights (after it) stop being finite, naming the first bad tensor. With fp16 mixed precision, inf gradients
    are the loss scaler's business (it skips that step and lowers the scale), so only the weights are checked."""
    from transformers import TrainerCallback

    def first_bad(model: Any, of_grad: bool) -> str | None:
        named = [(n, p.grad if of_grad else p) for n, p in model.named_parameters() if p.requires_grad]
        named = [(n, t) for n, t in named if t is not None]
        if not named or bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
            return None
        return next(n for n, t in named if not bool(torch.isfinite(t).all()))

    class FiniteGuard(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if model is not None and not args.fp16 and (bad := first_bad(model, of_grad=True)):
                raise TrainingDiverged(f"training stopped at step {state.global_step + 1}: the gradient of {bad} is "
                                       f"not finite (NaN or inf), though the loss was. Nothing from this step was "
                                       f"saved. {_TRY}")

        def on_optimizer_step(self, args, state, control, model=None, **kw):
            if model is not None and (bad := first_bad(model, of_grad=False)):
                raise TrainingDiverged(f"training stopped at step {state.global_step + 1}: the trainable weight {bad} "
                                       f"became non-finite (NaN or inf) in the optimizer step. Nothing from this "
                                       f"step was saved. {_TRY}")

    return FiniteGuard()


def _checked_trainer(*args: Any, **kwargs: Any) -> Any:
    """A transformers Trainer that stops at the first non-finite training loss. (The Trainer itself replaces a
    NaN or inf loss by the running mean in its logs and goes on, so a diverged run would look fine.)"""
    from transformers import Trainer

    class CheckedTrainer(Trainer):
        def training_step(self, *a: Any, **kw: Any) -> torch.Tensor:
            loss = super().training_step(*a, **kw)
            # under torchrun each process sees other data: a bad loss reaches every process through the
            # averaged gradients, which the guard checks on all of them at once (a lone raise would hang the rest)
            if not distributed.rank_info().distributed and not bool(torch.isfinite(loss.detach()).all()):
                raise TrainingDiverged(f"training stopped at step {self.state.global_step + 1}: the training loss is "
                                       f"{loss.detach().float().mean().item()} (not finite). Nothing from this step "
                                       f"was saved. {_TRY}")
            return loss

    return CheckedTrainer(*args, **kwargs)


def train(model: Any, tokenizer: Any, train_examples: list[dict], cfg: FinetuneConfig, compute: torch.dtype,
          checkpoint_dir: str, resume_from: str | None = None, progress: str = "bar",
          callbacks: list | None = None, log: Log = print) -> list[dict]:
    """Run the transformers Trainer on the tokenized examples; returns the log history (losses per step).

    Stops with TrainingDiverged at the first non-finite loss, gradient or trainable weight, before that step
    can be checkpointed."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    data.ensure_pad_token(tokenizer)
    # the data pipeline's tokenization (prompt masked, EOS appended); a plain list is all the Trainer needs
    dataset = [data.tokenize_example(ex, tokenizer, cfg.max_length) for ex in train_examples]
    trainer = _checked_trainer(model=model, args=training_arguments(cfg, compute, checkpoint_dir),
                               train_dataset=dataset, data_collator=data.DataCollator(tokenizer),
                               callbacks=[_finite_guard(), *(callbacks or [])])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback(progress, log))
    with quiet_libraries():
        trainer.train(resume_from_checkpoint=resume_from)
    return list(trainer.state.log_history)


def check_finite_adapter(model: Any) -> None:
    """Refuse to save trainable weights that are not all finite (TrainingDiverged naming the first bad one)."""
    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p).all()):
            raise TrainingDiverged(f"not saving: the trained weight {name} holds NaN or inf values. {_TRY}")


# ----------------------------------------------------------------------------------------------- the whole run
@dataclass
class _Run:
    """What the phases of one run share."""

    cfg: FinetuneConfig
    model_path: str
    compute: torch.dtype
    tokenizer: Any
    train_examples: list[dict]
    held_out: list[dict]
    scorer: Any
    out: Path
    workdir: Path
    plan: OutputPlan
    save: bool
    is_main: bool
    log: Log
    aside: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def resume_from(self) -> Path | None:
        return self.plan.resume_from


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"  # 1 MiB = 2**20 bytes


def _fmt(score: float | None) -> str:
    return "n/a (no automatic score for this data set)" if score is None else f"{score:.3f}"


PHASES = (("check", "checks"), ("load", "load"), ("eval_before", "evaluation before"), ("train", "training"),
          ("eval_after", "evaluation after"), ("save", "save"))


def _check_phase(cfg: FinetuneConfig, overwrite: bool, resume: bool, save: bool, log: Log,
                 data_root: str | os.PathLike | None) -> _Run:
    """Phase 1: everything that can fail, before the model loads and before any file is written: every option,
    the model's files and tokenizer, the data (each prompt must fit --max-length), the Trainer's settings and
    the output folder. Only then is the output folder changed (an old run set aside, run_config.json written)."""
    rank = distributed.rank_info()  # under torchrun/accelerate: only rank 0 writes files, logs and evaluates
    model_path, compute = check_config(cfg, data_root=data_root)
    tokenizer = models.load_tokenizer(model_path)
    train_examples, test_examples = load_splits(cfg, data_root)
    held_out = test_examples[: cfg.eval_examples]
    check_prompts(train_examples, tokenizer, cfg.max_length, "training")
    check_prompts(held_out, tokenizer, cfg.max_length, "held-out")
    out = Path(cfg.output)
    try:
        training_arguments(cfg, compute, str(out / "checkpoints"))
    except (ValueError, ImportError) as e:
        raise ValueError(f"the transformers Trainer refuses these settings: {str(e).splitlines()[0]}") from None
    plan = OutputPlan(out)
    if save and (rank.is_main or resume):
        if rank.is_main:
            paths.check_writable_dir(out, "output folder (--output)")
            for note in recover_output(out):
                log(note)
        plan = prepare_output(cfg, overwrite, resume)
        for note in plan.notes:
            log(note)
        if plan.resume_from is not None:
            log(f"resuming from {plan.resume_from}")
    run = _Run(cfg, model_path, compute, tokenizer, train_examples, held_out, generation.scorer_for(cfg.data), out,
               out if save else Path(tempfile.mkdtemp(prefix="qlora-tutor-run-")), plan, save, rank.is_main, log)
    if save and rank.is_main:
        run.aside = _claim_output(plan)
        atomic_write_text(out / "run_config.json", json.dumps(asdict(cfg), indent=2))
    return run


def _load_phase(run: _Run) -> tuple[Any, Any, dict[str, Any]]:
    """Phase 2: the base model, checked and prepared for the method; prints what is trained and what it weighs."""
    cfg, log, tokenizer = run.cfg, run.log, run.tokenizer
    hardware.set_seed(cfg.seed)
    info = hardware.detect()
    quant = f" {cfg.quant_type}{' + double quant' if cfg.double_quant else ''}" if cfg.method == "qlora" else ""
    log(f"model {cfg.model} ({run.model_path}); method {cfg.method}{quant}; compute "
        f"{str(run.compute).replace('torch.', '')} on {info.device.upper()} {info.name}")
    base = models.load_base(run.model_path, cfg.method, run.compute, cfg.quant_type, cfg.double_quant)
    models.check_finite_weights(base, f"model {run.model_path}")
    threads = configure_threads(base, cfg.threads)
    n_total = count_parameters(base).total
    bytes_stored, bytes_16 = weight_bytes(base, other_bytes_per_value=2), 2 * n_total
    model = prepare_for_training(base, cfg)
    trainable = count_parameters(model).trainable
    if cfg.method == "qlora":
        log(f"base model weights: {_mb(bytes_stored)} in 4-bit vs {_mb(bytes_16)} in 16-bit "
            f"({bytes_16 / bytes_stored:.1f}x smaller; embeddings and norms stay 16-bit)")
    log(f"trainable parameters: {trainable:,} of {n_total:,} ({100 * trainable / n_total:.2f}%)")
    if not torch.cuda.is_available():
        log(f"CPU threads: {threads}")
    facts = {"device": str(info), "trainable_params": trainable, "total_params": n_total, "cpu_threads": threads,
             "base_bytes_4bit": bytes_stored if cfg.method == "qlora" else None, "base_bytes_16bit": bytes_16}
    return model, tokenizer, facts


def _evaluate(run: _Run, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Held-out loss and score of `model` now (phases 3 and 5), with the seconds it took."""
    cfg = run.cfg
    t = time.time()
    result = generation.evaluate(model, tokenizer, run.held_out, run.scorer, n_generate=cfg.generate_examples,
                                 max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length,
                                 batch_size=eval_batch_size(cfg))
    result["seconds"] = time.time() - t
    return result


def _evaluate_before(run: _Run, model: Any, tokenizer: Any) -> dict[str, Any] | None:
    """Phase 3: the base model's numbers, measured once (a resumed run reuses them). A non-finite loss here
    stops the run: the base model itself is broken (damaged weights, or overflow in the compute dtype)."""
    cached = run.out / "before.json"
    before = None
    if run.resume_from is not None and cached.is_file():
        try:
            before = json.loads(cached.read_text())
        except ValueError:
            before = None  # damaged: measure again
    if before is None:
        before = _evaluate(run, model, tokenizer)
        if not torch.isfinite(torch.tensor(before["loss"])):
            raise TrainingDiverged(
                f"the base model's held-out loss before training is {before['loss']} (not finite): its weights "
                f"hold extreme values or overflow in {str(run.compute).replace('torch.', '')}. Check the model "
                "files (re-download or rebuild), or compute in fp32/bf16 (--dtype).")
        if run.save:
            atomic_write_text(cached, json.dumps(before, indent=2))
    run.log(f"before training: held-out loss {before['loss']:.4f}, score {_fmt(before['score'])}")
    return before


def _save_phase(run: _Run, model: Any, tokenizer: Any, metrics: dict[str, Any]) -> None:
    """Phase 6: the adapter (or full model) atomically, the loss curve, and where they went."""
    cfg = run.cfg
    kind = artifact_name(cfg.method)
    check_finite_adapter(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)  # PEFT: adapter_config.json + adapter_model.safetensors only
        if cfg.method == "full":
            tokenizer.save_pretrained(tmp)
        (tmp / "run_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    metrics[kind] = str(atomic_save_dir(run.out / kind, write))
    metrics["loss_curve"] = str(plots.loss_curve(metrics["loss_history"], run.out / "loss_curve.png",
                                                 title=f"{cfg.method} on {cfg.data}"))


def _phase_line(seconds: dict[str, float], total: float) -> str:
    parts = [f"{label} {seconds[key]:.0f} s" for key, label in PHASES if key in seconds]
    return f"time: {total:.0f} s in all ({', '.join(parts)})"


def run(cfg: FinetuneConfig, overwrite: bool = False, resume: bool = False, save: bool = True,
        eval_before: bool = True, progress: str = "bar", callbacks: list | None = None,
        log: Log = print, data_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check, load, evaluate, train, evaluate again, save the adapter atomically; returns the metrics.

    `save=False` trains in a temporary folder and keeps nothing (used by `compare`). `data_root` reads the
    embedded model and data sets from another folder than data/ (compare's frozen copy). A failure after the
    output folder was claimed puts back a run that --overwrite had set aside, unless the new run reached a
    checkpoint.
    """
    t_start = time.time()
    rank = distributed.rank_info()
    if not rank.is_main:
        log, progress, eval_before = (lambda *a, **k: None), "none", False
    if rank.distributed:
        callbacks = [*(callbacks or []), distributed.fingerprint_callback()]  # every rank prints its adapter's hash
    r = _check_phase(cfg, overwrite, resume, save, log, data_root)
    r.seconds["check"] = time.time() - t_start
    succeeded = False
    try:
        metrics = _run_phases(r, eval_before, progress, callbacks, rank)
        succeeded = True
    finally:
        if r.save and r.is_main:
            _settle_replaced(r.aside, r.out, cfg.method, succeeded, log)
        if not r.save:
            shutil.rmtree(r.workdir, ignore_errors=True)
    metrics["total_seconds"] = time.time() - t_start
    if rank.is_main:
        metrics["phase_seconds"] = dict(r.seconds)
        if save:
            atomic_write_text(r.out / "metrics.json", json.dumps(metrics, indent=2))
            kind = artifact_name(cfg.method)
            log(f"{kind} saved to {metrics[kind]}  (metrics: {r.out / 'metrics.json'}, loss curve: {metrics['loss_curve']})")
        log(_phase_line(r.seconds, metrics["total_seconds"]))
    return metrics


def _run_phases(r: _Run, eval_before: bool, progress: str, callbacks: list | None, rank: Any) -> dict[str, Any]:
    """Phases 2-6 of `run`, timed one by one into r.seconds."""
    cfg, log = r.cfg, r.log
    clock = time.time()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.time()
        r.seconds[name] = now - clock
        clock = now

    with PeakMemory() as mem:
        model, tokenizer, facts = _load_phase(r)
        lap("load")
        before = _evaluate_before(r, model, tokenizer) if eval_before else None
        if eval_before:
            lap("eval_before")
        extra = [_drop_replaced_at_first_checkpoint(r.aside, log)] if r.aside is not None else []
        history = train(model, tokenizer, r.train_examples, cfg, r.compute, str(r.workdir / "checkpoints"),
                        str(r.resume_from) if r.resume_from else None, progress, [*extra, *(callbacks or [])], log)
        lap("train")
        losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
        if not rank.is_main:  # the replicas are identical (see the fingerprints): rank 0 evaluates and saves
            return {"rank": rank.rank, "world_size": rank.world_size, "train_seconds": r.seconds["train"],
                    "loss_history": losses}
        after = _evaluate(r, model, tokenizer)
        lap("eval_after")
    log(f"after training:  held-out loss {after['loss']:.4f}, score {_fmt(after['score'])}")
    if not torch.isfinite(torch.tensor(after["loss"])):
        raise TrainingDiverged(f"the held-out loss after training is {after['loss']} (not finite), so the adapter was "
                               f"not saved. {_TRY}")
    metrics: dict[str, Any] = {
        "config": asdict(cfg), "model_path": r.model_path, "device": facts["device"],
        "compute_dtype": str(r.compute), "versions": hardware.versions(),
        "trainable_params": facts["trainable_params"], "total_params": facts["total_params"],
        "weight_bytes_stored": weight_bytes(model), "base_bytes_4bit": facts["base_bytes_4bit"],
        "base_bytes_16bit": facts["base_bytes_16bit"], "peak_memory_bytes": mem.used,
        "train_seconds": r.seconds["train"], "before": before, "after": after, "loss_history": losses,
        "train_examples": len(r.train_examples), "heldout_examples": len(r.held_out),
        "cpu_threads": facts["cpu_threads"], "optimizer": resolved_optim(cfg),
    }
    if r.save:
        _save_phase(r, model, tokenizer, metrics)
        lap("save")
    return metrics
