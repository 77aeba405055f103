"""Training-state checkpoints with Orbax: what a Trainer needs to go on exactly where it stopped.

    ckpt = TrainCheckpoints(out / "checkpoints")
    ckpt.save(trainer, data_position=batches.position, meta={...})   # one step directory per save
    info = ckpt.restore(trainer)       # latest step; trainer.trainable / opt_state / steps replaced

A checkpoint holds the trainable Params (the LoRA adapters, or every trained weight) under their
dotted module paths, the optimizer state's leaves in pytree order, the step count and the data
position, plus a JSON "meta" item the caller fills (the run's settings, checked on resume). The
optimizer state is restored into the structure of a freshly built Trainer's (same optimizer, same
trainable set): optax states hold nnx.States, whose pytree structure is rebuilt from that target
rather than stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from qvl_jax.errors import CheckpointError

_STATE, _META = "state", "meta"


def _path_key(path) -> str:
    return ".".join(str(p) for p in path)


def _trainable_dict(trainable: nnx.State) -> dict:
    return {_path_key(p): v[...] for p, v in nnx.to_flat_state(trainable)}


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class TrainCheckpoints:
    """Step-numbered Orbax checkpoints of a Trainer under one directory (the newest `keep` kept)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise CheckpointError(f"keep must be a positive integer, got {keep!r}")
        self.directory = Path(directory).absolute()  # Orbax wants absolute paths
        # Synchronous saves: a save returns with the step on disk, so a crash right after it loses nothing.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        # Handlers named up front: a fresh process can then read one item alone, and the arrays' metadata.
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, trainer, data_position: int, meta: dict | None = None) -> Path:
        """Writes the trainer's state at its current step (replacing a checkpoint of the same step)."""
        step = int(trainer.steps)
        state = {"trainable": _trainable_dict(trainer.trainable), "opt_state": jax.tree.leaves(trainer.opt_state)}
        info = dict(meta or {}, step=step, data_position=int(data_position))
        if step in self._manager.all_steps():
            self._manager.delete(step)
        self._manager.save(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                                             _META: ocp.args.JsonSave(info)}))
        self._manager.wait_until_finished()
        return self.directory / str(step)

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON meta item of a checkpoint (default: the latest), without touching any array."""
        step = self._step(step)
        return dict(self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META])

    def _step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no training checkpoint in {self.directory}")
            return max(steps)
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory} (it has {sorted(steps)})")
        return step

    def restore(self, trainer, step: int | None = None) -> dict:
        """Loads a checkpoint (default: the latest) into `trainer`, which must train the same Params
        with the same optimizer (built as the saving run built it); returns the checkpoint's meta
        item, with its "step" and "data_position". The model the trainer holds gets the weights."""
        step = self._step(step)
        ours = _trainable_dict(trainer.trainable)
        opt_leaves, opt_def = jax.tree.flatten(trainer.opt_state)
        saved = self._manager.item_metadata(step)[_STATE]
        saved_keys = set(saved["trainable"])
        if saved_keys != set(ours) or len(saved["opt_state"]) != len(opt_leaves):
            extra, missing = sorted(saved_keys - set(ours)), sorted(set(ours) - saved_keys)
            what = (f"it has {extra[0]!r}, which this trainer does not train" if extra else
                    f"it lacks {missing[0]!r}" if missing else
                    f"its optimizer state has {len(saved['opt_state'])} arrays, this trainer's {len(opt_leaves)}")
            raise CheckpointError(f"{self.directory / str(step)} does not match this trainer: {what} (another LoRA "
                                  "configuration, trainable set or optimizer?)")
        target = {"trainable": _abstract(ours), "opt_state": _abstract(opt_leaves)}
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target),
                                                                          _META: ocp.args.JsonRestore()}))
        except (ValueError, KeyError) as e:  # shapes or dtypes that differ from the target
            raise CheckpointError(f"cannot restore {self.directory / str(step)}: {' '.join(str(e).split())[:300]}"
                                  ) from None
        values = out[_STATE]["trainable"]
        trainable = jax.tree.map(lambda a: a, trainer.trainable)  # new Variables: the old State stays as it was
        for path, var in nnx.to_flat_state(trainable):
            var.set_value(values[_path_key(path)])
        trainer.trainable = trainable
        trainer.opt_state = jax.tree.unflatten(opt_def, out[_STATE]["opt_state"])
        meta = dict(out[_META])
        trainer.steps = int(meta["step"])
        trainer.publish()  # the model the trainer was given sees the restored weights
        return meta

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
