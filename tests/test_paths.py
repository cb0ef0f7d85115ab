"""Folder saves that survive a kill at any moment: the atomic exchange, the journaled two-rename fallback, the
repair on the next start, and the clean-up of temporary copies that a killed process left (never a live one's)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qlora_tutor import paths

ROOT = Path(__file__).resolve().parent.parent


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    """The id of a process that has ended (a short-lived child, reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _killed_save(dest: Path, kill_at: str, exchange: bool) -> None:
    """In a child process: save new content over `dest` and die with SIGKILL at `kill_at` ('before the swap':
    the new copy complete, nothing swapped; 'second rename': between the two renames of the fallback;
    'cleanup': after the swap, while removing the old copy)."""
    code = textwrap.dedent(f"""
        import os, signal, shutil
        from pathlib import Path
        from qlora_tutor import paths
        if not {exchange}:
            paths._exchange = lambda a, b: False  # a file system without an atomic exchange
        renames = []
        real_rename = os.rename
        def rename(a, b):
            renames.append(a)
            if {kill_at!r} == "second rename" and len(renames) == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rename(a, b)
        os.rename = rename
        if {kill_at!r} == "cleanup":
            shutil.rmtree = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        if {kill_at!r} == "before the swap":
            paths._swap_in = lambda new, dest: os.kill(os.getpid(), signal.SIGKILL)
        def write(tmp):
            (tmp / "weights.txt").write_text("new")
        paths.atomic_save_dir(Path({str(dest)!r}), write)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic exchange", "two renames"])
def test_a_kill_at_any_point_of_a_replacement_leaves_the_old_or_the_new_copy(tmp_path, exchange):
    if exchange and not _can_exchange(tmp_path):
        pytest.skip("this file system has no atomic exchange")
    points = {"before the swap": "old", "cleanup": "new", **({} if exchange else {"second rename": "new"})}
    for kill_at, expected in points.items():
        dest = tmp_path / kill_at.replace(" ", "-") / "adapter"
        paths.atomic_save_dir(dest, lambda tmp: (tmp / "weights.txt").write_text("old"))
        _killed_save(dest, kill_at, exchange)
        leftovers = [p.name for p in dest.parent.iterdir() if p.name != "adapter"]
        assert leftovers, "the kill left nothing to repair: the test did not cut the save"
        notes = paths.recover_dir(dest)  # what the next start does
        assert _tree(dest) == {"weights.txt": expected}, (kill_at, leftovers, notes)
        assert sorted(p.name for p in dest.parent.iterdir()) == ["adapter"], (kill_at, leftovers)
        assert notes, "the repair said nothing"


def _can_exchange(tmp_path: Path) -> bool:
    a, b = tmp_path / "x1", tmp_path / "x2"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    ok = paths._exchange(a, b)
    if ok:
        assert (b / "f").read_text() == "a" and not (a / "f").exists()
    return ok


def test_a_folder_lost_by_the_older_two_rename_save_is_put_back(tmp_path):
    # what the earlier atomic_save_dir left when killed at its second rename: no dest, the old copy in
    # .adapter.old-XXXX/adapter and the new one in .adapter.tmp-XXXX (neither named by a process id)
    (tmp_path / ".adapter.old-k2j4" / "adapter").mkdir(parents=True)
    (tmp_path / ".adapter.old-k2j4" / "adapter" / "weights.txt").write_text("old")
    (tmp_path / ".adapter.tmp-9x0q").mkdir()
    (tmp_path / ".adapter.tmp-9x0q" / "weights.txt").write_text("new")
    old_time = 1_000_000_000
    os.utime(tmp_path / ".adapter.tmp-9x0q", (old_time, old_time))
    notes = paths.recover_dir(tmp_path / "adapter")
    assert _tree(tmp_path / "adapter") == {"weights.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"] and len(notes) == 2


def test_stale_temporary_copies_are_removed_and_live_ones_kept(tmp_path):
    dest = tmp_path / "adapter"
    dest.mkdir()
    dead = tmp_path / f".adapter.tmp-{_dead_pid()}-abcd"
    live = tmp_path / f".adapter.tmp-{os.getpid()}-efgh"
    young_legacy = tmp_path / ".adapter.tmp-q1w2"  # no process id, written a moment ago: maybe in use
    for d in (dead, live, young_legacy):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x" * 10)
    other = tmp_path / f".model.tmp-{_dead_pid()}-abcd"  # another folder's: not ours to judge
    other.mkdir()
    removed = paths.clean_stale(dest)
    assert not dead.exists() and live.exists() and young_legacy.exists() and other.exists()
    assert len(removed) == 1 and dead.name in removed[0]
    paths.atomic_save_dir(dest, lambda tmp: (tmp / "a").write_text("1"))  # a save cleans up too, and leaves nothing
    assert {p.name for p in tmp_path.iterdir()} == {"adapter", live.name, young_legacy.name, other.name}


@pytest.mark.parametrize("case", ["is a file", "under a file"])
def test_saving_where_a_file_stands_is_a_clear_error(tmp_path, case):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    dest = blocker if case == "is a file" else blocker / "demo" / "adapter"
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        paths.atomic_save_dir(dest, lambda tmp: None)
    assert blocker.read_text() == "not a folder"


def test_a_read_only_output_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a non-root user sees a chmod 555 folder
    with pytest.raises(PermissionError, match="read-only"):
        paths.check_writable_dir(tmp_path / "out")


@pytest.mark.parametrize("name, is_path", [
    ("runs/x", True), ("nodir/x.jsonl", True), ("data.json", True), ("./model", True), ("../m", True),
    ("~/m", True), ("/abs/m", True), ("a/b/c", True), ("C:\\models\\m", True), ("sub\\m", True),
    ("Qwen/Qwen2.5-0.5B-Instruct", False), ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", False),
    ("timdettmers/openassistant-guanaco", False), ("tatsu-lab/alpaca", False)])
def test_what_looks_like_a_path_is_never_sent_to_the_hub(tmp_path, monkeypatch, name, is_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert paths.looks_like_local_path(name) is is_path
