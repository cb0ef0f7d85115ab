"""The Colab setup cell of every notebook and the README's Colab links all come from pyproject's Repository URL."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("colab_setup", ROOT / "scripts" / "colab_setup.py")
colab_setup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(colab_setup)

NOTEBOOKS = colab_setup.notebook_paths()
FORK = "https://github.com/someone/my-fork"


def _setup_cell(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_setup_cell_is_the_one_written_from_pyproject(path):
    want = colab_setup.setup_cell_source(colab_setup.repository_url(), colab_setup.extra_installs(path))
    assert _setup_cell(path) == want, f"run `python scripts/colab_setup.py {path.relative_to(ROOT)}`"


def test_readme_links_point_at_the_pyproject_repository():
    text = (ROOT / "README.md").read_text()
    url = colab_setup.repository_url()
    assert colab_setup.readme_text(text, url) == text, "run `python scripts/colab_setup.py README.md`"
    assert f"git clone {url}" in text and "colab.research.google.com/github/" in text


def test_a_fork_changes_one_line_and_the_script_follows(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text((ROOT / "pyproject.toml").read_text().replace(colab_setup.repository_url(), FORK))
    assert colab_setup.repository_url(pyproject) == FORK
    source = colab_setup.setup_cell_source(FORK)
    assert f"git clone -q --depth 1 {FORK} /content/qlora-tutor" in source and "qlora-tutor/qlora-tutor" not in source
    compile(source, "setup cell", "exec")  # valid Python

    readme = colab_setup.readme_text((ROOT / "README.md").read_text(), FORK)
    assert "colab.research.google.com/github/qlora-tutor/" not in readme and "github.com/qlora-tutor/" not in readme
    assert readme.count("colab.research.google.com/github/someone/my-fork/blob/main/notebooks/") >= 8
    assert f"git clone {FORK} && cd" in readme


def test_sync_rewrites_only_the_setup_cell(tmp_path):
    src = next(p for p in NOTEBOOKS if p.name.startswith("05"))
    copy = tmp_path / src.name
    shutil.copy(src, copy)
    before = json.loads(copy.read_text())
    assert not colab_setup._sync_notebook(copy, colab_setup.setup_cell_source(FORK), write=True)
    after = json.loads(copy.read_text())
    assert FORK in _setup_cell(copy)
    changed = [i for i, (a, b) in enumerate(zip(before["cells"], after["cells"])) if a != b]
    first_code = next(i for i, c in enumerate(before["cells"]) if c["cell_type"] == "code")
    assert changed == [first_code] and len(before["cells"]) == len(after["cells"])
    assert colab_setup._sync_notebook(copy, colab_setup.setup_cell_source(FORK), write=False)  # now in sync


def test_a_missing_or_foreign_url_is_a_clear_error(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n')
    with pytest.raises(SystemExit, match="Repository"):
        colab_setup.repository_url(pyproject)
    pyproject.write_text('[project]\nname = "x"\n[project.urls]\nRepository = "https://gitlab.com/a/b"\n')
    with pytest.raises(SystemExit, match="github.com/OWNER/NAME"):
        colab_setup.repository_url(pyproject)
