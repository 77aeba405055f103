"""Mixture-of-Experts (qwen3_vl_moe) against transformers' Qwen3VLMoeForConditionalGeneration, through
the real converter, in float32: logits for text, images, video and padded batches, greedy tokens,
decoder_sparse_step and mlp_only_layers, the expert computations, the config dialect, and
the fused-expert layout of both transformers generations (converted, or refused when it
contradicts what the checkpoint declares, never loaded wrong)."""

from __future__ import annotations

import functools
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from mm_inputs import PromptBuilder, batch_inputs, patch_dim, torch_logits
from parity import LOGITS_RTOL, rel_err
from safetensors.numpy import load_file, save_file
from test_generate import N_NEW, _assert_same_greedy, _hf_generate

import qvl_jax
from qvl_jax import CheckpointError, ConfigError
from qvl_jax.config import Qwen3VLConfig
from qvl_jax.modeling import moe as moe_mod

MOE = ["moe", "moe_step"]


def _ids(shape, seed):
    return np.random.RandomState(seed).randint(0, 290, size=shape)


def _prompt(hf, kind, seed=0):
    rng = np.random.RandomState(seed)
    builders = {
        "text": [PromptBuilder(rng).text(13), PromptBuilder(rng).text(7)],
        "image": [PromptBuilder(rng).text(4).image(6, 8).text(5)],
        "video": [PromptBuilder(rng).text(3).video(3, 4, 6).text(4)],
        "padded_batch": [PromptBuilder(rng).text(3).image(4, 6).text(2),
                         PromptBuilder(rng).text(12).image(2, 2).text(6),
                         PromptBuilder(rng).text(2).video(2, 4, 4).text(3)],
    }[kind]
    return batch_inputs(builders, patch_dim(hf.config), rng)


def test_config_dialect(hf_checkpoint):
    """Both spellings of the expert count; which layers are sparse is transformers' rule."""
    hf, path = hf_checkpoint("moe")
    d = json.loads((path / "config.json").read_text())
    assert "num_local_experts" in d["text_config"]  # what transformers 5 writes
    cfg = Qwen3VLConfig.from_hf_dict(d)
    t = cfg.text
    assert cfg.is_moe and (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size) == (8, 2, 48)
    assert [t.is_sparse(i) for i in range(3)] == [
        type(layer.mlp).__name__ == "Qwen3VLMoeTextSparseMoeBlock" for layer in hf.model.language_model.layers]
    step = Qwen3VLConfig.from_hf_dict(json.loads((hf_checkpoint("moe_step")[1] / "config.json").read_text())).text
    assert [step.is_sparse(i) for i in range(4)] == [False, True, False, True]
    d["text_config"]["num_experts"] = d["text_config"].pop("num_local_experts")  # released checkpoints' key
    assert Qwen3VLConfig.from_hf_dict(d).text.num_experts == 8
    for key, value, msg in [("num_experts_per_tok", 9, "exceeds"), ("norm_topk_prob", False, "renormalises"),
                            ("mlp_only_layers", [3], "outside"), ("moe_intermediate_size", 0, "positive")]:
        bad = json.loads(json.dumps(d))
        bad["text_config"][key] = value
        with pytest.raises(ConfigError, match=msg):
            Qwen3VLConfig.from_hf_dict(bad)


