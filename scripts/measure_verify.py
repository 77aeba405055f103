"""Load time of a converted checkpoint with verification: the first load after the conversion
(every file hashed, stamp written), a later load (stamp fresh: nothing hashed), `verify=True`
(hashed whatever the stamp says) and `verify=False` (never hashed), each in a fresh subprocess on
the CPU backend.

Writes a random Hugging Face checkpoint at Qwen3-VL-2B widths with few layers (as
scripts/measure_load_rss.py does) into a temporary directory and converts it there.

    python scripts/measure_verify.py                     # 2 decoder layers, 2 vision blocks, bfloat16
    python scripts/measure_verify.py --layers 4 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = (("first (no stamp)", None), ("again (stamp fresh)", None), ("verify=True", True), ("verify=False", False))


def child(path: str, verify: str) -> None:
    import jax

    import qvl_jax

    jax.devices()
    t0 = time.perf_counter()
    params = qvl_jax.load(path, verify=json.loads(verify)).params
    jax.block_until_ready(jax.tree.leaves(params))
    print(json.dumps({"load_s": time.perf_counter() - t0}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vision-blocks", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from measure_load_rss import config_2b, write_checkpoint

    from qvl_jax.checkpoint import _RACY_NS
    from qvl_jax.convert import convert_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        hf, out = Path(tmp) / "hf", Path(tmp) / "converted"
        write_checkpoint(hf, config_2b(args.layers, args.vision_blocks), args.dtype)
        convert_checkpoint(hf, out)
        size = (out / "params.safetensors").stat().st_size
        time.sleep(_RACY_NS / 1e9)  # a stamp is only written for files older than this
        print(f"params.safetensors: {size / 2**20:.0f} MiB")
        for name, verify in RUNS:
            run = subprocess.run([sys.executable, __file__, "--child", str(out), json.dumps(verify)],
                                 capture_output=True, text=True, check=False)
            if run.returncode:
                sys.exit(f"{name}: {run.stderr.strip().splitlines()[-1]}")
            print(f"{name:<22} {json.loads(run.stdout.splitlines()[-1])['load_s']:.2f} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
