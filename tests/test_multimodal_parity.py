"""Image, multi-image and video logits against transformers, component tests of the host-side
grid computations against transformers' own helpers, and proof that each reference behaviour below
(each has broken some other port) is pinned down by a test that fails when it is broken."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import ALL_CONFIGS
from flax import nnx
from mm_inputs import PromptBuilder, batch_inputs, patch_dim, torch_logits
from parity import LOGITS_RTOL, rel_err

import qvl_jax
from qvl_jax import InputError
from qvl_jax.modeling import inputs as inputs_mod
from qvl_jax.modeling import model as model_mod
from qvl_jax.modeling import text as text_mod
from qvl_jax.modeling import vision as vision_mod


def _one_image(rng):
    return [PromptBuilder(rng).text(5).image(6, 8).text(4)]


def _three_images(rng):
    return [PromptBuilder(rng).text(3).image(4, 4).text(2).image(8, 6).text(2).image(2, 10).text(3)]


def _video(rng):
    return [PromptBuilder(rng).text(4).video(3, 6, 4).text(3)]


def _image_and_video(rng):
    return [PromptBuilder(rng).text(2).image(4, 6).text(2).video(2, 4, 4).text(3)]


def _batch(rng):
    return [PromptBuilder(rng).text(2).image(4, 6).text(5),
            PromptBuilder(rng).text(9).image(6, 6).text(6).image(2, 2).text(1)]


def _batch_with_video(rng):
    return [PromptBuilder(rng).text(3).video(2, 4, 6).text(2),
            PromptBuilder(rng).text(1).image(4, 4).text(8)]


CASES = {"one_image": _one_image, "three_images": _three_images, "video": _video,
         "image_and_video": _image_and_video, "batch": _batch, "batch_with_video": _batch_with_video}


def _inputs(hf, case, seed=0, pad_side="left"):
    rng = np.random.RandomState(seed)
    return batch_inputs(CASES[case](rng), patch_dim(hf.config), rng, pad_side)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_multimodal_logits_match(name, case, hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint(name)
    inp = _inputs(hf, case)
    ours = jax_model(name).logits(**inp)
    assert rel_err(ours, torch_logits(hf, inp), inp["attention_mask"].astype(bool)) <= LOGITS_RTOL


def test_right_padded_multimodal_batch(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("untied")
    inp = _inputs(hf, "batch", seed=1, pad_side="right")
    ours = jax_model("untied").logits(**inp)
    assert rel_err(ours, torch_logits(hf, inp), inp["attention_mask"].astype(bool)) <= LOGITS_RTOL


def test_token_types_derived_when_not_given(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("tied")
    inp = _inputs(hf, "image_and_video")
    without = {k: v for k, v in inp.items() if k != "mm_token_type_ids"}
    np.testing.assert_array_equal(jax_model("tied").logits(**without), jax_model("tied").logits(**inp))


def test_batched_rows_equal_rows_alone(hf_checkpoint, jax_model):
    """Each row of a padded multimodal batch gives the logits it gives on its own."""
    hf, _ = hf_checkpoint("untied")
    rng = np.random.RandomState(5)
    builders = _batch(rng)
    both = batch_inputs(builders, patch_dim(hf.config), np.random.RandomState(6))
    out = jax_model("untied").logits(**both)
    n_img0 = len(builders[0].image_grids)
    patches0 = int(np.prod(both["image_grid_thw"][:n_img0], -1).sum())
    for row, b in enumerate(builders):
        sl = slice(0, n_img0) if row == 0 else slice(n_img0, None)
        pix = both["pixel_values"][:patches0] if row == 0 else both["pixel_values"][patches0:]
        alone = jax_model("untied").logits(np.array([b.ids]), pixel_values=pix,
                                           image_grid_thw=both["image_grid_thw"][sl])
        real = both["attention_mask"][row].astype(bool)
        assert rel_err(out[row][real], alone[0]) <= 1e-5


# --- Components against transformers' own helpers ---

GRIDS = np.array([[1, 4, 6], [3, 6, 4], [1, 2, 2], [2, 10, 8], [1, 16, 2]])


def test_pos_embed_taps_match_transformers(hf_checkpoint):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    hf, _ = hf_checkpoint("untied")
    cfg = qvl_jax.Qwen3VLConfig.from_hf_dict(hf.config.to_dict()).vision
    idx, w = vision_mod.pos_embed_taps(GRIDS, cfg)
    ref_idx, ref_w = get_vision_interpolation_indices_and_weights(
        torch.tensor(GRIDS), num_grid_per_side=cfg.num_grid_per_side, mode="bilinear", align_corners=True,
        spatial_merge_size=cfg.spatial_merge_size)
    # Same taps in the same order with the same weights (a zero-weight tap may point anywhere).
    np.testing.assert_allclose(w, ref_w.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.where(w > 0, idx, -1), np.where(ref_w.numpy() > 0, ref_idx.numpy(), -1))


def test_vision_rope_positions_match_transformers():
    from transformers.vision_utils import get_vision_position_ids

    ref = get_vision_position_ids(torch.tensor(GRIDS), 2).numpy()
    np.testing.assert_array_equal(vision_mod.rope_positions(GRIDS, 2), ref)


def test_vision_rope_frequencies_match_transformers(hf_checkpoint):
    hf, _ = hf_checkpoint("untied")
    cfg = qvl_jax.Qwen3VLConfig.from_hf_dict(hf.config.to_dict()).vision
    np.testing.assert_array_equal(vision_mod.vision_rope_inv_freq(cfg), hf.model.visual.rotary_pos_emb.inv_freq.numpy())


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_text_rope_frequencies_match_transformers(name, hf_checkpoint):
    hf, _ = hf_checkpoint(name)
    cfg = qvl_jax.Qwen3VLConfig.from_hf_dict(hf.config.to_dict()).text
    np.testing.assert_array_equal(text_mod.rope_inv_freq(cfg.head_dim, cfg.rope_theta),
                                  hf.model.language_model.rotary_emb.inv_freq.numpy())


def test_text_rope_frequencies_2b():
    """The 2B's theta=5e6, head_dim 128: torch's float32 pow itself is within 1 ulp of the correctly
    rounded power, so that is the bound here (exact equality holds for the test configs above)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        Qwen3VLTextRotaryEmbedding,
    )

    ref = Qwen3VLTextRotaryEmbedding.compute_default_rope_parameters(
        type("C", (), {"rope_parameters": {"rope_theta": 5e6}, "head_dim": 128})())[0].numpy()
    ours = text_mod.rope_inv_freq(128, 5e6)
    assert np.abs(ours.view(np.int32) - ref.view(np.int32)).max() <= 1
    assert (ours == ref).mean() > 0.95


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_rope_index_matches_transformers(pad_side, hf_checkpoint):
    from qvl_jax.modeling.positions import rope_index

    hf, _ = hf_checkpoint("untied")
    rng = np.random.RandomState(3)
    builders = [PromptBuilder(rng).text(3).image(4, 6).text(2).video(3, 4, 4).text(2),
                PromptBuilder(rng).text(7),
                PromptBuilder(rng).video(2, 2, 6).image(2, 2).text(4).image(6, 2)]
    inp = batch_inputs(builders, patch_dim(hf.config), rng, pad_side)
    ref_pos, ref_delta = hf.model.get_rope_index(
        torch.tensor(inp["input_ids"]), torch.tensor(inp["mm_token_type_ids"]),
        image_grid_thw=torch.tensor(inp["image_grid_thw"]), video_grid_thw=torch.tensor(inp["video_grid_thw"]),
        attention_mask=torch.tensor(inp["attention_mask"]))
    pos, delta = rope_index(inp["mm_token_type_ids"], inp["attention_mask"], inp["image_grid_thw"],
                            inp["video_grid_thw"], 2)
    real = inp["attention_mask"].astype(bool)
    np.testing.assert_array_equal(pos[:, real], ref_pos.numpy()[:, real])
    np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0])
    assert (delta != 0).any()


