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
    def qkv(p, x, cos, sin, cfg):  # rope first, QK-norm second: the wrong order
        def norm(y, s):
            return text_mod.rms_norm(y, s, cfg.rms_norm_eps)
        q = norm(text_mod.apply_rope(text_mod.linear(x, p["q_proj"], 2), cos, sin), p["q_norm"]["scale"])
        k = norm(text_mod.apply_rope(text_mod.linear(x, p["k_proj"], 2), cos, sin), p["k_norm"]["scale"])
        return q, k, text_mod.linear(x, p["v_proj"], 2)
    return "qkv", qkv


def _rope_wrong_half(text_mod):
    def apply_rope(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = jax.numpy.concatenate([x[..., half:], -x[..., :half]], axis=-1)  # sign flipped
        return x * cos[:, :, None] + rotated * sin[:, :, None]
    return "apply_rope", apply_rope


def _norm_eps_ignored(text_mod):
    orig = text_mod.rms_norm
    return "rms_norm", lambda x, scale, eps: orig(x, scale, 1e-2)


def _swiglu_swapped(text_mod):
    def mlp(p, x):
        gate = x @ p["gate_proj"]["weight"].T
        up = x @ p["up_proj"]["weight"].T
        return (gate * jax.nn.silu(up)) @ p["down_proj"]["weight"].T
    return "mlp", mlp


@pytest.mark.parametrize("mutation", [_qk_norm_after_rope, _rope_wrong_half, _norm_eps_ignored, _swiglu_swapped])
def test_parity_catches_broken_component(mutation, monkeypatch, hf_checkpoint, jax_model):
    from qvl_jax.modeling import text as text_mod

    hf, _ = hf_checkpoint("untied")
    ids = _ids((1, 12), seed=6)
    ref = _torch_logits(hf, ids)
    name, fn = mutation(text_mod)
    monkeypatch.setattr(text_mod, name, fn)
    jax.clear_caches()
    try:
        assert rel_err(jax_model("untied").logits(ids), ref) > LOGITS_RTOL
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_parity_catches_dropped_tie(hf_checkpoint, jax_model):
    """Using a random untied head instead of the tied embedding must fail parity."""
    import dataclasses

    hf, _ = hf_checkpoint("tied")
    m = jax_model("tied")
    emb = m.params["model"]["language_model"]["embed_tokens"]["embedding"]
    broken = qvl_jax.Model(dataclasses.replace(m.config, tie_word_embeddings=False),
                           dict(m.params, lm_head={"weight": jax.random.normal(jax.random.key(0), emb.shape)}))
    ids = _ids((1, 10), seed=7)
    assert rel_err(broken.logits(ids), _torch_logits(hf, ids)) > LOGITS_RTOL
