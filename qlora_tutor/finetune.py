"""QLoRA fine-tuning with the real stack: transformers loads the base in 4-bit through bitsandbytes, PEFT adds
LoRA adapters, the transformers Trainer trains them. The same code does LoRA on a 16/32-bit base and full
fine-tuning, so that `compare` can put the three side by side on the same data and budget.

A run has phases, each a function below: check (everything cheap, before the long work), load, evaluate,
train, evaluate again, save (the adapter is written atomically). A run can be resumed from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import data, distributed, generation, hardware, models, plots
from .config import BNB_QUANT_TYPES, METHODS, FinetuneConfig
from .counting import count_parameters, weight_bytes
from .measure import PeakMemory
from .paths import atomic_save_dir, atomic_write_text
from .quiet import quiet_libraries
from .targets import parse_target_modules

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------- checks up front
def check_config(cfg: FinetuneConfig, info: hardware.DeviceInfo | None = None,
                 data_root: str | os.PathLike | None = None) -> tuple[str, torch.dtype]:
    """Validate everything cheap to validate; returns (model path, compute dtype). Raises ValueError/FileNotFoundError."""
    if cfg.method not in METHODS:
        raise ValueError(f"method {cfg.method!r} unknown: use one of {METHODS}")
    if cfg.quant_type not in BNB_QUANT_TYPES:
        raise ValueError(f"quant_type {cfg.quant_type!r} unknown: use 'nf4' (the paper's) or 'fp4'")
    for name in ("r", "max_steps", "batch_size", "grad_accum", "max_length"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {cfg.learning_rate}")
    dtype = hardware.compute_dtype(cfg.dtype, info)
    model_path = models.resolve_model(cfg.model, data_root)
    model_config = models.load_model_config(model_path)
    if cfg.method != "full":
        models.check_targets(model_config, cfg.target_modules)
    return model_path, dtype


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
    if cfg.train_examples:
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
    elif not torch.cuda.is_available() and count_parameters(model).total < 50_000_000:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def lora_config(cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig
    return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=parse_target_modules(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def prepare_for_training(model: Any, cfg: FinetuneConfig) -> Any:
    """Freeze/cast/checkpoint as each method needs, then wrap with LoRA (not for full fine-tuning)."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    gc_kwargs = {"use_reentrant": False}
    with quiet_libraries():
        if cfg.method == "qlora" and distributed.fsdp_enabled():
            # FSDP flattens a layer's weights into one tensor of one dtype: keep the norms in the storage dtype
            # (no fp32 cast), freeze the base and checkpoint as prepare_model_for_kbit_training would
            model.requires_grad_(False)
            if cfg.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
                model.enable_input_require_grads()
        elif cfg.method == "qlora":
            # freezes the base, casts non-4-bit weights (norms, embeddings) to fp32, turns on checkpointing
            model = prepare_model_for_kbit_training(model, cfg.gradient_checkpointing, gc_kwargs)
        elif cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        if cfg.method == "full":
            return model
        hardware.set_seed(cfg.seed)  # the LoRA A matrices start random: make that repeatable
        return get_peft_model(model, lora_config(cfg))  # adapters in fp32 even on a 16-bit base (autocast_adapter_dtype)


# --------------------------------------------------------------------------------------- a saved run, reloaded
def load_trained(run_or_adapter: str | Path, model: str | None = None,
                 dtype: str | None = None) -> tuple[Any, Any, FinetuneConfig]:
    """A trained run back in memory: base loaded exactly as for training, then the saved adapter (or full model)."""
    from peft import PeftModel
    folder = find_artifact(run_or_adapter)
    cfg = FinetuneConfig(**json.loads((folder / "run_config.json").read_text()))
    if model:
        cfg.model = model
    if dtype:
        cfg.dtype = dtype
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
    base = _prepare_base_only(models.load_base(model_path, cfg.method, compute, cfg.quant_type, cfg.double_quant), cfg)
    return base.eval(), models.load_tokenizer(model_path)


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
    for candidate in (p, p / "adapter", p / "model"):
        if (candidate / "run_config.json").is_file() and (
                (candidate / "adapter_config.json").is_file() or (candidate / "config.json").is_file()):
            return candidate
    raise FileNotFoundError(f"no trained adapter found in {p} (looked for adapter_config.json there and in "
                            f"{p / 'adapter'}); train one with `qlora-tutor finetune --output {p}`")


