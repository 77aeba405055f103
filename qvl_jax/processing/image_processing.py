"""Image preprocessing for Qwen3-VL, in numpy + PIL (no torch, no transformers), and what the video
processor (video_processing.py) shares with it.

What it holds:
  - `smart_resize`: the target (height, width) rule of the reference image processor.
  - `load_image` (from media_io.py, where decoding and the RGB conversion rules live): any accepted
    image input -> RGB uint8 [H, W, 3], converted the way transformers does.
  - `ImageProcessor`: images -> {"pixel_values" [patches, C*T*P*P] float32, "image_grid_thw" [n, 3] int64},
    numerically equal to transformers' `Qwen2VLImageProcessorPil` (what `AutoImageProcessor` returns for
    Qwen3-VL when torchvision is absent) configured by Qwen3-VL's preprocessor_config.json.
  - The pieces both processors use: the pixel limits of both and the bounds on a config, the PIL
    resize, patchify in merge-block order, and the option checks of `_Base`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

from qvl_jax.errors import ConfigError, InputError
from qvl_jax.processing.media_io import load_image

# Qwen3-VL's preprocessor_config.json (what the released checkpoints ship).
QWEN3_VL_IMAGE_MIN_PIXELS = 65536  # 256 * 256
QWEN3_VL_IMAGE_MAX_PIXELS = 16777216  # 4096 * 4096
# Qwen3VLVideoProcessor's class defaults; the checkpoints' video_preprocessor_config.json overrides them
# (Qwen3-VL-2B ships shortest_edge 4096, longest_edge 25165824), see VideoProcessor.from_dict.
QWEN3_VL_VIDEO_MIN_PIXELS = 128 * 32 * 32
QWEN3_VL_VIDEO_MAX_PIXELS = 768 * 32 * 32
MAX_ASPECT_RATIO = 200
# Bounds on what a preprocessor config may ask for, checked when it is read: beyond them every image
# would be blown up (or allowed) to arrays that do not fit in memory, and the process gets killed.
# 2**30 pixels are four times the vision tokens the longest Qwen3-VL context holds (262144 tokens of
# 32 x 32 pixels); a minimum above the released maximum (4096 x 4096) enlarges every image past it.
MAX_PIXELS_LIMIT = 2**30
MIN_PIXELS_LIMIT = QWEN3_VL_IMAGE_MAX_PIXELS
MAX_TEMPORAL_PATCH_SIZE = 16
_BICUBIC = 3
_PIL_FILTERS = (0, 1, 2, 3, 4, 5)  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING


# ----------------------------------------------------------------------------------------------------
# target sizes


def _check_aspect(height: int, width: int, what: str = "image") -> None:
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"{what} aspect ratio {ratio:g}:1 (height {height}, width {width}) exceeds the "
            f"{MAX_ASPECT_RATIO}:1 limit of Qwen3-VL preprocessing"
        )


def smart_resize(
    height: int,
    width: int,
    factor: int = 32,
    min_pixels: int = QWEN3_VL_IMAGE_MIN_PIXELS,
    max_pixels: int = QWEN3_VL_IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """Target (height, width) of an image: multiples of `factor`, area within [min_pixels, max_pixels]
    (up to the rounding of each side), aspect ratio kept as well as that allows. Same arithmetic as
    transformers' `smart_resize` (Python's half-to-even `round`, then floor / ceil when out of budget)."""
    if height <= 0 or width <= 0:
        raise InputError(f"image has zero size (height {height}, width {width})")
    _check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ----------------------------------------------------------------------------------------------------
# resize


def _resize(rgb: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    # Same PIL call on the same uint8 RGB data as the reference, so the resampled bytes are identical.
    resized = Image.fromarray(rgb).resize((width, height), resample=resample)
    return np.asarray(resized, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# patchify


def _patchify(frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int):
    """frames [T, C, H, W] (T a multiple of temporal_patch_size) -> ([gt*gh*gw, C*Tp*P*P], (gt, gh, gw)).

    Rows go in merge-block order: for each temporal step, the merge_size x merge_size blocks in raster
    order, and inside a block its patches in raster order; each row is (C, Tp, P, P) flattened."""
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    m, p = merge_size, patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * p * p), (gt, gh, gw)


# ----------------------------------------------------------------------------------------------------
# shared option checks


def _positive_int(name: str, value: Any, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise ConfigError(f"{name}={value} is beyond the supported limit of {limit}")
    return int(value)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    values = (value,) * 3 if _is_number(value) else value
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(_is_number(v) for v in values):
        raise ConfigError(f"{name} must be 3 finite numbers (one per RGB channel), got {value!r}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _pixel_limits(size: Any, min_pixels: Any, max_pixels: Any, default: tuple[int, int]) -> tuple[int, int]:
    # transformers: `size` replaces the default dict wholesale, then min_pixels / max_pixels override it.
    if size is None:
        lo, hi = default
    elif isinstance(size, dict):
        lo = size.get("shortest_edge", size.get("min_pixels"))
        hi = size.get("longest_edge", size.get("max_pixels"))
    else:
        raise ConfigError(f"size must be a dict with 'shortest_edge' and 'longest_edge', got {size!r}")
    lo = lo if min_pixels is None else min_pixels
    hi = hi if max_pixels is None else max_pixels
    if lo is None or hi is None:
        raise ConfigError(f"size must give both 'shortest_edge' and 'longest_edge' (pixel counts), got {size!r}")
    lo = _positive_int("min_pixels (size['shortest_edge'])", lo, MIN_PIXELS_LIMIT)
    hi = _positive_int("max_pixels (size['longest_edge'])", hi, MAX_PIXELS_LIMIT)
    if lo > hi:
        raise ConfigError(f"min_pixels {lo} is larger than max_pixels {hi}")
    return lo, hi


def _common_from_dict(d: dict, extra: Sequence[str]) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(f"a preprocessor config must be a dict, got {type(d).__name__}")
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if d.get(flag) is False:
            raise ConfigError(f"preprocessor config sets {flag}=false, which qvl_jax does not support")
    keys = ("size", "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
            "image_mean", "image_std", "rescale_factor", "resample", *extra)
    return {k: d[k] for k in keys if d.get(k) is not None}


class _Base:
    def _init_common(self, size, min_pixels, max_pixels, default_pixels, patch_size, temporal_patch_size,
                     merge_size, image_mean, image_std, rescale_factor, resample):
        lo, hi = _pixel_limits(size, min_pixels, max_pixels, default_pixels)
        std = _triple("image_std", image_std)
        if any(s == 0 for s in std):
            raise ConfigError(f"image_std must be non-zero, got {image_std!r}")
        if isinstance(resample, bool) or not isinstance(resample, (int, np.integer)) or resample not in _PIL_FILTERS:
            raise ConfigError(f"resample must be a PIL filter code 0..5 (3 = bicubic), got {resample!r}")
        if not _is_number(rescale_factor) or not rescale_factor > 0:
            raise ConfigError(f"rescale_factor must be a finite positive number, got {rescale_factor!r}")
        patch, merge = _positive_int("patch_size", patch_size), _positive_int("merge_size", merge_size)
        if (patch * merge) ** 2 > hi:  # every image is at least one merge block of patches
            raise ConfigError(f"patch_size * merge_size = {patch * merge} makes one merge block "
                              f"{(patch * merge) ** 2} pixels, more than max_pixels={hi}")
        fields = dict(
            patch_size=patch,
            temporal_patch_size=_positive_int("temporal_patch_size", temporal_patch_size, MAX_TEMPORAL_PATCH_SIZE),
            merge_size=merge,
            min_pixels=lo,
            max_pixels=hi,
            image_mean=_triple("image_mean", image_mean),
            image_std=std,
            rescale_factor=float(rescale_factor),
            resample=int(resample),
        )
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    @property
    def factor(self) -> int:
        """Side lengths after resizing are multiples of this (patch_size * merge_size)."""
        return self.patch_size * self.merge_size

    @property
    def size(self) -> dict:
        """The pixel limits in preprocessor_config.json's form."""
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}


