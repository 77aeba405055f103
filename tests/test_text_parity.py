"""Text-only logits against transformers, through the real converter, in float32."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import qvl_jax
from conftest import ALL_CONFIGS
from parity import LOGITS_RTOL, rel_err


def _torch_logits(model, ids, mask=None, position_ids=None):
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(mask)
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(position_ids)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), **kwargs).logits.numpy()


def _ids(shape, seed, vocab=290):
    return np.random.RandomState(seed).randint(0, vocab, size=shape)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_text_logits_match(name, hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint(name)
    ids = _ids((2, 19), seed=1)
    ours = jax_model(name).logits(ids)
    assert ours.dtype == np.float32 and ours.shape == (2, 19, hf.config.text_config.vocab_size)
    assert rel_err(ours, _torch_logits(hf, ids)) <= LOGITS_RTOL


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_right_padded_batch(name, hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint(name)
    ids = _ids((3, 17), seed=2)
    mask = np.ones_like(ids)
    mask[0, 9:] = 0
    mask[2, 14:] = 0
    ours = jax_model(name).logits(ids, attention_mask=mask)
    ref = _torch_logits(hf, ids, mask)
    assert rel_err(ours, ref, mask.astype(bool)) <= LOGITS_RTOL


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_left_padded_batch(name, hf_checkpoint, jax_model):
    """Left padding: positions count real tokens only, the convention of transformers' generate()."""
    hf, _ = hf_checkpoint(name)
    ids = _ids((2, 15), seed=3)
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    pos = np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)
    ref = _torch_logits(hf, ids, mask, np.broadcast_to(pos[None], (3, *pos.shape)).copy())
    ours = jax_model(name).logits(ids, attention_mask=mask)
    assert rel_err(ours, ref, mask.astype(bool)) <= LOGITS_RTOL
    # Each padded row equals the same prompt run alone.
    alone = jax_model(name).logits(ids[1:, 6:])
    assert rel_err(ours[1, 6:], alone[0]) <= 1e-5


def test_load_hf_dir_directly_matches_converted(hf_checkpoint, jax_model):
    _, hf_dir = hf_checkpoint("untied")
    direct = qvl_jax.load(hf_dir)
    ids = _ids((1, 9), seed=4)
    np.testing.assert_array_equal(direct.logits(ids), jax_model("untied").logits(ids))


def test_batch_of_one_dimensional_ids(jax_model):
    ids = _ids((7,), seed=5)
    assert jax_model("tied").logits(ids).shape == (1, 7, 320)


# --- The contract can fail: break one component at a time and the parity check must notice. ---

def _qk_norm_after_rope(text_mod):
    def qkv(self, x, cos, sin):  # rope first, QK-norm second: the wrong order
        hd = self.head_dim
        q = self.q_norm(text_mod.apply_rope(self.q_proj(x, (self.heads, hd)), cos, sin))
        k = self.k_norm(text_mod.apply_rope(self.k_proj(x, (self.kv_heads, hd)), cos, sin))
        return q, k, self.v_proj(x, (self.kv_heads, hd))
    return text_mod.TextAttention, "qkv", qkv


def _rope_wrong_half(text_mod):
    def apply_rope(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = jax.numpy.concatenate([x[..., half:], -x[..., :half]], axis=-1)  # sign flipped
        return x * cos[:, :, None] + rotated * sin[:, :, None]
    return text_mod, "apply_rope", apply_rope


def _norm_eps_ignored(text_mod):
    from qvl_jax.modeling import layers

    return text_mod.RMSNorm, "__call__", lambda self, x: layers.rms_norm(x, self.weight[...], 1e-2)


def _swiglu_swapped(text_mod):
    def mlp(self, x):
        return self.down_proj(self.gate_proj(x) * jax.nn.silu(self.up_proj(x)))
    return text_mod.TextMLP, "__call__", mlp


@pytest.mark.parametrize("mutation", [_qk_norm_after_rope, _rope_wrong_half, _norm_eps_ignored, _swiglu_swapped])
def test_parity_catches_broken_component(mutation, monkeypatch, hf_checkpoint, jax_model):
    from qvl_jax.modeling import text as text_mod

    hf, _ = hf_checkpoint("untied")
    ids = _ids((1, 12), seed=6)
    ref = _torch_logits(hf, ids)
    owner, name, fn = mutation(text_mod)
    monkeypatch.setattr(owner, name, fn)
    jax.clear_caches()
    try:
        assert rel_err(jax_model("untied").logits(ids), ref) > LOGITS_RTOL
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_parity_catches_dropped_tie(hf_checkpoint, jax_model):
    """Using a random untied head instead of the tied embedding must fail parity."""
    import dataclasses

    from flax import nnx

    from qvl_jax.modeling.model import Qwen3VLForConditionalGeneration

    hf, _ = hf_checkpoint("tied")
    m = jax_model("tied")
    untied = Qwen3VLForConditionalGeneration(dataclasses.replace(m.config, tie_word_embeddings=False),
                                             rngs=nnx.Rngs(0))
    nnx.update(untied, m.params)  # every weight but the (random) lm_head
    broken = qvl_jax.Model.from_module(untied)
    ids = _ids((1, 10), seed=7)
    assert rel_err(broken.logits(ids), _torch_logits(hf, ids)) > LOGITS_RTOL
