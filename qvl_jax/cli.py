"""The `qvl-jax` command: generate, serve, batch, finetune, convert, info.

    qvl-jax generate [--model M] [--image FILE ...] [--video PATH ...] --prompt TEXT [sampling flags]
    qvl-jax serve [--model M] [--host H] [--port P] [--api-key KEY] [--max-num-seqs N] [...]
    qvl-jax batch IN.jsonl OUT.jsonl [--model M] [--max-num-seqs N] [--concurrency N] [...]
    qvl-jax finetune [--model M] --data train.jsonl [--eval eval.jsonl] --out DIR [--resume] [flags]
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
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path

from qvl_jax.config import ATTENTION_KERNELS, Qwen3VLConfig
from qvl_jax.errors import InputError, QvlError
from qvl_jax.files import temp_sibling
from qvl_jax.hub import DEFAULT_MODEL, cache_dir, resolve_model

ATTENTION_HELP = ("attention kernel: xla (ours, any backend), cudnn (cuDNN flash attention for vision and prefill "
                  "on a GPU in 16-bit), pallas (the server's paged decode through JAX's Pallas kernel), dot_product "
                  "(the fused path through XLA, for testing)")

__all__ = ["DEFAULT_MODEL", "build_parser", "cache_dir", "enable_compilation_cache", "main", "resolve_model"]


def enable_compilation_cache() -> None:
    """Persistent XLA compilation cache (QVL_JAX_COMPILATION_CACHE=0 turns it off)."""
    if os.environ.get("QVL_JAX_COMPILATION_CACHE", "1") == "0":
        return
    import jax  # lazy: `qvl-jax --help` and the other commands must not pay for JAX

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


def _load_video(path: str, fps: float | None) -> dict:
    """A chat content item for a directory of frame images (sorted by name; frame rate from
    --video-fps) or a video file (needs PyAV; frame rate from the file unless --video-fps)."""
    from qvl_jax.processing.media_io import load_video  # lazy: imports numpy and PIL (CLI start-up)

    video = load_video(path, fps)
    return {"type": "video", "video": video.frames, **({"video_fps": video.fps} if video.fps is not None else {})}


def parse_mesh(dp: int | None, tp: int | None):
    """--dp / --tp -> a ("data", "model") mesh over the visible devices, or None (one device).
    Giving one size derives the other from the device count."""
    if dp is None and tp is None:
        return None
    from qvl_jax.sharding import make_mesh  # lazy: `qvl-jax --help` and the other commands must not pay for JAX

    return make_mesh(dp, tp)


_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty",
             "seed")


def _sampling_kwargs(args) -> dict:
    kw = {name: getattr(args, name) for name in _SAMPLING if getattr(args, name) is not None}
    if kw.get("temperature", 0) > 0 and "seed" not in kw:
        # A fresh seed per run, as transformers and vLLM sample; --json reports it, --seed repeats it.
        kw["seed"] = secrets.randbits(63)
    return kw


_MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                 "video_grid_thw", "mm_token_type_ids")


def _utf8_stdout() -> bool:
    return (sys.stdout.encoding or "").lower().replace("-", "").replace("_", "") == "utf8"


def cmd_generate(args) -> int:
    _check_utf8("--prompt", args.prompt)
    _check_utf8("--system", args.system)
    # lazy, here and in the other commands: `qvl-jax --help` and a bad flag must not pay for JAX
    import qvl_jax
    from qvl_jax.engine.output import OutputStream, TokenTable
    from qvl_jax.engine.speculative import SpeculativeConfig
    from qvl_jax.processing.processor import Processor

    spec = SpeculativeConfig.of(args.speculative_config)  # checked before anything is loaded
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
    media = {k: getattr(args, k) for k in ("min_pixels", "max_pixels", "fps", "num_frames")}
    inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, **media)
    inputs = {k: v for k, v in inputs.items() if k in _MODEL_INPUTS}
    # Inputs are checked (images opened, prompt built) before the weights are loaded: a bad file
    # fails in a second, not after loading a large model.
    model = qvl_jax.load(model_dir, dtype=args.dtype, mesh=mesh, adapter=args.adapter, attention=args.attention,
                         verify=args.verify or None, quantize=args.quantize)
    load_s = time.perf_counter() - t0
    sampling = _sampling_kwargs(args)
    kw = dict(sampling, stop_token_ids=proc.eos_token_ids)
    if spec is not None:
        kw["speculative_config"] = spec
    if args.json or args.no_stream:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **kw)
        tokens = out.tokens[0, : out.lengths[0]].tolist()
        text = proc.decode(tokens, skip_special_tokens=True)
        if args.json:
            print(json.dumps({"model": str(model_dir), "text": text, "tokens": tokens,
                              "prompt_tokens": int(out.prompt_tokens), "new_tokens": len(tokens),
                              "seed": sampling.get("seed"), "load_s": round(load_s, 3),
                              "prefill_s": round(out.prefill_s, 3), "decode_s": round(out.decode_s, 3),
                              **({} if spec is None else {"proposed_tokens": int(out.proposed_tokens[0]),
                                                          "accepted_tokens": int(out.accepted_tokens[0])})},
                             ensure_ascii=not _utf8_stdout()))
        else:
            _text_stdout()
            print(escape_controls(text))
        return 0
    _text_stdout()
    out = OutputStream(TokenTable.of(proc), stop_token_ids=proc.eos_token_ids)  # holds split characters back
    for step in model.stream(**inputs, max_new_tokens=args.max_new_tokens, **kw):
        delta = out.add([int(step[0])])
        if delta:
            sys.stdout.write(escape_controls(delta))
            sys.stdout.flush()
        if out.finish_reason is not None:
            break
    sys.stdout.write(escape_controls(out.finish("length")) + "\n")
    return 0


def _text_stdout() -> None:
    # A terminal that cannot show a character gets an escape rather than a UnicodeEncodeError.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def cmd_serve(args) -> int:
    from qvl_jax.serving.server import run  # lazy: the serve extra (fastapi, uvicorn) and JAX

    enable_compilation_cache()  # a restarted server loads its engine's programs instead of compiling them
    return run(args)


def cmd_batch(args) -> int:
    from qvl_jax.serving.batch import run  # lazy: the serve extra (fastapi, httpx) and JAX

    enable_compilation_cache()
    return run(args)


def cmd_convert(args) -> int:
    from qvl_jax.convert.__main__ import run  # lazy: numpy and safetensors (CLI start-up)

    return run(args)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def cmd_info(args) -> int:
    from qvl_jax.checkpoint import read_manifest, verify_converted  # lazy: `qvl-jax --help` and the other commands must not pay for JAX

    model_dir = resolve_model(args.model)
    cfg = Qwen3VLConfig.from_json_file(model_dir / "config.json")
    manifest = read_manifest(model_dir)
    if args.verify:
        verify_converted(model_dir)
    t, v = cfg.text, cfg.vision
    n = manifest["num_params"]
    kv_per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim
    info = {
        "model": str(model_dir),
        **({"verified": True} if args.verify else {}),
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
    if t.is_moe:
        info["active_parameters"] = n - t.idle_expert_params
        info["text"].update(experts=t.num_experts, experts_per_token=t.num_experts_per_tok,
                            expert_mlp=t.moe_intermediate_size,
                            sparse_layers=[i for i in range(t.num_hidden_layers) if t.is_sparse(i)])
    if args.json:
        print(json.dumps(info))
        return 0
    tx, vx = info["text"], info["vision"]
    rows = [
        ("model", info["model"]),
        *([("verified", "every file's sha256 equals the one recorded at conversion")] if args.verify else []),
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
    if t.is_moe:
        a = info["active_parameters"]
        rows[2:2] = [("active", f"{_count(a)} ({a:,}) per token: {tx['experts_per_token']} of {tx['experts']} "
                                f"experts (MLP {tx['expert_mlp']}) in {len(tx['sparse_layers'])} sparse layers")]
    for key, value in rows:
        print(f"{key:<11} {value}")
    return 0


_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _port(text: str) -> int:
    """--port: a TCP port, 0-65535 (0: one the system picks); argparse reports anything else in one line."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (0-65535)")
    return port


