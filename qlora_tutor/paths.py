"""Where the project's shipped data lives, and the one way files and folders are written (atomically).

The package is used from a clone of the repository (``pip install -e .``), so ``data/`` sits next to
``qlora_tutor/``. ``QLORA_TUTOR_DATA`` points elsewhere when the data were copied somewhere else; functions that
read data also take an explicit ``data_root`` (used by `compare`, which works on a frozen copy).

Every file the package writes goes through `atomic_save_file` or `atomic_save_dir`: the content is written to a
temporary name in the destination's folder and renamed into place, so a reader (or a crash) never sees half of it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir(data_root: str | os.PathLike | None = None) -> Path:
    """The folder holding the embedded model and data sets: `data_root`, else $QLORA_TUTOR_DATA, else <repo>/data."""
    env = os.environ.get("QLORA_TUTOR_DATA")
    path = Path(data_root) if data_root is not None else Path(env) if env else REPO_ROOT / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"QLoRA Tutor's data folder was not found at {path}. Install the package from a clone of the "
            "repository (git clone ... && pip install -e .) or set QLORA_TUTOR_DATA to the folder that holds "
            "the embedded model and data sets."
        )
    return path


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` create the file `tmp` (same folder and suffix as `path`), then rename it to `path`.

    The suffix is kept because some writers pick the format from it (matplotlib's savefig). A failing `write`
    leaves `path` as it was and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes private files; give the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that readers see either the old or the new content, never half of it."""
    return atomic_save_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` for text (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_dir(dest: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` fill a temporary folder next to `dest`, then rename it to `dest` (replacing an old one).

    A crash while writing leaves only a hidden temporary folder, never a half-written `dest`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        write(tmp)
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes private folders; give the usual permissions
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
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
