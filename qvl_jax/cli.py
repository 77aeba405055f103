"""The `qvl-jax` command: generate, convert, info.

    qvl-jax generate [--model M] [--image FILE ...] [--video PATH ...] --prompt TEXT [sampling flags]
    qvl-jax convert HF_DIR OUT_DIR [--dtype ...] [--force]
    qvl-jax info [--model M] [--json]

`--model` takes a converted qvl_jax directory, a Hugging Face checkpoint directory (converted once
into the cache on first use), a hub id such as Qwen/Qwen3-VL-2B-Instruct (downloaded with
huggingface_hub when the network allows), or `tiny-random`: a small random checkpoint built locally,
the default, so that the whole path runs offline (its answers are random text). See qvl_jax/hub.py.

Errors print one line (`error: ...`) and exit with status 2; Ctrl-C exits with 130; `--debug`
(before or after the subcommand) shows the traceback instead. Nothing heavy (JAX, numpy) is imported
until a command runs, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from qvl_jax.errors import InputError, QvlError
from qvl_jax.hub import DEFAULT_MODEL, cache_dir, resolve_model

__all__ = ["DEFAULT_MODEL", "build_parser", "cache_dir", "enable_compilation_cache", "main", "resolve_model"]


def enable_compilation_cache() -> None:
    """Persistent XLA compilation cache (QVL_JAX_COMPILATION_CACHE=0 turns it off)."""
    if os.environ.get("QVL_JAX_COMPILATION_CACHE", "1") == "0":
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# C0 and C1 control characters except newline and tab, DEL, and lone surrogates: a model's output must
# not move the cursor, clear the screen or retitle the terminal.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def escape_controls(text: str) -> str:
    """`text` with every control character other than newline and tab written as a Python escape."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)


def _check_utf8(flag: str, text: str | None) -> None:
    # argv bytes that are not UTF-8 arrive as lone surrogates (surrogateescape)
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start:e.end].encode("utf-8", "surrogateescape")
        raise InputError(f"{flag} is not valid UTF-8 (bytes {raw!r} at character {e.start})") from None


_FRAME_HINT = "it must hold only the video's frame images"


