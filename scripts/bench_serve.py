"""Serving benchmark: a reproducible chat workload through the openai client against `qvl-jax serve`
(started here unless --url is given) and optionally a peer: `transformers serve` started here from
another virtual environment (--peer-venv), or any OpenAI-compatible server already running (--peer-url).

Workload (seeded): a shared system prompt, user prompts of mixed lengths (new ones at each level), an
image (data URL) in every --image-every-th request, greedy, streamed; run at each --concurrency level.
Servers are timed as their own start-up left them (the timed window includes any compiling they still
do); --warmup N sends N untimed requests of the same shape at each level first. Per level and server it prints one JSON
line: output tokens/s, requests/s, TTFT and inter-token latency p50 / p99 (client side), output tokens
received and asked for (for ours also, from /metrics, the engine's prefill / decode seconds and tokens,
padded prefill tokens, decode calls and compile seconds during the level); then, with a peer, one line of ratios (ours over the peer: output tokens/s and
TTFT p50 at each level).

    python scripts/bench_serve.py                              # tiny-random, concurrency 1/8/32
    python scripts/bench_serve.py --model Qwen/Qwen3-VL-2B-Instruct --requests 64
    python scripts/bench_serve.py --peer-url http://127.0.0.1:8001/v1 --peer-model Qwen/Qwen3-VL-2B-Instruct
    python scripts/bench_serve.py --config 2b --layers 4 --peer-venv VENV   # random 2B widths

--json-schema: every request of ours constrained by a JSON schema (response_format), to measure the
cost of structured outputs against the same command without it. Our server's full warm-up compiles
the constrained programs too, so neither run compiles inside its timed window (compile_s says).
Without --json-schema requests send ignore_eos; with it the grammar decides where an answer may end,
so compare output_tok_s, and see short_requests.

--config quick|2b|4b|8b [--layers N]: serve a random checkpoint of those widths instead of --model: a
`qvl_jax.Model.random` (seed --seed-weights) written with save_pretrained in the Hugging Face layout,
with the built-in tiny model's chat template and processor configs (small pixel budgets: at most 256
patches an image) and a byte-level tokenizer whose vocabulary fills the config's (the tiny merges, then
filler tokens that decode to ASCII words, then Qwen's added tokens at Qwen's ids where the vocabulary
allows), so that every token a random model emits streams as text. Written once into the qvl_jax
cache (bench-random-<config>-L<layers>-s<seed>) and reused, so our server's conversion is reused too.

--peer vllm --peer-venv VENV: runs vLLM's CPU backend (`VENV/bin/vllm serve <checkpoint>`, a venv built by
`../shared/peers/vllm-cpu.sh VENV`) on the same checkpoint, started as its README says: OpenMP threads on
every core (VLLM_CPU_OMP_THREADS_BIND=0-(N-1), VLLM_CPU_NUM_OF_RESERVED_CPU=0), VLLM_CPU_KVCACHE_SPACE
--peer-kv-gib, --dtype, --max-num-seqs and --max-model-len as ours, one image and no video a prompt.
It warms itself up before /health (70-100 s here); no untimed requests are sent to it.

--probe REPEATS: after the levels, one request at a time to each server: TTFT of fresh prompts of
16 / 128 / 512 words (max_tokens 1), their slope (prefill seconds a token at the margin) and
intercept, a 448x448 image's extra TTFT, and decode seconds a token at batch 1; medians of REPEATS.
Where each server's seconds go, measured the same way on both (`--concurrency ""` probes alone).

--repeat N: each level's timed workload N times on each server (new prompts and images each time, the
same ones for both servers), one line a run, then a summary line: the median over the runs of output
tokens/s (and wall, requests/s), TTFT and ITL percentiles over all the runs' requests together; the
ratios use the summary. One run's TTFT p50 at concurrency 8 moves by tens of percent on either server
(where the median request lands among the arrival clusters), so judge latency from several.

--dtype float32|bfloat16: both servers' working dtype (ours: `serve --dtype`; default: as stored).

--peer transformers --peer-venv VENV (the default peer): runs `VENV/bin/transformers serve <checkpoint> --continuous-batching --device
--peer-device --dtype --peer-dtype` on the same Hugging Face checkpoint our server serves (the --config
one, or --model's files: tiny-random's, a local HF directory or a hub snapshot), waits for /health,
runs the same workloads at the same levels, and stops it at the end (also on errors and Ctrl-C). Its
warm-up is --peer-warmup requests, one at a time (nothing to compile). transformers serves
continuously batched only text-only models; for Qwen3-VL it falls back to one `generate` at a time
(it logs "does not support continuous batching"), which is the baseline being measured.

Exact output lengths: random weights almost never pick an end-of-sequence token, but they may. Our
server is sent vLLM's `ignore_eos`, the peer generation_config {"min_new_tokens": max_tokens}
(transformers serve's own request field), so both generate max_tokens; every line reports
output_tokens against requested_tokens (short_requests > 0 if a server stopped early anyway), and
prompt_tokens (the sum of the usage each server reports: equal when both expanded the same images
into the same number of tokens, which the comparison assumes).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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


# --json-schema: every request's answer constrained to this schema (long answers: a random model
# rarely closes the array, so most run to max_tokens; each line reports short_requests).
BENCH_SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}}},
                "required": ["notes"]}


def _exact_length(max_tokens: int, exact_tokens: bool) -> dict:
    """The request field that makes a server generate exactly max_tokens: ours (and vLLM) take
    ignore_eos; transformers serve (exact_tokens) its own generation_config field."""
    if exact_tokens:
        return {"generation_config": json.dumps({"max_new_tokens": max_tokens, "do_sample": False,
                                                 "min_new_tokens": max_tokens})}
    return {"ignore_eos": True}


def run_level(base_url: str, model: str, api_key: str, jobs: list[dict], concurrency: int,
              exact_tokens: bool = False, json_schema: bool = False) -> dict:
    """exact_tokens: send transformers serve's generation_config field asking for max_tokens exactly.
    json_schema: constrain every answer by BENCH_SCHEMA (response_format; no ignore_eos: the grammar
    ends the answer with an end token)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    ttft, itl, out_tokens, errors, short, prompt_tokens = [], [], [0], [0], [0], [0]
    lock = threading.Lock()
    it = iter(jobs)

    def worker():
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                return
            t0 = time.perf_counter()
            first, last, n, p = None, None, 0, 0
            extra = _exact_length(job["max_tokens"], exact_tokens)
            if json_schema:
                extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "notes",
                                                                                     "schema": BENCH_SCHEMA}}}
            try:
                stream = client.chat.completions.create(model=model, messages=job["messages"], temperature=0,
                                                        max_tokens=job["max_tokens"], stream=True,
                                                        stream_options={"include_usage": True}, extra_body=extra)
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
                        n, p = ch.usage.completion_tokens, ch.usage.prompt_tokens
            except Exception as e:  # counted, and the run goes on
                with lock:
                    errors[0] += 1
                print(f"request failed: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            with lock:
                out_tokens[0] += n
                prompt_tokens[0] += p
                short[0] += n < job["max_tokens"]
                if first is not None:
                    ttft.append(first - t0)
                    # Text chunks can carry several tokens: spread each gap over the tokens between.
                    per = max(1, n - 1) / max(1, len(gaps)) if gaps else 1
                    itl.extend(g / per for g in gaps)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"_ttft": ttft, "_itl": itl,  # raw, for level_runs' pooled percentiles (not printed)
            "concurrency": concurrency, "requests": len(jobs), "errors": errors[0], "wall_s": round(wall, 2),
            "output_tok_s": round(out_tokens[0] / wall, 1), "req_s": round(len(jobs) / wall, 2),
            "output_tokens": out_tokens[0], "prompt_tokens": prompt_tokens[0], "requested_tokens": sum(j["max_tokens"] for j in jobs),
            "short_requests": short[0],
            "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99), "itl_p50_ms": _pct(itl, 50),
            "itl_p99_ms": _pct(itl, 99)}