# ----------------------------------------------------------------------------------------------------
# images


@dataclasses.dataclass(frozen=True, init=False)
class ImageProcessor(_Base):
    """Qwen3-VL image preprocessing: resize (smart_resize, PIL bicubic), rescale 1/255, normalise,
    patchify. Defaults are Qwen3-VL's preprocessor_config.json.

    `ImageProcessor()(images)` accepts one image or a (nested) list of images, each a file path
    (str / pathlib.Path), a PIL image, or a uint8 numpy array [H, W] or [H, W, C] (C = 1, 3 or 4), and
    returns {"pixel_values": float32 [patches, 3*T*P*P], "image_grid_thw": int64 [n_images, 3]}.
    File paths get their EXIF orientation applied (as transformers does); PIL images do not.
    """

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    resample: int

    def __init__(
        self,
        *,
        size: dict | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        patch_size: int = 16,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        rescale_factor: float = 1 / 255,
        resample: int = _BICUBIC,
    ):
        self._init_common(size, min_pixels, max_pixels, (QWEN3_VL_IMAGE_MIN_PIXELS, QWEN3_VL_IMAGE_MAX_PIXELS),
                          patch_size, temporal_patch_size, merge_size, image_mean, image_std,
                          rescale_factor, resample)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessor":
        """Build from a preprocessor_config.json dict; keys it does not use (processor_class, ...) are
        ignored, disabled steps (do_resize: false, ...) are refused."""
        return cls(**_common_from_dict(d, ()))

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """image_grid_thw row of an image of this size; it takes grid_h * grid_w / merge_size**2 tokens."""
        h, w = self.resized_size(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    def _normalize(self, rgb: np.ndarray) -> np.ndarray:
        # The reference's arithmetic, step for step: float64 rescale, cast to float32, then
        # (x - mean) / std in float32. Fusing the steps changes the last bit.
        x = (rgb.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = np.moveaxis(x, -1, 0)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        return (x - mean) / std

    def preprocess_one(self, image: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (patches [gh*gw, 3*T*P*P] float32, (1, gh, gw))."""
        rgb = load_image(image)
        h, w = self.resized_size(rgb.shape[0], rgb.shape[1])
        chw = self._normalize(_resize(rgb, h, w, self.resample))
        # an image is a clip of temporal_patch_size identical frames
        frames = np.broadcast_to(chw[None], (self.temporal_patch_size, *chw.shape))
        patches, grid = _patchify(frames, self.patch_size, self.merge_size, self.temporal_patch_size)
        return patches, grid

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        items = _flatten_images(images)
        if not items:
            raise InputError("no images given")
        patches, grids = [], []
        for item in items:
            p, g = self.preprocess_one(item)
            patches.append(p)
            grids.append(g)
        return {
            "pixel_values": np.concatenate(patches, axis=0).astype(np.float32, copy=False),
            "image_grid_thw": np.asarray(grids, dtype=np.int64).reshape(-1, 3),
        }


def _flatten_images(images: Any) -> list:
    if isinstance(images, (list, tuple)):
        out = []
        for x in images:
            out.extend(_flatten_images(x))
        return out
    return [images]


__all__ = [
    "ImageProcessor",
    "load_image",
    "smart_resize",
]