def _positive(flag: str, value, allow_zero: bool = False) -> None:
    if value is not None and not (value >= 0 if allow_zero else value > 0):
        raise InputError(f"{flag} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


def cmd_finetune(args) -> int:
    for flag in ("steps", "epochs", "batch_size", "grad_accum", "lr", "lora_alpha", "max_length"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    for flag in ("lora_rank", "save_every", "eval_every", "warmup_steps", "weight_decay", "max_grad_norm"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag), allow_zero=True)
    for flag in ("lr", "lora_alpha", "epochs", "weight_decay", "max_grad_norm"):
        if getattr(args, flag) is not None and not math.isfinite(getattr(args, flag)):
            raise InputError(f"--{flag.replace('_', '-')} must be a finite number, got {getattr(args, flag)}")
    if args.lora_rank == 0 and (args.lora_alpha is not None or args.lora_targets is not None):
        raise InputError("--lora-alpha and --lora-targets need LoRA (--lora-rank 0 is full fine-tuning)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    import optax  # lazy, with the rest: JAX and the trainer only once the flags are checked

    import qvl_jax
    from qvl_jax.processing.processor import Processor
    from qvl_jax.training import LoraConfig, Trainer
    from qvl_jax.training.data import Batches, check_records, read_jsonl
    from qvl_jax.training.run import eval_loss, train
    from qvl_jax.training.state import TrainCheckpoints

    # The data is read and checked before the model is loaded: a bad record fails in a second.
    records = read_jsonl(args.data)
    eval_records = read_jsonl(args.eval) if args.eval else None
    ckpt_dir = out / "checkpoints"
    final = out / ("adapter" if args.lora_rank else "model")
    have = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if args.resume and not have:
        raise InputError(f"--resume: no training checkpoint in {ckpt_dir}")
    if not args.resume and have:
        raise InputError(f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                         "or choose another --out")
    if not args.resume and not args.force and final.is_dir() and any(final.iterdir()):
        what = "an adapter" if args.lora_rank else "a model"
        raise InputError(f"{final} already holds {what}: pass --force to replace it when this run ends, or choose "
                         "another --out")

    enable_compilation_cache()
    model_dir = resolve_model(args.model)
    proc = Processor.from_pretrained(model_dir)
    # Every record's media decoded and length checked, as its batch will be, before the model loads.
    check_records(records, proc, args.max_length)
    if eval_records:
        check_records(eval_records, proc, args.max_length)
    rows = args.batch_size * args.grad_accum  # HF's meaning: --batch-size rows per micro-batch
    batches = Batches(records, proc, rows, seed=args.seed)
    total = args.steps or max(1, math.ceil((args.epochs or 1.0) * batches.steps_per_epoch))
    model = qvl_jax.load(model_dir, verify=args.verify or None, quantize=args.quantize)
    lr = args.lr if args.lr is not None else (1e-4 if args.lora_rank else 1e-5)
    warmup = args.warmup_steps if args.warmup_steps is not None else round(0.05 * total)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1), 0.0)
    lora = None
    if args.lora_rank:
        targets = [t for t in (args.lora_targets or _LORA_TARGETS).split(",") if t]
        alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
        lora = LoraConfig(r=args.lora_rank, alpha=alpha, target_modules=targets)
    trainer = Trainer(model, optax.adamw(schedule, weight_decay=args.weight_decay), lora=lora,
                      freeze_vision=args.freeze_vision,
                      compute_dtype=None if args.compute_dtype == "float32" else args.compute_dtype,
                      grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm or None, seed=args.seed)
    # Everything that changes the arithmetic of a step or the data order: a resume must match it.
    settings = {"--lora-rank": args.lora_rank, "--lora-alpha": None if lora is None else lora.alpha,
                "--lora-targets": None if lora is None else sorted(lora.target_modules),
                "--freeze-vision": args.freeze_vision, "--lr": lr, "--warmup-steps": warmup,
                "--weight-decay": args.weight_decay, "--max-grad-norm": args.max_grad_norm,
                "--steps/--epochs": total, "--batch-size": args.batch_size, "--grad-accum": args.grad_accum,
                "--seed": args.seed, "--compute-dtype": args.compute_dtype, "records in --data": len(records)}
    with TrainCheckpoints(ckpt_dir) as ckpt:
        if args.resume:
            saved = ckpt.read_meta().get("settings", {})  # the newest step whose metadata reads
            for key, value in settings.items():
                if key in saved and saved[key] != value:
                    raise InputError(f"--resume: the run in {ckpt_dir} has {key} {saved[key]}, this one {value}; "
                                     "resume with the same settings")
            batches.position = int(ckpt.restore(trainer)["data_position"])
            for line in ckpt.skipped:
                print(f"warning: {line}; went back to an older step", file=sys.stderr)
        meta = {"settings": settings, "model": str(model_dir)}

        def write_final():
            if trainer.lora is not None:
                trainer.save_adapter(final)  # written whole beside, then renamed over
            else:
                _replace_dir(final, trainer.model.save_pretrained)

        evaluate = (lambda: eval_loss(trainer, eval_records, proc, args.batch_size)) if eval_records else None
        summary = train(trainer, batches, total, ckpt, meta, write_final, schedule=schedule,
                        save_every=args.save_every, eval_every=args.eval_every, evaluate=evaluate,
                        resumed=args.resume)
    summary["adapter" if trainer.lora is not None else "model"] = str(final)
    print(json.dumps(summary, allow_nan=False))
    return 0


