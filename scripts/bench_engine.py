#!/usr/bin/env python
"""Benchmark the continuous-batching engine against model.generate in static batches and against
transformers' generate in the same static batches, on the same device, in the same run.

    python scripts/bench_engine.py [--config quick|2b|4b|8b] [--layers N] [--requests 64] [--slots 16]
        [--no-static] [--no-transformers] [--no-check-tokens]

A mixed workload, all requests arriving at once: a shared system prompt, user turns of very
different lengths, about half of them with an image drawn from a small pool (so images repeat), and
output lengths drawn per request (random weights never stop early, so max_new_tokens sets them).
Each side runs the workload twice and the second run is timed, so that compiles are not (the
jitted functions are cached per shape); the engine is a fresh one each time, so the timed run
starts from empty prefix and vision caches.

Static batches: requests in arrival order, `--static-batch` at a time through model.generate; a
batch runs until its longest request is done (that is what a static batch costs), and only each
request's own tokens count as output. TTFT of a request there: the workload's start to its batch's
first token. One JSON line per side, and one with the ratios.

transformers: the same static batches (same order, same size, left-padded, the same image patches)
through `Qwen3VLForConditionalGeneration.generate` on a transformers model holding the SAME weights:
our random model is written with `model.save_pretrained` (Hugging Face layout) into a temporary
directory and read back with `from_pretrained` (float32 on CPU, bfloat16 on GPU by default, like
ours). Greedy, min_new_tokens = max_new_tokens = the batch's longest request (random weights never
stop early anyway), the default (dynamic) KV cache, default attention (sdpa), torch.inference_mode,
torch's default thread count. Its TTFT is measured the way the static side's is: the workload's
start to the batch's first token, where that token's time is the first call of a LogitsProcessor,
which generate makes right after the prefill forward that produces the first token's logits (and
before choosing it: an argmax, negligible). An untimed warm-up batch (the first 2 requests, 4
tokens) comes first, like the other sides' warm-up runs. Token check (on by default,
--no-check-tokens): the first static batch's greedy tokens from the timed runs of our
model.generate and of transformers are compared; a mismatch prints a warning on stderr (not a
failure) and the check's JSON line says which rows differ and where, so a reader knows whether the
peer computes the same thing (float32 rounding can flip a near-tie between two random logits).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import hf_config_dict, device_name  # noqa: E402


def workload(cfg, n: int, seed: int, system: list[int], image_px: int, n_images: int, max_user: int,
             max_new: int) -> list[tuple[dict, int]]:
    rng = np.random.RandomState(seed)
    text_vocab = min(cfg.text.vocab_size - 8, 150000)
    g = image_px // cfg.vision.patch_size
    pool = [rng.uniform(-1, 1, size=(g * g, cfg.vision.patch_dim)).astype(np.float32) for _ in range(n_images)]
    out = []
    for _ in range(n):
        user = list(rng.randint(0, text_vocab, size=int(rng.randint(4, max_user))))
        inp = {}
        if rng.rand() < 0.5:
            k = int(rng.randint(n_images))
            vision = [cfg.vision_start_token_id] + [cfg.image_token_id] * (g * g // 4) + [cfg.vision_end_token_id]
            user = vision + user
            inp = {"pixel_values": pool[k], "image_grid_thw": np.array([[1, g, g]], np.int64)}
        inp["input_ids"] = np.array([system + user], np.int64)
        out.append((inp, int(rng.randint(8, max_new + 1))))
    return out


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def run_engine(model, work, slots: int, max_model_len: int, **kw):
    eng = model.engine(max_num_seqs=slots, max_model_len=max_model_len, **kw)
    t0 = time.perf_counter()
    handles = [eng.submit(inp, max_new_tokens=n, stop_token_ids=[]) for inp, n in work]
    outs = [h.result() for h in handles]
    wall = time.perf_counter() - t0
    stats = dict(eng.stats)
    free, total = eng.num_free_blocks, eng.num_blocks
    eng.close()
    tokens = sum(len(o.tokens) for o in outs)
    return {"side": "engine", "output_tok_s": tokens / wall, "wall_s": wall, "output_tokens": tokens,
            "ttft_p50_ms": 1e3 * pct([o.ttft_s for o in outs], 50),
            "ttft_p99_ms": 1e3 * pct([o.ttft_s for o in outs], 99),
            "latency_p50_s": pct([o.latency_s for o in outs], 50),
            "cached_prompt_tokens": int(sum(o.cached_tokens for o in outs)),
            "prompt_tokens": int(sum(o.prompt_tokens for o in outs)),
            "preemptions": int(sum(o.preemptions for o in outs)), "num_blocks": total, "free_after": free,
            "decode_chunks": stats.get("decode_chunks", 0),
            "prefill_s": round(stats.get("prefill_s", 0), 3), "decode_s": round(stats.get("decode_s", 0), 3), "vision_encoded": stats.get("vision_encoded", 0)}


def batch_of(rows: list[dict]) -> dict:
    """Left-padded HF batch of single-prompt inputs (images in row order)."""
    t = max(r["input_ids"].shape[1] for r in rows)
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[1]
        ids[i, t - n:] = r["input_ids"][0]
        mask[i, t - n:] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    pix = [r for r in rows if "pixel_values" in r]
    if pix:
        out["pixel_values"] = np.concatenate([r["pixel_values"] for r in pix])
        out["image_grid_thw"] = np.concatenate([r["image_grid_thw"] for r in pix])
    return out


def run_static(model, work, batch: int, first: list | None = None):
    """first: a list that receives the first batch's tokens [b, n] (for the token check)."""
    t0 = time.perf_counter()
    ttft, tokens = [], 0
    for i in range(0, len(work), batch):
        part = work[i:i + batch]
        start = time.perf_counter() - t0
        out = model.generate(**batch_of([inp for inp, _ in part]), max_new_tokens=max(n for _, n in part),
                             stop_token_ids=[])
        ttft += [start + out.prefill_s] * len(part)
        tokens += sum(n for _, n in part)
        if first is not None and i == 0:
            first.append(np.asarray(out.tokens))
    wall = time.perf_counter() - t0
    return {"side": "static", "batch": batch, "output_tok_s": tokens / wall, "wall_s": wall, "output_tokens": tokens,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99)}


