"""Where the project's shipped data lives, and the one way files and folders are written (atomically).

The package is used from a clone of the repository (``pip install -e .``), so ``data/`` sits next to
``qlora_tutor/``. ``QLORA_TUTOR_DATA`` points elsewhere when the data were copied somewhere else; functions that
read data also take an explicit ``data_root`` (used by `compare`, which works on a frozen copy).

Every file the package writes goes through `atomic_save_file` or `atomic_save_dir`: the content is written to a
temporary name in the destination's folder and renamed into place, so a reader (or a crash) never sees half of it.
A folder replaces an old one by one atomic exchange where the OS has it (Linux renameat2, macOS renamex_np);
elsewhere by two renames recorded in a small journal, so that the next start finishes the swap
(`recover_dir`). Temporary folders carry the writer's process id, so leftovers of a killed process are found and
removed (`clean_stale`) and a live writer's are left alone.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
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


# Endings that name a file, never a hub repository ('Qwen/Qwen2.5-0.5B' ends in '.5-0B', not in one of these)
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".safetensors", ".bin", ".pt", ".gguf")


def looks_like_local_path(name: str) -> bool:
    """Whether `name` is meant as a file or folder rather than a hub id 'org/name': it starts like a path
    (/, ./, ../, ~, a drive letter), has more than one '/', a backslash or a file ending, or its first part is a
    folder here ('runs/x' while runs/ exists). Only 'org/name' with neither is left to the hub."""
    text = str(name)
    if text.startswith(("/", ".", "~")) or "\\" in text or re.match(r"^[A-Za-z]:", text):
        return True
    if text.count("/") > 1 or Path(text).suffix.lower() in FILE_SUFFIXES:
        return True
    first = text.split("/", 1)[0]
    return "/" in text and Path(first).is_dir()


def no_such_path(name: str, what: str) -> FileNotFoundError:
    """The error for a path that does not exist, with the folder it was looked up from."""
    where = "" if Path(name).expanduser().is_absolute() else f" (looked up from {Path.cwd()})"
    return FileNotFoundError(f"{what} {name}: no such file or folder{where}")


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


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (on this machine). Windows: assumed alive (os.kill would end it)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


# Hidden siblings of a folder `name`: .name.tmp-<pid>-<random> (being written), .name.old-<pid>-<random> (the
# replaced copy during a two-rename swap), .name.replaced-<pid>-<random> (a run kept aside by --overwrite) and
# .name.swap.json (the journal of a two-rename swap).
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|replaced)-(?:(?P<pid>\d+)-)?[^/]*$")
STALE_AFTER_S = 24 * 3600  # a temporary folder without a readable writer id is stale after a day


def hidden_sibling(dest: Path, kind: str) -> Path:
    """A new, empty, private folder next to `dest`: .<name>.<kind>-<pid>-<random>."""
    return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.{kind}-{os.getpid()}-"))


def siblings(dest: str | os.PathLike, kind: str) -> list[tuple[Path, int | None]]:
    """The hidden `kind` siblings of `dest` ('tmp', 'old' or 'replaced') with the id of the process that made
    them (None for folders written by older versions, which carried no id)."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    found = []
    for p in dest.parent.iterdir():
        m = _SIBLING.match(p.name)
        if m and m["name"] == dest.name and m["kind"] == kind:
            found.append((p, int(m["pid"]) if m["pid"] else None))
    return sorted(found)


