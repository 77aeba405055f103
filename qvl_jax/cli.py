"""The `qvl-jax` command: generate, convert, info.

    qvl-jax generate [--model M] [--image FILE ...] [--video PATH ...] --prompt TEXT [sampling flags]
    qvl-jax convert HF_DIR OUT_DIR [--dtype ...] [--force]
    qvl-jax info [--model M]

`--model` takes a converted qvl_jax directory, a Hugging Face checkpoint directory (converted once
into the cache on first use), a hub id such as Qwen/Qwen3-VL-2B-Instruct (downloaded with
huggingface_hub when the network allows), or `tiny-random`: a small random checkpoint built locally,
the default, so that the whole path runs offline (its answers are random text).

Errors print one line (`error: ...`) and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from qvl_jax.errors import CheckpointError, InputError, QvlError

DEFAULT_MODEL = "tiny-random"


def cache_dir() -> Path:
    return Path(os.environ.get("QVL_JAX_CACHE", Path.home() / ".cache" / "qvl_jax"))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def enable_compilation_cache() -> None:
    """Persistent XLA compilation cache (QVL_JAX_COMPILATION_CACHE=0 turns it off)."""
    if os.environ.get("QVL_JAX_COMPILATION_CACHE", "1") == "0":
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _converted_from_hf(hf_dir: Path) -> Path:
    """Converts an HF checkpoint into the cache once; later calls reuse it (keyed by path and mtimes).
    A cached conversion this version cannot read (another params format, a broken manifest) is
    converted again in its place: the cache is ours to rebuild."""
    from qvl_jax.convert import convert_checkpoint
    from qvl_jax.checkpoint import read_manifest

    stamp = "|".join(f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}"
                     for p in sorted(hf_dir.glob("*")) if p.suffix in (".json", ".safetensors"))
    key = hashlib.sha256(f"{hf_dir.resolve()}|{stamp}".encode()).hexdigest()[:16]
    out = cache_dir() / "converted" / f"{hf_dir.name}-{key}"
    try:
        read_manifest(out)
    except CheckpointError as e:
        stale = out.exists()
        _log(f"converting {hf_dir} into {out} (once)" + (f"; the cached one is unusable: {e}" if stale else "") + "...")
        convert_checkpoint(hf_dir, out, force=stale)
    return out


def resolve_model(spec: str | None) -> Path:
    """A loadable (converted) model directory for --model."""
    from qvl_jax.checkpoint import is_converted

    if spec in (None, DEFAULT_MODEL):
        from qvl_jax.tiny import TINY_NAME, write_tiny_checkpoint

        hf = cache_dir() / TINY_NAME
        if spec is None:
            _log(f"*** no --model given: using the built-in {TINY_NAME} model (random weights, random text) ***")
        if not (hf / "config.json").is_file():
            _log(f"building the {TINY_NAME} checkpoint in {hf}...")
            write_tiny_checkpoint(hf)
        return _converted_from_hf(hf)
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_converted(path):
            return path
        if (path / "config.json").is_file():
            return _converted_from_hf(path)
        raise CheckpointError(f"{path} is neither a converted qvl_jax directory nor a Hugging Face checkpoint")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _converted_from_hf(_download(spec))
    raise CheckpointError(f"no model directory {spec!r} (and it does not look like a hub id such as Qwen/Qwen3-VL-2B-Instruct)")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        _log(f"downloading {repo_id}...")
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as e:  # offline, unknown repo, no access: one line either way
        raise CheckpointError(f"cannot download {repo_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from None


def _load_video(path: str, fps: float | None) -> dict:
    """A chat content item for a directory of frame images (sorted by name; frame rate from
    --video-fps) or a video file (needs PyAV; frame rate from the file)."""
    from PIL import Image

    p = Path(path)
    if p.is_dir():
        frames = [Image.open(f).convert("RGB") for f in sorted(p.iterdir())
                  if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp")]
        if not frames:
            raise InputError(f"video directory {p} holds no frame images")
        return {"type": "video", "video": frames, **({"video_fps": fps} if fps else {})}
    if not p.is_file():
        raise InputError(f"no video file or frame directory {p}")
    try:
        import av
    except ImportError:
        raise InputError(f"reading {p.name} needs PyAV: pip install 'qvl_jax[video]' (or pass a directory of frames)"
                         ) from None
    try:
        with av.open(str(p)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            frames = [f.to_image() for f in container.decode(video=0)]
    except Exception as e:
        raise InputError(f"cannot decode video {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return {"type": "video", "video": frames, **({"video_fps": fps or rate} if (fps or rate) else {})}


def parse_mesh(dp: int | None, tp: int | None):
    """--dp / --tp -> a ("data", "model") mesh over the visible devices, or None (one device).
    Giving one size derives the other from the device count."""
    if dp is None and tp is None:
        return None
    from qvl_jax.sharding import make_mesh

    return make_mesh(dp, tp)


def _sampling_kwargs(args) -> dict:
    kw = {}
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                 "presence_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    return kw


def cmd_generate(args) -> int:
    import qvl_jax
    from qvl_jax.processing.processor import Processor

    enable_compilation_cache()
    t0 = time.perf_counter()
    model_dir = resolve_model(args.model)
    mesh = parse_mesh(args.dp, args.tp)
    proc = Processor.from_pretrained(model_dir)
    content = [{"type": "image", "image": f} for f in args.image]
    content += [_load_video(v, args.video_fps) for v in args.video]
    content.append({"type": "text", "text": args.prompt})
    messages = ([{"role": "system", "content": [{"type": "text", "text": args.system}]}] if args.system else [])
    messages.append({"role": "user", "content": content})
    inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    inputs = {k: v for k, v in inputs.items() if k in _MODEL_INPUTS}
    # Inputs are checked (images opened, prompt built) before the weights are loaded: a bad file
    # fails in a second, not after loading a large model.
    model = qvl_jax.load(model_dir, dtype=args.dtype, mesh=mesh)
    load_s = time.perf_counter() - t0
    kw = dict(_sampling_kwargs(args), stop_token_ids=proc.eos_token_ids)
    if args.json or args.no_stream:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **kw)
        tokens = out.tokens[0, : out.lengths[0]].tolist()
        text = proc.decode(tokens, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"model": str(model_dir), "text": text, "tokens": tokens,
                              "prompt_tokens": int(out.prompt_tokens), "new_tokens": len(tokens),
                              "load_s": round(load_s, 3), "prefill_s": round(out.prefill_s, 3),
                              "decode_s": round(out.decode_s, 3)}, ensure_ascii=False))
        else:
            print(text)
        return 0
    tokens: list[int] = []
    shown = ""
    stops = set(proc.eos_token_ids)
    for step in model.stream(**inputs, max_new_tokens=args.max_new_tokens, **kw):
        tok = int(step[0])
        if tok in stops:
            break
        tokens.append(tok)
        text = proc.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(proc.decode(tokens, skip_special_tokens=True)[len(shown):] + "\n")
    return 0


_MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                 "video_grid_thw", "mm_token_type_ids")


def cmd_convert(args) -> int:
    from qvl_jax.convert.__main__ import run

    return run(args)


def cmd_info(args) -> int:
    from qvl_jax.checkpoint import read_manifest
    from qvl_jax.config import Qwen3VLConfig

    model_dir = resolve_model(args.model)
    cfg = Qwen3VLConfig.from_json_file(model_dir / "config.json")
    manifest = read_manifest(model_dir)
    t, v = cfg.text, cfg.vision
    n = manifest["num_params"]
    kv_per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim
    info = {
        "model": str(model_dir),
        "parameters": n,
        "stored_dtype": manifest["dtype"],
        "stored_bytes": manifest["params_bytes"],
        "weights_bf16_gib": round(n * 2 / 2**30, 3),
        "weights_f32_gib": round(n * 4 / 2**30, 3),
        "kv_cache_bf16_mib_per_1k_tokens": round(kv_per_token * 2 * 1024 / 2**20, 2),
        "text": {"layers": t.num_hidden_layers, "hidden": t.hidden_size, "heads": t.num_attention_heads,
                 "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim, "mlp": t.intermediate_size,
                 "vocab": t.vocab_size, "mrope_section": list(t.mrope_section), "rope_theta": t.rope_theta,
                 "tied_embeddings": cfg.tie_word_embeddings, "context": t.max_position_embeddings},
        "vision": {"blocks": v.depth, "hidden": v.hidden_size, "heads": v.num_heads, "patch": v.patch_size,
                   "merge": v.spatial_merge_size, "deepstack_layers": list(v.deepstack_visual_indexes)},
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>34}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qvl-jax", description="Qwen3-VL inference in JAX")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt about images / videos")
    g.add_argument("--model", default=None, help=f"model dir, HF dir, hub id or {DEFAULT_MODEL} (default)")
    g.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    g.add_argument("--video", action="append", default=[], help="video file (needs PyAV) or frame directory")
    g.add_argument("--video-fps", type=float, default=None,
                   help="frame rate of --video frame directories (files carry their own)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", default=None, help="system message")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=None, help="0 or absent: greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="cast params on load (default: as stored)")
    g.add_argument("--tp", type=int, default=None, help="tensor-parallel size: shard heads/MLP/vocab over N devices")
    g.add_argument("--dp", type=int, default=None, help="data-parallel size: shard the batch over N devices")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--no-stream", action="store_true", help="print the answer once complete")
    g.set_defaults(func=cmd_generate)

    from qvl_jax.convert.__main__ import build_parser as convert_parser

    c = convert_parser(sub.add_parser("convert", help="convert a Hugging Face checkpoint"))
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="config summary, parameter count, memory estimate")
    i.add_argument("--model", default=DEFAULT_MODEL)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QvlError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
