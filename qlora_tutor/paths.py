"""Where the project's shipped data lives (the embedded model and data sets).

The package is used from a clone of the repository (``pip install -e .``), so ``data/`` sits next to
``qlora_tutor/``. ``QLORA_TUTOR_DATA`` points elsewhere when the data were copied somewhere else.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The folder holding the embedded model and data sets; a clear error if it cannot be found."""
    env = os.environ.get("QLORA_TUTOR_DATA")
    path = Path(env) if env else REPO_ROOT / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"QLoRA Tutor's data folder was not found at {path}. Install the package from a clone of the "
            "repository (git clone ... && pip install -e .) or set QLORA_TUTOR_DATA to the folder that holds "
            "the embedded model and data sets."
        )
    return path


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
