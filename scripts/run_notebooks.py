"""Re-execute the notebooks in place, so that what GitHub shows is what a learner sees on a CPU.

    python scripts/run_notebooks.py                 # every notebook and solution
    python scripts/run_notebooks.py notebooks/01*   # some of them

Outputs are kept small: widget state and execution timings are dropped, and long text outputs are cut.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qlora_tutor.paths import atomic_save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAX_TEXT_CHARS = 4000


def _shrink(nb: nbformat.NotebookNode) -> None:
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        merged: list = []  # one output per run of stdout (or stderr) text, however the kernel chunked it
        for out in cell.get("outputs", []):
            if merged and out.get("output_type") == "stream" and merged[-1].get("output_type") == "stream" \
                    and merged[-1].get("name") == out.get("name"):
                merged[-1]["text"] += out["text"]
            else:
                merged.append(out)
        cell["outputs"] = merged
        for out in merged:
            if out.get("output_type") == "stream" and len(out.get("text", "")) > MAX_TEXT_CHARS:
                out["text"] = out["text"][:MAX_TEXT_CHARS] + "\n... (output cut)\n"
            data = out.get("data", {})
            data.pop("application/vnd.jupyter.widget-view+json", None)


def run(path: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - start
    _shrink(nb)
    atomic_save_file(path, lambda tmp: nbformat.write(nb, tmp))  # a failed run never leaves half a notebook
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args()
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    paths = args.paths or sorted((ROOT / "notebooks").glob("**/*.ipynb"))
    paths = [p for p in paths if ".ipynb_checkpoints" not in str(p)]
    for p in paths:
        print(f"running {p.relative_to(ROOT) if p.is_absolute() else p} ...", flush=True)
        print(f"  done in {run(p.resolve(), args.timeout):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