PROBE_WORDS = (16, 128, 512)  # random words in a text probe (2-3 tokens a word here)


def probe(base_url: str, model: str, api_key: str, repeats: int, seed: int, exact_tokens: bool = False) -> dict:
    """Where a request's seconds go on a server, one request at a time (--probe): prompts of fresh random
    words (no shared prefix, so no prefix-cache hits) with max_tokens 1 at each PROBE_WORDS length, the
    shortest again with a 448x448 image, and the shortest with 64 new tokens. Medians of repeats each:
    TTFT per prompt length, their slope (seconds a prompt token at the margin, from usage's prompt
    tokens) and intercept, the image's extra TTFT (its vision tower and image tokens) and the decode
    seconds a token at batch 1 ((end - TTFT) / 63)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    rng = np.random.RandomState(seed)

    def one(words: int, image: bool = False, max_tokens: int = 1) -> tuple[float, float, int]:
        content = [{"type": "text", "text": " ".join(rng.choice(WORDS, size=words))}]
        if image:
            content.insert(0, {"type": "image_url", "image_url": {"url": _png(rng, 448, 448)}})
        extra = _exact_length(max_tokens, exact_tokens)
        t0, first, prompt = time.perf_counter(), None, 0
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                temperature=0, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}, extra_body=extra)
        for ch in stream:
            if first is None and ch.choices and ch.choices[0].delta.content:
                first = time.perf_counter()
            if ch.usage is not None:
                prompt = ch.usage.prompt_tokens
        end = time.perf_counter()
        return (first or end) - t0, end - t0, prompt

    def med(f) -> tuple[float, float, int]:
        runs = [f() for _ in range(repeats)]
        return tuple(float(np.median([r[i] for r in runs])) for i in range(3))

    text = {w: med(lambda w=w: one(w)) for w in PROBE_WORDS}
    (t_lo, _, n_lo), (t_hi, _, n_hi) = text[PROBE_WORDS[0]], text[PROBE_WORDS[-1]]
    slope = (t_hi - t_lo) / max(1, n_hi - n_lo)
    img = med(lambda: one(PROBE_WORDS[0], image=True))
    dec = med(lambda: one(PROBE_WORDS[0], max_tokens=64))
    out = {f"ttft_ms_{int(n)}_tokens": round(t * 1000, 1) for t, _, n in text.values()}
    out.update({"prefill_ms_per_token": round(slope * 1000, 3),
                "prefill_intercept_ms": round((t_lo - slope * n_lo) * 1000, 1),
                "image_448_extra_ms": round((img[0] - t_lo) * 1000, 1), "image_448_prompt_tokens": int(img[2]),
                "decode_ms_per_token_batch1": round((dec[1] - dec[0]) / 63 * 1000, 1)})
    return out


def engine_counters(base_url: str) -> dict | None:
    """Our server's qvl_engine_* counters from /metrics (None from a server without them)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(base_url.rsplit("/v1", 1)[0] + "/metrics", timeout=10).text
        fams = list(text_string_to_metric_families(text))
    except (httpx.HTTPError, ValueError):
        return None
    out = {f.name[len("qvl_engine_"):]: f.samples[0].value for f in fams if f.name.startswith("qvl_engine_")}
    out.update({"compile_seconds": f.samples[0].value for f in fams if f.name == "qvl_jax_compile_seconds"})
    return out or None


