"""Training-state checkpoints with Orbax: what a Trainer needs to go on exactly where it stopped.

    ckpt = TrainCheckpoints(out / "checkpoints")
    ckpt.save(trainer, data_position=batches.position, meta={...})   # one step directory per save
    info = ckpt.restore(trainer)       # newest whole step; trainer.trainable / opt_state / steps replaced

A checkpoint is a directory named by its step: `state/` (Orbax: the trainable Params under their
dotted module paths and the optimizer state's leaves in pytree order) and `meta.json` (the step,
the data position and whatever the caller adds, such as the run's settings). The optimizer state is
restored into the structure of a freshly built Trainer's (same optimizer, same trainable set): optax
states hold nnx.States, whose pytree structure is rebuilt from that target rather than stored.

Saves are atomic: the step is written whole into a hidden temporary sibling, every file and
directory in it is fsynced, and only then is it renamed to its step number (and the parent
directory fsynced), so an interrupt or a crash at any point leaves the earlier checkpoints as they
were and either no new step or the whole of it. `restore` reads the newest step that reads whole
and goes back past a damaged one (an empty or truncated directory, garbage metadata), saying why
in `skipped`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from qvl_jax.errors import CheckpointError
from qvl_jax.files import temp_sibling

_STATE, _META = "state", "meta.json"
_OLD_META = "meta/metadata"  # where checkpoints written through Orbax's CheckpointManager kept it


def _path_key(path) -> str:
    return ".".join(str(p) for p in path)


def _trainable_dict(trainable: nnx.State) -> dict:
    return {_path_key(p): v[...] for p, v in nnx.to_flat_state(trainable)}


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _fsync_tree(root: Path) -> None:
    """Every file and directory under `root` (and `root`) on disk, deepest first."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:200]


class _Damaged(Exception):
    """A step directory that does not read whole (restore goes back to an older step)."""


