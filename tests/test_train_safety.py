"""`qvl-jax finetune` loses no work and never changes the result without a word: Ctrl-C at each
point of a step and of the saves resumes to the same adapter bits, a failing record or a non-finite
loss keeps what was trained, bad media and over-long records stop the run before the model loads,
damaged checkpoints fall back to the newest whole step, and epochs count whole passes.

The Ctrl-C cases run the real command in-process and send a real SIGINT (`signal.raise_signal`) from
a wrapper around the function at each point. CPython runs the SIGINT handler in the main thread at
the next bytecode boundary after the signal arrives, so this is exactly where a Ctrl-C typed at
that moment lands (with the handlers the command installs, e.g. the one that holds SIGINT during a
save), without a subprocess's JAX start-up and compile per case and without timing races."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import qvl_jax
from qvl_jax import cli
from qvl_jax.errors import CheckpointError
from qvl_jax.training import LoraConfig, Trainer
from qvl_jax.training import state as state_mod
from qvl_jax.training import trainer as trainer_mod
from qvl_jax.training.data import Batches
from qvl_jax.training.state import TrainCheckpoints

ROOT = Path(__file__).resolve().parents[1]
HOUSE = ROOT / "examples" / "house.png"
# The LoRA configuration and batch shape of tests/test_finetune.py: their compiled steps are reused.
LORA = ("--lora-rank", 4, "--lora-targets", "q_proj,k_proj,v_proj,o_proj", "--batch-size", 3)
RUN = (*LORA, "--steps", 2, "--lr", 1e-2, "--save-every", 0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("ts_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QVL_JAX_CACHE", str(path))
        mp.setenv("QVL_JAX_COMPILATION_CACHE", "0")
        yield path


def _records(directory: Path, n: int = 3, name: str = "train.jsonl") -> Path:
    shutil.copy(HOUSE, directory / "house.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "house.png"},
                                                       {"type": "text", "text": "What is this?"}]},
                          {"role": "assistant", "content": "A house with a red roof."}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                          {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}]
    path = directory / name
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows * n)[:n]), encoding="utf-8")
    return path


def _finetune(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(["finetune", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _same_bits(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert np.array_equal(got[key], want[key]), key


def _no_leftovers(out: Path) -> None:
    for directory in (out, out / "checkpoints"):
        if directory.is_dir():
            stray = [p.name for p in directory.iterdir() if p.name.startswith(".") or "tmp" in p.name]
            assert not stray, stray


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """(data, adapter tensors) of the uninterrupted two-step run."""
    tmp = tmp_path_factory.mktemp("reference")
    data = _records(tmp)
    assert cli.main(["finetune", "--data", str(data), "--out", str(tmp / "out"), *map(str, RUN)]) == 0
    return data, _adapter(tmp / "out")


# ----------------------------------------------------------------------------------------------------
# Ctrl-C at each point of a step and of the saves


def _sigint():
    signal.raise_signal(signal.SIGINT)


def _on_call(owner, name, nth, before: bool):
    """Wraps owner.name so that its nth call sends SIGINT before (or after) running."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*a, **k):
        calls[0] += 1
        if before and calls[0] == nth:
            _sigint()
        out = original(*a, **k)
        if not before and calls[0] == nth:
            _sigint()
        return out

    return wrapper


def _after_publish_of_step(k):
    original = Trainer.publish

    def publish(self):
        original(self)
        if self.steps == k:  # the last line of Trainer.step: the new weights are in, the step counted
            _sigint()

    return publish