def test_vision_features_match_transformers(hf_checkpoint, jax_model):
    """The tower's merged and DeepStack features, before any splicing."""
    hf, _ = hf_checkpoint("untied")
    m = jax_model("untied")
    grid = np.array([[1, 6, 8], [2, 4, 4]])
    rng = np.random.RandomState(8)
    pix = rng.uniform(-1, 1, size=(int(grid.prod(-1).sum()), patch_dim(hf.config))).astype(np.float32)
    with torch.no_grad():
        out = hf.model.get_image_features(torch.tensor(pix), torch.tensor(grid))
    ref = torch.cat(out.pooler_output).numpy()
    ref_ds = np.stack([torch.cat(f).numpy() for f in out.deepstack_features])
    vis = vision_mod.VisionInputs.build(pix, grid, m.config.vision, inputs_mod.bucket_length(len(pix), 64))
    feats, ds = model_mod.vision_tower(*m.split, vis)
    n = len(ref)
    assert rel_err(np.asarray(feats)[:n], ref) <= 1e-5
    assert rel_err(np.asarray(ds)[:, :n], ref_ds) <= 1e-5


# --- Each reference behaviour is caught when broken ---

def _mrope_chunked(_):
    # The non-interleaved (Qwen2.5-VL) layout: contiguous t | h | w chunks.
    return text_mod, "mrope_axis", lambda hd, s: np.repeat(np.arange(3), s)


