"""Host-side input preparation: checks a batch of Hugging Face-style inputs and works out, with numpy,
everything shape- or data-dependent (3-D positions, where the vision features go, the vision block
layout, length buckets), so that jitted functions see only arrays of bucketed shapes."""

from __future__ import annotations

import dataclasses

import numpy as np

from qvl_jax.config import Qwen3VLConfig
from qvl_jax.errors import InputError
from qvl_jax.modeling import positions as positions_mod
from qvl_jax.modeling import vision as vision_mod


def bucket_length(n: int, minimum: int = 16, per_octave: int = 1) -> int:
    """The length that n pads to (>= minimum): lengths compile once per bucket.

    per_octave=1: the smallest power of two >= n (prompts, cache windows). per_octave=k (a power of
    two): n rounded up to a multiple of p / (2k), p that power of two, so each octave (p/2, p] holds
    k buckets and padding stays under 1/k of n."""
    p = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    if per_octave <= 1 or p <= minimum:
        return p
    step = max(1, p // (2 * per_octave))
    return max(minimum, -(-int(n) // step) * step)


def vision_bucket(n_patches: int) -> int:
    """The patch bucket of a vision call: four per octave (784 -> 896, 1040 -> 1280), so padding is
    under a quarter of the patches rather than up to all of them (the tower compiles quickly; its
    work grows with the padded count)."""
    return bucket_length(n_patches, 64, per_octave=4)


def _as_batch(name: str, value, dtype_kind: str = "iu") -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as e:  # ragged lists and the like
        raise InputError(f"{name} must be an array of shape [batch, length] ({e})") from None
    if arr.size == 0:  # before the dtype check: np.asarray([]) is float64
        raise InputError(f"{name} is empty (shape {list(arr.shape)}); it needs at least one token per row")
    if arr.dtype.kind not in dtype_kind:
        raise InputError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InputError(f"{name} must have shape [batch, length] with length > 0, got {list(arr.shape)}")
    return arr


@dataclasses.dataclass(frozen=True)
class PreparedInputs:
    """Host-side result of checking and laying out one batch of model inputs (unpadded)."""

    input_ids: np.ndarray  # [b, t] int32
    mask: np.ndarray  # [b, t] int32
    positions: np.ndarray  # [3, b, t] int32
    rope_delta: np.ndarray  # [b] int32
    feat_index: np.ndarray | None  # [b, t] int32 row of the vision features, -1 elsewhere
    vision: vision_mod.VisionInputs | None


def _feature_index(ids: np.ndarray, cfg: Qwen3VLConfig, n_image: int, n_video: int) -> np.ndarray:
    """Image tokens take image features in row-major order, video tokens the video features (which
    follow the image features in the tower's output), as transformers' masked_scatter does."""
    is_img, is_vid = ids == cfg.image_token_id, ids == cfg.video_token_id
    for kind, mask, n in (("image", is_img, n_image), ("video", is_vid, n_video)):
        if int(mask.sum()) != n:
            raise InputError(f"{kind} features and {kind} tokens do not match: {int(mask.sum())} "
                             f"{kind} placeholder tokens in input_ids, {n} {kind} features from the grids")
    index = np.full(ids.shape, -1, np.int32)
    index[is_img] = np.arange(n_image)
    index[is_vid] = n_image + np.arange(n_video)
    return index


def _mask(attention_mask, shape) -> np.ndarray:
    if attention_mask is None:
        return np.ones(shape, np.int32)
    mask = _as_batch("attention_mask", attention_mask, "iub")
    if mask.shape != shape:
        raise InputError(f"attention_mask shape {list(mask.shape)} != input_ids shape {list(shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise InputError("attention_mask must hold only 0 and 1")
    if not mask.any(axis=1).all():
        raise InputError("attention_mask has a row with no real tokens")
    return mask.astype(np.int32)


def prepare_inputs(cfg: Qwen3VLConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None) -> PreparedInputs:
    """Checks a batch of HF-style inputs and computes everything shape- or data-dependent on the host."""
    ids = _as_batch("input_ids", input_ids)
    vocab = cfg.text.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise InputError(f"input_ids must lie in [0, {vocab}), got values in [{ids.min()}, {ids.max()}]")
    mask = _mask(attention_mask, ids.shape)
    types = positions_mod.token_types(ids, cfg.image_token_id, cfg.video_token_id)
    if mm_token_type_ids is not None:
        given = _as_batch("mm_token_type_ids", mm_token_type_ids)
        if given.shape != ids.shape or not np.array_equal(given, types):
            raise InputError("mm_token_type_ids disagrees with the image/video placeholder tokens in input_ids")

    vcfg = cfg.vision
    grid = {}
    for kind, pix, g in (("image", pixel_values, image_grid_thw), ("video", pixel_values_videos, video_grid_thw)):
        if (pix is None) != (g is None):
            raise InputError(f"{kind} pixel values and {kind}_grid_thw must be given together")
        grid[kind] = None if g is None else vision_mod.check_grid_thw(g, vcfg, f"{kind}_grid_thw")
    positions, delta = positions_mod.rope_index(types, mask, grid["image"], grid["video"], vcfg.spatial_merge_size)

    group = vcfg.spatial_merge_size ** 2
    n_feats = {k: 0 if g is None else int(g.prod(-1).sum()) // group for k, g in grid.items()}
    feat_index = _feature_index(ids, cfg, n_feats["image"], n_feats["video"])
    vis = None
    present = [(pix, grid[k]) for k, pix in (("image", pixel_values), ("video", pixel_values_videos))
               if pix is not None]
    if present:
        # Images and videos go through the tower in one call: attention never crosses a frame, so
        # this equals running them apart, and the video features land right after the image ones.
        all_grids = np.concatenate([g for _, g in present])
        pix = [np.asarray(p) for p, _ in present]
        widths = {p.shape[-1] for p in pix if p.ndim == 2}
        if any(p.ndim != 2 for p in pix) or len(widths) != 1:
            raise InputError(f"pixel values must be [patches, {vcfg.patch_dim}] arrays, got shapes "
                             f"{[list(p.shape) for p in pix]}")
        n_patches = int(all_grids.prod(-1).sum())
        vis = vision_mod.VisionInputs.build(np.concatenate(pix), all_grids, vcfg, vision_bucket(n_patches))
    return PreparedInputs(ids.astype(np.int32), mask, positions, delta, feat_index if present else None, vis)


def compact_left(prep: PreparedInputs) -> PreparedInputs:
    """The same batch with each row's real tokens moved to the right end, padded on the left to the
    longest row: what prepare_inputs gives for that layout (padding ids 0, positions 0, feature rows
    -1), without checking and laying it out a second time. Positions skip padding, so they move
    with their tokens unchanged."""
    lengths = prep.mask.sum(1)
    b, t = len(lengths), int(lengths.max())
    ids, mask = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    positions = np.zeros((3, b, t), np.int32)
    feat_index = None if prep.feat_index is None else np.full((b, t), -1, np.int32)
    for r in range(b):
        real, at = prep.mask[r] > 0, slice(t - int(lengths[r]), t)
        ids[r, at], mask[r, at] = prep.input_ids[r][real], 1
        positions[:, r, at] = prep.positions[:, r][:, real]
        if feat_index is not None:
            feat_index[r, at] = prep.feat_index[r][real]
    return PreparedInputs(ids, mask, positions, prep.rope_delta, feat_index, prep.vision)