def engine_split(before: dict | None, after: dict | None) -> dict:
    """What the engine did during a level: prefill / decode seconds, tokens and calls."""
    if not before or not after:
        return {}
    d = {k: after[k] - before.get(k, 0) for k in after}
    return {"engine_prefill_s": round(d.get("prefill_seconds", 0), 1), "engine_decode_s": round(d.get("decode_seconds", 0), 1),
            "engine_prefill_tokens": int(d.get("prefill_tokens", 0)),
            "engine_prefill_padded_tokens": int(d.get("prefill_padded_tokens", 0)),
            "engine_decode_tokens": int(d.get("decode_tokens", 0)),
            "engine_decode_chunks": int(d.get("decode_chunks", 0)), "engine_steps": int(d.get("steps", 0)),
            "engine_vision_encoded": int(d.get("vision_encoded", 0)), "compile_s": round(d.get("compile_seconds", 0), 1)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(p: subprocess.Popen, port: int, name: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if p.poll() is not None:
            raise SystemExit(f"{name} exited during start-up (exit status {p.returncode})")
        time.sleep(0.2)
    raise SystemExit(f"{name} did not become healthy within {timeout_s:.0f} s")


def _rss(pid: int) -> int | None:
    """A process's resident memory now (Linux /proc), in bytes."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _start_ours(args, model: str | None, procs: list) -> str:
    port = _free_port()
    cmd = [sys.executable, "-m", "qvl_jax", "serve", "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
           "--max-model-len", str(args.max_model_len), "--served-model-name", "bench", "--log-level", "warning"]
    if model:
        cmd += ["--model", model]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    cmd += args.our_arg
    p = subprocess.Popen(cmd, env=dict(os.environ))
    procs.append(p)
    _wait_healthy(p, port, "qvl-jax serve", 1200)
    return f"http://127.0.0.1:{port}/v1"


def _start_peer(args, model_dir: str, procs: list) -> tuple[str, Path]:
    """The peer (--peer: `transformers serve` or `vllm serve`) from --peer-venv, pinned to model_dir (its
    requests must name model_dir). Its output goes to a log file; returns its /v1 URL and the log's path."""
    venv = Path(args.peer_venv).expanduser().absolute()
    exe = venv / "bin" / ("vllm" if args.peer == "vllm" else "transformers")
    if not exe.is_file():
        raise SystemExit(f"{exe} not found: --peer-venv must be a virtual environment with {args.peer} installed")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), HF_HUB_OFFLINE="1")
    if args.peer == "vllm":
        cores = len(os.sched_getaffinity(0))
        env.update(VLLM_CPU_KVCACHE_SPACE=str(args.peer_kv_gib), VLLM_CPU_OMP_THREADS_BIND=f"0-{cores - 1}",
                   VLLM_CPU_NUM_OF_RESERVED_CPU="0")
        cmd = [str(exe), "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", args.dtype or args.peer_dtype, "--max-num-seqs", str(args.max_num_seqs),
               "--max-model-len", str(args.max_model_len), "--limit-mm-per-prompt", '{"image": 1, "video": 0}',
               *args.peer_arg]
    else:
        cmd = [str(exe), "serve", model_dir, "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
               "--device", args.peer_device, "--dtype", args.dtype or args.peer_dtype, "--log-level", "warning",
               *args.peer_arg]
    if args.peer_log:
        log = Path(args.peer_log)
    else:
        fd, name = tempfile.mkstemp(prefix="bench_serve_peer_", suffix=".log")
        os.close(fd)
        log = Path(name)
    print(f"starting the peer (log: {log}): {' '.join(cmd)}", file=sys.stderr, flush=True)
    with open(log, "wb") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    procs.append(p)
    try:
        _wait_healthy(p, port, f"{args.peer} serve", 1200)
    except SystemExit:
        sys.stderr.write("".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:]))
        raise
    return f"http://127.0.0.1:{port}/v1", log