def _replace_dir(final: Path, write) -> None:
    """`write(directory)` into a new directory, then put it in place of `final` (whose old contents
    go only once the new ones are whole)."""
    if not final.exists():
        write(final)
        return
    tmp = temp_sibling(final)
    try:
        write(tmp / final.name)
        os.rename(final, tmp / "old")
        os.rename(tmp / final.name, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def _quantize_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"],
                        help="weight-only quantization of the decoder's projections with qwix (int8 per output "
                             "channel, int4 in groups of 128); vision tower, norms and embedding keep --dtype")


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _verify_flag(p, text: str | None = None) -> None:
    p.add_argument("--verify", action="store_true", help=text or (
        "recompute the sha256 of every file of the converted checkpoint on this load (without it: only on the "
        "first load after the files were converted, copied or changed)"))


def _json_object(text: str) -> dict:
    """--speculative-config: a JSON object; argparse reports anything else in one line."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def _speculative_flag(p) -> None:
    p.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                   help='prompt-lookup speculative decoding, as vLLM takes it: \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 3}\' (greedy output unchanged; '
                        'not with penalties or logprobs)')


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. `argv` only decides whether the convert subcommand's own arguments are
    built: they live in qvl_jax.convert, whose import pulls in numpy, so other commands skip it."""
    fmt = {"formatter_class": _HelpFormatter}
    parser = argparse.ArgumentParser(prog="qvl-jax", description="Qwen3-VL inference in JAX", **fmt)
    _debug_flag(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,serve,batch,finetune,convert,info}")

    g = sub.add_parser("generate", help="answer a prompt about images / videos", **fmt)
    g.add_argument("--model", default=None, help=f"converted dir, HF dir, hub id or {DEFAULT_MODEL} "
                                                  f"(default: {DEFAULT_MODEL}, with a notice)")
    g.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to apply (e.g. finetune's OUT/adapter)")
    g.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    g.add_argument("--video", action="append", default=[],
                   help="video file (needs PyAV) or directory of frame images (repeatable)")
    g.add_argument("--video-fps", type=float, default=None,
                   help="source frame rate of --video (default: the file's own; 24 for frame directories)")
    g.add_argument("--min-pixels", type=int, default=None, help="resize images to at least this many pixels")
    g.add_argument("--max-pixels", type=int, default=None, help="resize images to at most this many pixels")
    g.add_argument("--fps", type=float, default=None, help="sample --video at this many frames per second")
    g.add_argument("--num-frames", type=int, default=None,
                   help="sample this many frames of --video (even; instead of --fps)")
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
    g.add_argument("--attention", default="xla", choices=list(ATTENTION_KERNELS), help=ATTENTION_HELP)
    _quantize_flag(g)
    g.add_argument("--tp", type=int, default=None, help="tensor-parallel size: shard heads/MLP/vocab over N devices")
    g.add_argument("--dp", type=int, default=None, help="data-parallel size: shard the batch over N devices")
    _verify_flag(g)
    _speculative_flag(g)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--no-stream", action="store_true", help="print the answer once complete")
    _debug_flag(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat completions, completions)", **fmt)
    s.add_argument("--model", default=None, help=f"converted dir, HF dir, hub id or {DEFAULT_MODEL} "
                                                  f"(default: {DEFAULT_MODEL}, with a notice)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=_port, default=8000, help="port to listen on (0-65535; 0: one the system picks)")
    s.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    s.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 requests")
    s.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded at once")
    s.add_argument("--max-model-len", type=int, default=None, help="longest prompt + answer (default: the "
                                                                   "model's context, at most 8192)")
    s.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="prompt tokens prefilled per scheduler step, across requests (chunked prefill)")
    s.add_argument("--decode-steps", type=int, default=None,
                   help="decode steps per jitted loop between scheduler visits: more saves host round trips, "
                        "fewer lets new requests in sooner (default: 1 on the CPU, 8 elsewhere)")
    s.add_argument("--packed-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU, bfloat16: a packed copy of the decoder's and lm_head's weights for the engine's "
                        "own product kernel (at 2B widths prompt chunks ~1.6x faster with AMX, decode steps "
                        "~1.6x with AVX512_BF16; those weights' memory once more). Default: on where the CPU "
                        "has AMX or AVX512_BF16 and the copy fits in half the "
                        "host memory left beside the KV pool")
    s.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="memory for the KV cache pool, e.g. 4GiB, 512MiB or bytes (default: half the free "
                        "device memory at start, at most 4GiB on the CPU)")
    s.add_argument("--kv-cache-memory-fraction", type=float, default=0.5, metavar="F",
                   help="without --kv-cache-memory: the fraction of free device memory at start the pool takes")
    s.add_argument("--max-pending", type=int, default=None,
                   help="requests admitted at once, queued ones included; more get 503 (default: 8 x --max-num-seqs)")
    s.add_argument("--allowed-local-media-path", default=None,
                   help="directory from which image/video paths and file:// URLs may be read (default: none)")
    s.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image/video URLs")
    s.add_argument("--max-media-bytes", type=int, default=20 << 20, help="largest encoded image or video")
    s.add_argument("--media-timeout", type=float, default=10.0, help="seconds for one remote media fetch")
    s.add_argument("--max-body-bytes", type=int, default=64 << 20, help="largest request body (413 beyond)")
    s.add_argument("--special-tokens-in-messages", action="store_true",
                   help="let typed special tokens (<|im_start|>) in messages become control tokens, as "
                        "transformers does (default: plain text)")
    s.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help="leave a request's tools out of the prompt when its tool_choice is none (default: "
                        "rendered, as vLLM does; no tool call is parsed either way)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let requests in flight finish before cancelling them")
    s.add_argument("--warm-up", default="full", choices=["full", "requests", "none"],
                   help="before /health says ready: full compiles every engine program greedy, default-sampled and "
                        "constrained (structured outputs, forced tool calls) requests meet (chunk lengths, row "
                        "counts, image sizes); requests runs one text and one "
                        "image prompt; none starts at once and compiles on first use")
    s.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="cast params on load (absent: as stored)")
    s.add_argument("--attention", default="xla", choices=list(ATTENTION_KERNELS), help=ATTENTION_HELP)
    _verify_flag(s)
    _quantize_flag(s)
    _speculative_flag(s)
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _debug_flag(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("batch", help="run an OpenAI batch file (JSONL) through the engine; resumable", **fmt)
    b.add_argument("input", help='requests, one a line: {"custom_id", "method": "POST", "url": '
                                 '"/v1/chat/completions", "body": {...}}')
    b.add_argument("output", help="results, one a line (OpenAI's batch output); a rerun skips ids already there")
    b.add_argument("--model", default=None, help=f"converted dir, HF dir, hub id or {DEFAULT_MODEL} "
                                                  f"(default: {DEFAULT_MODEL}, with a notice)")
    b.add_argument("--served-model-name", default=None, help="the model name bodies may send (default: --model)")
    b.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded at once")
    b.add_argument("--max-model-len", type=int, default=None, help="longest prompt + answer (default: the "
                                                                   "model's context, at most 8192)")
    b.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight at once (default: 2 x --max-num-seqs)")
    b.add_argument("--allowed-local-media-path", default=None,
                   help="directory from which image/video paths and file:// URLs may be read (default: none)")
    b.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image/video URLs")
    b.add_argument("--max-media-bytes", type=int, default=20 << 20, help="largest encoded image or video")
    b.add_argument("--media-timeout", type=float, default=10.0, help="seconds for one remote media fetch")
    b.add_argument("--special-tokens-in-messages", action="store_true",
                   help="let typed special tokens in messages become control tokens (as serve's flag)")
    b.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="cast params on load (absent: as stored)")
    b.add_argument("--attention", default="xla", choices=list(ATTENTION_KERNELS), help=ATTENTION_HELP)
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _debug_flag(b)
    b.set_defaults(func=cmd_batch)

    f = sub.add_parser("finetune", help="fine-tune on chat JSONL (LoRA or full)", **fmt)
    f.add_argument("--model", default=DEFAULT_MODEL, help="converted dir, HF dir, hub id or tiny-random")
    f.add_argument("--data", required=True, help='training JSONL: one {"messages": [...]} per line in the HF chat '
                                                 "format; image / video paths relative to the file")
    f.add_argument("--eval", default=None, help="evaluation JSONL (same format): loss at the end and every --eval-every steps")
    f.add_argument("--eval-every", type=int, default=0, help="eval loss every N steps (0: only at the end) (default: %(default)s)")
    f.add_argument("--out", required=True,
                   help="output directory: OUT/adapter (or OUT/model when --lora-rank 0) and OUT/checkpoints")
    f.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    f.add_argument("--force", action="store_true", help="replace an adapter (or model) already in OUT")
    f.add_argument("--lora-rank", type=int, default=16, help="LoRA rank; 0 = full fine-tuning")
    f.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    f.add_argument("--lora-targets", default=None, help=f"comma-separated module names (default: {_LORA_TARGETS})")
    f.add_argument("--freeze-vision", action="store_true", help="no training of the vision tower")
    f.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 1e-4 with LoRA, 1e-5 for full fine-tuning)")
    f.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up from 0, then cosine decay to 0 (default: 5%% of the steps)")
    f.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)s)")
    f.add_argument("--max-grad-norm", type=float, default=1.0, help="global-norm gradient clipping (0: off)")
    length = f.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=None,
                        help="passes over --data, each ceil(records / rows per step) steps (default: 1)")
    f.add_argument("--batch-size", type=int, default=4, help="conversations per micro-batch")
    f.add_argument("--max-length", type=int, default=4096,
                   help="longest record in tokens (its images' included); a longer one is refused before training")
    f.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (a step sees batch-size x grad-accum conversations)")
    f.add_argument("--seed", type=int, default=0, help="data order and LoRA initialisation (default: %(default)s)")
    f.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    f.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="matmul dtype over float32 master weights")
    _verify_flag(f)
    _quantize_flag(f)  # QLoRA: LoRA over quantized frozen weights (full fine-tuning refuses them)
    _debug_flag(f)
    f.set_defaults(func=cmd_finetune)

    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint", **fmt)
    if _command(sys.argv[1:] if argv is None else argv) == "convert":
        from qvl_jax.convert.__main__ import build_parser as convert_parser  # lazy: only for `convert`

        convert_parser(c)
    _debug_flag(c)
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="config summary, parameter count, memory estimate", **fmt)
    i.add_argument("--model", default=DEFAULT_MODEL, help="converted dir, HF dir, hub id or tiny-random")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _verify_flag(i, "check every file of the converted checkpoint against the sha256 recorded at conversion")
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
