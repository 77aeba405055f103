"""Decoding media into RGB uint8 arrays: the one place images and videos are read, so `generate`,
`serve` and `finetune` see the same pixels, frames and frame rate for the same file.

What it holds:
  - `load_image`: a file path, encoded bytes, a PIL image or a uint8 array -> RGB uint8 [H, W, 3],
    converted the way transformers does (the rules below).
  - `load_video`: a video file (path or bytes, decoded with PyAV) -> frames and the stream's frame
    rate; a directory of frame images -> its frames sorted by name, at the caller's rate.
    `probe_video`: what a video file's header states (frame count, size, rate), no frame decoded.
  - `MediaTooLarge`: decoded media over a caller's pixel limit (the server answers it with a 413).

Reference behaviours reproduced on purpose (some are surprising):
  - File paths: EXIF orientation IS applied (transformers' `load_image` calls `ImageOps.exif_transpose`),
    then the file is converted with a plain `convert("RGB")`, which DROPS an alpha channel without
    blending. PIL images passed directly are NOT EXIF-transposed, and their transparency IS composited
    onto white. So a transparent PNG gives different pixels from its path and from `Image.open(path)`.
    Encoded bytes are read as a file is (they are one's contents; transformers' `load_image` reads a
    base64 string or URL that way too), and so is every frame of a frame directory.
  - Mode conversion is PIL's own: CMYK uses PIL's naive formula, I;16 / I / F are clipped to 0..255
    (not scaled), a palette image with a transparent index is blended onto white.
  - uint8 arrays with 4 channels are blended onto white in float64 and rounded half-to-even (numpy's
    path in transformers), PIL images with alpha through PIL's alpha_composite.
  - 3-D arrays are always read as [H, W, C]; transformers guesses the layout and reads e.g. a
    (3, 40, 3) array as channels-first.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from qvl_jax.errors import InputError

_FRAME_HINT = "it must hold only the video's frame images"
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)


class MediaTooLarge(InputError):
    """Decoded media larger than the `max_pixels` its caller allowed."""

    def __init__(self, what: str, limit: int):
        super().__init__(f"{what} is larger than the limit of {limit:,} pixels")
        self.what, self.limit = what, limit


def _describe(x: Any) -> str:
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


# ----------------------------------------------------------------------------------------------------
# images


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    # transformers' convert_to_rgb: anything with an alpha band or a transparency key is blended onto
    # white through RGBA; everything else goes through PIL's own convert("RGB").
    if image.width == 0 or image.height == 0:
        raise InputError(f"image has zero size (width {image.width}, height {image.height})")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InputError(
            f"image array must be uint8 (0..255), got dtype {array.dtype}; "
            "convert with np.clip(x, 0, 255).round().astype(np.uint8)"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError(
            f"image array must be [H, W] or [H, W, C] with C in (1, 3, 4), got shape {tuple(array.shape)}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"image has zero size (height {array.shape[0]}, width {array.shape[1]})")
    channels = array.shape[2]
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 4:
        # float64 blend and numpy's half-to-even rounding, as transformers does for arrays
        alpha = array[..., 3:4] / 255
        blended = alpha * array[..., :3] + (1 - alpha) * 255
        return np.round(blended).astype(np.uint8)
    return np.ascontiguousarray(array)


def _decode(fp, max_pixels: int | None = None) -> np.ndarray:
    """An encoded image (a path or a file object) -> RGB uint8, as transformers reads a file. PIL's
    own errors (and its decompression-bomb check) pass through for the caller to word."""
    with Image.open(fp) as image:
        if max_pixels is not None and image.width * image.height > max_pixels:  # before decoding
            raise MediaTooLarge(f"the image ({image.width}x{image.height})", max_pixels)
        image = ImageOps.exif_transpose(image)
        # convert() forces the decode, so truncated files fail here
        image = image.convert("RGB")
    # A palette file with a transparent index keeps that colour as info["transparency"] through
    # convert("RGB"); the reference then blends exactly those pixels onto white.
    return _pil_to_rgb(image)


def _open_file(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise InputError(f"image file not found: {path!r} is a directory, not an image file")
        if path.startswith(("http://", "https://")):
            raise InputError(f"image URLs are not fetched, download the file first: {path!r}")
        raise InputError(f"image file not found: {path!r}")
    try:
        return _decode(path)
    except InputError:
        raise
    except Exception as e:  # PIL raises many types for undecodable data; any of them is the file's fault
        raise InputError(f"cannot read image file {path!r}: {_reason(e)}") from None


def _open_bytes(data: bytes, max_pixels: int | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # a caller with a limit refuses PIL's bomb warning too
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(io.BytesIO(data), max_pixels)
    except InputError:
        raise
    except _BOMB:
        raise MediaTooLarge("the image", max_pixels or Image.MAX_IMAGE_PIXELS) from None
    except Exception as e:  # as in _open_file: any failure to decode is the data's
        raise InputError(f"cannot decode the image: {_reason(e)}") from None


def load_image(image: Any, max_pixels: int | None = None) -> np.ndarray:
    """One image -> RGB uint8 [H, W, 3], converted exactly as transformers' Qwen2-VL PIL image
    processor converts it. `image`: a file path, the encoded bytes of a file (read as that file is),
    a PIL image, or a uint8 array [H, W] / [H, W, C]. `max_pixels` (bytes only): refuse a larger image
    from its header, before decoding it, with MediaTooLarge."""
    if isinstance(image, (str, os.PathLike)):
        return _open_file(os.fspath(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(image), max_pixels)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise InputError(
        f"unsupported image type {_describe(image)}; expected a file path, encoded bytes, a PIL image or a "
        "uint8 numpy array"
    )


# ----------------------------------------------------------------------------------------------------
# videos


@dataclasses.dataclass(frozen=True)
class Video:
    """Decoded frames (RGB uint8 [H, W, 3] each) and the source frame rate: the caller's when it gave
    one, else the file's stream rate; None when neither is known (the processor then assumes 24)."""

    frames: list
    fps: float | None


