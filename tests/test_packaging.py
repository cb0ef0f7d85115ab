"""The install files agree with each other: pyproject.toml, environment.yml, README and .ci/run."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# conda-forge names some packages differently from PyPI.
CONDA_TO_PYPI = {"pytorch": "torch"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;#]", requirement.strip(), maxsplit=1)[0].lower()


def _pyproject_packages() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"]) + [r for extra in meta["optional-dependencies"].values() for r in extra]
    return {_name(r) for r in reqs}


def _environment_packages() -> set[str]:
    """Package names under `dependencies:` (conda) and its `pip:` list, conda names mapped to PyPI's."""
    names, section = set(), None
    for line in (ROOT / "environment.yml").read_text().splitlines():
        stripped = line.split("#", 1)[0].rstrip()
        if not stripped:
            continue
        if not stripped.startswith(" "):
            section = stripped.rstrip(":")
            continue
        m = re.match(r"^\s+- (.+)$", stripped)
        if section != "dependencies" or not m or m.group(1).strip() == "pip:":
            continue
        name = _name(m.group(1).split("=")[0])
        if name not in ("python", "pip"):
            names.add(CONDA_TO_PYPI.get(name, name))
    return names


def test_environment_yml_names_the_same_packages_as_pyproject():
    assert _environment_packages() == _pyproject_packages()


def test_ci_runs_the_readme_test_command():
    ci_lines = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    readme = (ROOT / "README.md").read_text()
    command = ci_lines[-1].strip()
    assert command in readme, f"README does not contain the command .ci/run runs:\n{command}"


def test_console_script_points_at_an_existing_function():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    module, func = meta["scripts"]["qlora-tutor"].split(":")
    import importlib
    assert callable(getattr(importlib.import_module(module), func))
