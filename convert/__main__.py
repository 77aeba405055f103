"""`python -m qvl_jax.convert HF_DIR OUT_DIR`: convert a Hugging Face Qwen3-VL checkpoint once."""

from __future__ import annotations

import argparse
import json
import sys
import time

from qvl_jax.convert.core import MANIFEST_FILE, convert_checkpoint
from qvl_jax.errors import QvlError


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m qvl_jax.convert", description=__doc__)
    parser.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("out_dir", help="output directory (must not exist unless --force)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                        help="dtype of the stored params (auto: keep the checkpoint's)")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier conversion at OUT_DIR (never any other directory or file)")
    return parser


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        out = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, force=args.force)
    except QvlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the partial output is already removed
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    print(f"converted {args.hf_dir} -> {out}: {manifest['num_params'] / 1e6:.1f}M params, "
          f"{manifest['params_bytes'] / 2**20:.1f} MiB ({manifest['dtype']}) in {time.perf_counter() - start:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
