"""Fold a trained LoRA adapter into the base weights: W' = W + (alpha/r)·B·A, saved as a 16-bit model.

The merge happens on full-precision weights: either the 4-bit weights the adapter was trained against,
dequantized (the merged model then computes what was trained, up to 16-bit rounding), or the base model's
original weights. Merging into the 4-bit weights in place would re-quantize W + ΔW to 4 bits, and that
rounding is about as large as the whole update: `requantization_error` measures it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import finetune, hardware, models, paths
from .config import FinetuneConfig
from .paths import atomic_save_dir
from .quiet import import_bitsandbytes, quiet_libraries


def _same_or_inside(inner: Path, outer: Path) -> bool:
    """Whether `inner` is `outer` or lies inside it (both resolved, symlinks followed)."""
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def _check_output(output: Path, overwrite: bool, protected: dict[str, Path] | None = None) -> None:
    """The merge output must be a folder that is empty, new, or (with overwrite) an earlier merged model, and
    must not be, or hold, the base model or the run: replacing those would destroy what the merge reads."""
    paths.check_writable_dir(output, "merge: --output")
    for what, folder in (protected or {}).items():
        if _same_or_inside(folder, output):
            relation = "is" if folder.resolve() == output.resolve() else "holds"
            raise ValueError(f"merge: --output {output} {relation} {what} ({folder}): writing there would "
                             "replace what the merge starts from. Choose a new folder, e.g. runs/merged.")
    if output.exists() and any(output.iterdir()):
        if not (output / "config.json").is_file():
            raise ValueError(f"merge: {output} is not empty and holds no model: choose another --output")
        if not overwrite:
            raise ValueError(f"merge: {output} already holds a model: add --overwrite to replace it")


def _protected(run: str | Path) -> dict[str, Path]:
    """The folders a merge of `run` reads: the run (and its adapter) and, when local, the base model."""
    folder = finetune.find_artifact(run)
    cfg = finetune.read_run_config(folder / "run_config.json")
    found = {"the run's adapter": folder, "the run": folder.parent if folder.name in ("adapter", "model") else folder}
    model_path = Path(models.resolve_model(cfg.model))
    if model_path.exists():
        found["the base model"] = model_path
    return found


def merged_model(run: str | Path, base: str = "dequantized") -> tuple[Any, Any, FinetuneConfig]:
    """The base (dequantized 4-bit or original, in fp32) with the adapter merged in; plain transformers model."""
    from peft import PeftModel
    if base not in ("dequantized", "original"):
        raise ValueError(f"base must be 'dequantized' or 'original', not {base!r}")
    folder = finetune.find_artifact(run)
    cfg = finetune.read_run_config(folder / "run_config.json")
    if cfg.method == "full":
        raise ValueError(f"{folder} is a full fine-tune: it has no adapter to merge and is already a standalone model")
    finetune.check_artifact(folder, cfg.method)
    model_path = models.resolve_model(cfg.model)
    tokenizer = models.load_tokenizer(model_path)
    if base == "dequantized" and cfg.method == "qlora":
        model = models.load_base(model_path, "qlora", torch.float32, cfg.quant_type, cfg.double_quant)
        model = model.dequantize(dtype=torch.float32)  # every Linear4bit → nn.Linear holding dequant(W_4bit)
    else:
        model = models.load_base(model_path, "lora", torch.float32)
    with quiet_libraries():
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()  # W += (alpha/r)·B·A, in fp32
    return model.eval(), tokenizer, cfg


def merge_adapter(run: str | Path, output: str | Path, base: str = "dequantized", save_dtype: str = "bf16",
                  overwrite: bool = False, log: Any = print) -> Path:
    """Write a standalone 16-bit model (safetensors + tokenizer) with the adapter of `run` merged in, atomically."""
    output = Path(output)
    dtype = hardware.parse_dtype(save_dtype)
    if dtype == torch.float32:
        raise ValueError("save_dtype must be a 16-bit type: 'bf16' or 'fp16'")
    _check_output(output, overwrite, _protected(run))
    model, tokenizer, cfg = merged_model(run, base)
    model = model.to(dtype)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    atomic_save_dir(output, write)
    size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    log(f"merged {cfg.method} adapter into the {base} base; saved {str(dtype).replace('torch.', '')} model "
        f"({size / 2**20:.1f} MiB) to {output}. Load it with AutoModelForCausalLM.from_pretrained('{output}').")
    return output


@torch.no_grad()
def requantization_error(peft_model: Any, adapter: str = "default",
                         round_trips: dict[str, Any] | None = None) -> dict[str, float]:
    """How much of each LoRA update survives a merge, relative to the size of the update ‖ΔW‖:

    - 'requant_4bit': ‖Q4(W4 + ΔW) − (W4 + ΔW)‖ / ‖ΔW‖: merging into the 4-bit weights in place (W4 = dequantized base)
    - 'round_16bit': ‖bf16(W4 + ΔW) − (W4 + ΔW)‖ / ‖ΔW‖: our merge, stored in bf16
    - one more entry per `round_trips` name -> function(W) (e.g. real_model.q4_1_round_trip, the GGUF's format)
    All pooled over all adapted layers. A value near 1 means the error is as large as the update itself.
    """
    import_bitsandbytes()
    import bitsandbytes.functional as bnbf
    extra = dict(round_trips or {})
    err4 = err16 = norm = 0.0
    errs = {name: 0.0 for name in extra}
    for module in peft_model.modules():
        weight = getattr(getattr(module, "base_layer", None), "weight", None)
        if weight is None or getattr(weight, "quant_state", None) is None or adapter not in getattr(module, "lora_A", {}):
            continue
        qs = weight.quant_state
        w4 = bnbf.dequantize_4bit(weight.data, qs).float()
        exact = w4 + module.get_delta_weight(adapter).float()
        q, qs2 = bnbf.quantize_4bit(exact, blocksize=qs.blocksize, compress_statistics=qs.nested,
                                    quant_type=qs.quant_type)
        err4 += (bnbf.dequantize_4bit(q, qs2).float() - exact).pow(2).sum().item()
        err16 += (exact.bfloat16().float() - exact).pow(2).sum().item()
        for name, fn in extra.items():
            errs[name] += (fn(exact).float() - exact).pow(2).sum().item()
        norm += module.get_delta_weight(adapter).float().pow(2).sum().item()
    if norm == 0:
        raise ValueError("no 4-bit LoRA layers with a non-zero update found (train the adapter first)")
    return {"requant_4bit": (err4 / norm) ** 0.5, "round_16bit": (err16 / norm) ** 0.5,
            **{name: (e / norm) ** 0.5 for name, e in errs.items()}}
