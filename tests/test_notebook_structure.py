"""Every notebook opens and ends the same way, is stored executed, and stays small (the series' conventions)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAIN = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
EXPECTED = {"01", "02", "03", "04", "05", "06", "07", "08", "10"}


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _src(cell):
    return "".join(cell["source"])


def test_the_series_is_complete_with_solutions():
    assert {p.name[:2] for p in MAIN} == EXPECTED
    assert {p.name[:2] for p in SOLUTIONS} == EXPECTED


@pytest.mark.parametrize("path", MAIN + SOLUTIONS, ids=lambda p: p.name)
def test_notebook_opens_with_title_setup_and_environment(path):
    cells = _cells(path)
    assert cells[0]["cell_type"] == "markdown" and re.match(rf"# {path.name[:2]} · ", _src(cells[0]))
    code = [c for c in cells if c["cell_type"] == "code"]
    assert "google.colab" in _src(code[0]), "first code cell must be the Colab setup cell"
    assert "show_environment" in _src(code[1]), "second code cell must print versions and the device"


@pytest.mark.parametrize("path", MAIN, ids=lambda p: p.name)
def test_notebook_ends_with_summary_and_exercises(path):
    headings = [line for c in _cells(path) if c["cell_type"] == "markdown" for line in _src(c).splitlines()
                if line.startswith("#")]
    assert any(h.startswith("## Summary") for h in headings)
    assert any(h.startswith("## Exercises") for h in headings)
    assert any("assert" in _src(c) for c in _cells(path) if c["cell_type"] == "code"), "no check-yourself asserts"


@pytest.mark.parametrize("path", MAIN + SOLUTIONS, ids=lambda p: p.name)
def test_notebook_is_stored_executed_small_and_without_widget_state(path):
    nb = json.loads(path.read_text())
    assert "widgets" not in nb.get("metadata", {})
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), "re-run it with scripts/run_notebooks.py"
    assert path.stat().st_size < 400_000, "outputs too large: shrink figures or printed output"
