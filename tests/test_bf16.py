"""bfloat16: our end-to-end error is of the same size as the reference's own bfloat16 error.

float32 parity (the other test files) proves the arithmetic; this checks the bfloat16 path as a user
runs it (a bfloat16 conversion, bfloat16 params and cache): each bfloat16 model is compared with the
float32 reference over the real positions of a padded image + video batch, and our mean error may
exceed transformers' by at most MARGIN.

What it can and cannot see: over three seeds and both test configs the ratio of the two errors
ranged 0.95-1.11 for the shipped code (rounding differs between the two implementations). It is a
guard against gross mistakes in the bfloat16 path (a softmax in bfloat16 gives NaN here; so would a
cache or param left in the wrong dtype), not a precision proof: a decoder RMSNorm computed wholly in
bfloat16 raised the error by only 8%, and the rotary product in bfloat16, which matters only at
long positions, not at all. Those choices are pinned by reading the reference (text.rms_norm,
text.apply_rope) and by the float32 parity tests.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mm_inputs import PromptBuilder, batch_inputs, patch_dim, torch_logits

MARGIN = 1.25


def mean_rel_err(ours: np.ndarray, ref: np.ndarray, where: np.ndarray) -> float:
    ours, ref = np.asarray(ours, np.float64)[where], np.asarray(ref, np.float64)[where]
    return float(np.abs(ours - ref).mean() / np.abs(ref).mean())


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_bfloat16_error_comparable_to_transformers(name, hf_checkpoint, tmp_path):
    import qvl_jax
    from qvl_jax.convert import convert_checkpoint

    hf32, hf_dir = hf_checkpoint(name)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    from conftest import TEST_ATTENTION

    ours16 = qvl_jax.load(convert_checkpoint(hf_dir, tmp_path / "bf16", dtype="bfloat16"), attention=TEST_ATTENTION)
    assert str(ours16.dtype) == "bfloat16"

    rng = np.random.RandomState(21)
    builders = [PromptBuilder(rng).text(5).image(6, 8).text(4).video(2, 4, 4).text(3),
                PromptBuilder(rng).text(9).image(4, 4).text(6)]
    inp = batch_inputs(builders, patch_dim(hf32.config), rng)
    real = inp["attention_mask"].astype(bool)
    ref = torch_logits(hf32, inp)
    with torch.no_grad():
        theirs = hf16(**{k: torch.from_numpy(v) for k, v in inp.items()}).logits.float().numpy()
    ours = np.asarray(ours16.logits(**inp), np.float32)
    assert np.isfinite(ours[real]).all()
    err_theirs, err_ours = mean_rel_err(theirs, ref, real), mean_rel_err(ours, ref, real)
    assert err_theirs > 1e-3, "the transformers model did not run in bfloat16"
    assert err_ours <= MARGIN * err_theirs, f"bfloat16 error {err_ours:.2e} vs transformers' {err_theirs:.2e}"


def test_bfloat16_rms_norm_rounds_where_transformers_rounds():
    """The decoder's RMSNorm at bfloat16 under jit (q_norm's shape at a prompt chunk's rows) equals
    transformers' Qwen3VLTextRMSNorm: the normalised value is rounded to bfloat16 before the weight
    multiplies it. XLA drops a bare cast there (its default excess precision), which left 26% of the
    outputs one bfloat16 step or more from torch's; what remains is the float32 mean's order of
    additions (a handful of values, one step of the normalised value)."""
    import jax
    import jax.numpy as jnp
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

    from qvl_jax.modeling.layers import rms_norm

    rng = np.random.RandomState(0)
    x = torch.from_numpy(rng.randn(520, 16, 128).astype(np.float32) * 3).to(torch.bfloat16)
    norm = Qwen3VLTextRMSNorm(128, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(1 + rng.rand(128).astype(np.float32) * 0.5))
        want = norm(x).float().numpy()
    got = np.asarray(jax.jit(rms_norm, static_argnums=2)(jnp.asarray(x.float().numpy(), jnp.bfloat16),
                                                          jnp.asarray(norm.weight.detach().float().numpy(), jnp.bfloat16),
                                                          1e-6), np.float32)
    differ = got != want
    assert differ.mean() < 1e-4, f"{int(differ.sum())} of {differ.size} outputs differ from transformers'"
    # One bfloat16 step of the normalised value, times the weight (below 2): within two of the output's.
    step = 2.0 ** (np.floor(np.log2(np.abs(want[differ]))) - 7)
    assert (np.abs(got[differ] - want[differ]) <= 2 * step).all()
