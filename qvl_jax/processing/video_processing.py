"""Video preprocessing for Qwen3-VL, in numpy + PIL: frame sampling, the video smart_resize, and the
processor that turns frames into model inputs.

What it holds:
  - `VideoProcessor`: frames -> {"pixel_values_videos", "video_grid_thw", "video_metadata"}, following
    transformers' `Qwen3VLVideoProcessor` (fps-based frame sampling, even frame count, the video
    smart_resize that also sees the frame count).
  - `smart_resize_video`: the target (height, width) of every frame of a video.
  - `sample_frame_indices` and `video_timestamps`: the frame choice and the per-temporal-step times
    that `Qwen3VLProcessor` writes into the prompt as `<{t:.1f} seconds>`; `VideoMetadata` keeps both.

Decoding a video file or a frame directory is media_io.py's; this module starts from frames.

Differences from transformers (which resizes video with torchvision only):
  - Frames are resized with PIL's bicubic filter, as images are. torchvision's uint8 bicubic
    (antialiased) kernel on CPU differs from PIL's by one or two uint8 levels on under 1% of pixels,
    and its GPU path differs again, so video pixel values agree with transformers to ~2/127.5, not
    bit for bit. Everything else (frame choice, sizes, normalisation arithmetic, patch order) matches.
  - Frames are converted to RGB uint8 with the image rules (media_io.py); transformers keeps a blended
    RGBA video in float before resizing.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from qvl_jax.errors import ConfigError, InputError
from qvl_jax.processing.image_processing import (
    _BICUBIC,
    QWEN3_VL_VIDEO_MAX_PIXELS,
    QWEN3_VL_VIDEO_MIN_PIXELS,
    _Base,
    _check_aspect,
    _common_from_dict,
    _is_number,
    _patchify,
    _positive_int,
    _resize,
)
from qvl_jax.processing.media_io import _describe, load_image

MAX_FRAMES_LIMIT = 2**14  # two hours at 2 fps; more frames cannot fit a context at a useful resolution
# transformers assumes this source frame rate whenever a video's own rate is unknown.
DEFAULT_VIDEO_FPS = 24.0


# ----------------------------------------------------------------------------------------------------
# target size


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int = 2,
    factor: int = 32,
    min_pixels: int = QWEN3_VL_VIDEO_MIN_PIXELS,
    max_pixels: int = QWEN3_VL_VIDEO_MAX_PIXELS,
) -> tuple[int, int]:
    """Target (height, width) of every frame of a `num_frames`-frame video: Qwen3-VL's video rule, where
    the pixel budget covers all frames and a side shorter than `factor` is first scaled up to it."""
    if num_frames < temporal_factor:
        raise InputError(
            f"video has {num_frames} frame(s) after sampling; Qwen3-VL needs at least "
            f"temporal_patch_size={temporal_factor} (pass a single frame as an image instead)"
        )
    if height <= 0 or width <= 0:
        raise InputError(f"video frames have zero size (height {height}, width {width})")
    if height < factor or width < factor:
        # the reference truncates here (int), not rounds
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    _check_aspect(height, width, "video frame")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        # beta uses the raw frame count, not t_bar, as the reference does
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ----------------------------------------------------------------------------------------------------
# frame sampling and the processor


@dataclasses.dataclass(frozen=True)
class VideoMetadata:
    """Which source frames a processed video holds, and at what rate they were recorded."""

    total_num_frames: int
    fps: float  # source frame rate; DEFAULT_VIDEO_FPS (24) when the caller did not give one
    frames_indices: tuple[int, ...]

    def timestamps(self, temporal_patch_size: int = 2) -> list[float]:
        """Seconds for each temporal grid step, as written into the prompt."""
        return video_timestamps(self.frames_indices, self.fps, temporal_patch_size)


def sample_frame_indices(
    total_num_frames: int,
    video_fps: float | None = None,
    *,
    fps: float | None = 2.0,
    num_frames: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
) -> np.ndarray:
    """Indices of the source frames Qwen3-VL keeps (Qwen3VLVideoProcessor.sample_frames).

    With `fps`: int(duration * fps) frames, clamped to [min_frames, max_frames] and to the number of
    frames there are, spread evenly from the first to the last frame. With `num_frames` instead: that
    many, spread the same way (repeats allowed). `video_fps` is the source rate (24 if unknown)."""
    if fps is not None and num_frames is not None:
        raise InputError("fps and num_frames are mutually exclusive; set fps=None to sample a fixed count")
    if total_num_frames <= 0:
        raise InputError(f"video has {total_num_frames} frames")
    if num_frames is None and fps is not None:
        source_fps = DEFAULT_VIDEO_FPS if video_fps is None else video_fps
        if not _is_number(source_fps) or not source_fps > 0:
            raise InputError(f"video fps must be a finite positive number, got {video_fps!r}")
        num_frames = int(total_num_frames / source_fps * fps)
        num_frames = min(max(num_frames, min_frames), max_frames, total_num_frames)
    elif num_frames is None:
        num_frames = min(max(total_num_frames, min_frames), max_frames)
    return np.linspace(0, total_num_frames - 1, num_frames).round().astype(np.int64)


def video_timestamps(
    frames_indices: Sequence[int] | np.ndarray, video_fps: float | None, temporal_patch_size: int = 2
) -> list[float]:
    """Seconds at each temporal grid step: the mean time of the first and last frame of the step, after
    padding the indices with the last one to a multiple of temporal_patch_size (the frames are padded
    the same way). `video_fps` None means DEFAULT_VIDEO_FPS, as in transformers."""
    fps = DEFAULT_VIDEO_FPS if video_fps is None else video_fps
    indices = [int(i) for i in frames_indices]
    if not indices:
        raise InputError("video has 0 frames")
    if len(indices) % temporal_patch_size:
        indices += [indices[-1]] * (temporal_patch_size - len(indices) % temporal_patch_size)
    seconds = [i / fps for i in indices]
    return [
        (seconds[i] + seconds[i + temporal_patch_size - 1]) / 2 for i in range(0, len(seconds), temporal_patch_size)
    ]


def _is_frame(x: Any) -> bool:
    return isinstance(x, (Image.Image, str, os.PathLike)) or (isinstance(x, np.ndarray) and x.ndim in (2, 3))


def _split_videos(videos: Any) -> list:
    """One video or a batch -> list of videos, each a [T, H, W, C] array or a list of frames."""
    if isinstance(videos, np.ndarray):
        if videos.ndim != 4:
            raise InputError(
                f"a video array must be [T, H, W, C], got shape {tuple(videos.shape)} "
                "(pass one frame as an image instead)"
            )
        return [videos]
    if isinstance(videos, (str, os.PathLike)):
        raise InputError(f"cannot decode video file {os.fspath(videos)!r}; pass its frames instead")
    if not isinstance(videos, (list, tuple)):
        raise InputError(
            f"unsupported video type {_describe(videos)}; expected a [T, H, W, C] uint8 array or a list of frames"
        )
    if len(videos) == 0 or _is_frame(videos[0]):
        return [list(videos)]
    out = []
    for v in videos:
        if isinstance(v, np.ndarray) and v.ndim == 4:
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.append(list(v))
        else:
            raise InputError(
                f"unsupported video type {_describe(v)} in a batch of videos; each must be a "
                "[T, H, W, C] uint8 array or a list of frames"
            )
    return out


@dataclasses.dataclass(frozen=True, init=False)
class VideoProcessor(_Base):
    """Qwen3-VL video preprocessing: sample frames by fps, resize all frames to one size (the video
    smart_resize), rescale + normalise, pad to an even frame count with the last frame, patchify.
    Defaults are transformers' Qwen3VLVideoProcessor class defaults; use `from_dict` with a checkpoint's
    video_preprocessor_config.json to get its limits.

    `VideoProcessor()(videos, video_fps=None)` takes one video or a list of videos; a video is a uint8
    [T, H, W, C] array or a list of frames (anything `load_image` accepts). `video_fps` is the source
    frame rate (one number, or one per video); unknown means 24, as in transformers, which matters
    for both sampling and timestamps. Returns {"pixel_values_videos": float32 [patches, 3*T*P*P],
    "video_grid_thw": int64 [n_videos, 3], "video_metadata": [VideoMetadata, ...]}.
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
    fps: float | None
    num_frames: int | None
    min_frames: int
    max_frames: int
    do_sample_frames: bool
    cap_pixels_per_frame: bool
    max_video_tokens: int

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
        fps: float | None = 2.0,
        num_frames: int | None = None,
        min_frames: int = 4,
        max_frames: int = 768,
        do_sample_frames: bool = True,
        cap_pixels_per_frame: bool = False,
        max_video_tokens: int = 768,
    ):
        self._init_common(size, min_pixels, max_pixels, (QWEN3_VL_VIDEO_MIN_PIXELS, QWEN3_VL_VIDEO_MAX_PIXELS),
                          patch_size, temporal_patch_size, merge_size, image_mean, image_std,
                          rescale_factor, resample)
        if fps is not None and num_frames is not None:
            raise ConfigError("fps and num_frames are mutually exclusive; set fps=None to sample a fixed count")
        if fps is not None and (not _is_number(fps) or not fps > 0):
            raise ConfigError(f"fps must be a finite positive number, got {fps!r}")
        object.__setattr__(self, "fps", None if fps is None else float(fps))
        object.__setattr__(self, "num_frames", None if num_frames is None
                           else _positive_int("num_frames", num_frames, MAX_FRAMES_LIMIT))
        object.__setattr__(self, "min_frames", _positive_int("min_frames", min_frames, MAX_FRAMES_LIMIT))
        object.__setattr__(self, "max_frames", _positive_int("max_frames", max_frames, MAX_FRAMES_LIMIT))
        object.__setattr__(self, "do_sample_frames", bool(do_sample_frames))
        object.__setattr__(self, "cap_pixels_per_frame", bool(cap_pixels_per_frame))
        object.__setattr__(self, "max_video_tokens", _positive_int("max_video_tokens", max_video_tokens))

    @classmethod
    def from_dict(cls, d: dict) -> "VideoProcessor":
        """Build from a video_preprocessor_config.json dict (unused keys ignored)."""
        kwargs = _common_from_dict(
            d, ("fps", "num_frames", "min_frames", "max_frames", "cap_pixels_per_frame", "max_video_tokens")
        )
        if "do_sample_frames" in d and d["do_sample_frames"] is not None:
            kwargs["do_sample_frames"] = d["do_sample_frames"]
        if "num_frames" in kwargs and "fps" not in kwargs:
            # a config that fixes the frame count means "no fps sampling" (the class default fps would clash)
            kwargs["fps"] = None
        return cls(**kwargs)

    def sample_frame_indices(self, total_num_frames: int, video_fps: float | None = None) -> np.ndarray:
        """Source frame indices this processor keeps for a video of `total_num_frames` frames."""
        if not self.do_sample_frames:
            if total_num_frames <= 0:
                raise InputError(f"video has {total_num_frames} frames")
            return np.arange(total_num_frames, dtype=np.int64)
        return sample_frame_indices(
            total_num_frames, video_fps, fps=self.fps, num_frames=self.num_frames,
            min_frames=self.min_frames, max_frames=self.max_frames,
        )

    def resized_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """(height, width) each frame of a `num_frames`-frame (already sampled) video is resized to."""
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            # qwen-vl-utils' per-frame cap, as transformers applies it when cap_pixels_per_frame=True
            frame_cap = self.max_video_tokens * self.factor * self.factor
            per_frame = max(min(frame_cap, self.max_pixels // num_frames), int(self.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return smart_resize_video(num_frames, height, width, self.temporal_patch_size, self.factor,
                                  self.min_pixels, max_pixels)

    def grid_thw(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """video_grid_thw row for an already-sampled video of this shape."""
        h, w = self.resized_size(num_frames, height, width)
        t = -(-num_frames // self.temporal_patch_size)
        return t, h // self.patch_size, w // self.patch_size

    def _frames_rgb(self, video: Any, index: int) -> list[np.ndarray] | np.ndarray:
        if isinstance(video, np.ndarray):
            if video.shape[0] == 0:
                raise InputError(f"video {index} has 0 frames")
            if video.dtype != np.uint8:
                raise InputError(f"video {index} must be uint8 (0..255), got dtype {video.dtype}")
            if video.shape[-1] not in (1, 3, 4):
                raise InputError(
                    f"video {index} must be [T, H, W, C] with C in (1, 3, 4), got shape {tuple(video.shape)}"
                )
            return video  # converted frame by frame once sampled, so unsampled frames cost nothing
        if len(video) == 0:
            raise InputError(f"video {index} has 0 frames")
        return list(video)

    def _normalize(self, frames: np.ndarray) -> np.ndarray:
        # transformers' video path fuses rescale into normalise: (x - mean/scale) / (std/scale) in float32
        inv = np.float32(1.0 / self.rescale_factor)
        mean = (np.asarray(self.image_mean, dtype=np.float32) * inv)[None, :, None, None]
        std = (np.asarray(self.image_std, dtype=np.float32) * inv)[None, :, None, None]
        return (np.moveaxis(frames, -1, 1).astype(np.float32) - mean) / std

    def preprocess_one(self, video: Any, video_fps: float | None = None, index: int = 0):
        """One video -> (patches float32, (gt, gh, gw), VideoMetadata)."""
        frames = self._frames_rgb(video, index)
        total = len(frames)
        indices = self.sample_frame_indices(total, video_fps)
        rgb = [load_image(frames[int(i)]) for i in indices]
        height, width = rgb[0].shape[:2]
        for k, f in enumerate(rgb):
            if f.shape != rgb[0].shape:
                raise InputError(
                    f"video {index}: frame {int(indices[k])} is {f.shape[0]}x{f.shape[1]}, "
                    f"frame {int(indices[0])} is {height}x{width}; all frames must share one size"
                )
        h, w = self.resized_size(len(rgb), height, width)
        resized = np.stack([_resize(f, h, w, self.resample) for f in rgb])
        x = self._normalize(resized)
        if pad := -len(x) % self.temporal_patch_size:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
        patches, grid = _patchify(x, self.patch_size, self.merge_size, self.temporal_patch_size)
        fps = DEFAULT_VIDEO_FPS if video_fps is None else float(video_fps)
        meta = VideoMetadata(total_num_frames=total, fps=fps, frames_indices=tuple(int(i) for i in indices))
        return patches, grid, meta

    def __call__(self, videos: Any, video_fps: float | Sequence[float | None] | None = None) -> dict[str, Any]:
        batch = _split_videos(videos)
        if isinstance(video_fps, (str, bytes)):
            raise InputError(f"video_fps must be a number or one number per video, got {video_fps!r}")
        if video_fps is None or isinstance(video_fps, (int, float, np.integer, np.floating)):
            rates = [video_fps] * len(batch)
        else:
            rates = list(video_fps)
            if len(rates) != len(batch):
                raise InputError(f"got {len(batch)} videos but {len(rates)} video_fps values")
        patches, grids, metas = [], [], []
        for i, (video, rate) in enumerate(zip(batch, rates)):
            p, g, m = self.preprocess_one(video, rate, i)
            patches.append(p)
            grids.append(g)
            metas.append(m)
        return {
            "pixel_values_videos": np.concatenate(patches, axis=0).astype(np.float32, copy=False),
            "video_grid_thw": np.asarray(grids, dtype=np.int64).reshape(-1, 3),
            "video_metadata": metas,
        }


__all__ = [
    "DEFAULT_VIDEO_FPS",
    "VideoMetadata",
    "VideoProcessor",
    "sample_frame_indices",
    "smart_resize_video",
    "video_timestamps",
]
