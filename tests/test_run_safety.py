"""Nothing lost, nothing silent: --overwrite keeps the old run until the new one has a checkpoint, --resume picks
the newest complete checkpoint and refuses a finished run, and a run whose loss, gradients or weights go NaN stops
with a message that says which, saving nothing non-finite. All on the tiny model of test_finetune.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_tutor import finetune, models
from test_finetune import tiny_config, tiny_setup, trained_run

QUIET = dict(progress="none", log=lambda s: None)


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_run(tmp_path: Path, name: str = "run") -> Path:
    out, _ = trained_run()
    run = tmp_path / name
    shutil.copytree(out, run)
    return run


def _stop_at(step: int, after_save: bool = False):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if not after_save and state.global_step == step:
                raise KeyboardInterrupt(f"simulated Ctrl-C at step {step}")

        def on_save(self, args, state, control, **kw):
            if after_save and state.global_step == step:
                raise KeyboardInterrupt(f"simulated Ctrl-C after the step-{step} checkpoint")

    return Stop()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -------------------------------------------------------------------------------------------------- overwrite
def test_an_overwrite_that_fails_before_its_first_checkpoint_puts_the_old_run_back(tmp_path):
    run = _copy_run(tmp_path)
    before = _fingerprint(tmp_path)
    notes = []
    with pytest.raises(KeyboardInterrupt):
        finetune.run(tiny_config(run, learning_rate=1e-3), overwrite=True,
                     callbacks=[_stop_at(1)], progress="none", log=notes.append)
    assert _fingerprint(tmp_path) == before, "the old run was not put back as it was"
    assert any("put back" in n for n in notes)


def test_an_overwrite_that_reached_a_checkpoint_replaces_the_old_run(tmp_path):
    run = _copy_run(tmp_path)
    notes = []
    with pytest.raises(KeyboardInterrupt):
        finetune.run(tiny_config(run, learning_rate=1e-3), overwrite=True, callbacks=[_stop_at(2, after_save=True)],
                     progress="none", log=notes.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "the old run was left aside"
    assert json.loads((run / "run_config.json").read_text())["learning_rate"] == 1e-3
    assert not (run / "adapter").exists() and (run / "checkpoints" / "checkpoint-2").is_dir()
    assert any("deleted" in n for n in notes)
    finetune.run(tiny_config(run, learning_rate=1e-3), resume=True, **QUIET)  # and it can be continued
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("reached_checkpoint", [False, True])
def test_a_killed_overwrite_is_settled_on_the_next_start(tmp_path, reached_checkpoint):
    # what a kill -9 during an --overwrite run leaves: the old run renamed aside by a process that is gone, and
    # the new run's folder with its run_config.json (and, later, a checkpoint)
    old = _copy_run(tmp_path, "old-copy")
    aside = tmp_path / f".run.replaced-{_dead_pid()}-abcd1234"
    old.rename(aside)
    run = tmp_path / "run"
    run.mkdir()
    new_cfg = tiny_config(run, learning_rate=1e-3)
    (run / "run_config.json").write_text(json.dumps({**json.loads((aside / "run_config.json").read_text()),
                                                     "learning_rate": 1e-3}))
    if reached_checkpoint:
        shutil.copytree(aside / "checkpoints" / "checkpoint-2", run / "checkpoints" / "checkpoint-2")
    kept = _fingerprint(aside)
    notes = finetune.recover_output(run)  # the first thing the next finetune in this folder does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and len(notes) == 1
    if reached_checkpoint:
        assert "removed the run that" in notes[0] and (run / "checkpoints" / "checkpoint-2").is_dir()
        assert finetune.prepare_output(new_cfg, resume=True).resume_from.name == "checkpoint-2"
    else:
        assert "put back the earlier run" in notes[0] and _fingerprint(run) == kept


# ------------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("steps, phrase", [(4, "has finished --steps 4"), (3, "is past --steps 3"),
                                           (2, "is past --steps 2")])
def test_resume_of_a_finished_run_or_with_fewer_steps_is_refused_and_changes_nothing(tmp_path, steps, phrase):
    run = _copy_run(tmp_path)
    before = _fingerprint(tmp_path)
    with pytest.raises(ValueError, match=phrase):
        finetune.run(tiny_config(run, max_steps=steps, warmup_steps=1), resume=True, **QUIET)
    assert _fingerprint(tmp_path) == before


def test_resume_skips_incomplete_checkpoints_says_why_and_ends_with_the_same_adapter(tmp_path):
    out_a, metrics_a = trained_run()
    run = _copy_run(tmp_path)
    shutil.rmtree(run / "adapter")  # killed while writing checkpoint-4: the run never saved its adapter
    (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    weights = run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    shutil.copytree(run / "checkpoints" / "checkpoint-2", run / "checkpoints" / "checkpoint-last")
    notes = []
    metrics = finetune.run(tiny_config(run), resume=True, progress="none", log=notes.append)
    skipped = [n for n in notes if n.startswith("skipped")]
    assert any("checkpoint-4: trainer_state.json is missing" in n for n in skipped), notes
    assert any("checkpoint-last: not a checkpoint name" in n for n in skipped), notes
    assert any("resuming from" in n and n.endswith("checkpoint-2") for n in notes), notes
    a = load_file(out_a / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics["loss_history"] == metrics_a["loss_history"]


@pytest.mark.parametrize("damage", ["optimizer truncated", "weights truncated", "state not json"])
def test_every_kind_of_damaged_checkpoint_is_skipped(tmp_path, damage):
    run = _copy_run(tmp_path)
    ckpt = run / "checkpoints" / "checkpoint-4"
    target = {"optimizer truncated": ckpt / "optimizer.pt", "weights truncated": ckpt / "adapter_model.safetensors",
              "state not json": ckpt / "trainer_state.json"}[damage]
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    cfg = tiny_config(run, max_steps=6)
    plan = finetune.prepare_output(cfg, resume=True)
    assert plan.resume_from.name == "checkpoint-2"
    assert len(plan.notes) == 1 and "checkpoint-4" in plan.notes[0] and "damaged" in plan.notes[0]


# ------------------------------------------------------------------------------------------------ non-finite
def _poison(kind: str, at_step: int):
    """A callback that makes the run go non-finite at `at_step`: a NaN in a LoRA weight (the loss turns NaN)
    or an inf in the gradient of one (the loss stays finite)."""
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step + 1 != at_step:
                return
            name, p = next((n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)
            if kind == "loss":
                with torch.no_grad():
                    p[0, 0] = float("nan")
            else:
                p.register_hook(lambda g: torch.full_like(g, float("inf")))

    return Poison()


@pytest.mark.parametrize("kind, phrase", [("loss", "the training loss is nan"), ("gradient", "the gradient of")])
def test_a_run_that_goes_non_finite_stops_at_that_step_and_saves_nothing(tmp_path, kind, phrase):
    out = tmp_path / "run"
    with pytest.raises(finetune.TrainingDiverged, match=rf"stopped at step 3: {phrase}") as err:
        finetune.run(tiny_config(out), callbacks=[_poison(kind, 3)], eval_before=False, **QUIET)
    assert "--lr" in str(err.value)
    assert not (out / "adapter").exists() and not (out / "checkpoints" / "checkpoint-4").exists()
    saved = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")  # before the fault
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_never_saves_a_non_finite_adapter():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[1, 1] = float("inf")
    with pytest.raises(finetune.TrainingDiverged, match="not saving: the trained weight weight"):
        finetune.check_finite_adapter(model)


@pytest.mark.parametrize("fill", ["nan bytes", "huge values"])
def test_a_model_with_damaged_weights_fails_before_training(tmp_path, fill):
    model = tmp_path / "model"
    shutil.copytree(tiny_setup() / "model", model)
    weights = load_file(model / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight" if fill == "nan bytes" else "model.embed_tokens.weight"
    t = weights[name]
    if fill == "nan bytes":  # random bytes: as float32 some are NaN or inf
        g = torch.Generator().manual_seed(0)
        raw = torch.randint(0, 256, (t.numel() * 4,), dtype=torch.uint8, generator=g)
        raw[3::4] |= 0x7F  # exponent bits set often enough that NaN/inf appear
        weights[name] = raw.view(torch.float32).view(t.shape)
    else:  # finite, but the forward pass overflows
        weights[name] = torch.full_like(t, 3e38)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    expected = (r"values of model.layers.1.mlp.down_proj.weight.* are not finite.*damaged" if fill == "nan bytes"
                else "not finite")  # the norms hide 3e38 in the forward pass; the gradients overflow
    with pytest.raises((ValueError, finetune.TrainingDiverged), match=expected):
        finetune.run(tiny_config(out, model=str(model)), **QUIET)
    assert not (out / "adapter").exists() and not list(out.glob("checkpoints/checkpoint-*"))


# -------------------------------------------------------------------------------------- speed without a change
def test_gradient_checkpointing_changes_the_time_not_the_adapter(tmp_path):
    adapters = {}
    for gc in (True, False):
        out = tmp_path / f"gc-{gc}"
        finetune.run(tiny_config(out, gradient_checkpointing=gc, save_steps=0, max_steps=2), eval_before=False,
                     **QUIET)
        adapters[gc] = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(adapters[True][k], adapters[False][k]) for k in adapters[True])
    cfg = tiny_config("unused")
    base = models.load_base(cfg.model, "qlora", torch.float32)
    assert cfg.gradient_checkpointing is None
    assert finetune.use_gradient_checkpointing(cfg, base) is torch.cuda.is_available()  # a small model: off on a CPU


def test_run_reports_the_time_of_each_phase():
    out, metrics = trained_run()
    phases = metrics["phase_seconds"]
    assert list(phases) == ["check", "load", "eval_before", "train", "eval_after", "save"]
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= metrics["total_seconds"] + 1e-6
    assert json.loads((out / "metrics.json").read_text())["phase_seconds"] == phases
