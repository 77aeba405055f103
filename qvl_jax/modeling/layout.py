"""The layout of one multimodal prompt row: its unpadded tokens and 3-D positions, and for each image
and video (a `MediaItem`, in prompt order) where its placeholder tokens, pixel rows and feature rows
lie and a digest of its pixels. The engine's prefix cache and chunked prefill, and ChatSession's
reuse of a cached conversation, read these spans instead of working them out again."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from qvl_jax.config import Qwen3VLConfig, VisionConfig
from qvl_jax.errors import InputError
from qvl_jax.modeling import positions as positions_mod
from qvl_jax.modeling import vision as vision_mod
from qvl_jax.modeling.inputs import prepare_inputs, vision_bucket

KINDS = ("image", "video")


@dataclasses.dataclass(frozen=True)
class MediaItem:
    """One image or video of a prompt. Spans are half-open: [start, end)."""

    kind: str  # "image" or "video"
    index: int  # its place among the inputs of its kind (row of image_grid_thw / video_grid_thw)
    start: int  # token span of its placeholders in the unpadded prompt; a video's runs from its first
    end: int  # temporal step's first placeholder to its last step's end (timestamps included)
    patch_start: int  # rows of pixel_values (images) or pixel_values_videos (videos)
    patch_end: int
    feat_start: int  # rows of prepare_inputs' features: all image features, then all video features
    feat_end: int
    grid: tuple[int, int, int]  # (t, h, w) in patches
    digest: str  # sha256 hex of the grid (int64) and the pixel rows (float32): the prefix cache's key

    @property
    def n_patches(self) -> int:
        return self.patch_end - self.patch_start

    @property
    def n_feats(self) -> int:
        return self.feat_end - self.feat_start


def media_digest(grid, pixels) -> str:
    """The digest of one image or video: tells apart different pictures behind the same placeholder
    token ids (the prefix cache keys blocks on it, so its bytes must never change)."""
    return hashlib.sha256(np.asarray(grid, np.int64).tobytes()
                          + np.ascontiguousarray(pixels, dtype=np.float32).tobytes()).hexdigest()


def feature_order(items) -> tuple[MediaItem, ...]:
    """items in the order the tower takes them and prepare_inputs numbers their features: images
    before videos, each kind in input order."""
    return tuple(sorted(items, key=lambda m: m.feat_start))


@dataclasses.dataclass(frozen=True, eq=False)
class PromptLayout:
    """One prompt row, padding removed, as `prepare_prompt` lays it out."""

    ids: np.ndarray  # [n] int32
    positions: np.ndarray  # [3, n] int32 rope positions
    rope_delta: int  # decode position = cache index + rope_delta
    feat_index: np.ndarray | None  # [n] int32 feature row of each token (-1: text); None without media
    items: tuple[MediaItem, ...]  # prompt order
    image_pixels: np.ndarray | None  # [image patches, patch_dim] as given
    video_pixels: np.ndarray | None  # [video patches, patch_dim] as given
    vision_config: VisionConfig
    # prepare_inputs' tower inputs for every item (None without media): vision_inputs(items) hands
    # them out rather than building them again.
    vision: vision_mod.VisionInputs | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def digests(self) -> tuple[str, ...]:
        """The items' digests in prompt order."""
        return tuple(m.digest for m in self.items)

    def pixels(self, item: MediaItem) -> np.ndarray:
        """[patches, patch_dim]: the item's rows of its kind's pixel array."""
        pix = self.image_pixels if item.kind == "image" else self.video_pixels
        return pix[item.patch_start:item.patch_end]

    def items_overlapping(self, a: int, b: int) -> tuple[MediaItem, ...]:
        """Items whose token span meets [a, b) (the media behind a prefix-cache block)."""
        return tuple(m for m in self.items if m.start < b and m.end > a)

    def items_ending_after(self, n: int) -> tuple[MediaItem, ...]:
        """Items with a placeholder at or after token n (those a prefill from token n still needs)."""
        return tuple(m for m in self.items if m.end > n)

    def items_ending_by(self, n: int) -> tuple[MediaItem, ...]:
        """Items whose placeholders all lie before token n (those inside a cached prefix of n tokens)."""
        return tuple(m for m in self.items if m.end <= n)

    def splits_item(self, n: int) -> bool:
        """Whether a boundary before token n cuts through an item's span."""
        return any(m.start < n < m.end for m in self.items)

    def vision_inputs(self, items) -> vision_mod.VisionInputs | None:
        """Tower inputs of a subset of the items, in feature order (`feature_order`), so a subset that
        holds every item runs the tower exactly as the whole prompt does. None for no items."""
        items = feature_order(items)
        if not items:
            return None
        if self.vision is not None and items == feature_order(self.items):
            return self.vision
        grids = vision_mod.check_grid_thw(np.array([m.grid for m in items], np.int64), self.vision_config,
                                          "grid_thw")
        pix = np.concatenate([self.pixels(m) for m in items])
        return vision_mod.VisionInputs.build(pix, grids, self.vision_config,
                                             vision_bucket(int(grids.prod(-1).sum())))

    def feature_remap(self, items) -> np.ndarray:
        """[all features] int32: for each of prepare_inputs' feature rows, its row among the features
        of `items` in feature order; -1 where its item is not among them."""
        total = max((m.feat_end for m in self.items), default=0)
        remap = np.full(total, -1, np.int32)
        row = 0
        for m in feature_order(items):
            remap[m.feat_start:m.feat_end] = row + np.arange(m.n_feats)
            row += m.n_feats
        return remap

    def chunk_feat_index(self, items, a: int, b: int, length: int | None = None) -> np.ndarray:
        """[length] int32 (default b - a): for tokens [a, b) of the sequence, the row of each
        placeholder among the features of `items` in feature order (what `vision_inputs(items)`
        gives); -1 at text, at tokens past the prompt (generated ones) and at padding up to length."""
        length = b - a if length is None else length
        if not 0 <= a <= b or length < b - a:
            raise ValueError(f"chunk [{a}, {b}) does not fit a row of {length}")
        out = np.full(length, -1, np.int32)
        stop = min(b, len(self.ids))
        if self.feat_index is None or stop <= a:
            return out
        index = self.feat_index[a:stop]
        remap = self.feature_remap(items)
        rows = np.where(index >= 0, remap[np.maximum(index, 0)], -1)
        if ((index >= 0) & (rows < 0)).any():
            raise ValueError(f"tokens [{a}, {b}) hold placeholders of media outside the given items")
        out[:stop - a] = rows
        return out


