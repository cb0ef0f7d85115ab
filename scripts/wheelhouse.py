"""An offline classroom: download every wheel once, install on laptops that have no network.

On a machine with network (the teacher's), from a clone of this repository:

    python scripts/wheelhouse.py build wheelhouse            # torch's CPU build + everything pyproject needs
    python scripts/wheelhouse.py check wheelhouse            # offline: is every dependency, to the last, there?

    # for laptops of another kind than the teacher's machine, name theirs (pip download's own options):
    python scripts/wheelhouse.py build wheelhouse --platform win_amd64 --python-version 3.11
    python scripts/wheelhouse.py check wheelhouse --platform win_amd64 --python-version 3.11

Copy the repository folder and `wheelhouse/` to each laptop (a USB stick will do), then, with no network:

    python3 -m venv .venv && .venv/bin/pip install --no-index --find-links wheelhouse -e ".[dev]"

The recipe is read from pyproject.toml: the build requirements (setuptools, for the editable install), the
dependencies and the `dev` extra (pytest, nbmake, jupyterlab). Versions are pinned to what is installed where the
wheelhouse is built, so every laptop gets the same. torch comes from PyTorch's CPU index (PyPI's Linux wheel is
the multi-GB CUDA build). `check` reads the METADATA of every wheel and follows each Requires-Dist, with its
environment markers, down to the last dependency; it needs no network.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging import tags
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
EXTRAS = ("dev",)


def recipe(pyproject: Path = ROOT / "pyproject.toml", pin: bool = True) -> list[str]:
    """Requirement lines for the wheelhouse: build requirements, dependencies and the extras, pinned to the
    installed versions where `pin` and the package is installed here."""
    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    lines = list(data.get("build-system", {}).get("requires", [])) + list(project["dependencies"])
    for extra in EXTRAS:
        lines += project.get("optional-dependencies", {}).get(extra, [])
    out, seen = [], set()
    for line in lines:
        req = Requirement(line.split("#", 1)[0].strip())
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        if pin:
            try:
                installed = Version(version(req.name)).public  # 2.13.0+cpu -> 2.13.0
                if req.specifier.contains(installed, prereleases=True):
                    req = Requirement(f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}"
                                      f"=={installed}" + (f"; {req.marker}" if req.marker else ""))
            except PackageNotFoundError:
                pass
        out.append(str(req))
    return out


def commands(dest: Path, requirements: Path, pip_options: list[str],
             torch_index: str = TORCH_CPU_INDEX) -> list[list[str]]:
    """The pip calls that fill `dest`: torch alone from the CPU index; everything else (torch's own dependencies
    included) from PyPI, with `dest` as a find-links folder so the CPU torch already there satisfies torch; and a
    wheel of this project."""
    torch_line = next(line for line in requirements.read_text().splitlines() if canonicalize_name(
        Requirement(line).name) == "torch")
    pip = [sys.executable, "-m", "pip"]
    return [
        [*pip, "download", "--dest", str(dest), "--no-deps", "--only-binary=:all:", "--index-url", torch_index,
         *pip_options, torch_line],
        [*pip, "download", "--dest", str(dest), "--find-links", str(dest), "--only-binary=:all:", *pip_options,
         "-r", str(requirements)],
        [*pip, "wheel", "--no-deps", "--wheel-dir", str(dest), str(ROOT)],
    ]


def supported_tags(python_version: str | None = None, platforms: list[str] | None = None) -> set[tags.Tag]:
    """The wheel tags a target can install: this interpreter's, or CPython `python_version` on `platforms`."""
    if python_version is None and not platforms:
        return set(tags.sys_tags())
    pv = tuple(int(x) for x in python_version.split(".")[:2]) if python_version else sys.version_info[:2]
    plats = list(platforms or tags.platform_tags())
    return set(tags.cpython_tags(pv, platforms=plats)) | set(tags.compatible_tags(pv, platforms=plats))


def marker_environment(python_version: str | None = None, platforms: list[str] | None = None) -> dict[str, str]:
    """Environment markers of the target (this machine's, with the Python version and OS of the target)."""
    env = dict(default_environment())
    if python_version:
        env.update(python_version=python_version, python_full_version=f"{python_version}.0")
    if platforms:
        p = platforms[0]
        env.update(sys_platform="win32" if p.startswith("win") else "darwin" if p.startswith("macosx") else "linux",
                   platform_system="Windows" if p.startswith("win") else "Darwin" if p.startswith("macosx")
                   else "Linux", os_name="nt" if p.startswith("win") else "posix")
    return env


