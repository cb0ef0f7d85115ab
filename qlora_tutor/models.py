"""Getting a base model the way practitioners do: find it, check it cheaply, load it in 4-bit with bitsandbytes.

A model is 'embedded' (the project's own small Llama in data/, offline), a local transformers folder, or a hub
id ('org/name'). Everything that can fail fast (the folder, config.json, the target modules) is checked before any
weights are read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from . import distributed, paths, targets
from .quiet import import_bitsandbytes, quiet_libraries

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    """'org/name' with no path-like start: what the hub accepts as a repository id."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~"))


def embedded_model_dir(data_root: str | os.PathLike | None = None) -> Path:
    """The folder of the project's own small pretrained Llama (config, safetensors weights, tokenizer)."""
    path = paths.data_dir(data_root) / "embedded-model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded model is missing at {path}: rebuild it with `python scripts/pretrain.py` "
            "(see data/README.md) or pass a hub model id instead."
        )
    return path


def resolve_model(model: str, data_root: str | os.PathLike | None = None) -> str:
    """'embedded' → the shipped model folder; 'smollm2-135m' or a .gguf file → its transformers folder (converted once
    and cached, real_model.ensure_model); an existing folder → itself; 'org/name' → a hub id. Else a clear error."""
    if model == "embedded":
        return str(embedded_model_dir(data_root))
    from . import real_model
    if real_model.is_gguf_model(model):
        return str(real_model.ensure_model(model))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json: it is not a transformers model folder")
        return str(path)
    if looks_like_hub_id(model):
        return model
    raise FileNotFoundError(f"model {model!r} not found: give 'embedded', 'smollm2-135m', an existing folder, a .gguf "
                            "file, or a hub id 'org/name'")


def load_model_config(model_path: str) -> Any:
    """The model's config.json (fast, no weights): proves the model exists before anything heavy happens."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load model {model_path!r}: {e}. Offline? Use a local folder or 'embedded'.") from None


def check_targets(model_config: Any, target_modules: str | list[str]) -> list[str]:
    """The linear layers `target_modules` selects in this model (built on the meta device: no memory, no weights),
    by the same rule PEFT applies; a clear error when an entry selects nothing."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    return targets.find_linear_targets(skeleton, target_modules)


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    from .data import ensure_pad_token
    return ensure_pad_token(AutoTokenizer.from_pretrained(model_path))


def bnb_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
               quant_storage: torch.dtype = torch.uint8) -> Any:
    """The 4-bit recipe of the paper. bitsandbytes' own defaults (fp4, no double quantization) are overridden."""
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(
        load_in_4bit=True,                         # store the linear layers' weights in 4 bits
        bnb_4bit_quant_type=quant_type,            # nf4: 16 levels at normal quantiles (fp4: a float grid)
        bnb_4bit_use_double_quant=double_quant,    # the per-block absmax constants quantized to 8 bits too
        bnb_4bit_compute_dtype=compute_dtype,      # weights are dequantized to this dtype for every matmul
        bnb_4bit_quant_storage=quant_storage,      # container of the packed codes: uint8, or bf16 so FSDP can shard
    )


def load_base(model_path: str, method: str, compute_dtype: torch.dtype, quant_type: str = "nf4",
              double_quant: bool = True) -> Any:
    """The base model: 4-bit for qlora (other weights fp32), compute dtype for lora, fp32 for full (AMP on GPU)."""
    from transformers import AutoModelForCausalLM
    # one process per GPU under torchrun/accelerate: process k loads its copy onto GPU k (the CPU without CUDA)
    kwargs: dict[str, Any] = {"device_map": distributed.device_map()}
    if method == "qlora":
        import_bitsandbytes()
        storage = distributed.quant_storage(compute_dtype)  # bf16 under FSDP (it shards floats only), else uint8
        kwargs.update(quantization_config=bnb_config(quant_type, double_quant, compute_dtype, storage),
                      dtype=storage if storage.is_floating_point else torch.float32)
    else:
        kwargs["dtype"] = compute_dtype if method == "lora" else torch.float32
    with quiet_libraries():
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
