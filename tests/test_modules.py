"""The model as Flax NNX modules: attribute paths and Param leaves are transformers' names and shapes,
the state of a loaded model holds the checkpoint's arrays, and a random model builds from a config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qvl_jax
from qvl_jax.modeling.model import PARAM_DEVIATIONS, Qwen3VLForConditionalGeneration, state_key


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_state_paths_are_hf_keys(name, hf_checkpoint, jax_model):
    """Every Param's path, joined with '.', is its Hugging Face key, with HF's shape and values;
    only the deviation table's entries differ."""
    hf, _ = hf_checkpoint(name)
    m = jax_model(name)
    ours = {state_key(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(m.params)}
    theirs = {k: t.detach().numpy() for k, t in hf.state_dict().items()}
    deviating = set(theirs) - set(ours)
    assert deviating == ({"lm_head.weight"} if m.config.tie_word_embeddings else set())
    assert deviating <= set(PARAM_DEVIATIONS)
    assert set(ours) <= set(theirs)
    for key, arr in ours.items():
        assert arr.shape == theirs[key].shape, key
        np.testing.assert_array_equal(arr, theirs[key], err_msg=key)


def test_attribute_paths_mirror_transformers(jax_model):
    module = jax_model("untied").module
    vis, lm = module.model.visual, module.model.language_model
    assert isinstance(module, nnx.Module)
    assert vis.patch_embed.proj.weight[...].ndim == 5  # Conv3d [out, C, T, P, P], as stored by HF
    assert vis.blocks[0].attn.qkv.weight[...].shape == (3 * vis.config.hidden_size, vis.config.hidden_size)
    assert len(vis.deepstack_merger_list) == len(vis.config.deepstack_visual_indexes)
    layer = lm.layers[0]
    for leaf in (layer.self_attn.q_proj.weight, layer.self_attn.q_norm.weight, layer.mlp.gate_proj.weight,
                 lm.norm.weight, lm.embed_tokens.weight, module.lm_head.weight, vis.merger.linear_fc1.weight,
                 vis.pos_embed.weight):
        assert isinstance(leaf, nnx.Param) and "axes" in leaf.get_metadata()
    assert jax_model("tied").module.lm_head is None  # tied: the embedding is the head, held once


def test_random_model_from_config_runs_and_splits(jax_model):
    cfg = jax_model("tied").config
    module = Qwen3VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    model = qvl_jax.Model.from_module(module)
    ids = np.arange(5, 17)[None]
    logits = model.logits(ids)
    assert logits.shape == (1, 12, cfg.text.vocab_size) and np.isfinite(logits).all()
    again = qvl_jax.Model.random(cfg, seed=0).logits(ids)
    np.testing.assert_array_equal(logits, again)  # nnx.Rngs(seed) decides every weight
    assert not np.array_equal(logits, qvl_jax.Model.random(cfg, seed=1).logits(ids))


def test_module_view_shares_the_state(jax_model):
    m = jax_model("tied")
    w = m.module.model.language_model.layers[1].mlp.down_proj.weight[...]
    assert w is m.params["model"]["language_model"]["layers"][1]["mlp"]["down_proj"]["weight"][...]


def test_jitted_paths_merge_inside_the_trace(jax_model):
    """The forward takes (graphdef, state): a second call with the same shapes hits the jit cache
    (no graph traversal decides anything per call)."""
    from qvl_jax.modeling import model as model_mod

    m = jax_model("untied")
    ids = np.arange(3, 11)[None]
    m.logits(ids)
    size = model_mod.forward_logits._cache_size()
    m.logits(ids + 1)
    assert model_mod.forward_logits._cache_size() == size


def test_bfloat16_random_model_keeps_dtype(jax_model):
    cfg = jax_model("tied").config
    model = qvl_jax.Model.random(cfg, dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(model.params))


def test_tiny_checkpoint_follows_umask(tmp_path):
    import os

    from qvl_jax.tiny import write_tiny_checkpoint

    old = os.umask(0o022)
    try:
        out = write_tiny_checkpoint(tmp_path / "tiny")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
