"""Bad input, swept by class: every numeric option outside its range, options that only the model or the data can
refute, paths that do not exist or point at files, damaged model, adapter and config files. Each gives one clear
line naming the problem and the fix, before the model loads and before anything is written."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import fields
from pathlib import Path

import pytest

from qlora_tutor import cli, config, finetune, merge, models
from test_finetune import tiny_config, tiny_setup, trained_run


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _error(capsys, command: str, *argv: str, code: int = 2) -> str:
    start = time.time()
    got, _, err = _run(capsys, command, *argv)
    assert got == code, err
    assert time.time() - start < 30, "the error came only after long work"
    assert err.startswith(f"qlora-tutor {command}: error:") and len(err.strip().splitlines()) == 1, err
    return err


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with a hash of its bytes: equal means untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any base model is loaded: the error must come before."""
    trained_run()  # the shared run is built (and its model loaded) before the guard goes up

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")
    monkeypatch.setattr(models, "load_base", refuse)


# ------------------------------------------------------------------------------------------ numeric options
def _outside(valid: config.Range) -> list:
    """Values just outside a Range, plus the values no range accepts."""
    bad = [math.nan, math.inf, -math.inf, "3", True]
    if valid.low is not None:
        bad.append(valid.low if valid.low_open else valid.low - 1)
    if valid.high is not None:
        bad.append(valid.high if valid.high_open else valid.high + 1)
    if valid.integer:
        bad.append((valid.low or 0) + 1.5)
    return bad


def _inside(valid: config.Range) -> list:
    good = [v for v in (valid.low, valid.high) if v is not None]
    good = [g for g in good if not ((g == valid.low and valid.low_open) or (g == valid.high and valid.high_open))]
    if valid.low is not None and valid.low_open:
        good.append(valid.low + (1 if valid.integer else 1e-6))
    return good


def test_every_numeric_option_declares_its_range_and_every_value_outside_is_refused():
    declared = config.numeric_fields()
    assert declared and all(v is not None for v in declared.values()), \
        f"numeric options without a declared Range: {[k for k, v in declared.items() if v is None]}"
    parser = cli.build_parser()
    for f in fields(config.FinetuneConfig):
        valid = declared.get(f.name)
        if valid is None:
            continue
        flag = config.flag_of(f)
        for value in _outside(valid):
            with pytest.raises((ValueError, TypeError), match=rf"{f.name} \({flag}\) must be"):
                config.check_values(config.FinetuneConfig(**{f.name: value}))
            if not isinstance(value, (bool, str)):
                with pytest.raises(SystemExit):
                    parser.parse_args(["finetune", flag, str(value)])
        if valid.none_ok:
            config.check_values(config.FinetuneConfig(**{f.name: None}))
        for value in _inside(valid):
            cfg = config.FinetuneConfig(**{f.name: value, "max_steps": max(int(value), 250)
                                           if f.name == "warmup_steps" else 250}) if f.name != "max_steps" else \
                config.FinetuneConfig(max_steps=int(value), warmup_steps=0)
            config.check_values(cfg)


@pytest.mark.parametrize("argv, phrase", [
    (("--steps", "0"), "--steps: must be an integer >= 1, got 0"),
    (("--train-examples", "-5"), "--train-examples: must be an integer >= 1"),
    (("--max-grad-norm", "nan"), "--max-grad-norm: must be a number >= 0, got nan"),
    (("--lora-alpha", "inf"), "alpha 0 would scale"),
    (("--lr", "nan"), "--lr: must be a number in (0, 1]"),
    (("--save-steps", "-1"), "--save-steps: must be an integer >= 0"),
    (("--seed", "-1"), "--seed: must be an integer in [0, 4294967295]"),
])
def test_the_command_line_refuses_out_of_range_numbers_in_one_line(capsys, argv, phrase):
    assert phrase in _error(capsys, "finetune", *argv)


@pytest.mark.parametrize("command, argv", [
    ("evaluate", ("--show", "-1")), ("evaluate", ("--eval-examples", "0")), ("generate", ("--prompt", "x",
     "--max-new-tokens", "0")), ("compare", ("--seeds", "0", "-2")), ("compare", ("--steps", "0")),
    ("compare", ("--generate-examples", "-1")),
])
def test_every_subcommand_checks_its_numbers(capsys, command, argv):
    assert "must be an integer" in _error(capsys, command, *argv)