POINTS = {  # where step 2 of 2 (or the final save) is interrupted: (owner, attribute, replacement)
    "before the batch is built": lambda: (Batches, "next", _on_call(Batches, "next", 2, True)),
    "after the batch is built": lambda: (Batches, "next", _on_call(Batches, "next", 2, False)),
    "after the gradients": lambda: (trainer_mod, "_grads", _on_call(trainer_mod, "_grads", 2, False)),
    "after the optimizer update": lambda: (trainer_mod, "_apply", _on_call(trainer_mod, "_apply", 2, False)),
    "inside Trainer.step, step counted": lambda: (Trainer, "publish", _after_publish_of_step(2)),
    "after Trainer.step returns": lambda: (Trainer, "step", _on_call(Trainer, "step", 2, False)),
    "as the final checkpoint save starts": lambda: (TrainCheckpoints, "save",
                                                    _on_call(TrainCheckpoints, "save", 1, True)),
    "inside the final checkpoint save": lambda: (state_mod, "_fsync_tree", _on_call(state_mod, "_fsync_tree", 1, True)),
    "after the final checkpoint save": lambda: (TrainCheckpoints, "save", _on_call(TrainCheckpoints, "save", 1, False)),
    "as the adapter is written": lambda: (trainer_mod, "save_adapter", _on_call(trainer_mod, "save_adapter", 1, True)),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_ctrl_c_at_each_point_then_resume_ends_with_the_same_adapter(point, reference, tmp_path, capsys):
    data, want = reference
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(*POINTS[point]())
        rc, stdout, err = _finetune(capsys, "--data", data, "--out", out, *RUN)
    assert rc == 130, err
    assert err.rstrip().endswith("interrupted") and stdout == ""
    _no_leftovers(out)
    rc, stdout, err = _finetune(capsys, "--data", data, "--out", out, *RUN, "--resume")
    assert rc == 0, err
    assert json.loads(stdout)["steps"] == 2
    _same_bits(_adapter(out), want)
    _no_leftovers(out)


def test_a_crash_inside_a_save_leaves_the_previous_checkpoint_whole(cache, tmp_path):
    """No SIGINT to hold here (a kill, a full disk): the step's temporary directory goes, the
    earlier step stays, and restore reads it."""
    model = qvl_jax.load("tiny-random")
    trainer = Trainer(model, optax.adamw(1e-3), lora=LoraConfig(r=4, target_modules=["q_proj"]))
    with TrainCheckpoints(tmp_path / "ckpt") as ckpt:
        ckpt.save(trainer, 3)
        trainer.steps = 1
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(state_mod, "_fsync_tree", _raise(OSError("No space left on device")))
            with pytest.raises(OSError):
                ckpt.save(trainer, 6)
        assert ckpt.all_steps() == [0] and [p.name for p in (tmp_path / "ckpt").iterdir()] == ["0"]
        assert ckpt.restore(trainer)["data_position"] == 3 and trainer.steps == 0
        # what a kill -9 mid-save leaves (a hidden temporary directory) is never read, and the next save clears it
        (tmp_path / "ckpt" / ".1.tmp-0123456789ab" / "state").mkdir(parents=True)
        assert ckpt.all_steps() == [0]
        trainer.steps = 1
        ckpt.save(trainer, 6)
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["0", "1"]


def _raise(exc):
    def f(*_, **__):
        raise exc
    return f


# ----------------------------------------------------------------------------------------------------
# failures part-way and bad data


def test_a_bad_image_in_the_last_record_stops_the_run_before_the_model_loads(cache, tmp_path, capsys, monkeypatch):
    data = _records(tmp_path, 6)
    (tmp_path / "broken.png").write_bytes(HOUSE.read_bytes()[:200])  # a truncated PNG: its header reads
    lines = data.read_text().splitlines()
    lines[5] = json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "broken.png"}]},
                                        {"role": "assistant", "content": "x"}]})
    data.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(qvl_jax, "load", _raise(AssertionError("the model was loaded")))
    rc, stdout, err = _finetune(capsys, "--data", data, "--out", tmp_path / "out", *RUN)
    assert rc == 2 and err.startswith(f"error: {data}, line 6: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_record_that_fails_mid_run_keeps_the_steps_trained(reference, tmp_path, capsys):
    data, want = reference
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:  # a file that changes under the run: checked, then unreadable
        from qvl_jax.errors import InputError

        original, calls = Batches.next, [0]

        def next_(self):
            calls[0] += 1
            if calls[0] == 2:
                raise InputError(f"{data}, line 1: cannot read image file house.png")
            return original(self)

        mp.setattr(Batches, "next", next_)
        rc, stdout, err = _finetune(capsys, "--data", data, "--out", out, *RUN)
    assert rc == 2 and len(err.strip().splitlines()[-1:]) == 1 and stdout == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "line 1: cannot read image" in last and "step 1 is saved" in last, last
    assert TrainCheckpoints(out / "checkpoints").all_steps() == [1]
    rc, _, err = _finetune(capsys, "--data", data, "--out", out, *RUN, "--resume")
    assert rc == 0, err
    _same_bits(_adapter(out), want)


def test_a_non_finite_loss_stops_with_one_line_and_writes_nothing_non_finite(reference, tmp_path, capsys):
    data, _ = reference
    out = tmp_path / "out"
    rc, _, err = _finetune(capsys, "--data", data, "--out", out, *LORA, "--steps", 4, "--lr", "inf")
    assert rc == 2 and "--lr must be a finite number" in err and not out.exists()
    rc, stdout, err = _finetune(capsys, "--data", data, "--out", out, *LORA, "--steps", 4, "--lr", 1e30,
                                "--warmup-steps", 0, "--max-grad-norm", 0, "--save-every", 1)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and stdout == "" and last.startswith("error: step ") and "training stopped" in last, err
    assert "nan" in last or "not finite" in last
    assert not (out / "adapter").exists()
    steps = TrainCheckpoints(out / "checkpoints").all_steps()
    assert steps and max(steps) < 4
    for s in steps:  # every array of every checkpoint left is finite
        arrays = state_mod.ocp.Checkpointer(state_mod.ocp.StandardCheckpointHandler()).restore(
            out / "checkpoints" / str(s) / "state")
        for a in [*arrays["trainable"].values(), *arrays["opt_state"]]:
            assert np.isfinite(np.asarray(a, dtype=np.float64)).all()


def test_a_record_longer_than_max_length_is_refused_before_the_model_loads(cache, tmp_path, capsys, monkeypatch):
    data = _records(tmp_path, 3)
    long = {"messages": [{"role": "user", "content": "word " * 20000}, {"role": "assistant", "content": "ok"}]}
    data.write_text(data.read_text() + json.dumps(long) + "\n")
    monkeypatch.setattr(qvl_jax, "load", _raise(AssertionError("the model was loaded")))
    rc, _, err = _finetune(capsys, "--data", data, "--out", tmp_path / "out", *RUN)
    assert rc == 2 and err.startswith(f"error: {data}, line 4: ") and "--max-length 4096" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# damaged checkpoints


def _truncate_largest(step_dir: Path) -> None:
    f = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "truncated array file": lambda d: _truncate_largest(d / "2"),
    "garbage metadata": lambda d: (d / "2" / "meta.json").write_text("{garbage"),
    "garbage array metadata": lambda d: (d / "2" / "state" / "_METADATA").write_text("{garbage"),
    "missing state": lambda d: shutil.rmtree(d / "2" / "state"),
    "an empty newer step folder": lambda d: (d / "3").mkdir(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_restore_goes_back_past_a_damaged_step(damage, cache, tmp_path):
    def fresh():
        return Trainer(qvl_jax.load("tiny-random"), optax.adamw(1e-3), lora=LoraConfig(r=4, target_modules=["q_proj"]))

    trainer = fresh()
    with TrainCheckpoints(tmp_path / "ckpt") as ckpt:
        for step in (1, 2):
            trainer.steps = step
            ckpt.save(trainer, 10 * step)
    DAMAGE[damage](tmp_path / "ckpt")
    with TrainCheckpoints(tmp_path / "ckpt") as ckpt:
        meta = ckpt.restore(fresh())
        want = 2 if damage == "an empty newer step folder" else 1
        assert meta["step"] == want and meta["data_position"] == 10 * want
        assert len(ckpt.skipped) == 1 and "does not read whole" in ckpt.skipped[0]
        assert "\n" not in ckpt.skipped[0]
        if want == 1:  # with the older step damaged too: one line, no traceback
            shutil.rmtree(tmp_path / "ckpt" / "1" / "state")
            with pytest.raises(CheckpointError, match="reads whole") as e:
                ckpt.restore(fresh())
            assert "\n" not in str(e.value)


def test_resume_past_an_empty_newer_step_folder(reference, tmp_path, capsys):
    data, want = reference
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "step", _on_call(Trainer, "step", 2, False))
        assert _finetune(capsys, "--data", data, "--out", out, *RUN)[0] == 130
    (out / "checkpoints" / "7").mkdir()
    rc, _, err = _finetune(capsys, "--data", data, "--out", out, *RUN, "--resume")
    assert rc == 0, err
    assert "warning: " in err and "checkpoints/7 does not read whole" in err
    _same_bits(_adapter(out), want)


# ----------------------------------------------------------------------------------------------------
# flags


def test_an_existing_adapter_is_replaced_only_with_force(reference, tmp_path, capsys):
    data, want = reference
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"mine")
    rc, _, err = _finetune(capsys, "--data", data, "--out", out, *RUN)
    assert rc == 2 and "--force" in err and len(err.splitlines()) == 1
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == b"mine"
    assert not (out / "checkpoints").exists()
    rc, _, err = _finetune(capsys, "--data", data, "--out", out, *RUN, "--force")
    assert rc == 0, err
    _same_bits(_adapter(out), want)