# ------------------------------------------------------------------------------------------ the output folder
def prepare_output(cfg: FinetuneConfig, overwrite: bool = False, resume: bool = False) -> Path | None:
    """Check the output folder before training; returns the checkpoint to resume from (or None).

    A folder holding another run is refused unless `overwrite` (delete it) or `resume` (continue it, which needs
    the same configuration). A non-empty folder that is not a run is never deleted.
    """
    out = Path(cfg.output)
    if overwrite and resume:
        raise ValueError("choose --overwrite (start again) or --resume (continue), not both")
    saved = out / "run_config.json"
    if resume:
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {out} holds no run to resume (no run_config.json); drop --resume")
        old = FinetuneConfig(**json.loads(saved.read_text()))
        diff = {k: (v, getattr(cfg, k)) for k, v in old.identity().items() if getattr(cfg, k) != v}
        if diff:
            listing = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"--resume: the run in {out} was made with a different configuration ({listing}). "
                             "Use the same settings, or --overwrite / another --output to start a new run.")
        checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        if not checkpoints:
            raise FileNotFoundError(f"--resume: {out} has no checkpoint yet (they are saved every --save-steps)")
        return checkpoints[-1]
    if out.exists() and any(out.iterdir()):
        if not saved.is_file():
            raise ValueError(f"output folder {out} is not empty and holds no qlora-tutor run: choose another --output")
        if not overwrite:
            raise ValueError(f"output folder {out} already holds a run: add --overwrite to replace it, "
                             "--resume to continue it, or choose another --output")
        shutil.rmtree(out)
    return None


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


def train(model: Any, tokenizer: Any, train_examples: list[dict], cfg: FinetuneConfig, compute: torch.dtype,
          checkpoint_dir: str, resume_from: str | None = None, progress: str = "bar",
          callbacks: list | None = None, log: Log = print) -> list[dict]:
    """Run the transformers Trainer on the tokenized examples; returns the log history (losses per step)."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    data.ensure_pad_token(tokenizer)
    # the data pipeline's tokenization (prompt masked, EOS appended); a plain list is all the Trainer needs
    dataset = [data.tokenize_example(ex, tokenizer, cfg.max_length) for ex in train_examples]
    trainer = Trainer(model=model, args=training_arguments(cfg, compute, checkpoint_dir), train_dataset=dataset,
                      data_collator=data.DataCollator(tokenizer), callbacks=list(callbacks or []))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback(progress, log))
    with quiet_libraries():
        trainer.train(resume_from_checkpoint=resume_from)
    return list(trainer.state.log_history)


# ----------------------------------------------------------------------------------------------- the whole run
@dataclass
class _Run:
    """What the phases of one run share."""

    cfg: FinetuneConfig
    model_path: str
    compute: torch.dtype
    train_examples: list[dict]
    held_out: list[dict]
    scorer: Any
    out: Path
    workdir: Path
    resume_from: Path | None
    save: bool
    is_main: bool
    log: Log


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def _fmt(score: float | None) -> str:
    return "n/a (no automatic score for this data set)" if score is None else f"{score:.3f}"


def _check_phase(cfg: FinetuneConfig, overwrite: bool, resume: bool, save: bool, log: Log,
                 data_root: str | os.PathLike | None) -> _Run:
    """Phase 1: everything that can fail fast, and the output folder made ready."""
    rank = distributed.rank_info()  # under torchrun/accelerate: only rank 0 writes files, logs and evaluates
    model_path, compute = check_config(cfg, data_root=data_root)
    train_examples, test_examples = load_splits(cfg, data_root)
    out = Path(cfg.output)
    resume_from = prepare_output(cfg, overwrite, resume) if save and (rank.is_main or resume) else None
    workdir = out if save else Path(tempfile.mkdtemp(prefix="qlora-tutor-run-"))
    if save and rank.is_main:
        atomic_write_text(out / "run_config.json", json.dumps(asdict(cfg), indent=2))
    return _Run(cfg, model_path, compute, train_examples, test_examples[: cfg.eval_examples],
                generation.scorer_for(cfg.data), out, workdir, resume_from, save, rank.is_main, log)


def _load_phase(run: _Run) -> tuple[Any, Any, dict[str, Any]]:
    """Phase 2: tokenizer and base model, prepared for the method; prints what is trained and what it weighs."""
    cfg, log = run.cfg, run.log
    hardware.set_seed(cfg.seed)
    tokenizer = models.load_tokenizer(run.model_path)
    info = hardware.detect()
    quant = f" {cfg.quant_type}{' + double quant' if cfg.double_quant else ''}" if cfg.method == "qlora" else ""
    log(f"model {cfg.model} ({run.model_path}); method {cfg.method}{quant}; compute "
        f"{str(run.compute).replace('torch.', '')} on {info.device.upper()} {info.name}")
    base = models.load_base(run.model_path, cfg.method, run.compute, cfg.quant_type, cfg.double_quant)
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
    """Phase 3: the base model's numbers, measured once (a resumed run reuses them)."""
    cached = run.out / "before.json"
    if run.resume_from is not None and cached.is_file():
        before = json.loads(cached.read_text())
    else:
        before = _evaluate(run, model, tokenizer)
        if run.save:
            atomic_write_text(cached, json.dumps(before, indent=2))
    run.log(f"before training: held-out loss {before['loss']:.4f}, score {_fmt(before['score'])}")
    return before


