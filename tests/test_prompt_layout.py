"""The layout of one multimodal prompt (qvl_jax.modeling.layout): each image's and video's token span,
pixel rows, feature rows and digest, checked against what the test works out while building the
prompt; padding removed in one call; the vision inputs and feature index of a prefill chunk; and
compact_left for batches. Host only (numpy), no model."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest

from hf_models import SPECIAL, TINY_CONFIGS
from mm_inputs import IMG, VID, PromptBuilder, batch_inputs
from qvl_jax.config import Qwen3VLConfig
from qvl_jax.errors import InputError
from qvl_jax.modeling import vision as vision_mod
from qvl_jax.modeling.inputs import compact_left, prepare_inputs, vision_bucket
from qvl_jax.modeling.layout import MediaItem, PromptLayout, prepare_prompt

MERGE = 2


@pytest.fixture(scope="module")
def cfg() -> Qwen3VLConfig:
    return Qwen3VLConfig.from_hf_dict(dict(copy.deepcopy(TINY_CONFIGS["untied"]), model_type="qwen3_vl", **SPECIAL))


class Recorder:
    """A PromptBuilder that notes, as it goes, where each medium's placeholders land and how many
    patches it has: the expected layout, worked out apart from the code under test."""

    def __init__(self, rng):
        self.b = PromptBuilder(rng, MERGE)
        self.media: list[dict] = []  # prompt order

    def text(self, n):
        self.b.text(n)
        return self

    def image(self, h, w):
        a = len(self.b.ids)
        self.b.image(h, w)
        # <vision_start> pads <vision_end>
        self.media.append(dict(kind="image", start=a + 1, end=len(self.b.ids) - 1, grid=(1, h, w)))
        return self

    def video(self, t, h, w):
        a = len(self.b.ids)
        self.b.video(t, h, w)
        # each step: 3 timestamp tokens, <vision_start>, pads, <vision_end>
        self.media.append(dict(kind="video", start=a + 4, end=len(self.b.ids) - 1, grid=(t, h, w)))
        return self

    def expected(self) -> list[dict]:
        """Index, patch rows and feature rows of each medium (features: all images, then all videos)."""
        out = [dict(m) for m in self.media]
        patches = {"image": 0, "video": 0}
        for m in out:
            m["index"] = sum(1 for o in out[:out.index(m)] if o["kind"] == m["kind"])
            n = int(np.prod(m["grid"]))
            m["patch_start"], m["patch_end"] = patches[m["kind"]], patches[m["kind"]] + n
            patches[m["kind"]] += n
        n_img_feats = patches["image"] // MERGE ** 2
        for m in out:
            base = n_img_feats if m["kind"] == "video" else 0
            m["feat_start"] = base + m["patch_start"] // MERGE ** 2
            m["feat_end"] = base + m["patch_end"] // MERGE ** 2
        return out


def _mixed(seed=0) -> Recorder:
    """Images before, between and after two videos of several temporal steps."""
    rng = np.random.RandomState(seed)
    return (Recorder(rng).text(5).image(4, 4).text(3).video(3, 4, 6).text(2).image(2, 4).text(4)
            .video(2, 2, 2).image(6, 2).text(3))


def _inputs(rec: Recorder, cfg, seed=0) -> dict:
    inp = batch_inputs([rec.b], cfg.vision.patch_dim, np.random.RandomState(seed + 100))
    inp.pop("attention_mask")
    return inp


def _digest(grid, pix) -> str:
    return hashlib.sha256(np.array(grid, np.int64).tobytes() + np.asarray(pix, np.float32).tobytes()).hexdigest()


def _assert_same_vision(a: vision_mod.VisionInputs, b: vision_mod.VisionInputs):
    for f in ("patches", "pos_idx", "pos_w", "rope_pos", "frame", "merged_order", "packed"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


def _assert_same_layout(a: PromptLayout, b: PromptLayout):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert a.rope_delta == b.rope_delta
    np.testing.assert_array_equal(a.feat_index, b.feat_index)
    assert a.items == b.items
    for m in a.items:
        np.testing.assert_array_equal(a.pixels(m), b.pixels(m))
    _assert_same_vision(a.vision_inputs(a.items), b.vision_inputs(b.items))


def test_items_spans_patches_features_digests(cfg):
    rec = _mixed()
    inp = _inputs(rec, cfg)
    lay = prepare_prompt(cfg, **inp)
    exp = rec.expected()
    assert [m.kind for m in lay.items] == ["image", "video", "image", "video", "image"]
    assert len(lay.items) == len(exp)
    ids = np.asarray(rec.b.ids)
    pixels = {"image": inp["pixel_values"], "video": inp["pixel_values_videos"]}
    for m, e in zip(lay.items, exp):
        assert isinstance(m, MediaItem)
        got = dict(kind=m.kind, index=m.index, start=m.start, end=m.end, grid=m.grid, patch_start=m.patch_start,
                   patch_end=m.patch_end, feat_start=m.feat_start, feat_end=m.feat_end)
        assert got == e
        # the span holds exactly the placeholders of its grid (plus timestamps between video steps)
        tok = IMG if m.kind == "image" else VID
        span = ids[m.start:m.end]
        assert span[0] == tok and span[-1] == tok
        assert int((span == tok).sum()) == int(np.prod(m.grid)) // MERGE ** 2 == m.n_feats
        # prepare_inputs' feature rows of its placeholders are exactly its feature rows
        np.testing.assert_array_equal(lay.feat_index[m.start:m.end][span == tok], np.arange(e["feat_start"],
                                                                                             e["feat_end"]))
        np.testing.assert_array_equal(lay.pixels(m), pixels[m.kind][e["patch_start"]:e["patch_end"]])
        assert m.digest == _digest(m.grid, pixels[m.kind][e["patch_start"]:e["patch_end"]])
    assert lay.digests == tuple(m.digest for m in lay.items)
    assert (lay.feat_index[~np.isin(ids, (IMG, VID))] == -1).all()
    np.testing.assert_array_equal(lay.ids, ids)
    prep = prepare_inputs(cfg, **inp)
    np.testing.assert_array_equal(lay.positions, prep.positions[:, 0])
    assert lay.rope_delta == int(prep.rope_delta[0])
    # the vision inputs of every item are the whole prompt's
    _assert_same_vision(lay.vision_inputs(lay.items[::-1]), prep.vision)
    assert lay.vision_inputs(lay.items) is lay.vision  # not built twice


def test_digests_follow_the_pixels(cfg):
    """Equal pixels and grids give equal digests; one changed pixel changes its medium's digest only;
    the digests are those _image_digests gave (the prefix cache's keys do not move)."""
    rng = np.random.RandomState(3)
    rec = Recorder(rng).text(2).image(4, 4).text(2).image(4, 4).video(2, 4, 4).text(1)
    inp = _inputs(rec, cfg)
    pix = inp["pixel_values"]
    pix[16:32] = pix[0:16]  # the second image is a copy of the first
    a = prepare_prompt(cfg, **inp)
    assert a.items[0].digest == a.items[1].digest
    assert a.items[2].digest != a.items[0].digest
    changed = dict(inp, pixel_values=pix.copy())
    changed["pixel_values"][20, 5] += 1e-3
    b = prepare_prompt(cfg, **changed)
    assert b.items[0].digest == a.items[0].digest
    assert b.items[1].digest != a.items[1].digest
    assert b.items[2].digest == a.items[2].digest
    # a grid with the same pixel bytes but another shape is another picture
    assert _digest((1, 4, 4), pix[:16]) != _digest((1, 2, 8), pix[:16])
    from qvl_jax.engine import generate

    old = getattr(generate, "_image_digests", None)
    if old is not None:
        assert [m.digest for m in a.items if m.kind == "image"] == old(inp["pixel_values"], inp["image_grid_thw"])
        assert [m.digest for m in a.items if m.kind == "video"] == old(inp["pixel_values_videos"],
                                                                      inp["video_grid_thw"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_removed_in_one_call(cfg, side):
    rec = _mixed(1)
    inp = _inputs(rec, cfg, 1)
    ref = prepare_prompt(cfg, **inp)
    k = 7
    pad = ((0, 0), (k, 0) if side == "left" else (0, k))
    padded = dict(inp, input_ids=np.pad(inp["input_ids"], pad), attention_mask=np.pad(np.ones_like(inp["input_ids"]),
                                                                                       pad),
                  mm_token_type_ids=np.pad(inp["mm_token_type_ids"], pad))
    got = prepare_prompt(cfg, **padded)
    assert len(got) == len(ref) == len(rec.b.ids)
    _assert_same_layout(got, ref)
    assert got.items[0].start == rec.media[0]["start"]  # spans count unpadded tokens


def test_text_only(cfg):
    lay = prepare_prompt(cfg, input_ids=[[5, 6, 7]], attention_mask=[[0, 1, 1]])
    np.testing.assert_array_equal(lay.ids, [6, 7])
    np.testing.assert_array_equal(lay.positions, [[0, 1]] * 3)
    assert lay.items == () and lay.feat_index is None and lay.rope_delta == 0
    assert lay.vision_inputs(lay.items) is None
    np.testing.assert_array_equal(lay.chunk_feat_index((), 0, 2, 4), [-1] * 4)


def _expected_chunk(rec: Recorder, subset: list[dict], a: int, b: int, length: int) -> np.ndarray:
    """Feature rows of tokens [a, b) among the features of `subset` laid out images first, then
    videos, each kind in input order: counted placeholder by placeholder."""
    ordered = sorted(subset, key=lambda m: (m["kind"] != "image", m["index"]))
    offset, row = {}, 0
    for m in ordered:
        offset[id(m)] = row
        row += int(np.prod(m["grid"])) // MERGE ** 2
    ids = np.asarray(rec.b.ids)
    out = np.full(length, -1, np.int32)
    for j in range(a, min(b, len(ids))):
        for m in subset:
            if m["start"] <= j < m["end"] and ids[j] in (IMG, VID):
                out[j - a] = offset[id(m)] + int(np.isin(ids[m["start"]:j], (IMG, VID)).sum())
    return out


def test_suffix_vision_and_chunk_index(cfg):
    """A ChatSession-style suffix (every medium after a cached prefix that ends after the first image)
    and an engine-style chunk running into generated tokens: the subset's tower inputs in feature
    order and the chunk's feature rows into them, as counted here and as _suffix_vision gives them."""
    rec = _mixed(2)
    inp = _inputs(rec, cfg, 2)
    lay = prepare_prompt(cfg, **inp)
    exp = rec.expected()
    n = lay.items[0].end + 2  # inside the text after the first image
    assert not lay.splits_item(n) and lay.splits_item(lay.items[1].start + 1)
    assert lay.items_ending_by(n) == lay.items[:1]
    new = lay.items_ending_after(n)
    assert new == lay.items[1:]  # video, image, video, image: not feature order
    vis = lay.vision_inputs(new)
    ordered = [m for m in exp[1:] if m["kind"] == "image"] + [m for m in exp[1:] if m["kind"] == "video"]
    pixels = {"image": inp["pixel_values"], "video": inp["pixel_values_videos"]}
    pix = np.concatenate([pixels[m["kind"]][m["patch_start"]:m["patch_end"]] for m in ordered])
    grids = np.array([m["grid"] for m in ordered], np.int64)
    _assert_same_vision(vis, vision_mod.VisionInputs.build(pix, grids, cfg.vision, vision_bucket(len(pix))))
    tb = 128
    index = lay.chunk_feat_index(new, n, len(lay), tb)
    np.testing.assert_array_equal(index, _expected_chunk(rec, exp[1:], n, len(lay), tb))

    from qvl_jax.engine import generate

    old = getattr(generate, "_suffix_vision", None)
    if old is not None:
        tuples = [(m.kind, m.index, m.start, m.end) for m in new]
        old_vis, old_index = old(cfg, inp, tuples, lay.ids, n, tb)
        _assert_same_vision(vis, old_vis)
        np.testing.assert_array_equal(index[None], old_index)

    # an engine chunk: tokens [a, b) past the prompt's end, media still needed after a
    a = lay.items[2].start + 1
    b = len(lay) + 5
    need = lay.items_ending_after(a)
    assert need == lay.items[2:]
    assert lay.items_overlapping(a, a + 4) == (lay.items[2],)
    assert lay.items_overlapping(lay.items[2].end, lay.items[3].start) == ()
    index = lay.chunk_feat_index(need, a, b, 64)
    np.testing.assert_array_equal(index, _expected_chunk(rec, exp[2:], a, b, 64))
    assert (index[len(lay) - a:] == -1).all()
    with pytest.raises(ValueError, match="outside the given items"):
        lay.chunk_feat_index(lay.items[3:], a, b)


def test_batch_of_n_and_bad_inputs(cfg):
    rng = np.random.RandomState(5)
    two = batch_inputs([PromptBuilder(rng).text(4).image(4, 4), PromptBuilder(rng).text(6)], cfg.vision.patch_dim,
                       rng)
    with pytest.raises(InputError, match=r"^prepare_prompt takes one prompt \(a batch of one\); got a batch of 2$"):
        prepare_prompt(cfg, **two)
    msg = "submit takes one prompt (a batch of one); got a batch of {n}: submit each row, or use engine.generate"
    with pytest.raises(InputError) as e:
        prepare_prompt(cfg, **two, batch_message=msg)
    assert str(e.value) == "submit takes one prompt (a batch of one); got a batch of 2: submit each row, or use " \
                           "engine.generate"
    with pytest.raises(InputError) as e:
        prepare_prompt(cfg, input_ids=np.zeros((3, 4), np.int64),
                       batch_message="a chat session holds one conversation; got a batch of {n}")
    assert str(e.value) == "a chat session holds one conversation; got a batch of 3"
    # prepare_inputs' checks, with its messages, come first
    one = _inputs(_mixed(), cfg)
    bad = dict(one, image_grid_thw=one["image_grid_thw"][:2])
    with pytest.raises(InputError) as want:
        prepare_inputs(cfg, **bad)
    with pytest.raises(InputError) as got:
        prepare_prompt(cfg, **bad)
    assert str(got.value) == str(want.value)


def test_compact_left_equals_preparing_the_left_padded_batch(cfg):
    """Generator.request's layout in one call: a right-padded batch moved to left padding equals
    prepare_inputs on the same batch padded on the left."""
    builders = [_mixed(6).b, PromptBuilder(np.random.RandomState(7)).text(3).image(2, 2).text(2)]
    right = batch_inputs(builders, cfg.vision.patch_dim, np.random.RandomState(8), pad_side="right")
    left = batch_inputs(builders, cfg.vision.patch_dim, np.random.RandomState(8), pad_side="left")
    got = compact_left(prepare_inputs(cfg, **right))
    want = prepare_inputs(cfg, **left)
    assert not np.array_equal(prepare_inputs(cfg, **right).input_ids, want.input_ids)
    for f in ("input_ids", "mask", "positions", "rope_delta", "feat_index"):
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype, f
        np.testing.assert_array_equal(a, b, err_msg=f)
    _assert_same_vision(got.vision, want.vision)
