"""QLoRA fine-tuning with the real stack: transformers loads the base in 4-bit through bitsandbytes, PEFT adds
LoRA adapters, the transformers Trainer trains them. The same code does LoRA on a 16/32-bit base and full
fine-tuning, so that `compare` can put the three side by side on the same data and budget.

Everything that can be checked is checked before the long work starts (model, data, target modules, dtype,
output folder). The adapter is written atomically; a run can be resumed from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from . import data, distributed, generation, hardware
from .paths import atomic_write_text, current_umask

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # optional CPU kernel notice
# transformers 5 renamed gradient -> activation checkpointing; PEFT still calls the old names. Noise for a learner.
warnings.filterwarnings("ignore", message=r".*(is_)?gradient_checkpointing(_enable)?`? is deprecated", category=FutureWarning)
METHODS = ("qlora", "lora", "full")
# Fields that define what is trained; a resume must match them (steps, evaluation and output may change).
_RUN_IDENTITY = ("model", "data", "method", "quant_type", "double_quant", "dtype", "r", "lora_alpha", "lora_dropout",
                 "target_modules", "learning_rate", "batch_size", "grad_accum", "max_length", "warmup_steps",
                 "max_grad_norm", "seed", "train_examples", "gradient_checkpointing", "optim")


@dataclass
class FinetuneConfig:
    """Every knob of a run. Defaults are the demo: the embedded model and stories, QLoRA NF4 + double quantization,
    LoRA on all linear layers, a few minutes on a laptop CPU. See `qlora-tutor finetune --help` for each knob."""

    model: str = "embedded"            # 'embedded', a local folder, or a hub id
    data: str = "stories"              # 'stories', 'qa', a .jsonl file, a local folder or a hub id
    output: str = "runs/demo"
    method: str = "qlora"              # qlora | lora (16/32-bit base) | full (every weight trained)
    quant_type: str = "nf4"            # nf4 (the paper's) | fp4
    double_quant: bool = True          # quantize the block constants too (~0.37 bit/param saved)
    dtype: str = "auto"                # compute dtype: auto | bf16 | fp16 | fp32
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"  # or a comma list such as 'q_proj,v_proj'
    max_steps: int = 250
    learning_rate: float = 2e-3
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 176
    warmup_steps: int = 5
    max_grad_norm: float = 0.3         # the paper's value
    seed: int = 0
    train_examples: int | None = None  # use only the first N training examples (None: all)
    eval_examples: int = 64            # held-out examples for the loss
    generate_examples: int = 32        # held-out prompts answered greedily for the score
    max_new_tokens: int = 120
    gradient_checkpointing: bool = True
    optim: str = "auto"                # auto: paged_adamw_32bit on CUDA, adamw_torch on CPU
    save_steps: int = 50
    logging_steps: int = 5
    threads: int = 0                   # CPU threads for torch; 0 = auto (1 for small models on a CPU, see below)

    def identity(self) -> dict[str, Any]:
        """The fields a checkpoint must share with this config to be resumed."""
        return {k: getattr(self, k) for k in _RUN_IDENTITY}


# ------------------------------------------------------------------------------------------- checks up front
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str) -> str:
    """'embedded' → the shipped model folder; an existing folder → itself; 'org/name' → a hub id. Else a clear error."""
    if model == "embedded":
        return str(data.embedded_model_dir())
    from . import real_model
    if real_model.is_gguf_model(model):  # 'smollm2-135m' or a .gguf file: converted once, then cached
        return str(real_model.ensure_model(model))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json: it is not a transformers model folder")
        return str(path)
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        return model
    raise FileNotFoundError(f"model {model!r} not found: give 'embedded', an existing folder, or a hub id 'org/name'")


def load_model_config(model_path: str) -> Any:
    """The model's config.json (fast, no weights): proves the model exists before anything heavy happens."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load model {model_path!r}: {e}. Offline? Use a local folder or 'embedded'.") from None