def load_transformers(model, cfg_dict: dict, tmp: str, dtype_name: str):
    """A transformers Qwen3VLForConditionalGeneration holding our model's weights: written with
    model.save_pretrained (HF layout), read back with from_pretrained. Returns (hf_model, device)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src = Path(tmp) / "config"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen3VLForConditionalGeneration"], "dtype": dtype_name, **cfg_dict}, indent=1))
    model.path = str(src)  # save_pretrained copies config.json from the directory the model came from
    model.save_pretrained(Path(tmp) / "hf")
    device = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    hf = Qwen3VLForConditionalGeneration.from_pretrained(
        Path(tmp) / "hf", dtype=getattr(torch, dtype_name)).to(device).eval()
    return hf, device


def run_transformers(hf, device: str, work, batch: int, image_token_id: int, first: list | None = None):
    """The static batches through transformers' generate; see the module docstring for TTFT."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstToken(LogitsProcessor):
        """generate calls it once per new token, right after the forward that gave its logits."""

        def __init__(self):
            self.t = None

        def __call__(self, input_ids, scores):
            if self.t is None:
                if device != "cpu":
                    torch.cuda.synchronize()
                self.t = time.perf_counter()
            return scores

    t0 = time.perf_counter()
    ttft, tokens = [], 0
    for i in range(0, len(work), batch):
        part = work[i:i + batch]
        inp = {k: torch.from_numpy(v).to(device) for k, v in batch_of([x for x, _ in part]).items()}
        if "pixel_values" in inp:
            inp["pixel_values"] = inp["pixel_values"].to(hf.dtype)
            inp["mm_token_type_ids"] = (inp["input_ids"] == image_token_id).int()
        n = max(k for _, k in part)
        clock = FirstToken()
        with torch.inference_mode():
            seq = hf.generate(**inp, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                              logits_processor=LogitsProcessorList([clock]))
        ttft += [clock.t - t0] * len(part)
        tokens += sum(k for _, k in part)
        if first is not None and i == 0:
            first.append(seq[:, inp["input_ids"].shape[1]:].cpu().numpy())
    wall = time.perf_counter() - t0
    return {"side": "transformers", "batch": batch, "output_tok_s": tokens / wall, "wall_s": wall,
            "output_tokens": tokens, "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "torch_device": device, "torch_threads": torch.get_num_threads(), "attn": hf.config._attn_implementation}


def check_tokens(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Row-by-row comparison of two [b, n] greedy token arrays (first static batch)."""
    n = min(ours.shape[1], theirs.shape[1])
    rows = []
    for r in range(ours.shape[0]):
        diff = np.nonzero(ours[r, :n] != theirs[r, :n])[0]
        rows.append(int(diff[0]) if diff.size else None)
    same = sum(d is None for d in rows)
    return {"check": "transformers_vs_static_tokens", "rows": len(rows), "rows_equal": same, "tokens_per_row": n,
            "shape_ours": list(ours.shape), "shape_transformers": list(theirs.shape),
            "first_mismatch_per_row": rows, "equal": same == len(rows) and ours.shape == theirs.shape}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="quick", choices=["quick", "2b", "4b", "8b"])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="default: bfloat16 on accelerators, float32 on CPU")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16, help="engine max_num_seqs")
    ap.add_argument("--static-batch", type=int, default=8)
    ap.add_argument("--system-len", type=int, default=64)
    ap.add_argument("--max-user", type=int, default=200)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=4, help="distinct images in the pool")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--budget", type=int, default=512, help="engine max_num_batched_tokens")
    ap.add_argument("--attention", default="xla", choices=["xla", "pallas"], help="the engine's paged attention kernel")
    ap.add_argument("--no-static", action="store_true")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers generate side")
    ap.add_argument("--no-check-tokens", action="store_true",
                    help="skip comparing the first static batch's tokens between ours and transformers")
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    import qvl_jax
    from qvl_jax.config import Qwen3VLConfig

    on_cpu = jax.devices()[0].platform == "cpu"
    dtype = jnp.dtype(args.dtype or ("float32" if on_cpu else "bfloat16"))
    cfg_dict = hf_config_dict(args.config, args.layers)
    cfg = Qwen3VLConfig.from_hf_dict(cfg_dict)
    model = qvl_jax.Model.random(cfg, dtype=dtype)
    rng = np.random.RandomState(123)
    system = list(rng.randint(0, min(cfg.text.vocab_size - 8, 150000), size=args.system_len))
    shape = dict(system=system, image_px=args.image_size, n_images=args.images, max_user=args.max_user,
                 max_new=args.max_new)
    max_len = int(max(inp["input_ids"].shape[1] + n for inp, n in workload(cfg, args.requests, 1, **shape)))
    # max_model_len: the longest request, rounded up to a power of two with some room
    max_len = 1 << (max_len + 64 - 1).bit_length()
    ekw = dict(block_size=args.block_size, decode_steps=args.decode_steps, max_num_batched_tokens=args.budget,
               attention=args.attention)
    head = {"device": device_name(), "config": args.config, "layers": args.layers, "dtype": str(dtype),
            "requests": args.requests, "slots": args.slots}

    work = workload(cfg, args.requests, 1, **shape)
    run_engine(model, work, args.slots, max_len, **ekw)  # warm-up: compiles
    eng = dict(head, **run_engine(model, work, args.slots, max_len, **ekw))
    print(json.dumps(eng), flush=True)
    ratios = {}
    if not args.no_transformers:
        try:
            import torch  # noqa: F401
            from transformers import Qwen3VLForConditionalGeneration  # noqa: F401
        except Exception as e:  # as bench.py: no torch / transformers, no transformers side
            print(f"WARNING: no transformers side ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
            args.no_transformers = True
    check = not args.no_check_tokens and not args.no_static and not args.no_transformers
    ours_first, hf_first = ([], []) if check else (None, None)
    if not args.no_static:
        run_static(model, work, args.static_batch)  # warm-up: compiles
        st = dict(head, **run_static(model, work, args.static_batch, ours_first))
        print(json.dumps(st), flush=True)
        ratios.update({"engine_over_static_tok_s": eng["output_tok_s"] / st["output_tok_s"],
                       "ttft_p50_ratio": eng["ttft_p50_ms"] / st["ttft_p50_ms"],
                       "ttft_p99_ratio": eng["ttft_p99_ms"] / st["ttft_p99_ms"]})
    if not args.no_transformers:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bench_engine_hf_") as tmp:
            hf, hf_device = load_transformers(model, cfg_dict, tmp, str(dtype))
        run_transformers(hf, hf_device, [(inp, 4) for inp, _ in work[:2]], 2, cfg.image_token_id)  # warm-up
        tr = dict(head, **run_transformers(hf, hf_device, work, args.static_batch, cfg.image_token_id, hf_first))
        print(json.dumps(tr), flush=True)
        ratios.update({"engine_over_transformers_tok_s": eng["output_tok_s"] / tr["output_tok_s"],
                       "ttft_p50_ratio_vs_transformers": eng["ttft_p50_ms"] / tr["ttft_p50_ms"],
                       "ttft_p99_ratio_vs_transformers": eng["ttft_p99_ms"] / tr["ttft_p99_ms"]})
        if not args.no_static:
            ratios["static_over_transformers_tok_s"] = st["output_tok_s"] / tr["output_tok_s"]
        if check:
            line = check_tokens(ours_first[0], hf_first[0])
            print(json.dumps(line), flush=True)
            if not line["equal"]:
                print(f"WARNING: transformers' greedy tokens differ from our model.generate's on the first batch: "
                      f"{line['rows_equal']}/{line['rows']} rows equal, first mismatch per row "
                      f"{line['first_mismatch_per_row']}", file=sys.stderr, flush=True)
    if ratios:
        print(json.dumps(ratios), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