def _peer_batching(log: Path) -> str | None:
    """What transformers serve said about continuous batching for its last request ("CB: True/False")."""
    cb = [line.rsplit("CB: ", 1)[1].strip() for line in log.read_text(errors="replace").splitlines() if "CB: " in line]
    return cb[-1] if cb else None


def _stop(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _full_vocab_tokenizer(vocab_size: int):
    """The tiny byte-level tokenizer grown to vocab_size: its bytes and merges, then filler tokens (" ab",
    " abc", ... in the byte-level alphabet: ASCII words once decoded, never part of an encoding), then
    Qwen's added tokens, at Qwen's ids (151643...) where the vocabulary allows, else at its end.
    Returns (tokenizer, {added token: id})."""
    import itertools

    from tokenizers import AddedToken, Tokenizer

    from qvl_jax.processing.tokenizer_files import QWEN_ADDED_TOKENS, build_tiny_tokenizer

    n_added = len(QWEN_ADDED_TOKENS)
    regular = min(151643, vocab_size - n_added)
    d = json.loads(build_tiny_tokenizer().to_str())
    vocab = {t: i for t, i in d["model"]["vocab"].items() if i < 256 + len(d["model"]["merges"])}
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    letters = "abcdefghijklmnopqrstuvwxyz"
    fillers = ("\u0120" + "".join(w) for k in itertools.count(2) for w in itertools.product(letters, repeat=k))
    for tok in fillers:
        if len(vocab) >= regular:
            break
        vocab.setdefault(tok, len(vocab))
    d["model"]["vocab"] = vocab
    d["added_tokens"] = []
    tok = Tokenizer.from_str(json.dumps(d))
    for content, special in QWEN_ADDED_TOKENS:
        tok.add_tokens([AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                                   single_word=False)])
    ids = {content: tok.token_to_id(content) for content, _ in QWEN_ADDED_TOKENS}
    assert max(ids.values()) < vocab_size and tok.get_vocab_size() == regular + n_added
    return tok, ids