# ------------------------------------------------------------ options only the model or the data can refute
@pytest.mark.parametrize("overrides, phrase", [
    ({"optim": "bogus"}, "not an optimizer the transformers Trainer knows"),
    ({"max_length": 8}, "leaves no room for an answer: the longest training prompt is"),
    ({"max_length": 100_000}, "longer than the model's context (128 positions"),
    ({"lora_alpha": 0.0}, "alpha 0 would scale every update to zero"),
    ({"lora_alpha": math.nan}, "lora_alpha (--lora-alpha) must be a number > 0"),
    ({"learning_rate": math.nan}, "learning_rate (--lr) must be"),
    ({"logging_steps": 0}, "logging_steps (--logging-steps) must be"),
    ({"warmup_steps": -5}, "warmup_steps (--warmup-steps) must be"),
    ({"warmup_steps": 9}, "more than the 4 steps"),
    ({"threads": -1}, "threads (--threads) must be"),
    ({"train_examples": 0}, "train_examples (--train-examples) must be"),
    ({"max_grad_norm": math.nan}, "max_grad_norm (--max-grad-norm) must be"),
    ({"target_modules": "q_proj,c_attn"}, "c_attn"),
    ({"method": "qlora", "quant_type": "nf5"}, "quant_type (--quant-type): unknown quant_type 'nf5'"),
])
def test_a_bad_option_with_overwrite_fails_before_the_model_loads_and_leaves_the_old_run(
        tmp_path, no_model_load, overrides, phrase):
    out, _ = trained_run()
    old = tmp_path / "run"
    shutil.copytree(out, old)
    before = _fingerprint(tmp_path)
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as err:
        finetune.run(tiny_config(old, **overrides), overwrite=True, progress="none", log=lambda s: None)
    assert phrase in str(err.value)
    assert _fingerprint(tmp_path) == before, "the old run was changed"


def test_late_errors_on_the_command_line_come_before_any_file(capsys, tmp_path, no_model_load):
    root = tiny_setup()
    base = ["--model", str(root / "model"), "--data", str(root / "data"), "--output", str(tmp_path / "o")]
    for extra, phrase in ((("--optim", "bogus"), "--optim"), (("--max-length", "8"), "(--max-length) 8 leaves"),
                          (("--target-modules", "q_proj,qkv"), "qkv")):
        assert phrase in _error(capsys, "finetune", *base, *extra)
    assert not (tmp_path / "o").exists()


def test_settings_that_work_but_badly_are_warned_about():
    heard = []
    finetune.check_config(tiny_config("unused", dtype="fp16"), warn=heard.append)
    assert len(heard) == 1 and "fp16 on a CPU" in heard[0] and "slower" in heard[0]
    heard.clear()
    # the tiny model's k_proj is 32 x 64: B·A has rank 32 at most (PEFT and add_adapters accept more, and say so)
    finetune.check_config(tiny_config("unused", r=33), warn=heard.append)
    assert len(heard) == 1 and "r (--r) 33 is larger than the layer" in heard[0] and "at most 32" in heard[0]
    heard.clear()
    finetune.check_config(tiny_config("unused", r=32, dtype="auto"), warn=heard.append)
    assert heard == []


def test_quant_type_names_follow_the_one_rule():
    for name in ("NF4", "Nf4", "FP4"):
        assert finetune.check_config(tiny_config("unused", quant_type=name)) and \
            config.FinetuneConfig(quant_type=name).check().quant_type == name.lower()
        assert cli.build_parser().parse_args(["finetune", "--quant-type", name]).quant_type == name.lower()


def test_an_empty_prompt_is_refused_before_the_model_loads(capsys, no_model_load):
    out, _ = trained_run()
    for prompt in ("", "   ", "\n"):
        assert "--prompt number 2 is empty" in _error(capsys, "generate", str(out), "--prompt", "Hi.", "--prompt", prompt)