def _items(ids: np.ndarray, cfg: Qwen3VLConfig, grids: dict, pixels: dict) -> tuple[MediaItem, ...]:
    """The prompt's media in prompt order. Images take one placeholder run each, videos one run per
    temporal step (timestamps split them); prepare_inputs has checked that runs and grids agree."""
    kind_of = {positions_mod.IMAGE: "image", positions_mod.VIDEO: "video"}
    types = positions_mod.token_types(ids, cfg.image_token_id, cfg.video_token_id)
    runs = [r for r in positions_mod._runs(types) if r[0] != positions_mod.TEXT]
    group = cfg.vision.spatial_merge_size ** 2
    patch0 = {k: np.concatenate([[0], np.cumsum(g.prod(-1))]) for k, g in grids.items()}
    feat_base = {"image": 0, "video": int(patch0["image"][-1]) // group}
    used = {"image": 0, "video": 0}
    out, r = [], 0
    while r < len(runs):
        kind = kind_of[runs[r][0]]
        i = used[kind]
        used[kind] += 1
        grid = tuple(int(v) for v in grids[kind][i])
        steps = grid[0] if kind == "video" else 1
        p0, p1 = int(patch0[kind][i]), int(patch0[kind][i + 1])
        f0 = feat_base[kind] + p0 // group
        out.append(MediaItem(kind, i, runs[r][1], runs[r + steps - 1][2], p0, p1, f0, f0 + (p1 - p0) // group,
                             grid, media_digest(grid, pixels[kind][p0:p1])))
        r += steps
    return tuple(out)


def prepare_prompt(cfg: Qwen3VLConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None, *,
                   batch_message: str = "prepare_prompt takes one prompt (a batch of one); got a batch of {n}",
                   ) -> PromptLayout:
    """Checks one prompt (prepare_inputs' checks and errors) and lays out its row without padding.

    batch_message: the InputError's message for a batch of more than one row; "{n}" is replaced by
    the batch size. Padding on either side is removed: positions and feature rows skip it already."""
    prep = prepare_inputs(cfg, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                          video_grid_thw, mm_token_type_ids)
    b = prep.input_ids.shape[0]
    if b != 1:
        raise InputError(batch_message.format(n=b))
    real = prep.mask[0] > 0
    ids = prep.input_ids[0][real]
    feat_index = None if prep.feat_index is None else prep.feat_index[0][real]
    given = {"image": (pixel_values, image_grid_thw), "video": (pixel_values_videos, video_grid_thw)}
    pixels = {k: None if p is None else np.asarray(p) for k, (p, _) in given.items()}
    grids = {k: np.zeros((0, 3), np.int64) if g is None else np.asarray(g, np.int64) for k, (_, g) in given.items()}
    items = _items(ids, cfg, grids, pixels) if feat_index is not None else ()
    return PromptLayout(ids=ids, positions=np.ascontiguousarray(prep.positions[:, 0][:, real]),
                        rope_delta=int(prep.rope_delta[0]), feat_index=feat_index, items=items,
                        image_pixels=pixels["image"], video_pixels=pixels["video"], vision_config=cfg.vision,
                        vision=prep.vision)