@pytest.mark.parametrize("alpha", ["0", "-8", "nan"])
def test_a_non_positive_lora_alpha_is_refused(alpha, cache, tmp_path, capsys):
    data = _records(tmp_path)
    rc, _, err = _finetune(capsys, "--data", data, "--out", tmp_path / "out", *RUN, "--lora-alpha", alpha)
    assert rc == 2 and "--lora-alpha must be" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_epochs_are_whole_passes(cache, tmp_path, capsys, monkeypatch):
    """4 records at 3 rows a step: an epoch is ceil(4 / 3) = 2 steps, the second holding one record
    (the arithmetic of such a step is the test above; here the step only counts what it is given,
    which spares compiling two more batch shapes)."""
    seen = []

    def step(self, batch):
        seen.append(int((batch["labels"] != -100).any(axis=1).sum()))  # rows that carry labels
        self.steps += 1
        return 1.0

    monkeypatch.setattr(Trainer, "step", step)
    data = _records(tmp_path, 4)
    rc, stdout, err = _finetune(capsys, "--data", data, "--out", tmp_path / "out", *LORA, "--epochs", 2)
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["steps"] == 4 and summary["epochs"] == 2.0 and seen == [3, 1, 3, 1]


def test_a_checkpoint_of_another_shape_is_a_mismatch_not_damage(cache, tmp_path):
    def trainer(r):
        return Trainer(qvl_jax.load("tiny-random"), optax.adamw(1e-3), lora=LoraConfig(r=r, target_modules=["q_proj"]))

    with TrainCheckpoints(tmp_path / "ckpt") as ckpt:
        ckpt.save(trainer(4), 0)
        with pytest.raises(CheckpointError, match=r"does not match this trainer: its '.*lora_A' is float32 \[4, ") as e:
            ckpt.restore(trainer(8))
    assert "\n" not in str(e.value)