# ----------------------------------------------------------------------------------------- paths and files
@pytest.mark.parametrize("option", ["--model", "--data"])
@pytest.mark.parametrize("name", ["runs/x", "nodir/x.jsonl", "./gone", "a/b/c", "~/surely-not-here-qlora"])
def test_a_missing_path_is_called_missing_not_looked_up_on_the_hub(capsys, tmp_path, monkeypatch, option, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    root = tiny_setup()
    args = {"--model": str(root / "model"), "--data": str(root / "data"), option: name}
    err = _error(capsys, "finetune", *[x for kv in args.items() for x in kv], "--output", str(tmp_path / "o"),
                 "--max-length", "64")
    assert "no such file or folder" in err and name in err


@pytest.mark.parametrize("case", ["output is a file", "output under a file", "read-only output"])
def test_an_unusable_output_folder_is_named_before_the_model_loads(capsys, tmp_path, monkeypatch, no_model_load,
                                                                   case):
    root = tiny_setup()
    (tmp_path / "f").write_text("a file")
    output = {"output is a file": tmp_path / "f", "output under a file": tmp_path / "f" / "run",
              "read-only output": tmp_path / "ro"}[case]
    if case == "read-only output":
        import os
        monkeypatch.setattr(os, "access", lambda p, mode: False)
    err = _error(capsys, "finetune", "--model", str(root / "model"), "--data", str(root / "data"),
                 "--output", str(output), "--max-length", "64")
    assert ("read-only" if case == "read-only output" else "is a file, not a folder") in err
    assert (tmp_path / "f").read_text() == "a file"


def test_a_write_that_fails_midway_is_one_line_not_a_traceback(capsys, tmp_path, monkeypatch):
    root = tiny_setup()

    def denied(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(finetune, "atomic_write_text", denied)
    err = _error(capsys, "finetune", "--model", str(root / "model"), "--data", str(root / "data"),
                 "--output", str(tmp_path / "o"), "--max-length", "64")
    assert "Permission denied" in err and "run_config.json" in err


def _damaged_model(tmp_path: Path, how: str) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_setup() / "model", model)
    weights = model / "model.safetensors"
    raw = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(raw[: len(raw) // 2])
    elif how == "header damaged":
        weights.write_bytes(raw[:8] + b"{not json" + raw[17:])
    elif how == "empty file":
        weights.write_bytes(b"")
    elif how == "no weights":
        weights.unlink()
    elif how == "no tokenizer":
        for name in models.TOKENIZER_FILES + ("special_tokens_map.json",):
            (model / name).unlink(missing_ok=True)
    return model


@pytest.mark.parametrize("how, phrase", [
    ("truncated", "model.safetensors is damaged or truncated"), ("header damaged", "model.safetensors is damaged"),
    ("empty file", "model.safetensors is damaged or truncated"), ("no weights", "holds no weights"),
    ("no tokenizer", "has no tokenizer")])
def test_a_damaged_model_folder_is_named_before_anything_loads(capsys, tmp_path, no_model_load, how, phrase):
    model = _damaged_model(tmp_path, how)
    err = _error(capsys, "finetune", "--model", str(model), "--data", str(tiny_setup() / "data"),
                 "--output", str(tmp_path / "o"), "--max-length", "64")
    assert phrase in err
    assert not (tmp_path / "o").exists()


def _copy_run(tmp_path: Path) -> Path:
    out, _ = trained_run()
    run = tmp_path / "run"
    shutil.copytree(out, run)
    return run


@pytest.mark.parametrize("damage, phrase", [
    ("truncated adapter", "adapter_model.safetensors is damaged or truncated"),
    ("adapter config", "adapter_config.json is damaged"),
    ("run config not json", "run_config.json is damaged"),
    ("run config wrong value", "run_config.json is damaged: r (--r) must be"),
    ("run config unknown key", "does not know (lora_rank)"),
])
def test_a_damaged_saved_run_is_named_by_evaluate_generate_and_merge(capsys, tmp_path, no_model_load, damage,
                                                                     phrase):
    run = _copy_run(tmp_path)
    adapter = run / "adapter"
    if damage == "truncated adapter":
        raw = (adapter / "adapter_model.safetensors").read_bytes()
        (adapter / "adapter_model.safetensors").write_bytes(raw[:-100])
    elif damage == "adapter config":
        (adapter / "adapter_config.json").write_text('{"r": 4,')
    else:
        settings = json.loads((adapter / "run_config.json").read_text())
        text = {"run config not json": '{"model": "x", ', "run config wrong value": json.dumps({**settings, "r": -3}),
                "run config unknown key": json.dumps({**settings, "lora_rank": 4})}[damage]
        (adapter / "run_config.json").write_text(text)
    assert phrase in _error(capsys, "evaluate", str(run))
    assert phrase in _error(capsys, "generate", str(run), "--prompt", "Hi.")
    assert phrase in _error(capsys, "merge", str(run), "--output", str(tmp_path / "merged"))


# ---------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("target", ["the base model", "the run", "the adapter", "a folder holding the base",
                                    "a file"])
def test_merge_refuses_an_output_that_would_destroy_what_it_reads(capsys, tmp_path, target):
    root = tmp_path / "work"
    (root / "models").mkdir(parents=True)
    shutil.copytree(tiny_setup() / "model", root / "models" / "base")
    run = _copy_run(tmp_path)
    for f in (run / "run_config.json", run / "adapter" / "run_config.json"):
        f.write_text(json.dumps({**json.loads(f.read_text()), "model": str(root / "models" / "base")}))
    (tmp_path / "file.txt").write_text("keep me")
    output = {"the base model": root / "models" / "base", "the run": run, "the adapter": run / "adapter",
              "a folder holding the base": root / "models", "a file": tmp_path / "file.txt"}[target]
    before = _fingerprint(tmp_path)
    err = _error(capsys, "merge", str(run), "--output", str(output), "--overwrite")
    assert ("is a file" if target == "a file" else "would replace what the merge starts from") in err
    assert _fingerprint(tmp_path) == before