def has_pyav() -> bool:
    """Whether video files can be decoded here (PyAV, the `video` extra, is installed)."""
    return importlib.util.find_spec("av") is not None


def _frame_dir(p: Path) -> list[np.ndarray]:
    """Frames of a frame directory, sorted by name, each read as an image file is. Every entry but
    hidden files must be an image of sane size: a stray file or folder is an error, never skipped, and
    so is a frame past PIL's decompression-bomb limit (its warning too: a video multiplies one huge
    frame by its length)."""
    frames = []
    for f in sorted(e for e in p.iterdir() if not e.name.startswith(".")):
        if not f.is_file():
            raise InputError(f"video directory {p} holds {f.name!r}, which is not a file: {_FRAME_HINT}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                frames.append(_decode(f))
        except InputError:
            raise
        except _BOMB as e:
            raise InputError(f"frame {f.name!r} in {p} is too large: {' '.join(str(e).split())}") from None
        except Exception as e:  # any failure to decode is the file's
            raise InputError(f"video directory {p} holds {f.name!r}, which is not a readable image "
                             f"({_reason(e)}): {_FRAME_HINT}") from None
    if not frames:
        raise InputError(f"video directory {p} holds no frame images")
    return frames


@dataclasses.dataclass(frozen=True)
class VideoHeader:
    """What a video file's container states before any frame is decoded: its frame count (0 where
    the container does not state one, as Matroska / WebM and MPEG-TS do not; MP4, MOV, AVI and GIF
    do), the frame size, and the stream's average rate (None if unknown)."""

    frames: int
    height: int
    width: int
    fps: float | None


def _header(container, name: str, max_pixels: int | None):
    """(the first video stream, its `VideoHeader`); MediaTooLarge when the header alone shows more
    than max_pixels (one frame, or the stated frames together), before any frame is decoded."""
    if not container.streams.video:
        raise InputError(f"{name} has no video stream")
    stream = container.streams.video[0]
    head = VideoHeader(max(0, stream.frames or 0), stream.height or 0, stream.width or 0,
                       float(stream.average_rate) if stream.average_rate else None)
    if max_pixels is not None and head.width * head.height * max(1, head.frames) > max_pixels:
        raise MediaTooLarge("the decoded video", max_pixels)
    return stream, head


def _video_source(source: Any):
    """What av.open takes for a path or a video file's bytes."""
    return io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def probe_video(source: Any, *, max_pixels: int | None = None, name: str = "the video") -> VideoHeader:
    """A video file's header (a path or its encoded bytes; needs PyAV), read without decoding a frame:
    so that limits on frames, size and tokens can refuse it before the work. MediaTooLarge as
    `load_video`'s max_pixels, from the header; InputError when the file cannot be read."""
    import av

    try:
        with av.open(_video_source(source)) as container:
            return _header(container, name, max_pixels)[1]
    except InputError:
        raise
    except Exception as e:  # as in _decode_video: any failure here is the input's
        raise InputError(f"cannot decode {name}: {_reason(e)}") from None


def _decode_video(src, name: str, max_pixels: int | None) -> tuple[list[np.ndarray], float | None]:
    """A video file (a path or a file object) -> (RGB frames, the stream's average rate)."""
    import av  # optional (the `video` extra): images and frame directories do not need it

    frames, pixels = [], 0
    try:
        with av.open(src) as container:
            stream, head = _header(container, name, max_pixels)
            rate = head.fps
            for frame in container.decode(stream):
                pixels += frame.width * frame.height
                if max_pixels is not None and pixels > max_pixels:
                    raise MediaTooLarge("the decoded video", max_pixels)
                frames.append(frame.to_ndarray(format="rgb24"))
    except InputError:
        raise
    except Exception as e:  # PyAV's errors share no base class: any failure here is the input's
        raise InputError(f"cannot decode {name}: {_reason(e)}") from None
    if not frames:
        raise InputError(f"{name} has no frames")
    return frames, rate


def load_video(source: Any, fps: float | None = None, *, max_pixels: int | None = None) -> Video:
    """A video -> its frames and source frame rate.

    `source`: a video file's path or encoded bytes (needs PyAV; the rate is the stream's), or a
    directory of frame images (sorted by name; it has no rate of its own). `fps`, when given, is the
    source rate and overrides the file's. `max_pixels`: refuse a video whose frames hold more pixels
    in all (MediaTooLarge); one frame over it, or the frames the container states, from the header
    before decoding anything."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        path, name = None, "the video"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = f"video {path}"
        if path.is_dir():
            return Video(_frame_dir(path), fps)
        if not path.is_file():
            raise InputError(f"no video file or frame directory {path}")
    else:
        raise InputError(f"unsupported video source {_describe(source)}; expected a file path, a frame "
                         "directory or a video file's bytes")
    if not has_pyav():
        what = path.name if path is not None else "a video file"
        hint = " (or pass a directory of frames)" if path is not None else ""
        raise InputError(f"reading {what} needs PyAV: pip install 'qvl_jax[video]'{hint}")
    frames, rate = _decode_video(_video_source(path if path is not None else source), name, max_pixels)
    return Video(frames, fps if fps is not None else rate)


__all__ = ["MediaTooLarge", "Video", "VideoHeader", "has_pyav", "load_image", "load_video", "probe_video"]
