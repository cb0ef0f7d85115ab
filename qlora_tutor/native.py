"""The optional native fast path for 4-bit dequantization on the CPU: `dequant4.c`, built on first use.

The PyTorch dequantize in `quant.py` is the one the notebooks teach; it needs several memory passes because PyTorch
has no fused "look up and scale" op. `dequant4.c` does the same arithmetic in one pass (tests hold the two equal bit
for bit). It is compiled once with the system's C compiler (`$CC`, else cc, gcc or clang), cached in a private
per-user folder and verified before each load (see "the build cache" below), and loaded with ctypes: no Python or
torch headers, no build step at install time. Where there is no compiler (many
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

import contextlib
import ctypes
import hashlib
import numbers
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
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


# ------------------------------------------------------------------------------------------ the build cache
# The compiled library is code this process will run, so the cache is treated as an attack surface: another local
# user must not be able to make us load their library. Hence (POSIX; elsewhere nothing is cached):
# - the cache folder must be a real folder (not a symlink) of this user that no one else can write; otherwise it
#   is not used, and the library is built in a fresh private temporary folder instead (status() says why);
# - files in it are opened without following symlinks, must be regular files of this user that no one else can
#   write, and must hash to the SHA-256 recorded next to them when they were built; then the very file that was
#   hashed is loaded (through /proc/self/fd where there is one, so that it cannot be swapped in between);
# - builds run in a private temporary folder and are moved into the cache under a lock (one build for many
#   processes starting at once); temporary names are hidden and never match what the clean-up removes;
# - a library that loads but lacks the expected functions is rebuilt, not used.

_SUFFIX = ".dylib" if sys.platform == "darwin" else ".so"
_SYMBOLS = ("qt_dequantize_4bit", "qt_has_avx512", "qt_has_openmp", "qt_advise_huge_pages", "qt_is_resident")
_STALE_SECONDS = 3600  # a hidden temporary file this old was left by a killed process
_loaded_names: set[str] = set()  # /proc/self/fd names already given to the dynamic loader


def _lib_name(compiler: str, flags: list[str]) -> str:
    """dequant4-<source hash>-<build hash>.so: the source part tells old builds (removed) from other flag sets
    (kept: the OpenMP and the plain build may both be in use)."""
    source = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    build = hashlib.sha256(" ".join([compiler, *flags, platform.machine(), sys.platform]).encode()).hexdigest()[:8]
    return f"dequant4-{source}-{build}{_SUFFIX}"


def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")) / "qlora_tutor"


def _unsafe(st: os.stat_result, folder: bool) -> str | None:
    """Why a file or folder (its fstat) must not be trusted, or None."""
    if folder != stat.S_ISDIR(st.st_mode) or (not folder and not stat.S_ISREG(st.st_mode)):
        return "is not a folder" if folder else "is not a regular file"
    if st.st_uid != os.getuid():
        return f"belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"can be written by others (mode {oct(st.st_mode & 0o777)})"
    if not folder and st.st_nlink != 1:
        return "has other hard links"
    return None


def _open_cache() -> tuple[int, Path]:
    """The cache folder, opened (fd) and checked; OSError (PermissionError with the reason) if it cannot be used."""
    if not (hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY") and hasattr(os, "getuid")
            and os.open in os.supports_dir_fd):
        raise OSError("this system has no safe way to open the cache folder")
    try:
        path = _cache_path()
    except RuntimeError as err:  # Path.home() without a home directory
        raise OSError(str(err)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as err:
        kind = "is a symbolic link" if path.is_symlink() else f"cannot be opened ({err.strerror})"
        raise PermissionError(f"cache folder {path} {kind}") from None
    problem = _unsafe(os.fstat(fd), folder=True)
    if problem:
        os.close(fd)
        raise PermissionError(f"cache folder {path} {problem}")
    return fd, path


def _read_checked(dir_fd: int, name: str) -> tuple[int, bytes] | None:
    """(fd, content) of `name` in the folder if it is a safe file (see `_unsafe`), else None; never opened
    through a symlink. The caller closes the fd."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError:  # missing, or a symlink (ELOOP)
        return None
    if _unsafe(os.fstat(fd), folder=False):
        os.close(fd)
        return None
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return fd, b"".join(chunks)