def random_checkpoint(size: str, layers: int | None, seed: int) -> Path:
    """A random Hugging Face checkpoint of `size` widths (see the module docstring), built once."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import hf_config_dict

    from qvl_jax.hub import cache_dir

    out = cache_dir() / f"bench-random-{size}-L{layers or 'all'}-s{seed}"
    if (out / "model.safetensors").is_file():
        return out
    import jax.numpy as jnp

    import qvl_jax
    from qvl_jax.config import Qwen3VLConfig
    from qvl_jax.tiny import write_tiny_checkpoint

    print(f"building the random checkpoint {out}...", file=sys.stderr, flush=True)
    cfg = hf_config_dict(size, layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        src = write_tiny_checkpoint(Path(tmp) / "src")  # chat template, processor configs
        tok, ids = _full_vocab_tokenizer(cfg["text_config"]["vocab_size"])
        tok.save(str(src / "tokenizer.json"))
        tc = json.loads((src / "tokenizer_config.json").read_text())
        tc["added_tokens_decoder"] = {str(ids[v["content"]]): v for v in tc["added_tokens_decoder"].values()}
        (src / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
        cfg.update(architectures=["Qwen3VLForConditionalGeneration"], dtype="float32",
                   image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        (src / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        (src / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]},
            indent=1) + "\n")
        model = qvl_jax.Model.random(Qwen3VLConfig.from_hf_dict(cfg), seed=seed, dtype=jnp.float32)
        model.path = str(src)
        tmp_out = Path(tmp) / "out"
        model.save_pretrained(tmp_out)
        del model
        os.replace(tmp_out, out)  # whole or not at all
    return out


def _peer_files(args) -> str:
    """The Hugging Face checkpoint directory the peer loads (the one our server serves)."""
    from qvl_jax.hub import model_files

    path = model_files(args.model or "tiny-random", log=False)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise SystemExit(f"{path} is not a Hugging Face checkpoint directory; the peer needs one (--model HF_DIR "
                         "or --config)")
    return str(path)


def level_runs(run, seed: int, repeats: int, name: str) -> dict:
    """`repeats` timed runs of one level (run(seed) -> run_level's line; repeat r's workload seeded
    seed + 10000 r, so repeat 0 is the single run's), each printed; with more than one, a summary
    line, printed and returned: the medians over the runs of wall, output tokens/s and requests/s,
    TTFT and ITL percentiles over all the runs' requests together (pooled), the sums of errors and
    short requests, and each run's output tokens/s and TTFT p50."""
    lines = []
    for r in range(repeats):
        line = run(seed + 10000 * r)
        raw = {"ttft": line.pop("_ttft"), "itl": line.pop("_itl")}
        line = {"server": name, **line, **({"repeat": r} if repeats > 1 else {})}
        print(json.dumps(line), flush=True)
        lines.append((line, raw))
    if repeats == 1:
        return lines[0][0]
    med = {"server": name, "concurrency": lines[0][0]["concurrency"], "runs": repeats}
    for k in ("wall_s", "output_tok_s", "req_s"):
        med[k] = round(float(np.median([x[k] for x, _ in lines])), 2)
    for k in ("ttft", "itl"):
        pooled = [v for _, raw in lines for v in raw[k]]
        med[f"{k}_p50_ms"], med[f"{k}_p99_ms"] = _pct(pooled, 50), _pct(pooled, 99)
    for k in ("errors", "short_requests"):
        med[k] = sum(x[k] for x, _ in lines)
    med["output_tok_s_runs"] = [x["output_tok_s"] for x, _ in lines]
    med["ttft_p50_ms_runs"] = [x["ttft_p50_ms"] for x, _ in lines]
    print(json.dumps(med), flush=True)
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model for our server (default: tiny-random)")
    ap.add_argument("--config", default=None, choices=["quick", "2b", "4b", "8b"],
                    help="serve a random checkpoint of these widths instead of --model (see above)")
    ap.add_argument("--layers", type=int, default=None, help="with --config: decoder layers (vision depth follows)")
    ap.add_argument("--seed-weights", type=int, default=0, help="with --config: the random weights' seed")
    ap.add_argument("--url", default=None, help="an already running qvl-jax server's /v1 URL")
    ap.add_argument("--served-model", default="bench", help="model name to send to --url")
    ap.add_argument("--peer-url", default=None, help="a peer server's /v1 URL (e.g. `transformers serve`)")
    ap.add_argument("--peer-model", default=None, help="model name to send to the peer")
    ap.add_argument("--peer-venv", default=None, metavar="VENV",
                    help="start `transformers serve` from this virtual environment on the same checkpoint")
    ap.add_argument("--peer", default="transformers", choices=["transformers", "vllm"],
                    help="which server --peer-venv holds (default: transformers)")
    ap.add_argument("--peer-kv-gib", type=float, default=2, help="vllm: VLLM_CPU_KVCACHE_SPACE in GiB (default: 2)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="both servers' dtype (default: ours as stored, the peer's --peer-dtype)")
    ap.add_argument("--our-arg", action="append", default=[],
                    help="one more argument for qvl-jax serve (repeatable), e.g. --our-arg=--attention=xla")
    ap.add_argument("--peer-device", default="cpu", help="transformers serve --device")
    ap.add_argument("--peer-dtype", default="float32", help="transformers serve --dtype")
    ap.add_argument("--peer-arg", action="append", default=[],
                    help="one more argument for the peer's serve (repeatable), e.g. --peer-arg=--compile")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed requests to our server (and --peer-url) at each level before the timed ones "
                         "(default: 0, the servers' own start-up is their warm-up)")
    ap.add_argument("--peer-warmup", type=int, default=2,
                    help="untimed requests to transformers serve before the levels (vllm: none)")
    ap.add_argument("--only-peer", action="store_true", help="run the peer alone (ours is not started)")
    ap.add_argument("--peer-log", default=None, help="file for transformers serve's output (default: a temp file)")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json-schema", action="store_true",
                    help="ours: constrain every request by a JSON schema (response_format), to measure the mask's cost")
    ap.add_argument("--image-every", type=int, default=3, help="an image in every k-th request (0: none)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="timed runs of each level on each server, new prompts each; a summary line over them (default: 1)")
    ap.add_argument("--quantize", default=None, choices=["int8", "int4"], help="our server's --quantize")
    ap.add_argument("--probe", type=int, default=0, metavar="REPEATS",
                    help="after the levels, each server's one-request probes, REPEATS of each (see probe())")
    args = ap.parse_args()
    if args.peer_url and args.peer_venv:
        ap.error("--peer-url and --peer-venv are alternatives")
    if args.config and args.model:
        ap.error("--config and --model are alternatives")
    levels = [int(c) for c in args.concurrency.split(",") if c]
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the servers (finally below)
    procs: list[subprocess.Popen] = []
    results: dict[str, dict[int, dict]] = {}
    try:
        model = str(random_checkpoint(args.config, args.layers, args.seed_weights)) if args.config else args.model
        targets = []  # (name, url, model name)
        if args.url:
            targets.append(("qvl_jax", args.url, args.served_model))
        elif not args.only_peer:
            targets.append(("qvl_jax", _start_ours(args, model, procs), "bench"))
        if args.peer_url:
            targets.append(("peer", args.peer_url, args.peer_model or args.served_model))
        for name, url, served in targets:
            # Untimed passes over workloads of the same shape, one at each level (--warmup requests): they
            # compile the shape buckets that level meets (a few dozen requests still meet new ones). Each
            # level then gets its own prompts, so only the shared system prompt is in the prefix cache.
            for c in levels if args.warmup else ():
                run_level(url, served, args.api_key, workload(args.warmup, args.seed + 1000 + c, args.image_every,
                                                              args.max_tokens), c, json_schema=args.json_schema)
            for c in levels:
                def run(seed, url=url, served=served, name=name, c=c):
                    jobs = workload(args.requests, seed, args.image_every, args.max_tokens)
                    before = engine_counters(url) if name == "qvl_jax" else None
                    line = {**run_level(url, served, args.api_key, jobs, c, json_schema=args.json_schema),
                            **({"json_schema": True} if args.json_schema else {})}
                    if before:
                        line.update(engine_split(before, engine_counters(url)))
                    if name == "qvl_jax" and procs:
                        line["server_rss_bytes"] = _rss(procs[0].pid)
                    return line

                results.setdefault(name, {})[c] = level_runs(run, args.seed + c, args.repeat, name)
            if args.probe:
                results.setdefault(name, {})["probe"] = line = {"server": name, "probe": probe(
                    url, served, args.api_key, args.probe, args.seed + 2000)}
                print(json.dumps(line), flush=True)
        if args.peer_venv:
            _stop(procs)  # ours is done: the peer gets the CPU to itself, as ours had
            procs.clear()
            peer_dir = model if args.config else _peer_files(args)
            t_start = time.perf_counter()
            url, log = _start_peer(args, peer_dir, procs)
            print(f"{args.peer} serve healthy after {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
            hf = args.peer == "transformers"  # it needs its own min_new_tokens field, and a warm-up
            if hf and args.peer_warmup:
                run_level(url, peer_dir, args.api_key, workload(args.peer_warmup, args.seed + 1000, args.image_every,
                                                                args.max_tokens), 1, True)
            for c in levels:
                def run(seed, url=url, c=c):
                    jobs = workload(args.requests, seed, args.image_every, args.max_tokens)
                    line = run_level(url, peer_dir, args.api_key, jobs, c, hf)
                    if hf:
                        line["continuous_batching"] = _peer_batching(log)
                    return line

                results.setdefault(args.peer, {})[c] = level_runs(run, args.seed + c, args.repeat, args.peer)
            if args.probe:
                results.setdefault(args.peer, {})["probe"] = line = {"server": args.peer, "probe": probe(
                    url, peer_dir, args.api_key, args.probe, args.seed + 2000, hf)}
                print(json.dumps(line), flush=True)
        peer = next((p for p in ("transformers", "vllm", "peer") if p in results), None)
        if peer and "qvl_jax" in results:
            ours, theirs = results["qvl_jax"], results[peer]
            ratios = {"ratios": f"qvl_jax over {peer}", **({"runs": args.repeat} if args.repeat > 1 else {})}
            for c in levels:
                a, b = ours.get(c), theirs.get(c)
                if not a or not b:
                    continue
                ratios[f"output_tok_s_c{c}"] = round(a["output_tok_s"] / b["output_tok_s"], 2) if b["output_tok_s"] else None
                ratios[f"ttft_p50_c{c}"] = (round(a["ttft_p50_ms"] / b["ttft_p50_ms"], 3)
                                            if a["ttft_p50_ms"] and b["ttft_p50_ms"] else None)
            if "probe" in ours and "probe" in theirs:
                a, b = ours["probe"]["probe"], theirs["probe"]["probe"]
                ratios["probe"] = {k: round(a[k] / b[k], 2) for k in a if k in b and isinstance(a[k], float) and b[k] > 0}
            print(json.dumps(ratios), flush=True)
    finally:
        _stop(procs)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers were stopped on the way out
        sys.exit(130)