def _deepstack_dropped(_):
    return model_mod, "deepstack_at_tokens", lambda ds, idx: jnp.zeros((ds.shape[0], *idx.shape, ds.shape[-1]),
                                                                         ds.dtype)


def _deepstack_one_layer_late(_):
    orig = model_mod.deepstack_at_tokens

    def late(ds, idx):
        out = orig(ds, idx)
        return jnp.concatenate([jnp.zeros_like(out[:1]), out[:-1]], axis=0)
    return model_mod, "deepstack_at_tokens", late


def _attention_across_frames(_):
    return vision_mod, "frame_ids", lambda grid: np.zeros(int(np.prod(grid, -1).sum()), np.int32)


def _vision_rope_row_col_swapped(_):
    orig = vision_mod.rope_positions
    return vision_mod, "rope_positions", lambda grid, m: orig(grid, m)[:, ::-1].copy()


def _pos_embed_half_pixel(_):
    def taps(index, size, side):  # align_corners=False
        src = np.maximum((index + 0.5) * side / size - 0.5, 0).astype(np.float32)
        floor = np.floor(src)
        t = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
        return t, np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2)), 0, None).astype(np.float32)
    return vision_mod, "_axis_taps", taps


def _pos_embed_raster_order(_):
    def rows_cols(h, w, merge):
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        return r.ravel(), c.ravel()
    orig_rope = vision_mod.rope_positions
    # Only the position embedding loses merge-block order; the rotary keeps it.
    return vision_mod, "_merge_block_rows_cols", rows_cols, ("rope_positions", lambda g, m: orig_rope(g, m))


def _vision_mlp_exact_gelu(_):
    orig_gelu = jax.nn.gelu

    def mlp(self, x):
        jax.nn.gelu = lambda y, approximate=True: orig_gelu(y, approximate=False)
        try:
            return orig_mlp(self, x)
        finally:
            jax.nn.gelu = orig_gelu
    orig_mlp = vision_mod.VisionMLP.__call__
    return vision_mod.VisionMLP, "__call__", mlp


