#!/usr/bin/env python
"""Benchmark qvl_jax against transformers on the same device, in the same process.

    python scripts/bench.py [--config 2b|4b|8b|30b-a3b] [--layers N] [--model PATH] [--quick] [--no-hf]
                            [--moe-impl auto|scan|ragged|gather|dense] [--hf-only]

Random weights in the real shapes of the chosen config (or real weights with --model). Cases:
text-only decode at batch 1 / 8 / 64, one 1024x1024 image + short prompt (time to first token), and a
4k-token context. One JSON line per case: device, dtype, batch, prompt tokens, image size, prefill
ms, TTFT ms, decode tokens/s (median of repeats after warm-up, synchronised with
block_until_ready), compile seconds (the first call's extra time: a cold compile, or a warm start
from the persistent compilation cache, as the "compilation_cache" field says), peak device memory,
and the fraction of the bandwidth floor (weights + KV bytes read per decode step over the measured
copy bandwidth). When torch and transformers import, the same case runs through transformers'
generate (static cache) on the same device, and the line carries their numbers and our/their ratios.

--quick: a small config and few tokens, a smoke run for CPUs (well under 2 minutes on 2 cores).
--quantize int8|int4: weight-only quantization of the decoder's projections (qvl_jax.modeling.quant)
after the random (or loaded) float weights are made; each line's "rss_bytes" is the process's resident
memory after the case (on CPU: the weights as held, plus caches and compiled programs).
--attention einsum|xla|cudnn: the vision / prefill attention kernel (qvl_jax/attention.py); each line's
"attention" field names the kernel that ran.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SIZES = {  # text_config / vision_config of the released checkpoints (transformers 5 dialect)
    "2b": ({"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936},
           {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "out_hidden_size": 2048,
            "deepstack_visual_indexes": [5, 11, 17]}, True),
    "4b": ({"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936},
           {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "out_hidden_size": 2560,
            "deepstack_visual_indexes": [5, 11, 17]}, True),
    "8b": ({"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936},
           {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
            "deepstack_visual_indexes": [8, 16, 24]}, False),
    # Mixture of experts (qwen3_vl_moe): 128 experts, 8 per token, every layer sparse.
    "30b-a3b": ({"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "num_experts": 128,
                 "num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1,
                 "mlp_only_layers": []},
                {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 2048,
                 "deepstack_visual_indexes": [8, 16, 24]}, False),
    "quick": ({"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8192},
              {"depth": 2, "hidden_size": 128, "intermediate_size": 256, "num_heads": 2, "out_hidden_size": 256,
               "deepstack_visual_indexes": [0]}, True),
}
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 151655, 151656, 151652, 151653


def hf_config_dict(size: str, layers: int | None) -> dict:
    text, vision, tied = copy.deepcopy(SIZES[size])
    if layers:
        text["num_hidden_layers"] = layers
        # at most one DeepStack merger per decoder layer
        vision["deepstack_visual_indexes"] = vision["deepstack_visual_indexes"][:layers]
        vision["depth"] = max(layers, max(vision["deepstack_visual_indexes"]) + 1)
    vocab = text["vocab_size"]
    ids = {"image_token_id": IMAGE_TOKEN, "video_token_id": VIDEO_TOKEN, "vision_start_token_id": VISION_START,
           "vision_end_token_id": VISION_END}
    if vocab < 151936:  # small vocabularies keep the special ids inside
        ids = {k: vocab - 4 + i for i, k in enumerate(ids)}
    text.update(model_type="qwen3_vl_text", hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=262144,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20]
                                 if text["head_dim"] == 128 else [12, 10, 10], "mrope_interleaved": True})
    vision.update(model_type="qwen3_vl_vision", patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                  in_channels=3, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh")
    model_type = "qwen3_vl_moe" if "num_experts" in text else "qwen3_vl"
    text["model_type"], vision["model_type"] = f"{model_type}_text", f"{model_type}_vision"
    return {"model_type": model_type, "tie_word_embeddings": tied, "text_config": text, "vision_config": vision, **ids}


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')}".strip(":")


def peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # host RSS on CPU


def copy_bandwidth() -> float:
    """Bytes/s of a large device copy (read + write counted once each)."""
    n = 256 * 2**20 if jax.devices()[0].platform != "cpu" else 64 * 2**20
    x = jnp.ones((n // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n / min(times)


def rss_bytes() -> int | None:
    """The process's resident memory now (Linux), not its peak: a quantized run's peak is the float
    weights it was made from."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def text_weight_bytes(params, cfg) -> int:
    """Bytes of the language model read per decode step (embedding row reads aside; lm_head once)."""
    lm = params["model"]["language_model"]
    n = sum(x.nbytes for x in jax.tree.leaves(lm["layers"])) + lm["norm"]["weight"][...].nbytes
    head = lm["embed_tokens"]["weight"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]
    # A MoE token reads only its chosen experts (a batch-1 floor; wider batches read more of them).
    idle = cfg.text.idle_expert_params * head[...].dtype.itemsize if cfg.is_moe else 0
    return n + head[...].nbytes - idle


