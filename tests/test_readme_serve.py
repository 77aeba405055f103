"""The README's serving section as written: `qvl-jax serve` started by its command (on a free port
instead of 8000), then its client example run against it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve_util import free_port

ROOT = Path(__file__).resolve().parents[1]


def _serving_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Serving (OpenAI-compatible)"):text.index("\n## ", text.index("## Serving") + 3)]


def test_readme_client_runs_against_readme_server(tmp_path):
    section = _serving_section()
    commands = [line for block in re.findall(r"^```bash\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
                for line in block.splitlines() if line.startswith("qvl-jax serve")]
    assert len(commands) == 1, commands
    args = shlex.split(commands[0])[1:]
    assert args[args.index("--port") + 1] == "8000"
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    # The README's command compiles every engine program before /health (minutes of a CI run at the
    # default settings); this test is about the client, so the server warms up with two requests only
    # (the full warm-up: tests/test_engine_warmup.py and test_serve.py's health test).
    args += ["--warm-up", "requests"]
    client = re.findall(r"^```py\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    assert len(client) == 1 and "http://127.0.0.1:8000/v1" in client[0]
    env = dict(os.environ, QVL_JAX_CACHE=str(tmp_path / "cache"), QVL_JAX_COMPILATION_CACHE="0")
    server = subprocess.Popen([sys.executable, "-m", "qvl_jax", *args], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "wb"))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not become healthy"
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        code = client[0].replace("http://127.0.0.1:8000/v1", base + "/v1")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                             timeout=300, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.endswith("\n")  # it printed the answer (random text, possibly empty)
    finally:
        server.terminate()
        server.wait(60)
