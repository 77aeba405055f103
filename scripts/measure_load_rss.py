"""Peak host memory (RSS) of `qvl_jax.load(HF_DIR)` against the checkpoint's size.

Writes a random Hugging Face checkpoint at Qwen3-VL-2B widths with few layers (--layers decoder
layers, --vision-blocks vision blocks, the 151936-token tied embedding; bfloat16 like the released
checkpoint) into a temporary directory, then measures each way of loading it in a fresh subprocess
on the CPU backend, with a fresh cache ($QVL_JAX_CACHE in the same temporary directory):

  first       qvl_jax.load(HF_DIR): converts into the cache (tensor at a time), then reads the
              conversion memory-mapped, one tensor at a time
  cached      qvl_jax.load(HF_DIR) again: the cached conversion only
  in-memory   qvl_jax.checkpoint.load_state(HF_DIR): the whole model converted in host memory
              first (what load did before it went through the cache), for comparison

Each prints ru_maxrss (peak RSS) after importing jax and qvl_jax and starting the backend
(baseline), after the load (peak), and the loaded params' bytes. On the CPU backend the loaded params
are themselves host memory, so `over = peak - baseline - params` is what the load itself held beyond
the model it returns; compare it with the largest tensor and with the checkpoint. ru_maxrss counts
the file pages a memory map has touched (clean page cache the kernel can drop) as well as anonymous
memory, so each line also gives the peak of RssAnon alone, sampled every millisecond.

    python scripts/measure_load_rss.py                              # 2 decoder layers, 2 vision blocks
    python scripts/measure_load_rss.py --layers 4 --vision-blocks 4 --dtype float32
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("first", "cached", "in-memory")


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class _AnonPeak:
    """The largest RssAnon (anonymous memory: not the file pages a memory map touched, which the
    kernel can drop) seen by a thread sampling /proc/self/status every millisecond: a lower bound."""

    def __init__(self):
        import threading

        self.peak = _status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _status("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status("RssAnon"))


def child(mode: str, hf_dir: str) -> None:
    import jax

    import qvl_jax
    from qvl_jax.checkpoint import load_state

    jax.devices()  # the backend's own memory belongs to the baseline
    base, base_anon = _rss(), _status("RssAnon")
    sampler = _AnonPeak()
    if mode == "in-memory":
        _, _, params = load_state(hf_dir)
    else:
        params = qvl_jax.load(hf_dir).params
    leaves = jax.block_until_ready(jax.tree.leaves(params))
    peak, peak_anon = _rss(), sampler.stop()
    held = sum(a.nbytes for a in leaves)
    print(json.dumps({"mode": mode, "baseline": base, "peak": peak, "params": held, "baseline_anon": base_anon,
                      "peak_anon": peak_anon}))


def config_2b(layers: int, vision_blocks: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import hf_config_dict

    cfg = copy.deepcopy(hf_config_dict("2b", layers))
    vision = cfg["vision_config"]
    vision["depth"] = vision_blocks
    # 2B's three DeepStack mergers (indexes 5, 11, 17) on the first blocks there are
    vision["deepstack_visual_indexes"] = sorted({min(i, vision_blocks - 1) for i in range(3)})
    cfg.update(architectures=["Qwen3VLForConditionalGeneration"])
    return cfg


def write_checkpoint(out: Path, cfg: dict, dtype: str) -> None:
    """A random HF checkpoint (Model.random, saved with save_pretrained) at `out`."""
    import jax.numpy as jnp

    import qvl_jax
    from qvl_jax.config import Qwen3VLConfig

    src = out.parent / f"{out.name}-config"
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(dict(cfg, dtype=dtype), indent=1) + "\n")
    model = qvl_jax.Model.random(Qwen3VLConfig.from_hf_dict(cfg), seed=0, dtype=jnp.dtype(dtype))
    model.path = str(src)
    model.save_pretrained(out)


def tensor_sizes(hf_dir: Path) -> tuple[int, int, str]:
    """(checkpoint bytes, largest tensor's bytes, its name) from the safetensors headers."""
    from safetensors import safe_open

    itemsize = {"F32": 4, "BF16": 2, "F16": 2}
    total, largest, name = 0, 0, ""
    for f in sorted(hf_dir.glob("*.safetensors")):
        total += f.stat().st_size
        with safe_open(str(f), "numpy") as st:
            for key in st.keys():
                sl = st.get_slice(key)
                n = itemsize[sl.get_dtype()]
                for d in sl.get_shape():
                    n *= d
                if n > largest:
                    largest, name = n, key
    return total, largest, name


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    ap.add_argument("--vision-blocks", type=int, default=2, help="vision blocks (default 2)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="checkpoint dtype")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "HF_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        ap.error(f"unknown modes {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="qvl_jax_rss_") as tmp:
        hf_dir = Path(tmp) / "hf"
        cfg = config_2b(args.layers, args.vision_blocks)
        print(f"writing a random {args.dtype} checkpoint at 2B widths ({args.layers} decoder layers, "
              f"{args.vision_blocks} vision blocks) into {hf_dir}...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-c", "import sys, json; from pathlib import Path; "
                        "sys.path.insert(0, sys.argv[1]); import measure_load_rss as m; "
                        "m.write_checkpoint(Path(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4])",
                        str(Path(__file__).resolve().parent), str(hf_dir), json.dumps(cfg), args.dtype],
                       check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        size, largest, largest_name = tensor_sizes(hf_dir)
        print(f"checkpoint: {_mib(size)}; largest tensor: {largest_name} {_mib(largest)}")
        env = dict(os.environ, JAX_PLATFORMS="cpu", QVL_JAX_CACHE=str(Path(tmp) / "cache"))
        for mode in modes:
            if mode == "cached" and not (Path(tmp) / "cache" / "converted").is_dir():
                subprocess.run([sys.executable, __file__, "--child", "first", str(hf_dir)], check=True, env=env,
                               stdout=subprocess.DEVNULL)
            run = subprocess.run([sys.executable, __file__, "--child", mode, str(hf_dir)], check=True, env=env,
                                 stdout=subprocess.PIPE, text=True)
            r = json.loads(run.stdout.strip().splitlines()[-1])
            over = r["peak"] - r["baseline"] - r["params"]
            over_anon = r["peak_anon"] - r["baseline_anon"] - r["params"]
            print(f"{mode:>9}: peak RSS {_mib(r['peak'])} = baseline {_mib(r['baseline'])} + params "
                  f"{_mib(r['params'])} + over {_mib(over)} ({over / size:.2f}x the checkpoint, "
                  f"{over / largest:.1f}x its largest tensor); anonymous only: over {_mib(over_anon)} "
                  f"({over_anon / largest:.1f}x the largest tensor)")
            print(json.dumps(dict(r, over=over, over_anon=over_anon, checkpoint=size, largest_tensor=largest,
                                  layers=args.layers, vision_blocks=args.vision_blocks, dtype=args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