def is_stale(path: Path, pid: int | None) -> bool:
    """A sibling folder whose writer has died (or, without an id, that is more than a day old)."""
    if pid is not None and os.name != "nt":
        return not _pid_alive(pid)
    try:
        return time.time() - path.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def _journal(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.swap.json"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or file system cannot (then nothing moved)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        call = libc.renameat2
        call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd, flag = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
        rc = call(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flag)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        call = libc.renamex_np
        call.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rc = call(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # not supported here: the caller falls back to the journaled two renames
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap_in(new: Path, dest: Path) -> None:
    """Put the complete folder `new` at `dest`, replacing what is there; a crash at any point is recoverable."""
    if not dest.exists() and not dest.is_symlink():
        os.rename(new, dest)
        return
    if _exchange(new, dest):  # dest is the new copy now, and `new` holds the old one
        shutil.rmtree(new)
        return
    old = hidden_sibling(dest, "old")
    journal = _journal(dest)
    atomic_write_text(journal, json.dumps({"dest": dest.name, "new": new.name, "old": old.name}))
    os.replace(dest, old / dest.name)  # between this rename and the next, `dest` is missing: the journal says why
    os.rename(new, dest)
    journal.unlink()
    shutil.rmtree(old)


def recover_dir(dest: str | os.PathLike) -> list[str]:
    """Repair what a killed `atomic_save_dir` left next to `dest`, and say what was done (one line each).

    - a journaled swap cut between its two renames: finished (the new copy was complete before it began), or
      rolled back to the old copy if the new one is gone;
    - a folder left missing by an older version's swap, with the old copy in .<name>.old-*: put back;
    - temporary copies whose writer died: removed (`clean_stale`).
    """
    dest = Path(dest)
    done: list[str] = []
    journal = _journal(dest)
    if journal.is_file():
        try:
            record = json.loads(journal.read_text())
            new, old = dest.parent / record["new"], dest.parent / record["old"]
        except (ValueError, KeyError, TypeError):
            record = None
        writer = _SIBLING.match(record["old"]) if record is not None else None
        if writer and writer["pid"] and not is_stale(dest.parent / record["old"], int(writer["pid"])):
            return done  # its writer is still at work
        if record is not None and not dest.exists():
            if new.is_dir():
                os.rename(new, dest)
                done.append(f"finished an interrupted replacement of {dest} (the new copy was complete)")
            elif (old / dest.name).is_dir():
                os.rename(old / dest.name, dest)
                done.append(f"rolled back an interrupted replacement of {dest} (the old copy was put back)")
        if record is not None:
            for leftover in (new, old):
                shutil.rmtree(leftover, ignore_errors=True)
        journal.unlink(missing_ok=True)
    if not dest.exists():  # an older version's two renames, cut in between: .<name>.old-*/<name> holds the old copy
        for old, pid in siblings(dest, "old"):
            if (old / dest.name).is_dir() and (pid is None or is_stale(old, pid)):
                os.rename(old / dest.name, dest)
                shutil.rmtree(old, ignore_errors=True)
                done.append(f"put back {dest} from {old.name}, left by an interrupted replacement")
                break
    return done + clean_stale(dest)


def clean_stale(dest: str | os.PathLike) -> list[str]:
    """Remove temporary and replaced copies of `dest` whose writer died (a kill during a save); a live
    writer's are left alone. Returns one line per folder removed."""
    dest = Path(dest)
    removed = []
    for kind in ("tmp", "old"):
        for path, pid in siblings(dest, kind):
            if path.is_dir() and is_stale(path, pid) and not (kind == "old" and not dest.exists()):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(f"removed {path.name}, a temporary copy of {dest.name} left by an interrupted save")
    return removed


def atomic_save_dir(dest: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` fill a temporary folder next to `dest`, then put it at `dest` (replacing an old one).

    A crash while writing leaves `dest` as it was and only a hidden temporary folder, which the next call (or
    `recover_dir`) removes; the replacement itself is one atomic exchange where the OS has one, else two
    renames that `recover_dir` finishes if they are cut in between.
    """
    dest = Path(dest)
    check_writable_dir(dest.parent, "the output folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dest)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} is a file, not a folder: choose another output or remove the file")
    tmp = hidden_sibling(dest, "tmp")
    try:
        write(tmp)
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes private folders; give the usual permissions
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
        _swap_in(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def check_writable_dir(path: str | os.PathLike, what: str = "the output folder") -> Path:
    """Check, without creating anything, that `path` is a folder or can be made one, and that it can be written:
    a clear error when it is a file, lies under a file, or is read-only."""
    path = Path(path)
    probe = path
    while not probe.exists() and not probe.is_symlink():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is" if probe == path else f"cannot be created: {probe} is"
        raise NotADirectoryError(f"{what} {path} {where} a file, not a folder: choose another path")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path} cannot be written: {probe} is read-only for this user. "
                              "Choose a folder you can write to.")
    return path