def test_the_rows_that_fill_an_epochs_last_batch_change_nothing(cache, tmp_path):
    """The loss and every gradient of [a, b, filler] equal those of [a, b] alone: the filler adds
    exact zeros, so what differs is only the order XLA sums a batch of 3 rows in, not 2 (float32
    rounding, about 1e-6 of a gradient's scale; a filler row that counted one label moves them by
    far more)."""
    from qvl_jax.training.data import _filler, collate, encode_record, read_jsonl

    proc = qvl_jax.Processor.from_pretrained("tiny-random")
    records = read_jsonl(_records(tmp_path))[1:]  # the two text-only records
    rows = [encode_record(r, proc) for r in records]
    trainer = Trainer(qvl_jax.load("tiny-random"), optax.adamw(1e-3), lora=LoraConfig(r=4, alpha=8))
    # the same padded length both ways: the filled batch pads to the longest real row too
    filled = collate([*rows, _filler(proc.pad_token_id)], proc.pad_token_id)
    alone = collate(rows, proc.pad_token_id)
    assert filled["input_ids"].shape == (3, alone["input_ids"].shape[1])
    loss_f, grads_f = trainer.loss_and_grads(filled)
    loss_a, grads_a = trainer.loss_and_grads(alone)
    np.testing.assert_allclose(loss_f, loss_a, rtol=1e-6)
    for gf, ga in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads_a)):
        ga = np.asarray(ga)
        np.testing.assert_allclose(np.asarray(gf), ga, rtol=0, atol=1e-5 * np.abs(ga).max())
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads_a))
    # the check can fail: a third row that counts one label is a different step
    counted = {k: v.copy() for k, v in filled.items()}
    counted["input_ids"][2, :2] = counted["input_ids"][0, :2]
    counted["attention_mask"][2, :2] = 1
    counted["labels"][2, 1] = counted["input_ids"][2, 1]
    _, grads_c = trainer.loss_and_grads(counted)
    assert any(not np.allclose(np.asarray(gc), np.asarray(ga), rtol=0, atol=1e-5 * np.abs(np.asarray(ga)).max())
               for gc, ga in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_a)))