def _merger_tanh_gelu(_):
    orig_merger = vision_mod.PatchMerger.__call__
    orig_gelu = jax.nn.gelu

    def merger(self, x):
        jax.nn.gelu = lambda y, approximate=False: orig_gelu(y, approximate=True)
        try:
            return orig_merger(self, x)
        finally:
            jax.nn.gelu = orig_gelu
    return vision_mod.PatchMerger, "__call__", merger


def _deepstack_norm_before_grouping(_):
    def merger(self, x):
        if not self.postshuffle_norm:
            return orig(self, x)
        # normalise per patch with the first quarter of the (grouped-width) norm params
        d = x.shape[-1]
        w, b = self.norm.weight[...][:d], self.norm.bias[...][:d]
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(((x32 - mean) ** 2).mean(-1, keepdims=True) + self.norm.eps) * w + b
        y = y.astype(x.dtype).reshape(-1, d * self.group)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(y), approximate=False))
    orig = vision_mod.PatchMerger.__call__
    return vision_mod.PatchMerger, "__call__", merger


def _video_pos_embed_not_tiled(_):
    orig = vision_mod.pos_embed_taps

    def taps(grid, cfg):  # every frame after the first gets the table's corner instead of its tile
        idx, w = orig(grid, cfg)
        first = np.concatenate([np.arange(n) < (n // t) for t, n in zip(grid[:, 0], np.prod(grid, -1))])
        return np.where(first[:, None], idx, 0).astype(np.int32), w
    return vision_mod, "pos_embed_taps", taps


MUTATIONS = {
    "mrope_not_interleaved": (_mrope_chunked, "one_image"),
    "deepstack_dropped": (_deepstack_dropped, "one_image"),
    "deepstack_one_layer_late": (_deepstack_one_layer_late, "one_image"),
    "vision_attention_across_frames": (_attention_across_frames, "video"),
    "vision_attention_across_images": (_attention_across_frames, "three_images"),
    "vision_rope_row_col_swapped": (_vision_rope_row_col_swapped, "one_image"),
    "pos_embed_half_pixel": (_pos_embed_half_pixel, "one_image"),
    "pos_embed_raster_order": (_pos_embed_raster_order, "one_image"),
    "pos_embed_not_tiled_over_t": (_video_pos_embed_not_tiled, "video"),
    "vision_mlp_exact_gelu": (_vision_mlp_exact_gelu, "one_image"),
    "merger_tanh_gelu": (_merger_tanh_gelu, "one_image"),
    "deepstack_norm_before_grouping": (_deepstack_norm_before_grouping, "one_image"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_parity_catches_broken_reference_behaviour(mutation, monkeypatch, hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("untied")
    make, case = MUTATIONS[mutation]
    inp = _inputs(hf, case, seed=2)
    ref = torch_logits(hf, inp)
    real = inp["attention_mask"].astype(bool)
    assert rel_err(jax_model("untied").logits(**inp), ref, real) <= LOGITS_RTOL  # sound before
    mod, name, fn, *extra = make(None)
    monkeypatch.setattr(mod, name, fn)
    for attr, f in extra:
        monkeypatch.setattr(mod, attr, f)
    jax.clear_caches()
    try:
        assert rel_err(jax_model("untied").logits(**inp), ref, real) > LOGITS_RTOL
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_mrope_layout_invisible_to_text_only(monkeypatch, hf_checkpoint, jax_model):
    """Why the image tests above are needed: with t = h = w the MRoPE layout cannot matter."""
    hf, _ = hf_checkpoint("untied")
    ids = np.random.RandomState(0).randint(0, 290, size=(1, 12))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    monkeypatch.setattr(text_mod, "mrope_axis", lambda hd, s: np.repeat(np.arange(3), s))
    jax.clear_caches()
    try:
        assert rel_err(jax_model("untied").logits(ids), ref) <= LOGITS_RTOL
    finally:
        monkeypatch.undo()
        jax.clear_caches()


# --- Inputs that do not fit together ---

def _err(m, match, **inp):
    with pytest.raises(InputError, match=match) as e:
        m.logits(**inp)
    assert "\n" not in str(e.value)


def test_placeholder_count_mismatch(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("tied")
    m = jax_model("tied")
    inp = _inputs(hf, "one_image")
    ids = inp["input_ids"].copy()
    ids[0, np.flatnonzero(ids[0] == 300)[0]] = 5  # one image pad fewer
    _err(m, r"image 0: 11 placeholder tokens in the prompt but its grid \[1, 6, 8\] gives 12", **dict(inp, input_ids=ids, mm_token_type_ids=None))
    two = dict(inp, image_grid_thw=np.array([[1, 6, 8], [1, 2, 2]]),
               pixel_values=np.concatenate([inp["pixel_values"], inp["pixel_values"][:4]]))
    _err(m, "2 image grid", **two)


def test_vision_input_errors(hf_checkpoint, jax_model):
    hf, _ = hf_checkpoint("tied")
    m = jax_model("tied")
    inp = _inputs(hf, "one_image")
    _err(m, "must be given together", **dict(inp, image_grid_thw=None))
    _err(m, "multiples of spatial_merge_size", **dict(inp, image_grid_thw=np.array([[1, 6, 7]])))
    _err(m, "shape", **dict(inp, pixel_values=inp["pixel_values"][:-1]))
    _err(m, "floating", **dict(inp, pixel_values=inp["pixel_values"].astype(np.int32)))
    bad = inp["pixel_values"].copy()
    bad[3, 2] = np.nan
    _err(m, "NaN", **dict(inp, pixel_values=bad))
    _err(m, "disagrees", **dict(inp, mm_token_type_ids=np.zeros_like(inp["input_ids"])))
    _err(m, r"input_ids must lie in \[0, 320\)", **dict(inp, input_ids=inp["input_ids"] + 1000))


def test_new_image_size_in_bucket_does_not_recompile(jax_model):
    """Patch counts and prompt lengths are padded to buckets: new sizes inside known buckets reuse
    the compiled tower and decoder."""
    m = jax_model("tied")
    dim = m.config.vision.patch_dim
    rng = np.random.RandomState(0)

    def run(h, w, text_len):
        b = PromptBuilder(rng).text(text_len).image(h, w).text(2)
        m.logits(**batch_inputs([b], dim, rng))

    run(6, 8, 3)  # 48 patches -> bucket 64; 12 + 5 tokens -> bucket 32
    tower, fwd = model_mod._vision_tower._cache_size(), model_mod.forward_logits._cache_size()
    run(8, 8, 5)  # 64 patches, 16 + 7 tokens
    run(2, 10, 9)  # 20 patches, 5 + 11 tokens
    assert model_mod._vision_tower._cache_size() == tower
    assert model_mod.forward_logits._cache_size() == fwd
    run(10, 8, 3)  # 80 patches -> the next bucket: one more tower compile
    assert model_mod._vision_tower._cache_size() == tower + 1


# --- Block layout of the vision tower ---

@pytest.mark.parametrize("sizes, bucket, want_size, want_blocks", [
    ([784], 1024, 1024, 1),  # one image: one block, the patch bucket
    ([784] * 16, 16384, 1024, 16),  # a video: one frame per block
    ([48, 16, 16], 128, 64, 2),  # small frames share a block
    ([1024] + [16] * 8, 2048, 1024, 2),  # one big image and eight small ones: two blocks, not 16
    ([520] * 3, 2048, 1024, 4),  # frames that do not pack: more blocks than bucket // size
])
def test_block_layout_packs_frames(sizes, bucket, want_size, want_blocks):
    sizes = np.array(sizes)
    size, blocks, starts = vision_mod.block_layout(sizes, bucket)
    assert (size, blocks) == (want_size, want_blocks)
    assert blocks * size >= bucket
    taken = np.zeros(blocks * size, int)
    for start, n in zip(starts, sizes):
        assert start // size == (start + n - 1) // size, "a frame straddles two blocks"
        assert start % 4 == 0
        taken[start:start + n] += 1
    assert taken.max() == 1 and taken.sum() == sizes.sum()


def test_vision_buckets_four_per_octave(jax_model):
    """Patch counts pad by less than a quarter (not up to 100%), to at most four buckets per octave,
    each a multiple of 8 (of the merge group and of an 8-device split); prompts keep powers of two."""
    k = 4
    seen = {}
    for n in range(1, 9000):
        b = inputs_mod.vision_bucket(n)
        assert b >= max(n, 64) and b % 8 == 0
        assert n <= 64 or b - n < n / k
        seen.setdefault((b - 1).bit_length(), set()).add(b)
        assert inputs_mod.bucket_length(n, 16) == max(16, 1 << (n - 1).bit_length())
    assert max(len(v) for v in seen.values()) == k
    grid = np.array([[1, 28, 28]])  # a 448x448 image: 784 patches
    vcfg = jax_model("untied").config.vision
    vis = vision_mod.VisionInputs.build(np.zeros((784, vcfg.patch_dim), np.float32), grid, vcfg,
                                        inputs_mod.vision_bucket(784))
    assert vis.frame.shape == (1, 896)


def _all_outvars(jaxpr):
    """Every value produced anywhere in a jaxpr, inside loops and nested calls too."""
    for eqn in jaxpr.eqns:
        yield from eqn.outvars
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_outvars(inner)


def test_vision_attention_scores_are_per_block(jax_model):
    """A video of 8 frames: no [P, P] score matrix anywhere in the traced tower, only [B, heads, S, S]."""
    m = jax_model("untied")
    vcfg = m.config.vision
    grid = np.array([[8, 8, 8]])  # 8 frames of 64 patches
    n = int(grid.prod())
    vis = vision_mod.VisionInputs.build(np.zeros((n, vcfg.patch_dim), np.float32), grid, vcfg,
                                        inputs_mod.bucket_length(n, 64))
    assert vis.frame.shape == (8, 64)
    jaxpr = jax.make_jaxpr(lambda p, *a: nnx.merge(m.graphdef, p).model.visual(*a))(
        m.params, vis.patches, vis.pos_idx, vis.pos_w, vis.rope_pos, vis.frame, vis.merged_order)
    biggest = max(np.prod(v.aval.shape) for v in _all_outvars(jaxpr.jaxpr))
    assert biggest <= max(8 * vcfg.num_heads * 64 * 64, n * vcfg.intermediate_size)
    assert biggest < n * n * vcfg.num_heads


def test_block_attention_loop_and_batched_forms_agree():
    """The CPU default (blocks one after another) and the accelerator default (one batched einsum)
    give the same attention, including rows of padding and two frames sharing a block."""
    rng = np.random.RandomState(4)
    blocks, size, heads, hd = 3, 16, 2, 8
    q, k, v = (jnp.asarray(rng.randn(blocks * size, heads, hd).astype(np.float32)) for _ in range(3))
    frame = np.full((blocks, size), -1)
    frame[0, :10], frame[0, 10:14], frame[1, :16], frame[2, :4] = 0, 1, 2, 3
    frame = jnp.asarray(frame)
    mask = (frame[:, :, None] == frame[:, None, :]) & (frame[:, None, :] >= 0)
    looped = np.asarray(vision_mod.block_attention(q, k, v, mask, loop=True))
    batched = np.asarray(vision_mod.block_attention(q, k, v, mask, loop=False))
    np.testing.assert_allclose(looped, batched, rtol=1e-6, atol=1e-6)
    # and both equal plain attention over each frame alone
    for f in range(4):
        rows = np.flatnonzero(np.asarray(frame).ravel() == f)
        ref = vision_mod._attend(q[rows], k[rows], v[rows], jnp.ones((len(rows), len(rows)), bool))
        np.testing.assert_allclose(looped[rows], np.asarray(ref), rtol=1e-6, atol=1e-6)
