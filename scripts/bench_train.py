#!/usr/bin/env python
"""Benchmark LoRA training: qvl_jax's Trainer against transformers + PEFT, same device, same run.

    python scripts/bench_train.py [--config 2b] [--layers 4] [--seq-len 1024] [--image-size 512] [--quick]

Random weights in the real widths of the chosen config with a few layers; one batch of `--batch`
rows of about `--seq-len` tokens, each with one image (--image-size pixels square) at the start and
the loss taken on the second half of the text (a prompt / answer split). Both sides train LoRA
r=16, alpha=32 on q/k/v/o/gate/up/down_proj with AdamW and global-norm clipping 1.0, in float32 on
CPU (bfloat16 weights on GPU unless --dtype). Each side runs in a child process of its own, so its
peak memory is its own: host RSS high-water mark on CPU (ru_maxrss), peak device memory on GPU.
After `--warmup` untimed steps (compiles, allocator warm-up) `--steps` steps are timed.

Prints one JSON line per side (median step seconds, tokens/s, peak memory) and one with the ratios
(ours / theirs: > 1 means faster for tokens/s, larger for memory).

--quick: tiny widths, 2 layers, ~128 tokens: a smoke run for tests (well under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LR = 16, 32, 1e-4


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def batch_inputs(args, cfg) -> dict:
    """One batch of rows with an image at the start and labels on the second half of the text."""
    from bench import make_image_inputs

    image_tokens = (args.image_size // cfg.vision.patch_size) ** 2 // cfg.vision.spatial_merge_size ** 2
    prompt = max(8, args.seq_len - image_tokens - 2)
    inp = make_image_inputs(cfg, prompt, args.image_size, args.batch, np.random.RandomState(0))
    ids = inp["input_ids"]
    inp["attention_mask"] = np.ones_like(ids)
    inp["mm_token_type_ids"] = (ids == cfg.image_token_id).astype(np.int64)
    labels = ids.copy()
    labels[:, : ids.shape[1] // 2] = -100
    inp["labels"] = labels
    return inp


def timed_steps(step, args) -> list[float]:
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def run_ours(args, cfg_dict) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import qvl_jax
    from bench import device_name
    from qvl_jax.config import Qwen3VLConfig
    from qvl_jax.training import LoraConfig, Trainer

    base_rss = rss_bytes()
    cfg = Qwen3VLConfig.from_hf_dict(cfg_dict)
    model = qvl_jax.Model.random(cfg, dtype=jnp.dtype(args.dtype))
    trainer = Trainer(model, optax.adamw(LR, weight_decay=0.0), lora=LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS),
                      max_grad_norm=1.0, remat=args.remat)
    batch = batch_inputs(args, cfg)
    losses = []
    times = timed_steps(lambda: losses.append(trainer.step(batch)), args)  # step() returns a host float: synced
    stats = jax.devices()[0].memory_stats() or {}
    return {"impl": "qvl_jax", "device": device_name(), "loss": losses[-1], "times": times,
            "tokens": int(batch["attention_mask"].sum()), "peak_device_bytes": stats.get("peak_bytes_in_use"),
            "import_rss_bytes": base_rss}


def run_hf(args, cfg_dict) -> dict:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from qvl_jax.config import Qwen3VLConfig as OurConfig

    base_rss = rss_bytes()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**copy.deepcopy(cfg_dict))).to(device, dtype)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    batch = batch_inputs(args, OurConfig.from_hf_dict(cfg_dict))
    inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())  # .item() synchronises

    times = timed_steps(step, args)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"impl": "transformers+peft", "device": device, "loss": losses[-1], "times": times,
            "tokens": int(batch["attention_mask"].sum()), "peak_device_bytes": peak, "import_rss_bytes": base_rss}


def child(args) -> int:
    from bench import hf_config_dict

    if args.dtype is None:
        if args.child == "ours":
            import jax

            on_gpu = jax.devices()[0].platform != "cpu"
        else:
            import torch

            on_gpu = torch.cuda.is_available()
        args.dtype = "bfloat16" if on_gpu else "float32"
    cfg_dict = hf_config_dict("quick" if args.quick else args.config, 2 if args.quick else args.layers)
    out = (run_ours if args.child == "ours" else run_hf)(args, cfg_dict)
    times = out.pop("times")
    step_s = statistics.median(times)
    out.update(step_s=round(step_s, 4), tokens_per_s=round(out["tokens"] / step_s, 1), peak_rss_bytes=rss_bytes(),
               layers=cfg_dict["text_config"]["num_hidden_layers"], hidden=cfg_dict["text_config"]["hidden_size"],
               batch=args.batch, image_size=args.image_size, dtype=args.dtype, steps=len(times))
    print(json.dumps(out), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="2b", choices=["2b", "4b", "8b"])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (vision blocks: enough for DeepStack)")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per row, image included")
    ap.add_argument("--image-size", type=int, default=512, help="side of the square image (pixels)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="weights and compute (default: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--quick", action="store_true", help="tiny widths and ~128 tokens: a smoke run")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers + PEFT")
    ap.add_argument("--remat", action="store_true", help="recompute each decoder layer in the backward pass (ours)")
    ap.add_argument("--child", choices=["ours", "hf"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_len, args.image_size, args.steps, args.warmup = 128, 128, 3, 1
    if args.child:
        return child(args)

    results = {}
    # The parent never touches a device: each child owns the whole of it (and its memory high-water mark).
    forwarded = ["--config", args.config, "--layers", str(args.layers), "--seq-len", str(args.seq_len),
                 "--image-size", str(args.image_size), "--batch", str(args.batch), "--steps", str(args.steps),
                 "--warmup", str(args.warmup), *(["--dtype", args.dtype] if args.dtype else []),
                 *(["--quick"] if args.quick else []), *(["--remat"] if args.remat else [])]
    for side in ["ours"] + ([] if args.no_hf else ["hf"]):
        run = subprocess.run([sys.executable, __file__, *forwarded, "--child", side],
                             capture_output=True, text=True, check=False, env=dict(os.environ))
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        line = json.loads(run.stdout.strip().splitlines()[-1])
        results[side] = line
        print(json.dumps(line), flush=True)
    if "hf" in results:
        ours, hf = results["ours"], results["hf"]
        mem = "peak_device_bytes" if ours["peak_device_bytes"] and hf["peak_device_bytes"] else "peak_rss_bytes"
        print(json.dumps({"impl": "ratio", "tokens_per_s_ratio": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
                          "memory": mem, "memory_ratio": round(ours[mem] / hf[mem], 3),
                          "ours_tokens_per_s": ours["tokens_per_s"], "hf_tokens_per_s": hf["tokens_per_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
