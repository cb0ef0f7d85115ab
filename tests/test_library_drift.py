"""Library drift: every name the notebooks and the package import from the hub libraries still exists, and
every keyword they pass to those names is still accepted by the installed versions.

Libraries rename things (transformers 5 renamed `torch_dtype` to `dtype`, `evaluation_strategy` to
`eval_strategy`, ...). Running the notebooks in CI catches that too, but slowly and with a long traceback; this
test names the exact call site and keyword, in a second.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "safetensors")


def _sources() -> list[tuple[str, str]]:
    """(where, code) for every package module and every notebook code cell (magics and shell lines dropped)."""
    out = [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted((ROOT / "qlora_tutor").glob("*.py"))]
    for nb_path in sorted((ROOT / "notebooks").glob("**/*.ipynb")):
        if ".ipynb_checkpoints" in str(nb_path):
            continue
        cells = json.loads(nb_path.read_text())["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                src = "".join(cell["source"])
                src = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!")))
                out.append((f"{nb_path.relative_to(ROOT)} cell {i}", src))
    return out


def _accepted_keywords(obj) -> set[str] | None:
    """Keywords a callable accepts, or None when it takes **kwargs (anything goes)."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _library_calls():
    """Yield (where, library name, imported object name, keywords used) for calls to names imported from the libraries."""
    for where, code in _sources():
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        imported: dict[str, tuple[str, str]] = {}  # local name -> (module, attribute)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
                for alias in node.names:
                    imported[alias.asname or alias.name] = (node.module, alias.name)
        modules: dict[str, str] = {}  # local alias -> module, for `import bitsandbytes as bnb`
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in LIBRARIES:
                        modules[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            kws = [k.arg for k in node.keywords if k.arg is not None]
            if isinstance(node.func, ast.Name) and node.func.id in imported:
                yield where, *imported[node.func.id], kws
            elif isinstance(node.func, ast.Attribute):
                parts, base = [], node.func
                while isinstance(base, ast.Attribute):
                    parts.append(base.attr)
                    base = base.value
                if isinstance(base, ast.Name) and base.id in modules and base.id not in imported:
                    parts.reverse()  # bnb.nn.Linear4bit -> ("bitsandbytes", "nn.Linear4bit")
                    yield where, modules[base.id], ".".join(parts), kws
        for local, (module, name) in imported.items():
            yield where, module, name, []


CALLS = sorted(set((w, m, n, tuple(k)) for w, m, n, k in _library_calls()))


def test_the_drift_check_sees_library_calls():
    # Guard against this test silently checking nothing (e.g. if notebooks stop importing from the libraries).
    assert any(m.startswith("transformers") for _, m, _, _ in CALLS)
    assert any(m.startswith("peft") for _, m, _, _ in CALLS)


def _resolve(module: str, dotted: str):
    """Import `module` and follow `dotted` attributes, importing submodules on the way (bnb.nn, peft.utils...)."""
    obj = importlib.import_module(module)
    path = module
    for part in dotted.split("."):
        path = f"{path}.{part}"
        if not hasattr(obj, part):
            try:
                importlib.import_module(path)
            except ImportError:
                pass
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("where,module,name,keywords", CALLS, ids=[f"{c[0]}:{c[2]}" for c in CALLS])
def test_library_name_and_keywords_exist(where, module, name, keywords):
    obj = _resolve(module, name)
    assert obj is not None, f"{where}: {module}.{name} no longer exists in the installed version"
    accepted = _accepted_keywords(obj)
    if accepted is None or not keywords:
        return
    unknown = [k for k in keywords if k not in accepted]
    assert not unknown, (f"{where}: {module}.{name} no longer accepts keyword(s) {unknown}; "
                         f"check the installed library's changelog for the new name")
