"""Every notebook opens and ends the same way, is stored executed, and stays small (the series' conventions)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAIN = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
EXPECTED = {"01", "02", "03", "04", "05", "06", "07", "08", "09", "10"}


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


# ---------------------------------------------------------------------------------- write-it-yourself exercises
WRITE_IT_YOURSELF = {"01", "02", "03", "04"}  # notebooks whose learners write core pieces themselves (at least one each)
CHECK_CALL = re.compile(r"\b(check_\w+)\(")


def _code(path):
    return [c for c in _cells(path) if c["cell_type"] == "code"]


def _output_text(cell):
    parts = []
    for out in cell.get("outputs", []):
        parts.append("".join(out.get("text", "")))
        parts.append("".join(out.get("data", {}).get("text/plain", "")))
    return "".join(parts)


def _exercises(path):
    """(TODO cell, check cell) pairs: a code cell with a TODO and `raise NotImplementedError`, then the next code
    cell, which must call a check."""
    code = _code(path)
    return [(c, code[i + 1] if i + 1 < len(code) else None) for i, c in enumerate(code)
            if "TODO" in _src(c) and "raise NotImplementedError" in _src(c)]


@pytest.mark.parametrize("path", MAIN, ids=lambda p: p.name)
def test_each_todo_is_followed_by_its_check_which_says_not_done_yet(path):
    exercises = _exercises(path)
    if path.name[:2] in WRITE_IT_YOURSELF:
        assert exercises, "no write-it-yourself exercise (a TODO cell followed by a check cell)"
    imported = {m for c in _code(path) for m in re.findall(r"from qlora_tutor\.exercises\.(\w+) import", _src(c))}
    for todo, check in exercises:
        assert check is not None and CHECK_CALL.search(_src(check)), f"no check cell after:\n{_src(todo)[:200]}"
        assert "not done yet" in _output_text(check), "stored with the TODO unfilled, the check should say so"
    if exercises:
        assert imported, "the checks come from qlora_tutor.exercises.<module>"


@pytest.mark.parametrize("path", [p for p in MAIN if _exercises(p)], ids=lambda p: p.name)
def test_the_solutions_fill_every_todo_and_pass_its_check(path):
    solution = ROOT / "notebooks" / "solutions" / (path.stem + "_solutions.ipynb")
    called = {CHECK_CALL.search(_src(check)).group(1) for _, check in _exercises(path)}
    passed = {m for c in _code(solution) for m in CHECK_CALL.findall(_src(c)) if "✓" in _output_text(c)}
    assert called <= passed, f"checks not shown passing in {solution.name}: {sorted(called - passed)}"
    assert not any("raise NotImplementedError" in _src(c) for c in _code(solution))


@pytest.mark.parametrize("path", MAIN + SOLUTIONS, ids=lambda p: p.name)
def test_optional_sections_come_last(path):
    headings = [line for c in _cells(path) if c["cell_type"] == "markdown" for line in _src(c).splitlines()
                if line.startswith("## ")]
    optional = [i for i, h in enumerate(headings) if h.startswith("## Optional")]
    if optional:
        assert all(h.startswith("## Optional") for h in headings[optional[0]:]), \
            "an '## Optional: ...' section is followed by a main section: move it to the end"