def make_image_inputs(cfg, prompt_len: int, image_size: int | None, batch: int, rng):
    """HF-style inputs: `batch` rows of prompt_len text tokens (plus one image if asked)."""
    vocab = cfg.text.vocab_size
    text_vocab = min(vocab - 8, 150000)
    rows, pix, grids = [], [], []
    for _ in range(batch):
        ids = list(rng.randint(0, text_vocab, size=prompt_len))
        if image_size:
            g = image_size // cfg.vision.patch_size
            grids.append((1, g, g))
            ids = ids[:4] + [cfg.vision_start_token_id] + [cfg.image_token_id] * (g * g // 4) + \
                [cfg.vision_end_token_id] + ids[4:]
            pix.append(rng.uniform(-1, 1, size=(g * g, cfg.vision.patch_dim)).astype(np.float32))
        rows.append(ids)
    out = {"input_ids": np.array(rows, np.int64)}
    if image_size:
        out["pixel_values"] = np.concatenate(pix)
        out["image_grid_thw"] = np.array(grids, np.int64)
    return out


def bench_ours(model, inputs, new_tokens, repeats):
    cold = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, stop_token_ids=[])
    cold = time.perf_counter() - cold
    prefill, decode, total = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, stop_token_ids=[])
        total.append(time.perf_counter() - t)
        prefill.append(out.prefill_s)
        decode.append(out.decode_s)
    warm = statistics.median(total)
    return {"prefill_ms": 1e3 * statistics.median(prefill), "ttft_ms": 1e3 * statistics.median(prefill),
            "decode_tok_s": (new_tokens - 1) * inputs["input_ids"].shape[0] / statistics.median(decode),
            "step_ms": 1e3 * statistics.median(decode) / (new_tokens - 1),
            "compile_s": max(cold - warm, 0.0), "prompt_tokens": int(out.prompt_tokens)}


