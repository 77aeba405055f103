"""A chat request's media settings (`mm_processor_kwargs`) and the vision tokens its media will take,
checked before any image is decoded.

`request_settings` holds the request's min_pixels / max_pixels / fps / num_frames to the server's
processor limits (processing/media_settings.py with strict=True): a bad one is a 400 naming
`mm_processor_kwargs.<key>`. `VisionBudget` then counts the tokens of each image from its header's
size (no pixels decoded) and of each video from its container's header (frame count, frame size and
rate: MP4, MOV, AVI and GIF state them; no frame decoded), with the request's settings, and refuses
the request with a 400 as soon as they alone fill the context: a 4000 x 4000 picture or a long video
under a small context is refused before it is decoded. A container that states no frame count
(Matroska / WebM, MPEG-TS) is counted once its frames are decoded, before any is resized; a decoded
video is counted again from its frames, in place of its header's count.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

from PIL import Image

from qvl_jax.errors import InputError
from qvl_jax.processing.media_settings import MediaSettingError, apply_media_settings, check_media_settings
from qvl_jax.serving.protocol import ApiError

_WHERE = "mm_processor_kwargs"


def request_settings(raw: Any, processor) -> dict:
    """The request's checked media settings (a 400 naming the key when one is bad)."""
    try:
        return check_media_settings(raw, processor.image_processor, processor.video_processor, strict=True,
                                    where=_WHERE + ".")
    except MediaSettingError as e:
        raise ApiError(400, str(e), param=_WHERE + (f".{e.key}" if e.key else ""),
                       code="invalid_mm_processor_kwargs") from None


def header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from an encoded image's header (PIL reads no pixels on open); None when the
    header cannot be read (decoding then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.height, image.width
    except Exception:  # any failure to read a header is the data's, worded when it is decoded
        return None


class VisionBudget:
    """The vision tokens of one request's media so far, against the context."""

    def __init__(self, processor, settings: dict, context: int):
        self.image_processor, self.video_processor = apply_media_settings(
            settings, processor.image_processor, processor.video_processor)
        self.settings, self.context = settings, context
        self.tokens = self.images = 0
        self._videos = []  # tokens counted for each video so far

    def _add(self, tokens: int, what: str, hint: str) -> None:
        self.tokens += tokens
        if self.tokens >= self.context:
            raise ApiError(400, f"the request's images and videos take at least {self.tokens:,} tokens ({what}: "
                                f"{tokens:,}), more than this model's context of {self.context:,} tokens{hint}",
                           param="messages", code="context_length_exceeded")

    def image(self, data: bytes) -> bytes:
        """Counts one image from its header; returns its bytes."""
        self.images += 1
        size = header_size(data)
        if size is not None:
            ip = self.image_processor
            try:
                t, h, w = ip.grid_thw(*size)
            except InputError as e:
                raise ApiError(400, str(e), code="invalid_media") from None
            self._add(t * h * w // ip.merge_size ** 2, f"image {self.images}, {size[1]}x{size[0]}",
                      " (lower mm_processor_kwargs.max_pixels, or send smaller images)")
        return data

    def _video(self, number: int, frames: int, height: int, width: int, fps: float | None) -> None:
        """Video `number`'s tokens for this frame count, size and source rate, in place of its last count."""
        vp = self.video_processor
        try:
            n = len(vp.sample_frame_indices(frames, fps))
            t, h, w = vp.grid_thw(n, height, width)
        except InputError as e:
            raise ApiError(400, str(e), code="invalid_media") from None
        self.tokens -= self._videos[number]
        self._videos[number] = t * h * w // vp.merge_size ** 2
        self._add(self._videos[number], f"video {number + 1}, {n} of {frames} frames",
                  " (lower mm_processor_kwargs.fps or num_frames)")

    def video_header(self, head) -> int:
        """Counts one video from its container's header (a `media_io.VideoHeader`), before any frame
        is decoded, where it states a frame count. Returns the video's number, for `video`."""
        self._videos.append(0)
        number = len(self._videos) - 1
        if head.frames and head.height and head.width:
            self._video(number, head.frames, head.height, head.width, head.fps)
        return number

    def video(self, number: int, frames: list, fps: float | None) -> None:
        """Counts video `number` from its decoded frames (RGB, at source rate fps) before they are
        resized, in place of what its header said."""
        if frames:
            self._video(number, len(frames), *frames[0].shape[:2], fps)
