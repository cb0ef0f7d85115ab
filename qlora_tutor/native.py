"""The optional native fast path for 4-bit dequantization on the CPU: `dequant4.c`, built on first use.

The PyTorch dequantize in `quant.py` is the one the notebooks teach; it needs several memory passes because PyTorch
has no fused "look up and scale" op. `dequant4.c` does the same arithmetic in one pass (tests hold the two equal bit
for bit). It is compiled once with the system's C compiler (`$CC`, else cc, gcc or clang), cached per user, and
loaded with ctypes: no Python or torch headers, no build step at install time. Where there is no compiler (many
Windows and macOS laptops) or the build fails, `available()` is False, `status()` says why, and
`QuantizedTensor.dequantize` simply uses the PyTorch path: same results, slower.

Three things make it fast, each measured on the 2-core test machine (results/quant_cpu.md):
- one pass, vectorised with AVX-512 where the CPU has it (a plain C loop elsewhere);
- threads from OpenMP: built with -fopenmp, the library uses the OpenMP runtime torch has already loaded, so its
  threads are torch's own and do not fight them for the cores (a Python thread pool did);
- memory: a fresh output is advised to use 2 MiB pages (`empty`), and an output whose pages are already mapped is
  written with non-temporal stores, which skip reading each cache line before overwriting it.

Set QLORA_TUTOR_NATIVE=0 to turn the native path off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("dequant4.c")
_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MIN_VALUES_PER_THREAD = 1 << 18  # below this, one thread: starting a second costs more than it saves
_STREAM_BYTES = 16 << 20  # non-temporal stores from this output size on (bigger than most laptops' caches)
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off"]  # no FMA: every product rounds on its own
_state: dict = {}
_lock = threading.Lock()


def _compiler() -> str | None:
    for name in filter(None, [os.environ.get("CC"), "cc", "gcc", "clang"]):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cache_dir() -> Path:
    """A per-user cache folder (created private); the compiled library is found there again next time."""
    try:
        path = Path(os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")) / "qlora_tutor"
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
            raise PermissionError(f"{path} belongs to another user")
        return path
    except (OSError, RuntimeError):  # RuntimeError: Path.home() without a home directory
        return Path(tempfile.mkdtemp(prefix="qlora_tutor_native_"))


def _build(compiler: str, flags: list[str]) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *flags, platform.machine(), sys.platform]).encode())
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    target = _cache_dir() / f"dequant4-{key.hexdigest()[:16]}{suffix}"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=suffix)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or [result.stderr.strip()]
            raise RuntimeError(f"{Path(compiler).name} failed: {errors[0][:300]}")
        os.replace(tmp, target)  # atomic: another process building at the same time gets a whole file too
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in target.parent.glob(f"dequant4-*{suffix}"):  # builds of older sources (a process using one keeps it)
        if old != target and old.stat().st_mtime < target.stat().st_mtime:
            old.unlink(missing_ok=True)
    return target


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.qt_dequantize_4bit.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, ctypes.c_float, ptr, i32, i64, i64, i32,
                                       i32, i32]
    lib.qt_dequantize_4bit.restype = None
    for name in ("qt_has_avx512", "qt_has_openmp"):
        getattr(lib, name).restype = i32
    for name in ("qt_advise_huge_pages", "qt_is_resident"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [ptr, i64], i32
    return lib


def _load() -> dict:
    with _lock:
        if _state:
            return _state
        if os.environ.get("QLORA_TUTOR_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _state.update(lib=None, why="turned off by QLORA_TUTOR_NATIVE=0")
            return _state
        compiler = _compiler()
        if compiler is None:
            _state.update(lib=None, why="no C compiler found (set CC to one); using the PyTorch path")
            return _state
        # with OpenMP first (it then shares the runtime torch loaded); compilers without it (Apple's clang) build
        # a one-thread library instead
        error: Exception | None = None
        for flags in (_FLAGS + ["-fopenmp"], _FLAGS):
            try:
                lib = _open(_build(compiler, flags))
                break
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                error = error or err
        else:
            _state.update(lib=None, why=f"native build failed, using the PyTorch path: {error}")
            return _state
        avx512, openmp = bool(lib.qt_has_avx512()), bool(lib.qt_has_openmp())
        _state.update(lib=lib, fn=lib.qt_dequantize_4bit, avx512=avx512, openmp=openmp,
                      why=f"built with {Path(compiler).name}; {'AVX-512' if avx512 else 'plain C'} loop, "
                          f"{'OpenMP threads' if openmp else 'one thread (no OpenMP)'}")
        return _state


def available() -> bool:
    """True when the native dequantize can be used (compiled and loaded; builds it on the first call)."""
    return _load()["lib"] is not None


def status() -> str:
    """One line: whether the native path is used, and why (or why not)."""
    return _load()["why"]


def empty(n: int, dtype: torch.dtype, huge_pages: bool = True) -> torch.Tensor:
    """torch.empty(n, dtype=dtype) on the CPU; when large (>= 8 MiB) and `huge_pages`, advised to use 2 MiB pages.

    A fresh tensor's memory is mapped by the OS page by page on first write; for a 64 MiB tensor that is 16,384
    page faults, which on the 2-core test machine take 15 ms, far longer than dequantizing into it (1-2 ms). Linux's
    transparent huge pages cut that to 32 faults. PyTorch does the same for every allocation when the environment
    variable THP_MEM_ALLOC_ENABLE=1 is set; here it is done for this one output only, and only when its memory is
    fresh (memory the allocator recycled is already mapped and costs no faults).
    """
    out = torch.empty(n, dtype=dtype)
    nbytes = n * out.element_size()
    if huge_pages and nbytes >= 8 << 20 and available():
        _load()["lib"].qt_advise_huge_pages(out.data_ptr(), nbytes)  # advice only: failure changes nothing
    return out


def dequantize_4bit(packed: torch.Tensor, code: torch.Tensor, out: torch.Tensor, blocksize: int,
                    absmax: torch.Tensor | None = None, qabsmax: torch.Tensor | None = None,
                    dynamic_map: torch.Tensor | None = None, nested: torch.Tensor | None = None,
                    nested_blocksize: int = 256, offset: float = 0.0, use_avx512: bool = True,
                    threads: int | None = None, stream: bool | None = None) -> torch.Tensor:
    """Fill the flat `out` (fp32/bf16/fp16, contiguous, CPU) from packed codes; see dequant4.c for the formula.

    Pass `absmax` (fp32 per block), or `qabsmax`, `dynamic_map`, `nested` and `offset` for double quantization.
    All tensors must be contiguous CPU tensors of the dtypes named; `QuantizedTensor.dequantize` ensures that.
    stream (non-temporal stores, see dequant4.c): None = when `out` is large and its pages are already mapped.
    """
    state = _load()
    if state["lib"] is None:
        raise RuntimeError(f"the native dequantize is not available: {state['why']}")
    if out.dtype not in _OUT_KIND or blocksize < 2 or blocksize % 2:
        raise ValueError(f"native dequantize writes float32, bfloat16 or float16 with an even block size, "
                         f"got {out.dtype} and block size {blocksize}")
    n = out.numel()
    blocks = -(-n // blocksize)
    # C reads raw pointers: every size, dtype and layout is checked here, so a bad call is an error, not a crash
    expect = [(packed, torch.uint8, (n + 1) // 2, "packed"), (code, torch.float32, 16, "code"),
              (out, out.dtype, n, "out")]
    if absmax is not None:
        expect.append((absmax, torch.float32, blocks, "absmax"))
    else:
        if qabsmax is None or dynamic_map is None or nested is None or nested_blocksize < 1:
            raise ValueError("pass absmax, or qabsmax, dynamic_map, nested and nested_blocksize (double quantization)")
        expect += [(qabsmax, torch.uint8, blocks, "qabsmax"), (dynamic_map, torch.float32, 256, "dynamic_map"),
                   (nested, torch.float32, -(-blocks // nested_blocksize), "nested")]
    for t, dtype, size, name in expect:
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() or t.numel() != size:
            raise ValueError(f"native dequantize: {name} must be a contiguous CPU {dtype} tensor of {size} values, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device} (contiguous: {t.is_contiguous()})")
    ptr = (lambda t: None if t is None else t.data_ptr())
    args = (ptr(packed), ptr(code), ptr(absmax), ptr(qabsmax), ptr(dynamic_map), ptr(nested), nested_blocksize,
            float(offset), ptr(out), _OUT_KIND[out.dtype], n, blocksize)
    avx = int(use_avx512 and state["avx512"])
    nbytes = n * out.element_size()
    if stream is None:
        stream = nbytes >= _STREAM_BYTES and state["lib"].qt_is_resident(out.data_ptr(), nbytes) == 1
    stream = int(bool(stream) and avx and out.data_ptr() % 64 == 0)
    threads = max(1, min(threads or torch.get_num_threads(), n // _MIN_VALUES_PER_THREAD))
    state["fn"](*args, avx, stream, threads)  # synchronous: every tensor above stays alive until it returns
    return out
