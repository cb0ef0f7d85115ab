"""The native kernel's build cache holds code this process runs: planted, tampered, symlinked or broken files in it
are never loaded, and many processes building at once all get the real library.

Every scenario runs in a child process (what it loads stays out of pytest's process) with its own cache folder,
set through XDG_CACHE_HOME. The "planted" library has every function the real one exports, and a constructor that
writes a marker file: if the marker appears, someone else's code ran in the process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_tutor import native

if sys.platform == "win32" or native._compiler() is None or os.environ.get("QLORA_TUTOR_NATIVE", "1") == "0":
    pytest.skip("the build cache needs a C compiler on a POSIX system", allow_module_level=True)

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("PLANTED_MARKER");
    FILE *f = marker ? fopen(marker, "a") : NULL;
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
int qt_has_avx512(void) { return 0; }
int qt_has_openmp(void) { return 0; }
void qt_dequantize_4bit(void) {}
int qt_advise_huge_pages(void *p, long n) { (void)p; (void)n; return -1; }
int qt_is_resident(void *p, long n) { (void)p; (void)n; return -1; }
"""
NO_SYMBOLS = "int something_else(void) { return 1; }\n"

# Building and loading need no torch: children get a stand-in for it (three dtype names are all native.py reads at
# import), so that a child starts in a fraction of a second. The real library's bits are checked in test_native.py.
STUB_TORCH = "import sys, types; sys.modules['torch'] = types.SimpleNamespace(float32=0, bfloat16=1, float16=2)\n"

# One child process runs several scenarios: each sets its cache folder and marker, forgets the loaded library
# (native._state) and loads again. It reports, per scenario, whether the native path is available and its status.
RUNNER = STUB_TORCH + r"""
import json, os
from qlora_tutor import native
for cache, marker in json.loads(sys.argv[1]):
    os.environ["XDG_CACHE_HOME"], os.environ["PLANTED_MARKER"] = cache, marker
    native._state.clear()
    try:
        ok = native.available() and native._load()["lib"].qt_has_openmp() == 1
        print(json.dumps([bool(ok), native.status() + " | " + native._load().get("where", "")]))
    except Exception as err:
        print(json.dumps([False, f"{type(err).__name__}: {err}"]))
"""