def _save_phase(run: _Run, model: Any, tokenizer: Any, metrics: dict[str, Any]) -> None:
    """Phase 6: the adapter (or full model) atomically, the loss curve, and where they went."""
    cfg = run.cfg
    kind = "model" if cfg.method == "full" else "adapter"

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)  # PEFT: adapter_config.json + adapter_model.safetensors only
        if cfg.method == "full":
            tokenizer.save_pretrained(tmp)
        (tmp / "run_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    metrics[kind] = str(atomic_save_dir(run.out / kind, write))
    metrics["loss_curve"] = str(plots.loss_curve(metrics["loss_history"], run.out / "loss_curve.png",
                                                 title=f"{cfg.method} on {cfg.data}"))


def run(cfg: FinetuneConfig, overwrite: bool = False, resume: bool = False, save: bool = True,
        eval_before: bool = True, progress: str = "bar", callbacks: list | None = None,
        log: Log = print, data_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check, load, evaluate, train, evaluate again, save the adapter atomically; returns the metrics.

    `save=False` trains in a temporary folder and keeps nothing (used by `compare`). `data_root` reads the
    embedded model and data sets from another folder than data/ (compare's frozen copy).
    """
    t_start = time.time()
    rank = distributed.rank_info()
    if not rank.is_main:
        log, progress, eval_before = (lambda *a, **k: None), "none", False
    if rank.distributed:
        callbacks = [*(callbacks or []), distributed.fingerprint_callback()]  # every rank prints its adapter's hash
    r = _check_phase(cfg, overwrite, resume, save, log, data_root)
    with PeakMemory() as mem:
        model, tokenizer, facts = _load_phase(r)
        before = _evaluate_before(r, model, tokenizer) if eval_before else None
        t_train = time.time()
        history = train(model, tokenizer, r.train_examples, cfg, r.compute, str(r.workdir / "checkpoints"),
                        str(r.resume_from) if r.resume_from else None, progress, callbacks, log)
        train_seconds = time.time() - t_train
        losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
        if not rank.is_main:  # the replicas are identical (see the fingerprints): rank 0 evaluates and saves
            if not save:
                shutil.rmtree(r.workdir, ignore_errors=True)
            return {"rank": rank.rank, "world_size": rank.world_size, "train_seconds": train_seconds,
                    "loss_history": losses}
        after = _evaluate(r, model, tokenizer)
    log(f"after training:  held-out loss {after['loss']:.4f}, score {_fmt(after['score'])}")
    metrics: dict[str, Any] = {
        "config": asdict(cfg), "model_path": r.model_path, "device": facts["device"],
        "compute_dtype": str(r.compute), "versions": hardware.versions(),
        "trainable_params": facts["trainable_params"], "total_params": facts["total_params"],
        "weight_bytes_stored": weight_bytes(model), "base_bytes_4bit": facts["base_bytes_4bit"],
        "base_bytes_16bit": facts["base_bytes_16bit"], "peak_memory_bytes": mem.used, "train_seconds": train_seconds,
        "before": before, "after": after, "loss_history": losses, "train_examples": len(r.train_examples),
        "heldout_examples": len(r.held_out), "cpu_threads": facts["cpu_threads"], "optimizer": resolved_optim(cfg),
    }
    if save:
        _save_phase(r, model, tokenizer, metrics)
    metrics["total_seconds"] = time.time() - t_start
    if save:
        atomic_write_text(r.out / "metrics.json", json.dumps(metrics, indent=2))
        kind = "model" if cfg.method == "full" else "adapter"
        log(f"{kind} saved to {metrics[kind]}  (metrics: {r.out / 'metrics.json'}, loss curve: {metrics['loss_curve']})")
    else:
        shutil.rmtree(r.workdir, ignore_errors=True)
    log(f"time: {metrics['total_seconds']:.0f} s in all, {train_seconds:.0f} s training")
    return metrics
