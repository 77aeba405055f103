"""The fine-tuning loop behind `qvl-jax finetune`: steps, checkpoints, eval, the final adapter, and
what happens when something goes wrong on the way.

The loop keeps the last committed state: the trainable weights, the optimizer state, the step count
and the data position of the last step that finished with finite numbers, as one tuple of
references (JAX arrays are immutable, so this copies nothing). Whatever stops the run part-way (a
Ctrl-C at any point of a step, a record that fails to encode, an out-of-memory step, a non-finite
loss) puts that state back in the trainer and saves it if it is not on disk yet, so `--resume`
goes on from a state where the weights and the data position agree and ends with the same adapter
as a run that never stopped. A Ctrl-C stops the run at the next step boundary (`StopAtStep`; a
second one at once). Checkpoint and adapter writes run with SIGINT held until they finish,
and are atomic besides (TrainCheckpoints, save_adapter), so a Ctrl-C during the final save leaves
a whole checkpoint that `--resume` finds.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp

from qvl_jax.errors import NumericalError, QvlError, device_memory_errors
from qvl_jax.training.data import eval_batches


@contextlib.contextmanager
def sigint_held():
    """SIGINT held while the block runs (a checkpoint or the adapter being written) and raised as
    KeyboardInterrupt once it has finished; a plain block outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    previous = signal.signal(signal.SIGINT, lambda *_: got.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if got and callable(previous):  # what the signal would have done (SIG_IGN: nothing)
        previous(signal.SIGINT, None)


class StopAtStep:
    """Ctrl-C during a run asks it to stop at the next step boundary: SIGINT sets a flag, and
    `check()` (called between steps) raises KeyboardInterrupt there; a second SIGINT raises at once.
    Raised wherever the main thread happened to be, the interrupt could land in code that swallows
    it (a destructor, a library's cleanup) and the run went on stepping. A plain object outside the
    main thread (signals reach only the main thread)."""

    def __init__(self):
        self.asked = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def check(self) -> None:
        if self.asked:
            raise KeyboardInterrupt

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(a).all() for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def eval_loss(trainer, records, processor, batch_size: int) -> float:
    """Mean token loss over every eval record (the current weights, no gradients)."""
    total = count = 0
    for batch in eval_batches(records, processor, batch_size):
        t, c = trainer.loss_sum(batch)
        total, count = total + t, count + c
    return total / max(count, 1)


def train(trainer, batches, total: int, ckpt, meta: dict, write_final, *, schedule, save_every: int = 0,
          eval_every: int = 0, evaluate=None, resumed: bool = False, log=None) -> dict:
    """Steps `trainer` on `batches` until step `total`, saving every `save_every` steps and at the
    end, then calls `write_final()` (the adapter or model). Returns the summary (strictly JSON:
    every number finite). On any failure the last committed state is saved before the error
    goes on; a non-finite loss or weight is a NumericalError."""
    from tqdm import tqdm  # lazy: the CLI's start-up

    log = sys.stderr if log is None else log
    good = (trainer.trainable, trainer.opt_state, trainer.steps, batches.position)
    saved_at = trainer.steps if resumed else None
    losses, speeds, last_eval = [], [], None

    def run_eval() -> float:
        value = evaluate()
        if not math.isfinite(value):
            raise NumericalError(f"step {trainer.steps}: the eval loss is {value}; training stopped")
        return value

    def save():
        nonlocal saved_at
        with sigint_held():
            ckpt.save(trainer, batches.position, meta)
        saved_at = trainer.steps

    # Redrawn at most once a second when the log is a file rather than a terminal.
    bar = tqdm(total=total, initial=trainer.steps, file=log, unit="step", dynamic_ncols=True,
               mininterval=0.1 if log.isatty() else 1.0)
    stop = StopAtStep()
    try:
        while trainer.steps < total:
            stop.check()
            t0 = time.perf_counter()
            batch = batches.next()
            rate = float(schedule(trainer.steps))
            with device_memory_errors(f"training step {trainer.steps + 1}"):
                loss = trainer.step(batch)
            if not math.isfinite(loss) or not bool(_all_finite((trainer.trainable, trainer.opt_state))):
                what = f"the loss is {loss}" if not math.isfinite(loss) else "the updated weights are not finite"
                raise NumericalError(f"step {trainer.steps}: {what} (learning rate {rate:.3g}); training stopped")
            good = (trainer.trainable, trainer.opt_state, trainer.steps, batches.position)
            speeds.append(int(batch["attention_mask"].sum()) / (time.perf_counter() - t0))
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{speeds[-1]:.0f}", lr=f"{rate:.2e}", refresh=False)
            bar.update(1)
            if save_every and trainer.steps % save_every == 0:
                save()
            if evaluate is not None and eval_every and trainer.steps % eval_every == 0 and trainer.steps < total:
                last_eval = run_eval()
                bar.write(f"step {trainer.steps}: eval loss {last_eval:.4f}", file=log)
        bar.close()
        stop.check()
        if trainer.steps != saved_at:
            save()
        if evaluate is not None:
            last_eval = run_eval()
            print(f"step {trainer.steps}: eval loss {last_eval:.4f}", file=log)
        stop.check()
        with sigint_held():
            write_final()
        stop.check()  # a Ctrl-C held while the adapter was written
    except BaseException as e:
        stop.close()
        bar.close()
        with sigint_held():  # a second Ctrl-C waits until this is on disk
            # Back to the last committed state: a step cut short, or one that went non-finite, is undone.
            trainer.trainable, trainer.opt_state, trainer.steps, batches.position = good
            trainer.publish()
            if trainer.steps != saved_at:
                save()
        where = f"step {trainer.steps} is saved in {ckpt.directory / str(trainer.steps)}: --resume goes on from there"
        if isinstance(e, KeyboardInterrupt):
            print(f"interrupted; {where}", file=log)
        elif isinstance(e, QvlError):
            raise type(e)(f"{e}; {where}") from None
        raise
    stop.close()
    speeds = sorted(speeds)
    summary = {"steps": trainer.steps, "loss": losses[-1] if losses else None, "eval_loss": last_eval,
               "tokens_per_s": round(speeds[len(speeds) // 2], 1) if speeds else None,
               "epochs": round(batches.epoch, 3), "checkpoint": str(ckpt.directory / str(trainer.steps))}
    json.dumps(summary, allow_nan=False)  # a non-finite number would have stopped the run above
    return summary
