"""The package's shape: one home per idea, a one-way import graph with two stacks, no hidden global state, and a
`--help` that needs no torch."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "qlora_tutor"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
# The from-scratch stack the notebooks teach, and the real one built on transformers + peft + bitsandbytes; they
# meet only in notebooks and tests. Both may use the shared helpers below them.
FROM_SCRATCH = {"quant", "native", "triton_kernels", "fused_layer", "lora", "qlora"}
REAL = {"cli", "compare", "merge", "finetune", "fsdp_check", "models", "data", "generation", "distributed",
        "measure", "score", "storyworld", "plots"}


def _imports(module: str) -> set[str]:
    """qlora_tutor modules that `module` imports (at top level or inside functions)."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("qlora_tutor")):
            base = (node.module or "").replace("qlora_tutor.", "").replace("qlora_tutor", "")
            if base:
                found.add(base.split(".")[0])
            else:
                found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("qlora_tutor.")}
    return found & set(MODULES) - {module}


def test_the_import_graph_has_no_cycle():
    graph = {m: _imports(m) for m in MODULES}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            pytest.fail(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in graph[m]:
            visit(n, path + [m])
        state[m] = 2

    for m in MODULES:
        visit(m, [])


def test_the_two_stacks_meet_only_in_notebooks_and_tests():
    for m in FROM_SCRATCH:
        assert not _imports(m) & REAL, f"{m} (from scratch) imports the real stack: {_imports(m) & REAL}"
    for m in REAL:
        assert not _imports(m) & FROM_SCRATCH, f"{m} (real stack) imports the from-scratch stack: {_imports(m) & FROM_SCRATCH}"


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_help_builds_without_torch():
    out = _python("import sys; from qlora_tutor import cli; cli.build_parser().format_help(); "
                  "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))")
    assert out.strip() == "[]"


def test_importing_every_module_changes_no_warning_filter_logger_or_thread_count():
    code = f"""
import importlib, json, logging, warnings, torch
before = (list(map(repr, warnings.filters)), {{n: l.level for n, l in logging.root.manager.loggerDict.items()
          if isinstance(l, logging.Logger)}}, logging.root.level, torch.get_num_threads())
for m in {MODULES!r}:
    importlib.import_module("qlora_tutor." + m)
import qlora_tutor.exercises
after = (list(map(repr, warnings.filters)), {{n: l.level for n, l in logging.root.manager.loggerDict.items()
         if isinstance(l, logging.Logger) and n in before[1]}}, logging.root.level, torch.get_num_threads())
print(json.dumps([before == after, before[0] == after[0], before[1] == after[1], before[3], after[3]]))
"""
    same, filters, loggers, *_ = json.loads(_python(code))
    assert filters, "a module changed the warning filters at import"
    assert loggers, "a module changed a logger's level at import"
    assert same


def test_quiet_libraries_restores_what_it_changes():
    import logging
    import warnings

    from qlora_tutor.quiet import quiet_libraries
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level, filters = logger.level, list(warnings.filters)
    with quiet_libraries():
        assert logger.level == logging.ERROR
        warnings.warn("noise", FutureWarning)  # swallowed
    assert logger.level == level and warnings.filters == filters
    with pytest.warns(FutureWarning):
        warnings.warn("heard again", FutureWarning)


def test_each_list_of_allowed_values_has_one_home():
    import bitsandbytes.functional as F
    import torch

    from qlora_tutor import cli, config, data, quant, score
    assert set(config.BNB_QUANT_TYPES) <= set(quant.FORMATS)
    for qt in config.BNB_QUANT_TYPES:  # bitsandbytes accepts each of them ...
        F.quantize_4bit(torch.randn(64), quant_type=qt)
    for qt in set(quant.FORMATS) - set(config.BNB_QUANT_TYPES):  # ... and none of ours beyond them
        with pytest.raises(Exception):
            F.quantize_4bit(torch.randn(64), quant_type=qt)
    assert set(score.SCORERS) == set(data.EMBEDDED_DATASETS)
    actions = {a.dest: a for sub in cli.build_parser()._subparsers._group_actions[0].choices.values()
               for a in sub._actions}
    assert tuple(actions["quant_type"].choices) == config.BNB_QUANT_TYPES
    assert tuple(actions["method"].choices) == config.METHODS
    assert tuple(actions["dtype"].choices) == config.COMPUTE_DTYPES


def test_every_config_field_is_a_finetune_option_and_parses_to_its_default():
    from dataclasses import asdict, fields

    from qlora_tutor import cli, config
    args = cli.build_parser().parse_args(["finetune"])
    parsed = {f.name: getattr(args, f.name) for f in fields(config.FinetuneConfig)}
    assert parsed == asdict(config.FinetuneConfig())
    args = cli.build_parser().parse_args(["finetune", "--no-double-quant", "--lora-r", "4", "--steps", "7"])
    assert (args.double_quant, args.r, args.max_steps) == (False, 4, 7)
