"""The `qlora-tutor` command: help a learner can read, and bad input stopped with one clear line before any work."""

from __future__ import annotations

import json
import time

import pytest

from qlora_tutor import cli, finetune, hardware
from test_finetune import tiny_config, tiny_setup, trained_run

COMMANDS = ("finetune", "evaluate", "generate", "merge", "compare")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what building the tiny model printed
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and all(c in out for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(capsys, command):
    code, out, _ = _run(capsys, command, "--help")
    assert code == 0 and "example:" in out and f"qlora-tutor {command}" in out


def test_finetune_help_explains_the_knobs(capsys):
    _, out, _ = _run(capsys, "finetune", "--help")
    flat = " ".join(out.split())
    for phrase in ("alpha/r", "paged", "evicted to CPU RAM", "nf4", "double quantization", "T4", "all-linear",
                   "q_proj,v_proj", "--resume", "--overwrite", "0.3"):
        assert phrase in flat, phrase
    defaults = finetune.FinetuneConfig()
    assert f"(default: {defaults.learning_rate})" in flat and f"(default: {defaults.r})" in flat


def test_merge_help_says_why_not_to_merge_into_4bit(capsys):
    _, out, _ = _run(capsys, "merge", "--help")
    assert "quantized again" in out and "16-bit" in out


def _finetune_error(capsys, *argv: str) -> str:
    start = time.time()
    code, _, err = _run(capsys, "finetune", *argv)
    assert code == 2, err
    assert time.time() - start < 30, "the error came only after long work"
    assert err.startswith("qlora-tutor finetune: error:") and len(err.strip().splitlines()) == 1
    return err


def test_unknown_model_and_data_paths(capsys, tmp_path):
    root = tiny_setup()
    err = _finetune_error(capsys, "--model", str(tmp_path / "no-such-model"), "--data", str(root / "data"),
                          "--output", str(tmp_path / "o"))
    assert "no such file or folder" in err and "no-such-model" in err
    (tmp_path / "empty-dir").mkdir()
    err = _finetune_error(capsys, "--model", str(tmp_path / "empty-dir"), "--output", str(tmp_path / "o"))
    assert "no config.json" in err
    err = _finetune_error(capsys, "--model", str(root / "model"), "--data", "./no/such/data.jsonl",
                          "--output", str(tmp_path / "o"), "--max-length", "64")
    assert "no such file or folder" in err and "data.jsonl" in err
    assert not (tmp_path / "o").exists()


def test_data_set_without_the_needed_fields(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "hi", "output": "there"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    err = _finetune_error(capsys, "--model", str(tiny_setup() / "model"), "--data", str(bad),
                          "--output", str(tmp_path / "o"), "--max-length", "64")
    assert "line 2" in err and "'instruction'" in err


def test_model_without_the_target_modules(capsys, tmp_path):
    err = _finetune_error(capsys, "--model", str(tiny_setup() / "model"), "--data", str(tiny_setup() / "data"),
                          "--target-modules", "q_proj,c_attn", "--output", str(tmp_path / "o"))
    assert "c_attn" in err and "q_proj" in err and "all-linear" in err


def test_output_folder_conflicts_and_resume_mismatch(capsys):
    out, _ = trained_run()
    cfg = tiny_config(out)
    args = ["--model", cfg.model, "--data", cfg.data, "--output", str(out), "--r", "4", "--lora-alpha", "8",
            "--lora-dropout", "0.1", "--batch-size", "4", "--max-length", "64", "--warmup-steps", "1"]
    assert "--overwrite" in _finetune_error(capsys, *args)
    err = _finetune_error(capsys, *args, "--resume", "--lr", "0.01")
    assert "different configuration" in err and "learning_rate" in err
    assert "not both" in _finetune_error(capsys, *args, "--resume", "--overwrite")


def test_bf16_on_a_gpu_without_it_is_refused_up_front():
    t4 = hardware.DeviceInfo("cuda", "Tesla T4", False, 15.0)
    with pytest.raises(ValueError, match="no bfloat16 support"):
        finetune.check_config(tiny_config("unused", dtype="bf16"), info=t4)
    assert finetune.check_config(tiny_config("unused", dtype="auto"), info=t4)[1] == hardware.parse_dtype("fp16")


def test_bad_knob_values_are_refused(capsys, tmp_path):
    base = ["--model", str(tiny_setup() / "model"), "--data", str(tiny_setup() / "data"), "--output", str(tmp_path)]
    assert "--lora-dropout: must be a number in [0, 1)" in _finetune_error(capsys, *base, "--lora-dropout", "1.5")
    assert "--r/--lora-r: must be an integer >= 1" in _finetune_error(capsys, *base, "--r", "0")


def test_evaluate_and_generate_run_on_a_trained_adapter(capsys):
    out, metrics = trained_run()
    code, text, err = _run(capsys, "evaluate", str(out), "--show", "1", "--eval-examples", "8",
                           "--generate-examples", "4", "--max-new-tokens", "6")
    assert code == 0, err
    assert f"held-out loss {metrics['after']['loss']:.4f} on 8 examples" in text
    code, text, err = _run(capsys, "generate", str(out / "adapter"), "--prompt", "Write about Pip and a kite.",
                           "--compare", "--max-new-tokens", "4")
    assert code == 0, err
    assert "[base model]" in text and "[fine-tuned]" in text
    code, _, err = _run(capsys, "evaluate", str(tiny_setup() / "nowhere"))
    assert code == 2 and "no such file or folder" in err
    code, _, err = _run(capsys, "evaluate", str(tiny_setup() / "data"))
    assert code == 2 and "no trained adapter found" in err
