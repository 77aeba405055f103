"""Several hosts: the recipe of docs/multi-host.md, run as two processes on this machine.

Each process (tests/multihost_worker.py) has 4 CPU devices, joins the other with
jax.distributed.initialize (a localhost coordinator on a free port, gloo collectives), and loads the
converted tiny-random model on a 2 x 4 mesh spanning both; logits, greedy generation and a
training step must give what this process (8 devices) gives on the same mesh shape.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

import qvl_jax  # noqa: F401  (the package the workers import is this one)
from multihost_worker import N_NEW, compute
from parity import rel_err
from qvl_jax.hub import resolve_model

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
RTOL = 1e-5  # float32: only the summation order of the collectives may differ
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(model_dir: Path, out: Path, n: int = 2, local_devices: int = 4, dp: int = 2, tp: int = 4):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, str(TESTS / "multihost_worker.py"), coordinator, str(n), str(i),
                               str(model_dir), str(out), str(dp), str(tp)],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(out / f"{i}.log", "wb"))
             for i in range(n)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [f"process {i} exited with {p.returncode}:\n"
              + "\n".join((out / f"{i}.log").read_text(errors="replace").strip().splitlines()[-8:])
              for i, p in enumerate(procs) if p.returncode != 0]
    assert not failed, "\n".join(failed)


def test_two_processes_on_one_mesh_equal_one_process(tmp_path):
    assert jax.device_count() >= 8, "needs 8 devices; tests/conftest.py sets XLA_FLAGS for that"
    model_dir = resolve_model("tiny-random", log=False)
    _run_processes(model_dir, tmp_path)
    want = compute(str(model_dir), 2, 4)
    for pid in range(2):
        got = dict(np.load(tmp_path / f"{pid}.npz"))
        assert int(got["devices"]) == 8 and int(got["local_devices"]) == 4
        assert got["tokens"].shape == (2, N_NEW)
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
        np.testing.assert_array_equal(got["lengths"], want["lengths"])
        for key in ("logits", "logits_after_step"):
            assert got[key].shape == want[key].shape
            assert rel_err(got[key], want[key]) <= RTOL, (pid, key, rel_err(got[key], want[key]))
        assert "run one engine per host" in str(got["engine_error"])
        np.testing.assert_array_equal(got["gathered"], np.arange(16).reshape(8, 2))  # split: gathered
        assert abs(float(got["loss"]) - float(want["loss"])) <= RTOL * abs(float(want["loss"]))
    # The step changed the weights: the comparison after it is not the one before it again.
    assert rel_err(want["logits_after_step"], want["logits"]) > 1e-3
