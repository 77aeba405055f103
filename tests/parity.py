"""The parity measure shared by the tests: max |jax - torch| / max |torch| over the compared entries."""

import numpy as np

# The parity bar: float32 logits agree to 1e-4 relative to the largest logit.
LOGITS_RTOL = 1e-4


def rel_err(ours, ref, where=None) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if where is not None:
        ours, ref = ours[where], ref[where]
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
