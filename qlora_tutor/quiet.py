"""Known, harmless library noise, silenced only where it arises and only while it arises.

Importing a qlora_tutor module changes no logger level and no warning filter; code that calls a noisy library
wraps that call in `quiet_libraries()`, and `import_bitsandbytes()` imports bitsandbytes without its notice.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import warnings
from types import ModuleType
from typing import Iterator

# On CPUs with AVX512-BF16, importing bitsandbytes 0.50 tries to load an optional CPU kernel through the `kernels`
# package and logs a warning when that package is missing. Its standard CPU path (used here) does not need it.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def import_bitsandbytes() -> ModuleType:
    """`import bitsandbytes`, without the optional-kernel notice it logs on some CPUs (see above)."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    with _logger_level(_BNB_CPU_LOGGER, logging.ERROR):
        return importlib.import_module("bitsandbytes")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside the block: no FutureWarnings from transformers/PEFT (transformers 5 renamed gradient checkpointing
    to activation checkpointing and PEFT still calls the old names), no notice about `use_reentrant` (we pass
    use_reentrant=False explicitly), and no bitsandbytes import notice (transformers and PEFT import it on first
    use). Everything is restored afterwards."""
    with warnings.catch_warnings(), _logger_level(_BNB_CPU_LOGGER, logging.ERROR):
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*use_reentrant.*")
        yield


def hide_library_notices() -> None:
    """For an entry point (a notebook's setup cell): hide, from now on in this process, the harmless notices that
    `quiet_libraries()` hides inside a block: the gradient-checkpointing renaming FutureWarnings that PEFT
    triggers in transformers 5, bitsandbytes' optional-kernel notice (by importing it quietly now), and tqdm's
    "IProgress not found" (it looks for Jupyter widgets, which the notebooks do not need: progress is printed).
    Call it before importing transformers or PEFT. Library code never calls this; only the caller decides to
    change its own process's warning filters."""
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="IProgress not found")
    warnings.filterwarnings("ignore", message=".*use_reentrant.*")
    import_bitsandbytes()


@contextlib.contextmanager
def quiet_gguf_loading() -> Iterator[None]:
    """Inside the block: transformers' GGUF loader without its progress bars and warnings. Its "de-quantizing"
    bar is a plain tqdm of its own (transformers' switch does not reach it), so that one is wrapped with
    disable=True for the duration. Everything is restored afterwards."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging
    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    bar = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
