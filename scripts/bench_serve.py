"""Serving benchmark: a reproducible chat workload through the openai client against `qvl-jax serve`
(started here unless --url is given) and optionally a peer such as `transformers serve` (--peer-url).

Workload (seeded): a shared system prompt, user prompts of mixed lengths (new ones at each level, after an untimed warm-up pass), an image (data URL) in every
--image-every-th request, greedy, streamed; run at each --concurrency level. Per level and server it
prints one JSON line: output tokens/s, requests/s, TTFT and inter-token latency p50 / p99 (client side).

    python scripts/bench_serve.py                              # tiny-random, concurrency 1/8/32
    python scripts/bench_serve.py --model Qwen/Qwen3-VL-2B-Instruct --requests 64
    python scripts/bench_serve.py --peer-url http://127.0.0.1:8001/v1 --peer-model Qwen/Qwen3-VL-2B-Instruct
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np

SYSTEM = ("You are a careful assistant. Answer in plain sentences, describe what you see precisely, and say "
          "when you are unsure. ") * 3
WORDS = "the a cat dog red blue house tree river sky runs sits under over near far big small old new".split()


def _png(rng, h, w) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def workload(n: int, seed: int, image_every: int, max_tokens: int) -> list[dict]:
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, size=int(rng.choice([8, 32, 128, 384]))))
        content = [{"type": "text", "text": f"Request {i}: {text}"}]
        if image_every and i % image_every == 0:
            side = int(rng.choice([128, 256, 448]))
            content.insert(0, {"type": "image_url", "image_url": {"url": _png(rng, side, side)}})
        out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}],
                    "max_tokens": int(rng.randint(max_tokens // 2, max_tokens + 1))})
    return out


def _pct(xs, q):
    return round(float(np.percentile(xs, q)) * 1000, 2) if xs else None


def run_level(base_url: str, model: str, api_key: str, jobs: list[dict], concurrency: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    ttft, itl, out_tokens, errors = [], [], [0], [0]
    lock = threading.Lock()
    it = iter(jobs)

    def worker():
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                return
            t0 = time.perf_counter()
            first, last, n = None, None, 0
            try:
                stream = client.chat.completions.create(model=model, messages=job["messages"], temperature=0,
                                                        max_tokens=job["max_tokens"], stream=True,
                                                        stream_options={"include_usage": True})
                gaps = []
                for ch in stream:
                    now = time.perf_counter()
                    if ch.choices and ch.choices[0].delta.content:
                        if first is None:
                            first = now
                        elif last is not None:
                            gaps.append(now - last)
                        last = now
                    if ch.usage is not None:
                        n = ch.usage.completion_tokens
            except Exception as e:  # counted, and the run goes on
                with lock:
                    errors[0] += 1
                print(f"request failed: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            with lock:
                out_tokens[0] += n
                if first is not None:
                    ttft.append(first - t0)
                    # Text chunks can carry several tokens: spread each gap over the tokens between.
                    per = max(1, n - 1) / max(1, len(gaps)) if gaps else 1
                    itl.extend(g / per for g in gaps)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(jobs), "errors": errors[0], "wall_s": round(wall, 2),
            "output_tok_s": round(out_tokens[0] / wall, 1), "req_s": round(len(jobs) / wall, 2),
            "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99), "itl_p50_ms": _pct(itl, 50),
            "itl_p99_ms": _pct(itl, 99)}


def _start_ours(args) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "qvl_jax", "serve", "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
           "--max-model-len", str(args.max_model_len), "--served-model-name", "bench", "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    p = subprocess.Popen(cmd, env=dict(os.environ))
    for _ in range(6000):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return p, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        if p.poll() is not None:
            raise SystemExit("the server exited during start-up")
        time.sleep(0.1)
    raise SystemExit("the server did not become healthy")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model for our server (default: tiny-random)")
    ap.add_argument("--url", default=None, help="an already running qvl-jax server's /v1 URL")
    ap.add_argument("--served-model", default="bench", help="model name to send to --url")
    ap.add_argument("--peer-url", default=None, help="a peer server's /v1 URL (e.g. `transformers serve`)")
    ap.add_argument("--peer-model", default=None, help="model name to send to the peer")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--image-every", type=int, default=3, help="an image in every k-th request (0: none)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    targets = []
    proc = None
    if args.url:
        targets.append(("qvl_jax", args.url, args.served_model))
    else:
        proc, url = _start_ours(args)
        targets.append(("qvl_jax", url, "bench"))
    if args.peer_url:
        targets.append(("peer", args.peer_url, args.peer_model or args.served_model))
    try:
        for name, url, model in targets:
            # Untimed pass over a workload of the same shape: compiles the shape buckets. Each level then
            # gets its own prompts, so only the shared system prompt is in the prefix cache.
            run_level(url, model, args.api_key, workload(args.requests, args.seed + 1000, args.image_every,
                                                         args.max_tokens), 8)
            for c in levels:
                jobs = workload(args.requests, args.seed + c, args.image_every, args.max_tokens)
                print(json.dumps({"server": name, **run_level(url, model, args.api_key, jobs, c)}), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
