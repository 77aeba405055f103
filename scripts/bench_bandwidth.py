"""How fast this machine reads memory: the bound of a decode step, which reads every weight once.

A decode step of a few rows is a few products of each weight matrix with a few vectors: it reads
the decoder's weights and the lm_head once (at 2B widths, 4 layers, bfloat16: 384 MB of projections
and the tied 151,936 x 2048 table's 622 MB) and does little arithmetic on them. So its time is at
least those bytes over the rate memory is read at. This reads one large array in place with numpy
from --threads threads at once (numpy's sum releases the GIL), each its own contiguous part, and
prints the median rate over --repeats passes as one JSON line, with the decode step's bound at
--weights-gb.

    python scripts/bench_bandwidth.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np


def read_rate(data: np.ndarray, threads: int) -> float:
    """Bytes a second to read `data` once, split between `threads` threads."""
    parts = np.array_split(data, threads)
    out = [0.0] * threads

    def read(i):
        out[i] = float(parts[i].sum(dtype=np.float32))

    workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
    t = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return data.nbytes / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gib", type=float, default=1.0, help="size of the array read (GiB)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--weights-gb", type=float, default=1.006,
                    help="bytes a decode step reads (GB; default: the 2B-width, 4-layer bfloat16 bench model)")
    args = ap.parse_args()
    data = np.ones(int(args.gib * (1 << 30)) // 4, np.float32)  # written once: every page is mapped
    rates = [read_rate(data, args.threads) for _ in range(args.repeats)]
    gbs = float(np.median(rates)) / 1e9
    print(json.dumps({"threads": args.threads, "read_gb_s": round(gbs, 1),
                      "read_gb_s_range": [round(min(rates) / 1e9, 1), round(max(rates) / 1e9, 1)],
                      "decode_step_bound_ms": round(args.weights_gb / gbs * 1e3, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