def _compile(tmp: Path, name: str, source: str) -> Path:
    src = tmp / f"{name}.c"
    src.write_text(source)
    out = tmp / f"{name}.so"
    subprocess.run([native._compiler(), "-shared", "-fPIC", "-o", str(out), str(src)], check=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("libs")
    return {"planted": _compile(tmp, "planted", PLANTED), "no_symbols": _compile(tmp, "no_symbols", NO_SYMBOLS)}


def _name() -> str:
    """The file name the cache uses for the first (OpenMP) build."""
    return native._lib_name(native._compiler(), native._FLAGS + ["-fopenmp"])


def _plant(folder: Path, lib: Path, mode: int = 0o700, record: bool = True, link: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / _name()
    if link:
        target.symlink_to(lib)
    else:
        shutil.copy(lib, target)
        target.chmod(mode)
    if record:  # a recorded digest that matches: only the other checks can stop it
        (folder / (_name() + ".sha256")).write_text(hashlib.sha256(lib.read_bytes()).hexdigest() + "\n")
    return target


def _run(scenarios: list[tuple[Path, Path]]) -> list[tuple[bool, str]]:
    arg = json.dumps([[str(cache), str(marker)] for cache, marker in scenarios])
    env = {k: v for k, v in os.environ.items() if k not in ("QLORA_TUTOR_NATIVE", "CC")}
    out = subprocess.run([sys.executable, "-c", RUNNER, arg], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, f"the child process died (signal or error {out.returncode}):\n{out.stderr[-3000:]}"
    return [tuple(json.loads(line)) for line in out.stdout.splitlines()]


def test_planted_or_tampered_libraries_are_never_loaded(tmp_path, libs):
    planted = libs["planted"]
    cases = {}
    # a cache folder anyone can write: not used at all (built in a private temporary folder instead)
    cases["world-writable folder"] = tmp_path / "a"
    _plant(tmp_path / "a" / "qlora_tutor", planted).parent.chmod(0o777)
    # a private folder, but the file can be written by others
    cases["file others can write"] = tmp_path / "b"
    _plant(tmp_path / "b" / "qlora_tutor", planted, mode=0o766).parent.chmod(0o700)
    # a private folder whose library is a symlink to a file elsewhere
    cases["symlinked file"] = tmp_path / "c"
    _plant(tmp_path / "c" / "qlora_tutor", planted, link=True).parent.chmod(0o700)
    # the cache folder itself is a symlink (to a private folder holding the planted library)
    cases["symlinked folder"] = tmp_path / "d"
    _plant(tmp_path / "elsewhere", planted).parent.chmod(0o700)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "qlora_tutor").symlink_to(tmp_path / "elsewhere")
    # a private folder, a private file, but no recorded digest / a digest of other bytes
    cases["no digest"] = tmp_path / "e"
    _plant(tmp_path / "e" / "qlora_tutor", planted, record=False).parent.chmod(0o700)
    cases["wrong digest"] = tmp_path / "f"
    _plant(tmp_path / "f" / "qlora_tutor", planted).parent.chmod(0o700)
    (tmp_path / "f" / "qlora_tutor" / (_name() + ".sha256")).write_text("0" * 64 + "\n")
    if os.getuid() == 0:  # a folder of another user (only root can make one here)
        cases["another user's folder"] = tmp_path / "g"
        folder = _plant(tmp_path / "g" / "qlora_tutor", planted).parent
        folder.chmod(0o700)
        for p in (folder, *folder.iterdir()):
            os.chown(p, 65534, 65534, follow_symlinks=False)
    markers = {what: tmp_path / f"marker-{i}" for i, what in enumerate(cases)}
    results = dict(zip(cases, _run([(cases[w], markers[w]) for w in cases])))
    for what, (ok, status) in results.items():
        assert not markers[what].exists(), f"{what}: the planted library's code ran in the process ({status})"
        assert ok, f"{what}: the native path (the real library, with OpenMP) should still work: {status}"
    assert "not cached" in results["world-writable folder"][1]
    assert "written by others" in results["world-writable folder"][1]
    assert "symbolic link" in results["symlinked folder"][1]
    if "another user's folder" in results:
        assert "another user" in results["another user's folder"][1]
    # where the folder was private, the bad file was replaced by a verified build; a symlink's target is untouched
    for what in ("file others can write", "symlinked file", "no digest", "wrong digest"):
        lib = cases[what] / "qlora_tutor" / _name()
        st = lib.lstat()
        assert stat.S_ISREG(st.st_mode) and not st.st_mode & 0o022, what
        recorded = (lib.parent / (lib.name + ".sha256")).read_text().strip()
        assert recorded == hashlib.sha256(lib.read_bytes()).hexdigest()
        assert lib.read_bytes() != planted.read_bytes()
    assert (tmp_path / "elsewhere" / _name()).read_bytes() == planted.read_bytes()


def test_a_library_without_the_functions_is_rebuilt(tmp_path, libs):
    # right name, right recorded digest (as if a broken build had been recorded), but none of the functions
    folder = tmp_path / "cache" / "qlora_tutor"
    _plant(folder, libs["no_symbols"]).parent.chmod(0o700)
    (ok, status), (ok_again, status_again) = _run([(tmp_path / "cache", tmp_path / "m1")] * 2)
    assert ok and "built into" in status, status
    assert ok_again and "cached in" in status_again, status_again  # the rebuilt library is found next time
    assert (folder / _name()).read_bytes() != libs["no_symbols"].read_bytes()


def test_concurrent_first_builds_all_get_the_native_library(tmp_path):
    # a compiler that takes a moment, so that six processes starting together really overlap
    slow = tmp_path / "slow-cc"
    slow.write_text(f"#!/bin/sh\nsleep 1\nexec {native._compiler()} \"$@\"\n")
    slow.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k != "QLORA_TUTOR_NATIVE"},
           "CC": str(slow), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    code = STUB_TORCH + ("from qlora_tutor import native; "
                         "print(native.available(), '|', native.status(), '|', native._load()['where'])")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(6)]
    outs = [p.communicate(timeout=600) for p in procs]
    for (out, err), p in zip(outs, procs):
        assert p.returncode == 0, err[-2000:]
        assert out.startswith("True") and "OpenMP threads" in out, out  # nobody fell back to the plain build
    built = sorted(p.name for p in (tmp_path / "cache" / "qlora_tutor").iterdir())
    name = native._lib_name(str(slow), native._FLAGS + ["-fopenmp"])
    assert built == [".lock", name, name + ".sha256"], built  # one library, no temporary files left
    assert sum("built into" in out for out, _ in outs) == 1  # one process compiled; the others waited and loaded


def test_old_builds_and_stale_temporary_files_are_cleaned_but_nothing_else(tmp_path):
    folder = tmp_path / "cache" / "qlora_tutor"
    folder.mkdir(parents=True, mode=0o700)
    other_flags = f"dequant4-{_name().split('-')[1]}-00000000.so"   # this source, other flags: kept
    old_source = "dequant4-0123456789abcdef-e2c61908.so"             # an older source: removed
    fresh_tmp = f".{_name()}.1.abcd.tmp"                             # maybe still being written: kept
    stale_tmp = f".{_name()}.2.abcd.tmp"                             # left by a kill long ago: removed
    for name in (other_flags, old_source, fresh_tmp, stale_tmp, "notes.txt"):
        (folder / name).write_text("x")
    os.utime(folder / stale_tmp, (0, 0))
    (ok, status), = _run([(tmp_path / "cache", tmp_path / "m")])
    assert ok, status
    left = {p.name for p in folder.iterdir()}
    assert {other_flags, fresh_tmp, "notes.txt", _name()} <= left
    assert not {old_source, stale_tmp} & left