def _metadata(wheel: Path) -> tuple[str, Version, list[Requirement]]:
    name, ver, _, _ = parse_wheel_filename(wheel.name)
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = z.read(meta).decode("utf-8", "replace")
    headers = text.split("\n\n", 1)[0]
    reqs = [Requirement(v.strip()) for k, v in re.findall(r"^([\w-]+):[ \t]*(.*)$", headers, re.M)
            if k.lower() == "requires-dist"]
    return canonicalize_name(name), ver, reqs


def check(dest: Path, requirements: list[str] | None = None, environment: dict[str, str] | None = None,
          supported: set[tags.Tag] | None = None) -> list[str]:
    """What is missing from the wheelhouse `dest` for `requirements` (default: its requirements.txt plus this
    project with its extras), following every wheel's Requires-Dist under `environment`'s markers, among the
    wheels whose tags the target supports (`supported`, default: this interpreter's). Empty = complete."""
    supported = supported_tags() if supported is None else supported
    wheels: dict[str, list[tuple[Version, list[Requirement]]]] = {}
    foreign: dict[str, list[str]] = {}
    for w in sorted(dest.glob("*.whl")):
        name, ver, reqs = _metadata(w)
        if supported.isdisjoint(parse_wheel_filename(w.name)[3]):
            foreign.setdefault(name, []).append(w.name)
            continue
        wheels.setdefault(name, []).append((ver, reqs))
    if requirements is None:
        listed = dest / "requirements.txt"
        requirements = [ln for ln in listed.read_text().splitlines() if ln.strip()] if listed.is_file() else []
        requirements.append(f"qlora-tutor[{','.join(EXTRAS)}]")
    env = {**default_environment(), **(environment or {})}
    problems, done = [], set()
    todo = [(Requirement(r), "the recipe") for r in requirements]
    while todo:
        req, why = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, str(req.specifier), tuple(sorted(req.extras)))
        if key in done:
            continue
        done.add(key)
        found = [(v, r) for v, r in wheels.get(name, []) if req.specifier.contains(v, prereleases=True)]
        if not found:
            have = ", ".join([str(v) for v, _ in wheels.get(name, [])] + [f"{f}, not for this target"
                                                                         for f in foreign.get(name, [])]) or "none"
            problems.append(f"{req.name}{req.specifier} (needed by {why}): no matching wheel (have: {have})")
            continue
        ver, deps = max(found, key=lambda x: x[0])
        for dep in deps:
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in extras):
                todo.append((dep, f"{name} {ver}"))
    return sorted(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("recipe", help="print the requirement lines the wheelhouse is built from")
    b = sub.add_parser("build", help="download every wheel into DEST (needs network)")
    b.add_argument("dest", type=Path)
    b.add_argument("--platform", action="append", default=[], help="pip download --platform (repeatable)")
    b.add_argument("--python-version", help="pip download --python-version, e.g. 3.11")
    b.add_argument("--torch-index", default=TORCH_CPU_INDEX, help="where torch comes from (default: %(default)s)")
    c = sub.add_parser("check", help="offline: is every dependency in DEST?")
    c.add_argument("dest", type=Path)
    c.add_argument("--python-version", help="the laptops' Python, e.g. 3.11 (default: this one)")
    c.add_argument("--platform", action="append", default=[], help="the laptops' platform tag, as for build")
    args = parser.parse_args(argv)

    if args.command == "recipe":
        print("\n".join(recipe()))
        return 0
    if args.command == "build":
        args.dest.mkdir(parents=True, exist_ok=True)
        req_file = args.dest / "requirements.txt"
        req_file.write_text("\n".join(recipe()) + "\n")
        options = [o for p in args.platform for o in ("--platform", p)]
        if args.python_version:
            options += ["--python-version", args.python_version]
        for cmd in commands(args.dest, req_file, options, args.torch_index):
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    problems = check(args.dest, environment=marker_environment(args.python_version, args.platform),
                     supported=supported_tags(args.python_version, args.platform))
    n = len(list(args.dest.glob("*.whl")))
    for p in problems:
        print("missing:", p)
    print(f"{args.dest}: {n} wheels, " + ("complete" if not problems else f"{len(problems)} missing"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
