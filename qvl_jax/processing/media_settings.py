"""Per-call media settings: `min_pixels`, `max_pixels` (images), `fps`, `num_frames` (videos), the
keys of vLLM's `mm_processor_kwargs` for Qwen-VL. `Processor.apply_chat_template`, `Processor.__call__`,
`qvl-jax generate` and the server's `mm_processor_kwargs` all go through `check_media_settings` and
`apply_media_settings`.

What each key means:
  - `min_pixels` / `max_pixels`: the pixel range an image is resized into (smart_resize). Videos keep
    the processor's own range: a video's budget covers all of its frames, so an image's range does not
    carry over to it.
  - `fps`: frames sampled per second of video; `num_frames`: a fixed frame count instead (the two are
    mutually exclusive; either one turns frame sampling on). A video needs at least
    temporal_patch_size frames and holds a multiple of it, so `num_frames` must be one.

`strict=True` (the server) also holds a request to the processor's configured limits: `max_pixels`
at most its `max_pixels`, `num_frames` at most its `max_frames`, so a client can lower the cost of
its request but never raise it past what the server was configured for.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from qvl_jax.errors import ConfigError, InputError
from qvl_jax.processing.image_processing import MAX_PIXELS_LIMIT, MIN_PIXELS_LIMIT, ImageProcessor
from qvl_jax.processing.video_processing import MAX_FRAMES_LIMIT, VideoProcessor

MEDIA_SETTINGS = ("min_pixels", "max_pixels", "fps", "num_frames")


class MediaSettingError(InputError):
    """A bad media setting; `key` names it (None: the settings object itself)."""

    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key = key


def _int(where: str, key: str, value: Any, low: int, high: int, high_what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MediaSettingError(key, f"{where}{key} must be an integer, got {value!r}")
    if value < low:
        raise MediaSettingError(key, f"{where}{key} must be at least {low:,}, got {value:,}")
    if value > high:
        raise MediaSettingError(key, f"{where}{key}={value:,} is more than {high_what} of {high:,}")
    return value


def check_media_settings(settings: Mapping | None, image_processor: ImageProcessor, video_processor: VideoProcessor,
                         *, strict: bool = False, where: str = "") -> dict:
    """The settings checked (unknown key, type, range, consistency with the processors' other
    limits): a dict of the keys that were given (None values dropped). `where` prefixes the key in
    messages (e.g. "mm_processor_kwargs."). Raises MediaSettingError."""
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise MediaSettingError(None, f"{where.rstrip('.') or 'media settings'} must be an object with keys "
                                      f"{', '.join(MEDIA_SETTINGS)}, got {type(settings).__name__}")
    out = {}
    for key, value in settings.items():
        if key not in MEDIA_SETTINGS:
            raise MediaSettingError(str(key), f"{where}{key} is not a known setting; the known ones are "
                                              f"{', '.join(MEDIA_SETTINGS)}")
        if value is not None:
            out[key] = value
    ip, vp = image_processor, video_processor
    pixel_cap, pixel_what = (ip.max_pixels, "the configured max_pixels") if strict else \
        (MAX_PIXELS_LIMIT, "the supported limit")
    block = ip.factor ** 2  # the smallest resized image: one merge block of patches
    if "max_pixels" in out:
        _int(where, "max_pixels", out["max_pixels"], block, pixel_cap, pixel_what)
    if "min_pixels" in out:
        _int(where, "min_pixels", out["min_pixels"], 1, min(pixel_cap, MIN_PIXELS_LIMIT),
             pixel_what if pixel_cap <= MIN_PIXELS_LIMIT else "the supported limit")
    lo, hi = out.get("min_pixels", ip.min_pixels), out.get("max_pixels", ip.max_pixels)
    if lo > hi:
        if "min_pixels" not in out:
            raise MediaSettingError("max_pixels", f"{where}max_pixels ({hi:,}) is below the configured min_pixels "
                                                  f"({lo:,}); give {where}min_pixels too")
        if "max_pixels" not in out:
            raise MediaSettingError("min_pixels", f"{where}min_pixels ({lo:,}) is above the configured max_pixels "
                                                  f"({hi:,})")
        raise MediaSettingError("min_pixels", f"{where}min_pixels ({lo:,}) is larger than {where}max_pixels ({hi:,})")
    if "fps" in out and "num_frames" in out:
        raise MediaSettingError("num_frames", f"{where}fps and {where}num_frames are mutually exclusive")
    if "fps" in out:
        fps = out["fps"]
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise MediaSettingError("fps", f"{where}fps must be a finite number > 0, got {fps!r}")
        out["fps"] = float(fps)
    if "num_frames" in out:
        step = vp.temporal_patch_size
        cap, cap_what = (vp.max_frames, "the configured max_frames") if strict else \
            (MAX_FRAMES_LIMIT, "the supported limit")
        n = _int(where, "num_frames", out["num_frames"], step, cap, cap_what)
        if n % step:
            raise MediaSettingError("num_frames", f"{where}num_frames must be a multiple of {step} (each temporal "
                                                  f"patch takes {step} frames), got {n}")
    return out


def apply_media_settings(settings: Mapping, image_processor: ImageProcessor,
                         video_processor: VideoProcessor) -> tuple[ImageProcessor, VideoProcessor]:
    """The (image, video) processors with checked settings applied (the same objects when none)."""
    ip, vp = image_processor, video_processor
    try:
        if "min_pixels" in settings or "max_pixels" in settings:
            ip = dataclasses.replace(ip, min_pixels=settings.get("min_pixels", ip.min_pixels),
                                     max_pixels=settings.get("max_pixels", ip.max_pixels))
        if "fps" in settings:
            vp = dataclasses.replace(vp, fps=settings["fps"], num_frames=None, do_sample_frames=True)
        elif "num_frames" in settings:
            vp = dataclasses.replace(vp, fps=None, num_frames=settings["num_frames"], do_sample_frames=True)
    except ConfigError as e:  # a combination the processor refuses: the caller's input
        raise MediaSettingError(None, str(e)) from None
    return ip, vp


__all__ = ["MEDIA_SETTINGS", "MediaSettingError", "apply_media_settings", "check_media_settings"]