class TrainCheckpoints:
    """Step-numbered checkpoints of a Trainer under one directory (the newest `keep` kept)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise CheckpointError(f"keep must be a positive integer, got {keep!r}")
        self.directory = Path(directory).absolute()  # Orbax wants absolute paths
        self.keep = keep
        self.skipped: list[str] = []  # why restore went past newer steps, one line each
        # Synchronous: a save returns with the arrays written.
        self._checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())

    def all_steps(self) -> list[int]:
        """Step numbers of the step directories, oldest first (whole or not: `restore` finds out)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, trainer, data_position: int, meta: dict | None = None) -> Path:
        """Writes the trainer's state at its current step (replacing a directory of the same step)."""
        step = int(trainer.steps)
        state = {"trainable": _trainable_dict(trainer.trainable), "opt_state": jax.tree.leaves(trainer.opt_state)}
        info = dict(meta or {}, step=step, data_position=int(data_position))
        final = self.directory / str(step)
        tmp = temp_sibling(final)
        try:
            self._checkpointer.save(tmp / _STATE, args=ocp.args.StandardSave(state))
            (tmp / _META).write_text(json.dumps(info, allow_nan=False) + "\n", encoding="utf-8")
            _fsync_tree(tmp)
            if final.exists():  # a damaged or earlier directory of this step: set aside, then dropped
                old = temp_sibling(final)
                os.rename(final, old / "old")
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for stale in self.directory.glob(".*.tmp-*"):  # what a killed save left (never a whole step)
            if stale.name.split(".")[1].isdigit():
                shutil.rmtree(stale, ignore_errors=True)
        older = [s for s in self.all_steps() if s < step]
        for s in older[:max(0, len(older) - (self.keep - 1))]:  # the newest `keep` steps stay, this one among them
            shutil.rmtree(self.directory / str(s), ignore_errors=True)
        return final

    def _read_meta(self, step: int) -> dict:
        path = self.directory / str(step) / _META
        if not path.exists() and (self.directory / str(step) / _OLD_META).is_file():
            path = self.directory / str(step) / _OLD_META
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise _Damaged(f"no {_META}") from None
        except (OSError, ValueError) as e:
            raise _Damaged(f"{_META} does not read ({_one_line(e)})") from None
        if (not isinstance(meta, dict) or meta.get("step") != step or isinstance(meta.get("data_position"), bool)
                or not isinstance(meta.get("data_position"), int) or meta["data_position"] < 0):
            raise _Damaged(f"{_META} is not this step's metadata")
        return meta

    def read_meta(self, step: int | None = None) -> dict:
        """The meta item of a checkpoint (default: the newest whose meta reads), without any array."""
        for s in self._candidates(step):
            try:
                return self._read_meta(s)
            except _Damaged as e:
                if step is not None:
                    raise CheckpointError(f"{self.directory / str(s)}: {e}") from None
        raise CheckpointError(f"no readable training checkpoint in {self.directory}")

    def _candidates(self, step: int | None) -> list[int]:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no training checkpoint in {self.directory}")
            return steps[::-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory} (it has {steps})")
        return [step]

    def restore(self, trainer, step: int | None = None) -> dict:
        """Loads a checkpoint into `trainer`, which must train the same Params with the same optimizer
        (built as the saving run built it): the given step, or else the newest one that reads whole
        (those it went past are in `self.skipped`). Returns the checkpoint's meta, with its "step"
        and "data_position". The model the trainer holds gets the weights."""
        self.skipped = []
        candidates = self._candidates(step)
        for s in candidates:
            try:
                meta, values, opt_leaves = self._read(trainer, s)
            except _Damaged as e:
                line = f"{self.directory / str(s)} does not read whole: {e}"
                if step is not None:
                    raise CheckpointError(line) from None
                self.skipped.append(line)
                continue
            trainable = jax.tree.map(lambda a: a, trainer.trainable)  # new Variables: the old State stays as it was
            for path, var in nnx.to_flat_state(trainable):
                var.set_value(values[_path_key(path)])
            trainer.trainable = trainable
            trainer.opt_state = jax.tree.unflatten(jax.tree.structure(trainer.opt_state), opt_leaves)
            trainer.steps = int(meta["step"])
            trainer.publish()  # the model the trainer was given sees the restored weights
            return meta
        raise CheckpointError(f"no checkpoint in {self.directory} reads whole; the newest: {self.skipped[0]}")

    def _read(self, trainer, step: int):
        """(meta, trainable values by key, optimizer leaves) of one step; _Damaged if it does not
        read whole, CheckpointError if it is whole but of another trainer."""
        meta = self._read_meta(step)
        ours = _trainable_dict(trainer.trainable)
        opt_leaves = jax.tree.leaves(trainer.opt_state)
        where = self.directory / str(step) / _STATE
        if not where.is_dir():
            raise _Damaged(f"no {_STATE} directory")
        try:
            saved = self._checkpointer.metadata(where).item_metadata.tree
            saved_keys, n_opt = set(saved["trainable"]), len(saved["opt_state"])
            shapes = {k: (tuple(m.shape), str(m.dtype)) for k, m in saved["trainable"].items()}
            shapes.update({i: (tuple(m.shape), str(m.dtype)) for i, m in enumerate(saved["opt_state"])})
        except Exception as e:  # noqa: BLE001 - whatever Orbax raises on a damaged directory
            raise _Damaged(f"its array metadata does not read ({_one_line(e)})") from None
        target = {"trainable": _abstract(ours), "opt_state": _abstract(opt_leaves)}
        what = None
        if saved_keys != set(ours) or n_opt != len(opt_leaves):
            extra, missing = sorted(saved_keys - set(ours)), sorted(set(ours) - saved_keys)
            what = (f"it has {extra[0]!r}, which this trainer does not train" if extra else
                    f"it lacks {missing[0]!r}" if missing else
                    f"its optimizer state has {n_opt} arrays, this trainer's {len(opt_leaves)}")
        else:
            wanted = {k: (tuple(t.shape), str(t.dtype)) for k, t in target["trainable"].items()}
            wanted.update({i: (tuple(t.shape), str(t.dtype)) for i, t in enumerate(target["opt_state"])})
            for k in wanted:
                if shapes[k] != wanted[k]:
                    name = repr(k) if isinstance(k, str) else f"optimizer array {k}"
                    what = f"its {name} is {shapes[k][1]} {list(shapes[k][0])}, this trainer's " \
                           f"{wanted[k][1]} {list(wanted[k][0])}"
                    break
        if what is not None:
            raise CheckpointError(f"{self.directory / str(step)} does not match this trainer: {what} (another LoRA "
                                  "configuration, trainable set or optimizer?)")
        try:
            out = self._checkpointer.restore(where, args=ocp.args.StandardRestore(target))
            values = out["trainable"]
            restored = list(out["opt_state"])
            arrays = list(values.values()) + restored
            if any(a.shape != t.shape or a.dtype != t.dtype for a, t in
                   zip(arrays, list(target["trainable"].values()) + list(target["opt_state"]))):
                raise ValueError("an array of another shape or dtype")
            if not all(bool(np.isfinite(np.asarray(a)).all()) for a in arrays if np.asarray(a).dtype.kind == "f"):
                raise ValueError("non-finite values")
        except Exception as e:  # noqa: BLE001 - truncated or garbled array files surface as many types
            raise _Damaged(f"its arrays do not read ({_one_line(e)})") from None
        return meta, values, restored

    def close(self) -> None:
        self._checkpointer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
