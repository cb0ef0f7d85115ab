"""Where the project's shipped data lives (the embedded model and data sets).

The package is used from a clone of the repository (``pip install -e .``), so ``data/`` sits next to
``qlora_tutor/``. ``QLORA_TUTOR_DATA`` points elsewhere when the data were copied somewhere else.
"""

from __future__ import annotations

import os
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