def test_a_checkpoint_from_orbax_checkpoint_manager_still_resumes(cache, tmp_path):
    """Runs checkpointed before saves were atomic (through Orbax's CheckpointManager, with a JSON
    "meta" item) restore as they were written."""
    ocp = state_mod.ocp
    trainer = Trainer(qvl_jax.load("tiny-random"), optax.adamw(1e-3), lora=LoraConfig(r=4, target_modules=["q_proj"]))
    state = {"trainable": state_mod._trainable_dict(trainer.trainable),
             "opt_state": jax.tree.leaves(trainer.opt_state)}
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager((tmp_path / "ckpt").absolute(), options=options, item_handlers=handlers) as m:
        m.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave({"step": 3, "data_position": 9, "settings": {}})))
    with TrainCheckpoints(tmp_path / "ckpt") as ckpt:
        assert ckpt.read_meta()["data_position"] == 9
        assert ckpt.restore(trainer)["step"] == 3 and trainer.steps == 3 and not ckpt.skipped


def test_ctrl_c_from_outside_a_real_run_saves_a_step_that_agrees_with_its_data_position(reference, cache, tmp_path):
    """The one subprocess: SIGINT from another process at whatever point the run has reached (after
    its second checkpoint). With 3 records at 3 rows a step, a consistent checkpoint has data
    position = 3 x step; the bug this guards against saved the position one batch ahead."""
    import os
    import subprocess
    import sys
    import time

    data, _ = reference
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), QVL_JAX_CACHE=str(cache), QVL_JAX_COMPILATION_CACHE="0")
    run = subprocess.Popen([sys.executable, "-m", "qvl_jax.cli", "finetune", "--data", str(data), "--out", str(out),
                            *map(str, LORA), "--steps", "100000", "--save-every", "2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "4").is_dir():
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-2000:]
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130, stderr[-2000:]
    assert "interrupted; step " in stderr and stdout == ""
    _no_leftovers(out)
    with TrainCheckpoints(out / "checkpoints") as ckpt:
        trainer = Trainer(qvl_jax.load("tiny-random"), optax.adamw(optax.constant_schedule(1e-3)), max_grad_norm=1.0,
                          lora=LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        meta = ckpt.restore(trainer)
    assert meta["step"] >= 4 and meta["data_position"] == 3 * meta["step"] and not ckpt.skipped