def linear_module_names(model_config: Any) -> set[str]:
    """Short names of the linear layers (q_proj, down_proj, ...) of a model, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    names = {n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    return names - {"lm_head"}


def parse_targets(target_modules: str | list[str]) -> str | list[str]:
    """'all-linear' stays as is (PEFT's shortcut: every linear layer but the output head); else a list of names."""
    if isinstance(target_modules, str):
        if target_modules.strip() == "all-linear":
            return "all-linear"
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    return list(target_modules)


def check_targets(target_modules: str | list[str], available: set[str]) -> None:
    """A clear error when a requested target module does not exist in the model."""
    targets = parse_targets(target_modules)
    if not available:
        raise ValueError("the model has no linear layers that LoRA could adapt")
    if targets == "all-linear":
        return
    missing = [t for t in targets if t not in available]
    if missing or not targets:
        raise ValueError(f"target module(s) {missing or targets} not in this model; its linear layers are "
                         f"{sorted(available)} (or use 'all-linear')")


def check_config(cfg: FinetuneConfig, info: hardware.DeviceInfo | None = None) -> tuple[str, torch.dtype]:
    """Validate everything cheap to validate; returns (model path, compute dtype). Raises ValueError/FileNotFoundError."""
    if cfg.method not in METHODS:
        raise ValueError(f"method {cfg.method!r} unknown: use one of {METHODS}")
    if cfg.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type {cfg.quant_type!r} unknown: use 'nf4' (the paper's) or 'fp4'")
    for name in ("r", "max_steps", "batch_size", "grad_accum", "max_length"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {cfg.learning_rate}")
    dtype = hardware.compute_dtype(cfg.dtype, info)
    model_path = resolve_model(cfg.model)
    if cfg.method != "full":
        check_targets(cfg.target_modules, linear_module_names(load_model_config(model_path)))
    else:
        load_model_config(model_path)
    return model_path, dtype


def load_splits(cfg: FinetuneConfig) -> tuple[list[dict], list[dict]]:
    """Training and held-out examples. A single file with no test split is split 90/10 (deterministically)."""
    source = data.resolve_dataset(cfg.data)
    if isinstance(source, str) and not _HUB_ID.match(source):
        raise FileNotFoundError(f"data set {cfg.data!r} not found: give 'stories', 'qa', a .jsonl file, a folder or a hub id")
    train = data.load_examples(cfg.data, "train")
    if isinstance(source, Path) and source.is_file():
        cut = max(1, len(train) // 10)
        train, test = train[:-cut], train[-cut:]
        if not train:
            raise ValueError(f"data set {cfg.data}: too few examples to hold some out for evaluation")
    else:
        test = data.load_examples(cfg.data, "test")
    if cfg.train_examples:
        train = train[: cfg.train_examples]
    return train, test


# ----------------------------------------------------------------------------------------------------- loading
def bnb_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
               quant_storage: torch.dtype = torch.uint8):
    """The 4-bit recipe of the paper. bitsandbytes' own defaults (fp4, no double quantization) are overridden."""
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(
        load_in_4bit=True,                         # store the linear layers' weights in 4 bits
        bnb_4bit_quant_type=quant_type,            # nf4: 16 levels at normal quantiles (fp4: a float grid)
        bnb_4bit_use_double_quant=double_quant,    # the per-block absmax constants quantized to 8 bits too
        bnb_4bit_compute_dtype=compute_dtype,      # weights are dequantized to this dtype for every matmul
        bnb_4bit_quant_storage=quant_storage,      # container of the packed codes: uint8, or bf16 so FSDP can shard
    )


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer
    return data.ensure_pad_token(AutoTokenizer.from_pretrained(model_path))


def load_base(model_path: str, method: str, compute_dtype: torch.dtype, quant_type: str = "nf4",
              double_quant: bool = True) -> Any:
    """The base model: 4-bit for qlora (other weights fp32), compute dtype for lora, fp32 for full (AMP on GPU)."""
    from transformers import AutoModelForCausalLM
    # one process per GPU under torchrun/accelerate: process k loads its copy onto GPU k (the CPU without CUDA)
    kwargs: dict[str, Any] = {"device_map": distributed.device_map()}
    if method == "qlora":
        storage = distributed.quant_storage(compute_dtype)  # bf16 under FSDP (it shards floats only), else uint8
        kwargs.update(quantization_config=bnb_config(quant_type, double_quant, compute_dtype, storage),
                      dtype=storage if storage.is_floating_point else torch.float32)
    else:
        kwargs["dtype"] = compute_dtype if method == "lora" else torch.float32
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    keep_standard_4bit_layout(model)
    return model


def keep_standard_4bit_layout(model: Any) -> None:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for its bf16 CPU inference kernel.

    On CPUs with AVX512-BF16, the first forward pass in eval mode converts each Linear4bit weight, for good, to
    a layout only that kernel reads; it computes in bf16 and has no backward, so training after an evaluation
    would get no input gradients through the base layers. We keep the standard layout (fp32 dequantize + matmul).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def eval_batch_size(cfg: FinetuneConfig) -> int:
    """Prompts per generation batch: generous, since each decoding step dequantizes every 4-bit weight once
    for the whole batch, so bigger batches cost little more per step."""
    return max(cfg.batch_size, 32)


def configure_threads(model: Any, requested: int = 0) -> int:
    """Set torch's CPU thread count: `requested`, or for 0 (auto) one thread when a small model runs on a CPU.

    The embedded model's matrices are tiny (256 x 704): splitting each product over threads costs more in
    synchronisation than it saves, and when other programs share the cores the threads wait on each other
    (measured on a busy 2-core machine: 4-bit generation 20x slower with 2 threads than with 1).
    """
    if requested:
        torch.set_num_threads(requested)
    elif not torch.cuda.is_available() and count_parameters(model)[1] < 50_000_000:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def lora_config(cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig
    return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=parse_targets(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def prepare_for_training(model: Any, cfg: FinetuneConfig) -> Any:
    """Freeze/cast/checkpoint as each method needs, then wrap with LoRA (not for full fine-tuning)."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    gc_kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
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
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(model, lora_config(cfg))  # adapters in fp32 even on a 16-bit base (autocast_adapter_dtype)


def load_trained(run_or_adapter: str | Path, model: str | None = None, dtype: str | None = None) -> tuple[Any, Any, FinetuneConfig]:
    """A trained run back in memory: base loaded exactly as for training, then the saved adapter (or full model)."""
    from peft import PeftModel
    folder = find_artifact(run_or_adapter)
    cfg = FinetuneConfig(**json.loads((folder / "run_config.json").read_text()))
    if model:
        cfg.model = model
    if dtype:
        cfg.dtype = dtype
    model_path, compute = check_config(cfg)
    tokenizer = load_tokenizer(model_path)
    if cfg.method == "full":
        base = load_base(str(folder), "full", compute)
        configure_threads(base, cfg.threads)
        return base.eval(), tokenizer, cfg
    base = _prepare_base_only(load_base(model_path, cfg.method, compute, cfg.quant_type, cfg.double_quant), cfg)
    configure_threads(base, cfg.threads)
    return PeftModel.from_pretrained(base, str(folder)).eval(), tokenizer, cfg


def load_untrained(cfg: FinetuneConfig) -> tuple[Any, Any]:
    """The base model alone, loaded as `cfg` would train it (4-bit for qlora), for a before-training look."""
    model_path, compute = check_config(cfg)
    base = _prepare_base_only(load_base(model_path, cfg.method, compute, cfg.quant_type, cfg.double_quant), cfg)
    configure_threads(base, cfg.threads)
    return base.eval(), load_tokenizer(model_path)


def _prepare_base_only(model: Any, cfg: FinetuneConfig) -> Any:
    """The same dtype casts as training (so a reload computes bit for bit the same), without LoRA or checkpointing."""
    from peft import prepare_model_for_kbit_training
    if cfg.method == "qlora":
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


# ------------------------------------------------------------------------------------------------ measuring
def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts as its logical (unpacked) number of values."""
    trainable = total = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        n = int(torch.Size(qs.shape).numel()) if qs is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def weight_bytes(model: Any, other_bytes_per_value: int | None = None) -> int:
    """Bytes of the model's weights: packed 4-bit codes plus their constants (absmax, nested absmax, code tables).

    `other_bytes_per_value=2` counts the non-quantized weights as 16-bit (how they sit on a GPU), None as stored.
    """
    total = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is None:
            total += p.numel() * (other_bytes_per_value or p.element_size())
            continue
        total += p.numel() * p.element_size()
        state2 = qs.state2 if qs.nested else None
        for t in (qs.absmax, qs.code, getattr(state2, "absmax", None), getattr(state2, "code", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


class PeakMemory:
    """Peak memory during a block: CUDA's allocator peak on a GPU, else the process's resident memory (sampled)."""

    def __enter__(self) -> "PeakMemory":
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = _rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())

    @property
    def used(self) -> int:
        """Bytes above what was in use when the block started."""
        return max(0, self.peak - self.start)


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: fall back to the high-water mark
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------ the output folder
def atomic_save_dir(dest: Path, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` fill a temporary folder next to `dest`, then rename it to `dest` (replacing an old one).

    A crash while writing leaves only a hidden temporary folder, never a half-written `dest`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes private folders; give the usual permissions
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~current_umask())
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


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
    optim = resolved_optim(cfg)
    return TrainingArguments(
        output_dir=output_dir, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant_with_warmup", warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm,
        weight_decay=0.0, optim=optim, seed=cfg.seed, data_seed=cfg.seed,
        bf16=cuda and compute == torch.bfloat16, fp16=cuda and compute == torch.float16, use_cpu=not cuda,
        logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or cfg.max_steps, save_total_limit=2, report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=cuda,
    )


def _progress_callback(mode: str, log: Callable[[str], None]) -> Any:
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
          callbacks: list | None = None, log: Callable[[str], None] = print) -> list[dict]:
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
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*use_reentrant.*")
        trainer.train(resume_from_checkpoint=resume_from)
    return list(trainer.state.log_history)


# ----------------------------------------------------------------------------------------------- the whole run
def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def run(cfg: FinetuneConfig, overwrite: bool = False, resume: bool = False, save: bool = True,
        eval_before: bool = True, progress: str = "bar", callbacks: list | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Check, load, evaluate, train, evaluate again, save the adapter atomically; returns the metrics.

    `save=False` trains in a temporary folder and keeps nothing (used by `compare`).
    """
    t_start = time.time()
    rank = distributed.rank_info()  # under torchrun/accelerate: only rank 0 writes files, logs and evaluates
    if not rank.is_main:
        log, progress, eval_before = (lambda *a, **k: None), "none", False
    if rank.distributed:
        callbacks = [*(callbacks or []), distributed.fingerprint_callback()]  # every rank prints its adapter's hash
    model_path, compute = check_config(cfg)
    train_examples, test_examples = load_splits(cfg)
    scorer = generation.scorer_for(cfg.data)
    out = Path(cfg.output)
    resume_from = prepare_output(cfg, overwrite, resume) if save and (rank.is_main or resume) else None
    workdir = out if save else Path(tempfile.mkdtemp(prefix="qlora-tutor-run-"))
    if save and rank.is_main:
        atomic_write_text(out / "run_config.json", json.dumps(asdict(cfg), indent=2))
    hardware.set_seed(cfg.seed)
    tokenizer = load_tokenizer(model_path)
    info = hardware.detect()
    quant = f" {cfg.quant_type}{' + double quant' if cfg.double_quant else ''}" if cfg.method == "qlora" else ""
    log(f"model {cfg.model} ({model_path}); method {cfg.method}{quant}; compute {str(compute).replace('torch.', '')}"
        f" on {info.device.upper()} {info.name}")
    with PeakMemory() as mem:
        base = load_base(model_path, cfg.method, compute, cfg.quant_type, cfg.double_quant)
        threads = configure_threads(base, cfg.threads)
        _, n_total = count_parameters(base)
        bytes_stored, bytes_16 = weight_bytes(base, other_bytes_per_value=2), 2 * n_total
        model = prepare_for_training(base, cfg)
        trainable, _ = count_parameters(model)
        if cfg.method == "qlora":
            log(f"base model weights: {_mb(bytes_stored)} in 4-bit vs {_mb(bytes_16)} in 16-bit "
                f"({bytes_16 / bytes_stored:.1f}x smaller; embeddings and norms stay 16-bit)")
        log(f"trainable parameters: {trainable:,} of {n_total:,} ({100 * trainable / n_total:.2f}%)")
        if not torch.cuda.is_available():
            log(f"CPU threads: {threads}")
        eval_kw = dict(n_generate=cfg.generate_examples, max_new_tokens=cfg.max_new_tokens,
                       max_length=cfg.max_length, batch_size=eval_batch_size(cfg))
        held_out = test_examples[: cfg.eval_examples]
        before = None
        cached = out / "before.json"
        if eval_before and resume_from is not None and cached.is_file():
            before = json.loads(cached.read_text())
        elif eval_before:
            t = time.time()
            before = generation.evaluate(model, tokenizer, held_out, scorer, **eval_kw)
            before["seconds"] = time.time() - t
            if save:
                atomic_write_text(cached, json.dumps(before, indent=2))
        if before:
            log(f"before training: held-out loss {before['loss']:.4f}, score {_fmt(before['score'])}")
        t_train = time.time()
        history = train(model, tokenizer, train_examples, cfg, compute, str(workdir / "checkpoints"),
                        str(resume_from) if resume_from else None, progress, callbacks, log)
        train_seconds = time.time() - t_train
        if not rank.is_main:  # the replicas are identical (see the fingerprints): rank 0 evaluates and saves
            if not save:
                shutil.rmtree(workdir, ignore_errors=True)
            return {"rank": rank.rank, "world_size": rank.world_size, "train_seconds": train_seconds,
                    "loss_history": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]}
        t = time.time()
        after = generation.evaluate(model, tokenizer, held_out, scorer, **eval_kw)
        after["seconds"] = time.time() - t
    log(f"after training:  held-out loss {after['loss']:.4f}, score {_fmt(after['score'])}")
    metrics: dict[str, Any] = {
        "config": asdict(cfg), "model_path": model_path, "device": str(info), "compute_dtype": str(compute),
        "versions": hardware.versions(), "trainable_params": trainable, "total_params": n_total,
        "weight_bytes_stored": weight_bytes(model), "base_bytes_4bit": bytes_stored if cfg.method == "qlora" else None,
        "base_bytes_16bit": bytes_16, "peak_memory_bytes": mem.used, "train_seconds": train_seconds,
        "before": before, "after": after, "loss_history": [
            {"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "train_examples": len(train_examples), "heldout_examples": len(held_out), "cpu_threads": threads,
        "optimizer": resolved_optim(cfg),
    }
    if save:
        kind = "model" if cfg.method == "full" else "adapter"

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)  # PEFT: adapter_config.json + adapter_model.safetensors only
            if cfg.method == "full":
                tokenizer.save_pretrained(tmp)
            (tmp / "run_config.json").write_text(json.dumps(asdict(cfg), indent=2))

        metrics[kind] = str(atomic_save_dir(out / kind, write))
        from . import plots
        metrics["loss_curve"] = str(plots.loss_curve(metrics["loss_history"], out / "loss_curve.png",
                                                     title=f"{cfg.method} on {cfg.data}"))
    metrics["total_seconds"] = time.time() - t_start
    if save:
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        log(f"{kind} saved to {metrics[kind]}  (metrics: {out / 'metrics.json'}, loss curve: {metrics['loss_curve']})")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"time: {metrics['total_seconds']:.0f} s in all, {train_seconds:.0f} s training")
    return metrics


def _fmt(score: float | None) -> str:
    return "n/a (no automatic score for this data set)" if score is None else f"{score:.3f}"
