"""`qvl-jax batch` against the same requests sent to the server over HTTP, on one engine in one process.

Both sides run the same bodies (chat completions, greedy, some with an image) at the same concurrency
through the same app: the batch runner over its in-process ASGI transport, writing fsynced result
lines; the HTTP side through uvicorn on 127.0.0.1 with an httpx client. They alternate, `--rounds`
times each, after one warm-up pass of each; prints requests/s per round and the medians.

    python scripts/bench_batch.py [--model tiny-random] [--requests 200] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image

import qvl_jax
from qvl_jax.processing.processor import Processor
from qvl_jax.serving.app import ServerConfig, create_app
from qvl_jax.serving.batch import run_batch


def _bodies(n: int, max_tokens: int) -> list[dict]:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 96, 3), dtype=np.uint8)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    out = []
    for i in range(n):
        content = f"question {i}: tell me something" if i % 10 else [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": f"question {i}"}]
        out.append({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
    return out


async def _http(base: str, bodies: list[dict], concurrency: int) -> None:
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=None) as client:
        async def one(body):
            async with slots:
                r = await client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text

        await asyncio.gather(*(one(b) for b in bodies))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    model = qvl_jax.load(args.model)
    proc = Processor.from_pretrained(args.model)
    engine = model.engine(max_num_seqs=args.max_num_seqs, max_model_len=512)
    app = create_app(engine, proc, ServerConfig(served_model_name="m", max_pending=16 * args.concurrency,
                                                warm_up=False))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    bodies = _bodies(args.requests, args.max_tokens)
    tmp = Path(tempfile.mkdtemp())
    inp = tmp / "in.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                       "body": b}) + "\n" for i, b in enumerate(bodies)))
    rates = {"batch": [], "http": []}
    try:
        for r in range(args.rounds + 1):  # round 0 warms both up
            for side in ("batch", "http"):
                t0 = time.perf_counter()
                if side == "batch":
                    out = tmp / f"out{r}.jsonl"
                    counts = asyncio.run(run_batch(app, inp, out, concurrency=args.concurrency, progress=False))
                    assert counts["ok"] == args.requests, counts
                else:
                    asyncio.run(_http(f"http://127.0.0.1:{port}", bodies, args.concurrency))
                rate = args.requests / (time.perf_counter() - t0)
                if r:
                    rates[side].append(rate)
                print(f"round {r} {side}: {rate:.2f} req/s", file=sys.stderr, flush=True)
    finally:
        server.should_exit = True
        engine.close()
    print(json.dumps({side: {"req_s": [round(x, 2) for x in v], "median": round(statistics.median(v), 2)}
                      for side, v in rates.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
