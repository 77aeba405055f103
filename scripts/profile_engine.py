#!/usr/bin/env python
"""Where an engine's seconds go on the serving benchmark's workload: the requests of
`bench_serve.py` (same seeded prompts and images, greedy, `ignore_eos`) submitted straight to an
`Engine` at a fixed concurrency (a finished request is replaced by the next), after `warm_up`, with
every jitted call timed on its own (each waits for its result):

    python scripts/profile_engine.py [--config 2b] [--layers 4] [--requests 24] [--concurrency 8]
        [--max-tokens 32] [--image-every 3] [--max-num-seqs 8] [--dtype float32] [--engine-arg KEY=VALUE ...] [--replay 6]

Prints one JSON line per kind of call (mixed steps by chunk length bucket, decode loops by row
count, the vision tower, chunk feature gathers): calls, total and median ms, tokens; then one line
with the wall time, output tok/s, TTFT p50 and the seconds not inside any timed call (host work:
tokenization happens before the clock starts; this is the scheduler, output handling and
dispatch). Timing each call on its own removes the overlap of host work with device work that the
engine otherwise gets, so the wall time here is an upper bound of the engine's.

--replay N: after the run, the last mixed step of each chunk length up to 64 tokens and the last
decode loop of each row count run N times more, back to back, with the same inputs over the engine's
pools as they then are (one JSON line each, ms per call): the same call's cost without the other
calls between them, against its live median above."""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np


def _image(url: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="2b", choices=["quick", "2b", "4b", "8b"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--image-every", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the params (and so the pools)")
    ap.add_argument("--engine-arg", action="append", default=[], help="KEY=VALUE for Engine(...) (ints)")
    ap.add_argument("--replay", type=int, default=0, help="run the last short mixed steps and decode loops N times more")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serve import random_checkpoint, workload

    import qvl_jax
    from qvl_jax.engine import engine as engine_mod
    from qvl_jax.engine import steps
    from qvl_jax.processing.processor import Processor

    path = random_checkpoint(args.config, args.layers, 0)
    model = qvl_jax.load(str(path), dtype=args.dtype)
    processor = Processor.from_pretrained(str(path))
    jobs = workload(args.requests, args.seed, args.image_every, args.max_tokens)
    prompts = []
    for job in jobs:
        messages = []
        for m in job["messages"]:
            content = m["content"]
            if isinstance(content, list):
                content = [{"type": "image", "image": _image(p["image_url"]["url"])}
                           if p["type"] == "image_url" else p for p in content]
            messages.append({"role": m["role"], "content": content})
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompts.append((inputs, job["max_tokens"]))

    kw = {k: int(v) for k, v in (a.split("=", 1) for a in args.engine_arg)}
    eng = model.engine(max_num_seqs=args.max_num_seqs, **kw)
    print(f"warm-up: {eng.warm_up(vision_patches=1024):.1f} s", file=sys.stderr, flush=True)

    calls = collections.defaultdict(list)  # kind -> [(ms, tokens)]

    last = {}  # (kind, shape) -> (args, kwargs) of the last such call, for --replay

    def timed(kind, fn, tokens):
        def run(*a, **k):
            if args.replay and fn is orig[0] and a[7].shape[1] <= 64:
                last[("mixed", a[7].shape[1], a[16].shape[0])] = (a, k)
            elif args.replay and fn is orig[1]:
                last[("decode", a[9].shape[0], a[4])] = (a, k)
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*a, **k))
            calls[kind(*a, **k)].append(((time.perf_counter() - t0) * 1e3, tokens(out, *a, **k)))
            return out
        return run

    orig = steps.mixed, steps.decode, engine_mod.vision_tower
    # tokens: prompt tokens + decode tokens of a mixed step; tokens chosen by a decode loop
    steps.mixed = timed(lambda *a, **k: f"mixed t={a[7].shape[1]} rows={a[16].shape[0]}", orig[0],
                        lambda out, *a, **k: int(np.sum(a[9])) + int(np.sum(a[17])))
    steps.decode = timed(lambda *a, **k: f"decode rows={a[9].shape[0]} steps={a[4]}", orig[1],
                         lambda out, *a, **k: int(np.sum(np.asarray(out[3].tokens) >= 0)))
    engine_mod.vision_tower = timed(lambda *a, **k: "vision", orig[2], lambda out, *a, **k: 0)

    done, lock, ttft = threading.Event(), threading.Lock(), []
    it = iter(prompts)
    left = [len(prompts)]
    out_tokens = [0]

    def next_one():
        with lock:
            item = next(it, None)
        if item is None:
            return
        t0 = time.perf_counter()
        h = eng.submit(item[0], item[1], temperature=0, ignore_eos=True)

        def wait():
            first = None
            n = 0
            for chunk in h:
                if first is None:
                    first = time.perf_counter() - t0
                n += len(chunk)
            with lock:
                ttft.append(first)
                out_tokens[0] += n
                left[0] -= 1
                if left[0] == 0:
                    done.set()
            next_one()
        threading.Thread(target=wait, daemon=True).start()

    before = dict(eng.stats)
    t0 = time.perf_counter()
    for _ in range(args.concurrency):
        next_one()
    done.wait()
    wall = time.perf_counter() - t0
    steps.mixed, steps.decode, engine_mod.vision_tower = orig
    timed_s = 0.0
    for kind in sorted(calls):
        ms = [c[0] for c in calls[kind]]
        timed_s += sum(ms) / 1e3
        print(json.dumps({"call": kind, "calls": len(ms), "total_s": round(sum(ms) / 1e3, 2),
                          "median_ms": round(float(np.median(ms)), 1), "max_ms": round(max(ms), 1),
                          "tokens": sum(c[1] for c in calls[kind])}))
    stats = {k: round(v - before.get(k, 0), 3) if isinstance(v, float) else v - before.get(k, 0)
             for k, v in eng.stats.items()}
    print(json.dumps({"wall_s": round(wall, 2), "output_tok_s": round(out_tokens[0] / wall, 2),
                      "ttft_p50_s": round(float(np.median(ttft)), 2), "in_calls_s": round(timed_s, 2),
                      "outside_calls_s": round(wall - timed_s, 2), "stats": stats}))
    for key, (a, k) in sorted(last.items()):
        print(json.dumps({"replay": f"{key[0]} " + (f"t={key[1]} rows={key[2]}" if key[0] == "mixed"
                                                     else f"rows={key[1]} steps={key[2]}"),
                          "ms": _replay(eng, key[0], a, k, args.replay)}))
    eng.close()
    return 0


def _replay(eng, kind: str, a: tuple, k: dict, n: int) -> list[float]:
    """ms of n more runs of a captured step call (`steps.mixed` or `steps.decode`) over the engine's
    pools as they are now (its cache, penalty history and, for a decode loop, window buffers were
    donated by the call: fresh ones take their place)."""
    import dataclasses

    from qvl_jax.engine import steps

    fn, at = (steps.mixed, 4) if kind == "mixed" else (steps.decode, 6)
    a, out = list(a), []
    for _ in range(n):
        windows = eng._window_buffers(a[9].shape[0]) if kind == "decode" else a[at].windows
        a[at] = dataclasses.replace(a[at], pages=eng._pages, windows=windows)
        a[at + 1], a[at + 2] = eng._seen, eng._counts
        t0 = time.perf_counter()
        cache, eng._seen, eng._counts, _ = jax.block_until_ready(fn(*a, **k))
        out.append(round((time.perf_counter() - t0) * 1e3, 1))
        eng._pages = cache.pages
        if kind == "decode" and cache.windows:
            eng._windows = (a[9].shape[0], cache.windows)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
