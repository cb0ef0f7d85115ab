"""The offline classroom's wheelhouse: its recipe names everything pyproject needs, its pip calls take torch from
the CPU index, and its offline check follows every wheel's Requires-Dist to the last dependency (on wheels made
here: nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "scripts" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wheelhouse)


def _names(lines):
    return {canonicalize_name(Requirement(line).name) for line in lines}


def test_recipe_names_every_dependency_extra_and_build_requirement_of_pyproject():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = _names(data["build-system"]["requires"]) | _names(data["project"]["dependencies"])
    for extra in wheelhouse.EXTRAS:
        wanted |= _names(data["project"]["optional-dependencies"][extra])
    assert "jupyterlab" in wanted and "setuptools" in wanted  # a classroom opens notebooks; -e . needs the backend
    for pin in (True, False):
        assert _names(wheelhouse.recipe(pin=pin)) == wanted


def test_pinned_recipe_uses_the_installed_versions_without_local_labels():
    from importlib.metadata import version
    torch_line = next(r for r in wheelhouse.recipe() if r.startswith("torch"))
    assert torch_line == f"torch=={version('torch').split('+')[0]}"


def test_build_takes_torch_from_the_cpu_index_and_the_rest_around_it(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("\n".join(wheelhouse.recipe()) + "\n")
    torch_call, rest_call, own_call = wheelhouse.commands(tmp_path, req, ["--platform", "win_amd64"])
    assert torch_call[torch_call.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert "--no-deps" in torch_call and torch_call[-1].startswith("torch==")
    assert rest_call[rest_call.index("--find-links") + 1] == str(tmp_path)  # the CPU torch satisfies torch
    assert "-r" in rest_call and "--platform" in rest_call and "win_amd64" in rest_call
    assert own_call[-1] == str(ROOT) and "wheel" in own_call


def _wheel(folder: Path, name: str, ver: str, requires: list[str], tag: str = "py3-none-any") -> None:
    dist = f"{name.replace('-', '_')}-{ver}"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{dist}-{tag}.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta + "\nA description that mentions Requires-Dist: nothing\n")


def test_check_follows_requires_dist_markers_and_extras(tmp_path):
    _wheel(tmp_path, "qlora-tutor", "0.1.0", ["alpha>=1", "pytest; extra == 'dev'", "winonly; sys_platform == 'win32'"])
    _wheel(tmp_path, "alpha", "1.2", ["beta<3", "gamma[fast]>=2"])
    _wheel(tmp_path, "beta", "2.5", [])
    _wheel(tmp_path, "gamma", "2.0", ["delta; extra == 'fast'"])
    (tmp_path / "requirements.txt").write_text("alpha==1.2\n")
    env = {"sys_platform": "linux"}
    missing = wheelhouse.check(tmp_path, environment=env)
    assert any(m.startswith("pytest") and "qlora-tutor" in m for m in missing)  # the dev extra is followed
    assert any(m.startswith("delta") and "gamma 2.0" in m for m in missing)  # so is gamma[fast]'s extra
    assert not any("winonly" in m for m in missing)  # a marker that is false here is not needed here
    assert any("winonly" in m for m in wheelhouse.check(tmp_path, environment={"sys_platform": "win32"}))
    _wheel(tmp_path, "pytest", "9.0", [])
    _wheel(tmp_path, "delta", "1.0", [])
    assert wheelhouse.check(tmp_path, environment=env) == []


def test_check_reports_a_version_that_does_not_match(tmp_path):
    _wheel(tmp_path, "alpha", "1.2", ["beta<3"])
    _wheel(tmp_path, "beta", "3.1", [])
    missing = wheelhouse.check(tmp_path, requirements=["alpha"])
    assert missing == ["beta<3 (needed by alpha 1.2): no matching wheel (have: 3.1)"]
    assert wheelhouse.main(["check", str(tmp_path)]) == 1  # and the command says so with its exit code


def test_check_skips_wheels_the_target_cannot_install(tmp_path):
    _wheel(tmp_path, "alpha", "1.2", ["beta"])
    _wheel(tmp_path, "beta", "2.5", [], tag="cp311-cp311-win_amd64")  # a Windows wheel only
    here = wheelhouse.supported_tags(python_version="3.11", platforms=["manylinux_2_28_x86_64"])
    windows = wheelhouse.supported_tags(python_version="3.11", platforms=["win_amd64"])
    missing = wheelhouse.check(tmp_path, requirements=["alpha"], supported=here)
    assert missing and "not for this target" in missing[0] and missing[0].startswith("beta")
    assert wheelhouse.check(tmp_path, requirements=["alpha"], supported=windows) == []
    assert wheelhouse.marker_environment("3.11", ["win_amd64"])["sys_platform"] == "win32"
