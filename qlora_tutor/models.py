"""Getting a base model the way practitioners do: find it, check it cheaply, load it in 4-bit with bitsandbytes.

A model is 'embedded' (the project's own small Llama in data/, offline), a local transformers folder, or a hub
id ('org/name'). Everything that can fail fast (the folder, config.json, the target modules) is checked before any
weights are read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

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
        check_model_folder(path)
        return str(path)
    if paths.looks_like_local_path(model):
        raise paths.no_such_path(model, "model")
    if looks_like_hub_id(model):
        return model
    raise FileNotFoundError(f"model {model!r} not found: give 'embedded', 'smollm2-135m', an existing folder, a .gguf "
                            "file, or a hub id 'org/name'")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def check_model_folder(path: str | os.PathLike) -> Path:
    """A local model folder must hold config.json, weights and a tokenizer, and its safetensors files must be
    whole: checked from the files' sizes and headers (no weights read), with an error that names the file."""
    path = Path(path)
    if not path.is_dir():
        raise NotADirectoryError(f"model {path} is a file: give the folder that holds config.json and the weights")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json: it is not a transformers model folder")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"model folder {path} holds no weights (looked for {', '.join(WEIGHT_FILES)}): "
                                "copy the weights next to config.json")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"model folder {path} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)}): "
                                "save the tokenizer there too (tokenizer.save_pretrained)")
    index = path / "model.safetensors.index.json"
    shards = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    if index.is_file():
        try:
            shards += sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is damaged ({e}): re-download or re-save the model") from None
    for shard in shards:
        check_safetensors(shard)
    return path


def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a .safetensors file, after checking that it parses and that every tensor's bytes lie
    inside the file and fill it exactly (a truncated or damaged file fails here, before anything loads it)."""
    path = Path(path)
    hint = "re-save or re-download it"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {hint}")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            raise ValueError(f"{path} is damaged or truncated ({size} bytes; its header cannot be read): {hint}")
        try:
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            ends = [(k, v["data_offsets"][0], v["data_offsets"][1], v["dtype"], v["shape"]) for k, v in tensors.items()]
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, UnicodeDecodeError):
            raise ValueError(f"{path} is damaged: its header is not valid safetensors JSON: {hint}") from None
    itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
    data = size - 8 - n
    for name, start, end, dtype, shape in ends:
        count = 1
        for d in shape:
            count *= int(d)
        if not 0 <= start <= end <= data or (dtype in itemsize and end - start != count * itemsize[dtype]):
            raise ValueError(f"{path} is damaged or truncated: tensor {name!r} does not fit the file "
                             f"({data} data bytes): {hint}")
    if ends and max(e for _, _, e, _, _ in ends) != data:
        raise ValueError(f"{path} is damaged or truncated: its tensors cover "
                         f"{max(e for _, _, e, _, _ in ends)} of {data} data bytes: {hint}")
    return header


def check_finite_weights(model: Any, where: str) -> None:
    """Every floating-point weight and buffer (and each 4-bit weight's scale constants) finite; else an error
    naming the first bad tensor: a damaged weights file shows here, not as a NaN loss 250 steps later."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        parts = [(name, t)]
        state = getattr(t, "quant_state", None)
        while state is not None:  # 4-bit: the absmax scales (and, with double quantization, theirs)
            parts += [(f"{name} (4-bit scales)", getattr(state, "absmax", None)),
                      (f"{name} (4-bit offset)", getattr(state, "offset", None))]
            state = getattr(state, "state2", None)
        for label, x in parts:
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.device.type != "meta":
                bad = int((~torch.isfinite(x)).sum())
                if bad:
                    raise ValueError(f"{where}: {bad} of {x.numel()} values of {label} are not finite (NaN or "
                                     "inf): the weights file is damaged. Re-download or rebuild the model.")


def load_model_config(model_path: str) -> Any:
    """The model's config.json (fast, no weights): proves the model exists before anything heavy happens."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load model {model_path!r}: {e}. Offline? Use a local folder or 'embedded'.") from None


def check_targets(model_config: Any, target_modules: str | list[str], r: int | None = None,
                  warn: Callable[[str], None] | None = None) -> list[str]:
    """The linear layers `target_modules` selects in this model (built on the meta device: no memory, no weights),
    by the same rule PEFT applies; a clear error when an entry selects nothing. A LoRA rank `r` larger than a
    selected layer (B·A can have rank at most min(in, out), so the extra rank only costs memory; PEFT accepts
    it, as does the from-scratch add_adapters with a warning) is said through `warn` (an error without it)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    names = targets.find_linear_targets(skeleton, target_modules)
    if r is not None and names:
        modules = dict(skeleton.named_modules())
        smallest = min(names, key=lambda n: min(modules[n].in_features, modules[n].out_features))
        layer = modules[smallest]
        limit = min(layer.in_features, layer.out_features)
        if r > limit:
            message = (f"r (--r) {r} is larger than the layer {smallest} ({layer.out_features} x "
                       f"{layer.in_features}): its update B·A can have rank at most {limit}, so the extra rank "
                       f"only costs memory. Use --r {limit} or less (8-64 is usual).")
            if warn is None:
                raise ValueError(message)
            warn(f"warning: {message}")
    return names


def load_tokenizer(model_path: str) -> Any:
    """The model's tokenizer (with a pad token); a clear error naming the folder when it cannot be read."""
    from transformers import AutoTokenizer

    from .data import ensure_pad_token
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"could not load the tokenizer of {model_path!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                         "Save a tokenizer into the model folder (tokenizer.save_pretrained), or if the model is "
                         "on the hub check the id and the network.") from None
    return ensure_pad_token(tokenizer)


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