def _load_verified(dir_fd: int, folder: Path, name: str, keep_open: list[int]) -> ctypes.CDLL | None:
    """The library `name`, loaded only if it is safe, hashes to its recorded digest and has every expected
    function; else None. It is loaded through its open fd (/proc/self/fd/<n>, a name never used before in this
    process: the dynamic loader would return whatever it loaded under that name); the fds stay open in `keep_open`
    until the caller is done."""
    lib_file = _read_checked(dir_fd, name)
    if lib_file is None:
        return None
    fd, data = lib_file
    keep_open.append(fd)
    record = _read_checked(dir_fd, name + ".sha256")
    if record is None:
        return None
    os.close(record[0])
    if record[1].decode("ascii", "replace").strip() != hashlib.sha256(data).hexdigest():
        return None
    while f"/proc/self/fd/{fd}" in _loaded_names:  # the loader would hand back what it loaded under that name
        fd = os.dup(fd)
        keep_open.append(fd)
    proc = f"/proc/self/fd/{fd}"
    try:
        if os.path.exists(proc):
            _loaded_names.add(proc)
            return _open(proc)
        return _open(str(folder / name))
    except (OSError, AttributeError):  # not loadable here, or a library without our functions: rebuild
        return None


def _write_into(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Write `data` to `name` in the folder atomically: a hidden, unique temporary name, then a rename."""
    tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _clean(dir_fd: int, name: str) -> None:
    """Remove builds of other sources and temporary files left by killed processes; never another flag set of
    this source, never a temporary file that may still be being written."""
    source = name.split("-")[1]
    now = time.time()
    for entry in os.listdir(dir_fd):
        try:
            st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
            other_source = entry.startswith("dequant4-") and entry.split("-")[1] != source
            stale_tmp = entry.startswith(".dequant4-") and entry.endswith(".tmp") and now - st.st_mtime > _STALE_SECONDS
            if other_source or stale_tmp:
                os.unlink(entry, dir_fd=dir_fd)
        except (OSError, IndexError):
            pass


@contextlib.contextmanager
def _locked(dir_fd: int):
    """An exclusive lock on the cache folder (flock on its .lock file; the OS releases it if we die)."""
    try:
        import fcntl
    except ImportError:  # no flock: unique names and atomic renames still keep every file whole
        yield
        return
    fd = os.open(".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _compile(compiler: str, flags: list[str], folder: Path) -> Path:
    target = folder / f"dequant4{_SUFFIX}"
    result = subprocess.run([compiler, *flags, "-o", str(target), str(SOURCE)], capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "error" in line] or [result.stderr.strip()]
        raise RuntimeError(f"{Path(compiler).name} failed: {errors[0][:300]}")
    return target


def _build(compiler: str, flags: list[str]) -> tuple[ctypes.CDLL, str]:
    """The library for this compiler and flags, from the cache or built into it; (library, where it came from:
    "cached in <folder>", "built into <folder>" or "not cached: <why>")."""
    name = _lib_name(compiler, flags)
    try:
        dir_fd, folder = _open_cache()
    except OSError as err:  # no usable cache: build in a private temporary folder, load, remove the folder
        with tempfile.TemporaryDirectory(prefix="qlora_tutor_native_") as tmp:
            return _open(str(_compile(compiler, flags, Path(tmp)))), f"not cached: {err}"
    keep_open: list[int] = []
    try:
        with _locked(dir_fd):
            lib = _load_verified(dir_fd, folder, name, keep_open)
            if lib is not None:
                return lib, f"cached in {folder}"
            with tempfile.TemporaryDirectory(prefix="qlora_tutor_build_") as tmp:
                data = _compile(compiler, flags, Path(tmp)).read_bytes()
            _write_into(dir_fd, name, data, 0o700)
            _write_into(dir_fd, name + ".sha256", hashlib.sha256(data).hexdigest().encode() + b"\n", 0o600)
            lib = _load_verified(dir_fd, folder, name, keep_open)
            if lib is None:
                raise RuntimeError(f"the library just built does not load or lacks {', '.join(_SYMBOLS)}")
            _clean(dir_fd, name)
            return lib, f"built into {folder}"
    finally:
        for fd in keep_open:
            os.close(fd)
        os.close(dir_fd)


def _open(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    missing = [name for name in _SYMBOLS if not hasattr(lib, name)]
    if missing:
        raise AttributeError(f"{path} lacks {', '.join(missing)}")
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
                lib, where = _build(compiler, flags)
                break
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as err:
                error = error or err
        else:
            _state.update(lib=None, why=f"native build failed, using the PyTorch path: {error}")
            return _state
        avx512, openmp = bool(lib.qt_has_avx512()), bool(lib.qt_has_openmp())
        uncached = f"; {where}" if where.startswith("not cached") else ""  # the one case the user should hear of
        _state.update(lib=lib, fn=lib.qt_dequantize_4bit, avx512=avx512, openmp=openmp, where=where,
                      why=f"built with {Path(compiler).name}; {'AVX-512' if avx512 else 'plain C'} loop, "
                          f"{'OpenMP threads' if openmp else 'one thread (no OpenMP)'}{uncached}")
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


_MAX_BLOCK = 1 << 30  # far above any real block size (bitsandbytes' largest is 4096), far below int64 overflow


def _int_in_range(value: object, what: str, low: int, high: int) -> int:
    """`value` as a Python int (numpy integers too) in [low, high], or a ValueError before it reaches C."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= int(value) <= high:
        raise ValueError(f"native dequantize: {what} must be an integer from {low} to {high:,}, got {value!r}")
    return int(value)


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
    # ctypes passes an int to C by silently keeping its low 64 (or 32) bits: a block size of 2**64 would arrive
    # as 0 (a division by zero) and 2**64 + 64 as 64 (reads past the buffers). Every number is range-checked here.
    blocksize = _int_in_range(blocksize, "block size", 2, _MAX_BLOCK)
    nested_blocksize = _int_in_range(nested_blocksize, "nested block size", 1, _MAX_BLOCK)
    if threads is not None:
        threads = _int_in_range(threads, "threads", 1, 1 << 16)
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real):
        raise TypeError(f"native dequantize: offset must be a number, got {offset!r}")
    if not isinstance(out, torch.Tensor) or out.dtype not in _OUT_KIND or blocksize % 2:
        raise ValueError(f"native dequantize writes float32, bfloat16 or float16 with an even block size, "
                         f"got {getattr(out, 'dtype', type(out).__name__)} and block size {blocksize}")
    n = out.numel()
    blocks = -(-n // blocksize)
    # C reads raw pointers: every size, dtype and layout is checked here, so a bad call is an error, not a crash
    expect = [(packed, torch.uint8, (n + 1) // 2, "packed"), (code, torch.float32, 16, "code"),
              (out, out.dtype, n, "out")]
    if absmax is not None:
        expect.append((absmax, torch.float32, blocks, "absmax"))
    else:
        if qabsmax is None or dynamic_map is None or nested is None:
            raise ValueError("pass absmax, or qabsmax, dynamic_map, nested and nested_blocksize (double quantization)")
        expect += [(qabsmax, torch.uint8, blocks, "qabsmax"), (dynamic_map, torch.float32, 256, "dynamic_map"),
                   (nested, torch.float32, -(-blocks // nested_blocksize), "nested")]
    for t, dtype, size, name in expect:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"native dequantize: {name} must be a torch.Tensor, got {type(t).__name__}")
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