@pytest.mark.parametrize("kind", ["text", "image", "video", "padded_batch"])
@pytest.mark.parametrize("name", MOE)
def test_moe_logits_match(name, kind, hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint(name)
    inp = _prompt(hf, kind)
    ours = jax_model(name).logits(**inp)
    assert rel_err(ours, torch_logits(hf, inp), inp["attention_mask"].astype(bool)) <= LOGITS_RTOL


def test_right_padded_text_batch(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("moe")
    ids = _ids((3, 17), seed=2)
    mask = np.ones_like(ids)
    mask[0, 9:] = 0
    mask[2, 14:] = 0
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = jax_model("moe").logits(ids, attention_mask=mask)
    assert rel_err(ours, ref, mask.astype(bool)) <= LOGITS_RTOL


@pytest.mark.parametrize("kind", ["text", "padded_batch"])
def test_moe_greedy_matches_transformers(kind, hf_checkpoint, jax_model):
    """Greedy tokens; decode steps of 1 and 3 rows take the gather path, prefill another one."""
    hf, _ = hf_checkpoint("moe")
    inp = _prompt(hf, kind, seed=3)
    ref, ref_logits = _hf_generate(hf, inp, n=N_NEW // 2)
    out = jax_model("moe").generate(**inp, max_new_tokens=N_NEW // 2, stop_token_ids=[])
    assert out.tokens.shape == ref.shape
    _assert_same_greedy(out.tokens, ref, ref_logits)


@pytest.mark.parametrize("impl", ["scan", "ragged", "gather", "dense"])
def test_expert_impls_match_transformers(impl, hf_checkpoint, converted):
    """Each expert computation, forced, against transformers' (image, video, padding)."""
    hf, _ = hf_checkpoint("moe_step")
    m = qvl_jax.load(converted("moe_step"), moe_impl=impl)
    assert all(layer.mlp.impl == impl for layer in m.module.model.language_model.layers
               if isinstance(layer.mlp, moe_mod.SparseMoeBlock))
    inp = _prompt(hf, "padded_batch", seed=4)
    assert rel_err(m.logits(**inp), torch_logits(hf, inp), inp["attention_mask"].astype(bool)) <= LOGITS_RTOL


def test_expert_block_matches_transformers_block(hf_checkpoint, jax_model):
    """One sparse block on its own, each computation, for many tokens and for one."""
    hf, _ = hf_checkpoint("moe")
    ours = jax_model("moe").module.model.language_model.layers[0].mlp
    theirs = hf.model.language_model.layers[0].mlp
    for n in (37, 1):
        x = np.random.RandomState(n).randn(1, n, 64).astype(np.float32)
        with torch.no_grad():
            ref = theirs(torch.from_numpy(x)).numpy()
        for impl in ("scan", "ragged", "gather", "dense"):
            ours.impl = impl
            assert rel_err(ours(jnp.asarray(x)), ref) <= 1e-5, impl
        # "scan" at every step size: one pair per step, and steps that end inside an expert's tokens
        flat = jnp.asarray(x.reshape(n, 64))
        _, w, idx = ours.gate(flat)
        gu, dn = ours.experts.gate_up_proj[...], ours.experts.down_proj[...]
        for rows in (1, 3, 8):
            y = moe_mod.expert_mlp(flat, w, idx, gu, dn, "scan", rows)
            assert rel_err(y.reshape(x.shape), ref) <= 1e-5, rows


def test_expert_impls_have_equal_gradients(jax_model):
    """Training runs whichever computation `auto` picks: the gradients (weights, router, input)
    of all of them agree ("scan" with one pair per step and with several)."""
    block = jax_model("moe").module.model.language_model.layers[0].mlp
    gate_up, down = block.experts.gate_up_proj[...], block.experts.down_proj[...]
    router = block.gate.weight[...]
    x = jnp.asarray(np.random.RandomState(0).randn(29, 64).astype(np.float32))

    def loss(gu, dn, rw, x, impl):
        probs = jax.nn.softmax(moe_mod.matmul_t(x, rw), axis=-1)
        top, idx = jax.lax.top_k(probs, 2)
        impl, _, rows = impl.partition("@")
        y = moe_mod.expert_mlp(x, top / top.sum(-1, keepdims=True), idx, gu, dn, impl, int(rows or 0) or None)
        return jnp.sum(jnp.sin(y))

    grads = {impl: jax.grad(loss, argnums=(0, 1, 2, 3))(gate_up, down, router, x, impl)
             for impl in ("dense", "scan", "scan@1", "ragged", "gather")}
    for impl in ("scan", "scan@1", "ragged", "gather"):
        for ours, ref in zip(grads[impl], grads["dense"]):
            assert rel_err(ours, ref) <= 1e-5, impl


def _no_renormalisation(self, x):
    logits = moe_mod.matmul_t(x, self.weight[...])
    top, idx = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), self.top_k)
    return logits, top, idx


def _gate_up_swapped(h):
    f = h.shape[-1] // 2
    return h[..., :f] * jax.nn.silu(h[..., f:])


@pytest.mark.parametrize("owner,name,fn", [("TopKRouter", "__call__", _no_renormalisation),
                                            (None, "_swiglu", _gate_up_swapped)])
def test_parity_catches_broken_routing(owner, name, fn, monkeypatch, hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("moe")
    ids = _ids((1, 12), seed=6)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    monkeypatch.setattr(getattr(moe_mod, owner) if owner else moe_mod, name, fn)
    jax.clear_caches()
    try:
        assert rel_err(jax_model("moe").logits(ids), ref) > LOGITS_RTOL
    finally:
        monkeypatch.undo()
        jax.clear_caches()


# --- the fused expert layout of transformers 4 ([e, in, out]) vs 5 ([e, out, in]) ---

def _rewrite(src, dst, transpose=("gate_up_proj", "down_proj"), version="keep", metadata=None):
    """A copy of HF checkpoint `src` with the named expert tensors transposed to the other layout
    and config.json's transformers_version set (None: removed)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for key in tensors:
        if any(key.endswith(f"mlp.experts.{t}") for t in transpose):
            tensors[key] = np.ascontiguousarray(np.swapaxes(tensors[key], 1, 2))
    save_file(tensors, str(dst / "model.safetensors"), metadata=metadata or {"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    if version is None:
        cfg.pop("transformers_version", None)
    elif version != "keep":
        cfg["transformers_version"] = version
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("name", ["moe", "moe_square"])
@pytest.mark.parametrize("version", ["4.57.0.dev0", None])
def test_older_expert_layout_is_converted(name, version, hf_checkpoint, tmp_path):
    """The released checkpoints' layout (transformers 4) loads to the same logits, whether the config
    says which transformers wrote it or only the shapes do; moe_square has d == 2f, where
    gate_up_proj's shape is the same in both layouts."""
    hf, src = hf_checkpoint(name)
    old = _rewrite(src, tmp_path / "old", version=version)
    ids = _ids((2, 11), seed=8)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert rel_err(qvl_jax.load(old).logits(ids), ref) <= LOGITS_RTOL


@pytest.mark.parametrize("name", ["moe", "moe_square"])
def test_contradictory_expert_layout_is_refused(name, hf_checkpoint, tmp_path):
    """Transposed tensors under a config written by transformers 5, or a metadata declaration the
    shapes contradict: a one-line CheckpointError, never a model with scrambled experts."""
    _, src = hf_checkpoint(name)
    with pytest.raises(CheckpointError, match="expert layout.*refusing to guess"):
        qvl_jax.load(_rewrite(src, tmp_path / "a"))
    with pytest.raises(CheckpointError, match="metadata implies the out_in expert layout"):
        qvl_jax.load(_rewrite(src, tmp_path / "b", version="4.57.0",
                              metadata={"format": "pt", "expert_layout": "out_in"}))


def test_mixed_expert_layouts_are_refused(hf_checkpoint, tmp_path):
    """Only gate_up_proj transposed: fits neither layout whole."""
    _, src = hf_checkpoint("moe")
    with pytest.raises(CheckpointError, match="gate_up_proj' has shape"):
        qvl_jax.load(_rewrite(src, tmp_path / "m", transpose=("gate_up_proj",), version=None))


def test_metadata_declaration_wins_over_version(hf_checkpoint, tmp_path):
    hf, src = hf_checkpoint("moe_square")
    path = _rewrite(src, tmp_path / "d", version="5.0.0", metadata={"format": "pt", "expert_layout": "in_out"})
    ids = _ids((1, 9), seed=9)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert rel_err(qvl_jax.load(path).logits(ids), ref) <= LOGITS_RTOL


def test_scan_reads_expert_weights_in_place():
    """At decode sizes `auto` runs "scan" one pair per step, written so that XLA CPU fuses the slice
    of the expert's weights into the matrix-vector product: no step copies an expert's weights out
    first (the copy is what "gather" and the several-rows steps pay; the second case shows this
    check sees it)."""
    assert jax.default_backend() == "cpu"
    s = jax.ShapeDtypeStruct
    args = (s((2, 48), jnp.float32), s((2, 2), jnp.float32), s((2, 2), jnp.int32),
            s((8, 80, 48), jnp.float32), s((8, 48, 40), jnp.float32))
    assert moe_mod.choose_impl("auto", 2, 2, 8) == "scan" and moe_mod.scan_rows(2, 2, 8) == 1
    copied = re.compile(r"= f32\[(1,)?(80,48|48,40)\]\{[^}]*\} (fusion|copy)\(")
    for rows, copies in ((None, False), (2, True)):
        f = functools.partial(moe_mod.expert_mlp, impl="auto" if rows is None else "scan", rows=rows)
        hlo = jax.jit(f).lower(*args).compile().as_text()
        assert bool(copied.search(hlo)) == copies, rows