def _load_frame_dir(p) -> list:
    """Frames of a frame directory, sorted by name. Every entry but hidden files must be an image of
    sane size: a stray file or folder is an error, never skipped, and so is a frame past PIL's
    decompression-bomb limit (its warning too: a video multiplies one huge frame by its length)."""
    import warnings

    from PIL import Image

    frames = []
    for f in sorted(e for e in p.iterdir() if not e.name.startswith(".")):
        if not f.is_file():
            raise InputError(f"video directory {p} holds {f.name!r}, which is not a file: {_FRAME_HINT}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(f) as image:
                    frames.append(image.convert("RGB"))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise InputError(f"frame {f.name!r} in {p} is too large: {' '.join(str(e).split())}") from None
            except (OSError, SyntaxError, ValueError) as e:
                reason = " ".join(str(e).split()) or type(e).__name__
                raise InputError(f"video directory {p} holds {f.name!r}, which is not a readable image "
                                 f"({reason}): {_FRAME_HINT}") from None
    if not frames:
        raise InputError(f"video directory {p} holds no frame images")
    return frames


def _load_video(path: str, fps: float | None) -> dict:
    """A chat content item for a directory of frame images (sorted by name; frame rate from
    --video-fps) or a video file (needs PyAV; frame rate from the file unless --video-fps)."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        return {"type": "video", "video": _load_frame_dir(p), **({"video_fps": fps} if fps is not None else {})}
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
    except Exception as e:  # PyAV's errors have no common base: any failure here is the file's
        raise InputError(f"cannot decode video {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    rate = fps if fps is not None else rate
    return {"type": "video", "video": frames, **({"video_fps": rate} if rate is not None else {})}


def parse_mesh(dp: int | None, tp: int | None):
    """--dp / --tp -> a ("data", "model") mesh over the visible devices, or None (one device).
    Giving one size derives the other from the device count."""
    if dp is None and tp is None:
        return None
    from qvl_jax.sharding import make_mesh

    return make_mesh(dp, tp)


_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty",
             "seed")


def _sampling_kwargs(args) -> dict:
    kw = {name: getattr(args, name) for name in _SAMPLING if getattr(args, name) is not None}
    if kw.get("temperature", 0) > 0 and "seed" not in kw:
        import secrets

        # A fresh seed per run, as transformers and vLLM sample; --json reports it, --seed repeats it.
        kw["seed"] = secrets.randbits(63)
    return kw


_MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                 "video_grid_thw", "mm_token_type_ids")


def _utf8_stdout() -> bool:
    return (sys.stdout.encoding or "").lower().replace("-", "").replace("_", "") == "utf8"


def cmd_generate(args) -> int:
    import json
    import time

    _check_utf8("--prompt", args.prompt)
    _check_utf8("--system", args.system)
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
    sampling = _sampling_kwargs(args)
    kw = dict(sampling, stop_token_ids=proc.eos_token_ids)
    if args.json or args.no_stream:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **kw)
        tokens = out.tokens[0, : out.lengths[0]].tolist()
        text = proc.decode(tokens, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"model": str(model_dir), "text": text, "tokens": tokens,
                              "prompt_tokens": int(out.prompt_tokens), "new_tokens": len(tokens),
                              "seed": sampling.get("seed"), "load_s": round(load_s, 3),
                              "prefill_s": round(out.prefill_s, 3), "decode_s": round(out.decode_s, 3)},
                             ensure_ascii=not _utf8_stdout()))
        else:
            _text_stdout()
            print(escape_controls(text))
        return 0
    _text_stdout()
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
            sys.stdout.write(escape_controls(text[len(shown):]))
            sys.stdout.flush()
            shown = text
    sys.stdout.write(escape_controls(proc.decode(tokens, skip_special_tokens=True)[len(shown):]) + "\n")
    return 0


def _text_stdout() -> None:
    # A terminal that cannot show a character gets an escape rather than a UnicodeEncodeError.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def cmd_convert(args) -> int:
    from qvl_jax.convert.__main__ import run

    return run(args)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def cmd_info(args) -> int:
    import json

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
        return 0
    tx, vx = info["text"], info["vision"]
    rows = [
        ("model", info["model"]),
        ("parameters", (f"{_count(n)} ({n:,}), stored as {info['stored_dtype']} "
                        f"({info['stored_bytes'] / 2**20:,.1f} MiB)")),
        ("weights", f"{info['weights_bf16_gib']} GiB in bfloat16, {info['weights_f32_gib']} GiB in float32"),
        ("KV cache", f"{info['kv_cache_bf16_mib_per_1k_tokens']} MiB per 1024 tokens (bfloat16)"),
        ("text", (f"{tx['layers']} layers, hidden {tx['hidden']}, {tx['heads']} heads ({tx['kv_heads']} KV, "
                  f"head_dim {tx['head_dim']}), MLP {tx['mlp']}, vocab {tx['vocab']:,}, context {tx['context']:,}")),
        ("", f"MRoPE section {tx['mrope_section']}, rope_theta {tx['rope_theta']:g}, "
             + ("tied embeddings" if tx["tied_embeddings"] else "separate lm_head")),
        ("vision", (f"{vx['blocks']} blocks, hidden {vx['hidden']}, {vx['heads']} heads, patch {vx['patch']}, "
                    f"merge {vx['merge']}x{vx['merge']}, DeepStack after blocks {vx['deepstack_layers']}")),
    ]
    for key, value in rows:
        print(f"{key:<11} {value}")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" where there is a default worth showing (not None, False or empty)."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _debug_flag(parser: argparse.ArgumentParser, top: bool = False) -> None:
    # After the subcommand too; SUPPRESS there, so the subparser does not reset a --debug given before it.
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. `argv` only decides whether the convert subcommand's own arguments are
    built: they live in qvl_jax.convert, whose import pulls in numpy, so other commands skip it."""
    fmt = {"formatter_class": _HelpFormatter}
    parser = argparse.ArgumentParser(prog="qvl-jax", description="Qwen3-VL inference in JAX", **fmt)
    _debug_flag(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,convert,info}")

    g = sub.add_parser("generate", help="answer a prompt about images / videos", **fmt)
    g.add_argument("--model", default=None, help=f"converted dir, HF dir, hub id or {DEFAULT_MODEL} "
                                                  f"(default: {DEFAULT_MODEL}, with a notice)")
    g.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    g.add_argument("--video", action="append", default=[],
                   help="video file (needs PyAV) or directory of frame images (repeatable)")
    g.add_argument("--video-fps", type=float, default=None,
                   help="source frame rate of --video (default: the file's own; 24 for frame directories)")
    g.add_argument("--prompt", required=True, help="the user's question")
    g.add_argument("--system", default=None, help="system message")
    g.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=None, help="0 or absent: greedy")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 or absent: off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (absent: off)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=None, help="transformers' (1 or absent: off)")
    g.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI's (0 or absent: off)")
    g.add_argument("--presence-penalty", type=float, default=None, help="OpenAI's (0 or absent: off)")
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed, 0 <= seed < 2**64 (absent: a fresh random one, shown by --json)")
    g.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="cast params on load (absent: as stored)")
    g.add_argument("--tp", type=int, default=None, help="tensor-parallel size: shard heads/MLP/vocab over N devices")
    g.add_argument("--dp", type=int, default=None, help="data-parallel size: shard the batch over N devices")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--no-stream", action="store_true", help="print the answer once complete")
    _debug_flag(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint", **fmt)
    if _command(sys.argv[1:] if argv is None else argv) == "convert":
        from qvl_jax.convert.__main__ import build_parser as convert_parser

        convert_parser(c)
    _debug_flag(c)
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="config summary, parameter count, memory estimate", **fmt)
    i.add_argument("--model", default=DEFAULT_MODEL, help="converted dir, HF dir, hub id or tiny-random")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _debug_flag(i)
    i.set_defaults(func=cmd_info)
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        debug = args.debug
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except QvlError as e:
        if debug:
            raise
        return _fail(str(e))
    except PermissionError as e:
        if debug:
            raise
        return _fail(f"permission denied: {e.filename or e}")
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
