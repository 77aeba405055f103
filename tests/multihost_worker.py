"""One process of tests/test_multihost.py's multi-host run, and the computation both sides of its
comparison make.

Run as a script, it joins the other processes with jax.distributed.initialize (localhost
coordinator, gloo collectives between the CPU devices of different processes), loads a converted
model on a data x model mesh spanning every process's devices, and writes what `compute` returns
to OUT_DIR/<process id>.npz:

    python tests/multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID MODEL_DIR OUT_DIR DP TP
"""

from __future__ import annotations

import os
import sys

N_NEW = 6


def compute(model_dir: str, dp: int, tp: int) -> dict:
    """Logits, greedy tokens, one SGD training step's loss, and the logits after that step, of the
    inputs in multihost_inputs, on a dp x tp mesh over jax.devices()."""
    import numpy as np
    import optax

    import qvl_jax
    from multihost_inputs import batch, train_batch
    from qvl_jax.sharding import make_mesh

    model = qvl_jax.load(model_dir, mesh=make_mesh(dp=dp, tp=tp))
    inputs = batch(model.config)
    logits = model.logits(**inputs)
    gen = model.generate(**inputs, max_new_tokens=N_NEW)
    loss = qvl_jax.Trainer(model, optax.sgd(0.5)).step(train_batch(model.config))
    return {"logits": logits, "tokens": gen.tokens, "lengths": gen.lengths, "loss": np.float64(loss),
            "logits_after_step": model.logits(**inputs)}


def main(coordinator: str, n: str, pid: str, model_dir: str, out: str, dp: str, tp: str) -> None:
    import jax

    # Collectives between the CPU devices of different processes go through gloo (none by default).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(n), process_id=int(pid),
                               initialization_timeout=120)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    result = compute(model_dir, int(dp), int(tp))  # the user's path first

    import qvl_jax
    from qvl_jax.sharding import MeshError, make_mesh, to_host

    mesh = make_mesh(dp=int(dp), tp=int(tp))
    split = jax.device_put(np.arange(16, dtype=np.int32).reshape(8, 2),
                           NamedSharding(mesh, PartitionSpec(("data", "model"))))  # a block per device
    assert not split.is_fully_addressable and not split.is_fully_replicated
    result["gathered"] = to_host(split)

    try:  # the engine schedules per process: it refuses a mesh over several hosts, before any step
        qvl_jax.load(model_dir, mesh=mesh).engine()
        result["engine_error"] = np.str_("")
    except MeshError as e:
        result["engine_error"] = np.str_(str(e))
    result.update(devices=np.int64(jax.device_count()), local_devices=np.int64(jax.local_device_count()))
    np.savez(os.path.join(out, f"{pid}.npz"), **result)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(*sys.argv[1:])