def bench_hf(hf_model, inputs, new_tokens, repeats, device):
    import torch

    t_in = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
    if "pixel_values" in t_in:
        t_in["pixel_values"] = t_in["pixel_values"].to(hf_model.dtype)
        t_in["mm_token_type_ids"] = (t_in["input_ids"] == hf_model.config.image_token_id).int()

    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        """Called once per generated token, right after that step's forward: the gaps between calls
        are transformers' decode step times, free of generate()'s fixed start-up costs."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            if device != "cpu":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    def run(n):
        clock = StepClock()
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            hf_model.generate(**t_in, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              cache_implementation="static", pad_token_id=0,
                              logits_processor=LogitsProcessorList([clock]))
        return clock.times[0] - start, np.diff(clock.times)

    run(min(new_tokens, 8))  # warm-up
    ttft, steps = [], []
    for _ in range(repeats):
        first, gaps = run(new_tokens)
        ttft.append(first)
        steps.append(statistics.median(gaps))
    batch = inputs["input_ids"].shape[0]
    return {"hf_ttft_ms": 1e3 * statistics.median(ttft), "hf_decode_tok_s": batch / statistics.median(steps)}


def load_hf(cfg_dict, dtype_name):
    try:
        import torch
        from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                                  Qwen3VLMoeForConditionalGeneration)
    except Exception:
        return None, None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    torch.manual_seed(0)
    moe = cfg_dict["model_type"] == "qwen3_vl_moe"
    config_cls, model_cls = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe
                             else (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    model = model_cls(config_cls(**copy.deepcopy(cfg_dict))).to(device, tdtype).eval()
    return model, device


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="2b", choices=[k for k in SIZES if k != "quick"])
    ap.add_argument("--layers", type=int, default=None, help="override the decoder / vision depth (CPU runs)")
    ap.add_argument("--model", default=None, help="real weights: a converted or HF checkpoint directory")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--cases", default="decode1,decode8,decode64,image,long",
                    help="comma list of decode1, decode8, decode64, image, long")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=1024, help="side of the square image case (pixels)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small config and sizes: a smoke run on CPU")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--hf-only", action="store_true",
                    help="transformers alone (a separate process from --no-hf when both do not fit in memory)")
    ap.add_argument("--moe-impl", default="auto", choices=["auto", "scan", "ragged", "gather", "dense"],
                    help="how a MoE model computes its experts (qvl_jax.load's moe_impl=)")
    ap.add_argument("--no-compilation-cache", action="store_true")
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel size (a data x model mesh)")
    ap.add_argument("--dp", type=int, default=None, help="data-parallel size")
    ap.add_argument("--quantize", default=None, choices=["int8", "int4"], help="weight-only quantization")
    ap.add_argument("--attention", default="xla", choices=["xla", "cudnn", "dot_product"],
                    help="attention kernel of vision and prefill (qvl_jax.load's attention=; see qvl_jax/modeling/attention.py)")
    args = ap.parse_args(argv)

    import qvl_jax
    from qvl_jax.modeling import attention
    from qvl_jax.config import Qwen3VLConfig

    xla_dir = None
    if not args.no_compilation_cache and os.environ.get("QVL_JAX_COMPILATION_CACHE", "1") != "0":
        from qvl_jax.cli import cache_dir, enable_compilation_cache

        enable_compilation_cache()
        # Every compile is written (the CLI skips those under 0.5 s), so that "cold" / "warm" below says
        # exactly whether this run compiled anything, however fast the machine compiles.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        xla_dir = cache_dir() / "xla"

    def cache_entries() -> int:
        return sum(1 for _ in xla_dir.iterdir()) if xla_dir is not None and xla_dir.is_dir() else 0
    on_cpu = jax.devices()[0].platform == "cpu"
    dtype_name = args.dtype or ("float32" if on_cpu else "bfloat16")
    dtype = jnp.dtype(dtype_name)
    cases = args.cases.split(",")
    image_size, long_len = args.image_size, 4096
    if args.quick:
        cases = ["decode1", "decode8", "image"]
        args.new_tokens, args.repeats, image_size = 16, 2, 128

    from qvl_jax.cli import parse_mesh

    mesh = parse_mesh(args.dp, args.tp)
    if args.model:
        model = qvl_jax.load(args.model, dtype=dtype_name, mesh=mesh, attention=args.attention,
                             quantize=args.quantize, moe_impl=args.moe_impl)
        cfg_dict = json.loads((Path(args.model) / "config.json").read_text())
    else:
        cfg_dict = hf_config_dict("quick" if args.quick else args.config, args.layers)
        cfg = Qwen3VLConfig.from_hf_dict(cfg_dict)
        # --hf-only: only the config is needed, no weights of ours in memory.
        model = None if args.hf_only else qvl_jax.Model.random(cfg, dtype=dtype)  # random weights, nnx.Rngs(0)
    if model is not None and not args.model:
        model.set_attention(args.attention)
        if cfg.is_moe:
            model.set_moe_impl(args.moe_impl)
        if mesh is not None:
            from qvl_jax.sharding import state_shardings

            model.params = jax.device_put(model.params, state_shardings(model.params, mesh))
            model.mesh = mesh
        if args.quantize:
            model.quantize(args.quantize)
    cfg = cfg if model is None else model.config
    hf_model, hf_device = (None, None) if args.no_hf else load_hf(cfg_dict, dtype_name)
    bandwidth = copy_bandwidth()
    weights = 0 if args.hf_only else text_weight_bytes(model.params, cfg)
    kv_per_token = 2 * cfg.text.num_hidden_layers * cfg.text.num_key_value_heads * cfg.text.head_dim * dtype.itemsize

    rng = np.random.RandomState(0)
    for case in cases:
        batch = {"decode1": 1, "decode8": 8, "decode64": 64}.get(case, 1)
        prompt = long_len if case == "long" else args.prompt_len
        img = image_size if case == "image" else None
        inputs = make_image_inputs(cfg, prompt, img, batch, rng)
        if args.hf_only:
            hf = bench_hf(hf_model, inputs, args.new_tokens, args.repeats, hf_device)
            print(json.dumps({"case": case, "device": "torch:" + hf_device, "dtype": dtype_name, "batch": batch,
                              "layers": cfg.text.num_hidden_layers, **{k: round(v, 3) for k, v in hf.items()}}),
                  flush=True)
            continue
        before = cache_entries()
        ours = bench_ours(model, inputs, args.new_tokens, args.repeats)
        # "cold": the first call compiled and wrote new cache entries; "warm": it wrote none, so every
        # program it needed came from the persistent cache.
        cache_state = "off" if xla_dir is None else ("cold" if cache_entries() > before else "warm")
        context = ours["prompt_tokens"] + args.new_tokens // 2
        floor_s = (weights + batch * context * kv_per_token) / bandwidth
        line = {"case": case, "device": device_name(), "mesh": None if mesh is None else dict(mesh.shape), "dtype": dtype_name, "batch": batch,
                "prompt_tokens": ours["prompt_tokens"], "image_size": img, "new_tokens": args.new_tokens,
                "layers": cfg.text.num_hidden_layers, **{k: round(v, 3) for k, v in ours.items() if k != "prompt_tokens"},
                "bandwidth_floor_fraction": round(floor_s / (ours["step_ms"] / 1e3), 3),
                "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "peak_memory_bytes": peak_memory_bytes(),
                "quantize": args.quantize, "rss_bytes": rss_bytes(),
                "compilation_cache": cache_state, "attention": attention.implementation(args.attention, dtype)}
        if cfg.is_moe:
            line["moe_impl"] = args.moe_impl
        if hf_model is not None:
            hf = bench_hf(hf_model, inputs, args.new_tokens, args.repeats, hf_device)
            line.update({k: round(v, 3) for k, v in hf.items()})
            line["decode_speedup_vs_hf"] = round(ours["decode_tok_s"] / hf["hf_decode_tok_s"], 2)
            line["ttft_speedup_vs_hf"] = round(hf["hf_ttft_ms"] / ours["ttft_ms"], 2)
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
