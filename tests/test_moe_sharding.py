"""Mixture-of-Experts under a mesh: experts split over "expert" (expert parallel) and each expert's
MLP width over "model" (tensor parallel), with "data" beside them; the loader reads only each
device's experts; logits and greedy tokens equal one device's on 8 CPU devices."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors
from flax import nnx
from jax.sharding import PartitionSpec as P
from parity import rel_err
from test_moe_parity import _prompt
from test_sharding import RTOL, _Recorder, needs_8

import qvl_jax
from qvl_jax import sharding
from qvl_jax.sharding import MeshError, make_mesh

# (dp, ep, tp)
MESHES = [(1, 8, 1), (1, 4, 2), (2, 2, 2), (2, 1, 4)]
GATE_UP = "model.language_model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.language_model.layers.0.mlp.experts.down_proj"


@needs_8
def test_make_mesh_with_experts():
    mesh = make_mesh(dp=2, tp=2, ep=2)
    assert mesh.axis_names == ("data", "expert", "model")
    assert dict(mesh.shape) == {"data": 2, "expert": 2, "model": 2}
    assert dict(make_mesh(ep=8).shape) == {"data": 1, "expert": 8, "model": 1}
    with pytest.raises(MeshError, match="ep=3 does not divide the 8 devices"):
        make_mesh(ep=3)
    with pytest.raises(MeshError, match="ep must be a positive integer"):
        make_mesh(ep=0)


@needs_8
def test_rules_place_experts(converted):
    cfg = qvl_jax.Qwen3VLConfig.from_json_file(converted("moe") / "config.json")
    specs = {k: s.spec for k, s in sharding.flat_param_shardings(cfg, make_mesh(1, 2, ep=4)).items()}
    assert specs[GATE_UP] == P("expert", "model") and specs[DOWN] == P("expert", None, "model")
    assert specs["model.language_model.layers.0.mlp.gate.weight"] == P()  # every device routes
    # Without an "expert" axis the experts are whole on every device and split in width.
    plain = sharding.flat_param_shardings(cfg, make_mesh(2, 4))
    assert plain[GATE_UP].spec == P(None, "model") and plain[DOWN].spec == P(None, None, "model")


@needs_8
def test_load_reads_only_each_devices_experts(converted, monkeypatch):
    rec = _Recorder(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", rec)
    from qvl_jax.checkpoint import load_state
    from qvl_jax.modeling.model import state_key

    _, _, params = load_state(converted("moe"), mesh=make_mesh(1, 1, ep=8))
    flat = {state_key(p): v[...] for p, v in nnx.to_flat_state(params)}
    for key in (GATE_UP, DOWN):
        arr = flat[key]
        assert arr.shape[0] == 8 and rec.reads[key] == [(1, *arr.shape[1:])] * 8
        assert all(s.data.shape[0] == 1 for s in arr.addressable_shards)


_REF: dict = {}


@needs_8
@pytest.mark.parametrize("dp,ep,tp", MESHES)
def test_logits_and_greedy_equal_one_device(dp, ep, tp, hf_checkpoint, jax_model, converted):
    hf, _ = hf_checkpoint("moe")
    inp = _prompt(hf, "padded_batch", seed=5)
    if not _REF:
        ref = jax_model("moe")
        _REF["v"] = (ref.logits(**inp), ref.generate(**inp, max_new_tokens=6, stop_token_ids=[]).tokens)
    ref_logits, ref_tokens = _REF["v"]
    model = qvl_jax.load(converted("moe"), mesh=make_mesh(dp, tp, ep=ep))
    gate_up = model.params["model"]["language_model"]["layers"][0]["mlp"]["experts"]["gate_up_proj"][...]
    assert gate_up.sharding.shard_shape(gate_up.shape) == (8 // ep, 96 // tp, 64)
    valid = np.broadcast_to(inp["attention_mask"][..., None] > 0, ref_logits.shape)
    assert rel_err(model.logits(**inp), ref_logits, valid) <= RTOL
    np.testing.assert_array_equal(model.generate(**inp, max_new_tokens=6, stop_token_ids=[]).tokens, ref_tokens)

