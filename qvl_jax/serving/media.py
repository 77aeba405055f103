"""Images and videos named by a request: data: URLs always; local files (a path or file://) only
under --allowed-local-media-path; http(s) only with --allow-remote-media, size- and time-limited.
The bytes fetched are decoded by qvl_jax.processing.media_io, as the CLI and fine-tuning decode a file.

Every refusal is an `ApiError`: 400 for a disallowed or unreadable source, 413 for one too large.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
import stat
import time
import urllib.parse
from pathlib import Path

from qvl_jax.errors import InputError
from qvl_jax.processing import media_io
from qvl_jax.serving.protocol import ApiError


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: str | None = None  # realpath of the one directory local files may come from
    allow_remote: bool = False
    max_bytes: int = 20 << 20  # encoded size of one image or video
    max_image_pixels: int = 40_000_000  # decoded width * height of one image (decompression bombs)
    max_video_pixels: int = 200_000_000  # decoded pixels over all frames of one video
    timeout_s: float = 10.0  # a remote fetch, connect to last byte (checked between reads: at most ~2x this)


def _too_large(what: str, limit: int, unit: str = "bytes") -> ApiError:
    return ApiError(413, f"{what} is larger than this server's limit of {limit:,} {unit}", code="media_too_large")


def _bad(message: str) -> ApiError:
    return ApiError(400, message, code="invalid_media")


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")  # RFC 3986; an absolute path has none (even with a ':')


def fetch_bytes(url: str, policy: MediaPolicy, kind: str) -> bytes:
    """The encoded bytes behind a media URL, under the policy's rules."""
    if not isinstance(url, str) or not url:
        raise _bad(f"{kind}_url needs a url")
    m = _SCHEME.match(url)
    scheme = m.group(1).lower() if m else ""
    if scheme == "data":
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise _bad(f"{kind} data URL must be base64 (data:<mime>;base64,<data>)")
        if len(payload) * 3 // 4 > policy.max_bytes:
            raise _too_large(f"the {kind}", policy.max_bytes)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{kind} data URL is not valid base64") from None
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise _bad(f"this server does not fetch remote {kind}s (start it with --allow-remote-media); "
                       "send the data inline as a data: URL")
        return _fetch_remote(url, policy, kind)
    if scheme == "file" or scheme == "":
        try:
            path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if scheme == "file" else url
        except ValueError:  # e.g. file://[x: an invalid host
            raise _bad(f"invalid {kind} file URL") from None
        return _read_local(path, policy, kind)
    raise _bad(f"unsupported {kind} URL scheme {scheme!r}: use data:, http(s): or file:")


def _read_local(path: str, policy: MediaPolicy, kind: str) -> bytes:
    if policy.allowed_local_path is None:
        raise _bad(f"this server does not read local {kind} files (start it with --allowed-local-media-path DIR)")
    if "\x00" in path:
        raise _bad(f"{kind} path contains a NUL character")
    # The real path, symlinks resolved, must lie under the allowed directory.
    real = os.path.realpath(path)
    root = policy.allowed_local_path
    if not os.path.isabs(path) or os.path.commonpath([real, root]) != root:
        raise _bad(f"{kind} path is not under the allowed local media directory")
    try:
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):  # a directory, FIFO or device: opening or reading it may block
            raise _bad(f"the {kind} path is not a regular file")
        if st.st_size > policy.max_bytes:
            raise _too_large(f"the {kind} file", policy.max_bytes)
        with open(real, "rb") as f:
            return f.read(policy.max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise _bad(f"no such {kind} file under the allowed local media directory") from None
    except PermissionError:
        raise _bad(f"the {kind} file is not readable") from None


def _fetch_remote(url: str, policy: MediaPolicy, kind: str) -> bytes:
    import httpx  # lazy: optional extra (`serve`), not a core dependency

    # httpx's timeout bounds each connect and each read, not the whole transfer: a server that
    # trickles bytes would never trip it, so the deadline is also checked between reads.
    deadline = time.monotonic() + policy.timeout_s
    timed_out = _bad(f"fetching the {kind} timed out after {policy.timeout_s:g} s")
    try:
        with httpx.Client(timeout=policy.timeout_s, follow_redirects=True, max_redirects=3) as client:
            with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise _bad(f"fetching the {kind} gave HTTP {r.status_code}")
                length = r.headers.get("content-length")
                if length and length.isdigit() and int(length) > policy.max_bytes:
                    raise _too_large(f"the {kind}", policy.max_bytes)
                buf = bytearray()
                for chunk in r.iter_bytes():
                    buf += chunk
                    if len(buf) > policy.max_bytes:
                        raise _too_large(f"the {kind}", policy.max_bytes)
                    if time.monotonic() > deadline:
                        raise timed_out
                return bytes(buf)
    except httpx.TimeoutException:
        raise timed_out from None
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise _bad(f"cannot fetch the {kind}: {type(e).__name__}") from None


def load_image(url: str, policy: MediaPolicy):
    """An image_url's image as RGB uint8 [H, W, 3], decoded by media_io as a file is."""
    return decode_image(fetch_bytes(url, policy, "image"), policy)


def decode_image(data: bytes, policy: MediaPolicy):
    """Fetched image bytes as RGB uint8 [H, W, 3] (media_io's decoding, the policy's pixel limit)."""
    try:
        return media_io.load_image(data, max_pixels=policy.max_image_pixels)
    except media_io.MediaTooLarge as e:
        raise _too_large(e.what, policy.max_image_pixels, "pixels") from None
    except InputError as e:
        raise _bad(str(e)) from None


def _video_io(call, policy: MediaPolicy):
    """call() under the server's refusals: no PyAV is a 400, too many pixels a 413, bad data a 400."""
    if not media_io.has_pyav():
        raise _bad("this server cannot decode videos (PyAV is not installed)")
    try:
        return call()
    except media_io.MediaTooLarge as e:
        raise _too_large(e.what, policy.max_video_pixels, "pixels") from None
    except InputError as e:
        raise _bad(str(e)) from None


def video_header(data: bytes, policy: MediaPolicy) -> media_io.VideoHeader:
    """A fetched video's header (frame count, size, rate; no frame decoded), refused with a 413 when
    it states more pixels than the policy's max_video_pixels."""
    return _video_io(lambda: media_io.probe_video(data, max_pixels=policy.max_video_pixels), policy)


def decode_video(data: bytes, policy: MediaPolicy) -> tuple[list, float | None]:
    """(frames as RGB uint8 arrays, the stream's frame rate) of a fetched video (needs PyAV)."""
    video = _video_io(lambda: media_io.load_video(data, max_pixels=policy.max_video_pixels), policy)
    return video.frames, video.fps


def load_video(url: str, policy: MediaPolicy) -> tuple[list, float | None]:
    """(frames as RGB uint8 arrays, the stream's frame rate) from a video_url (needs PyAV)."""
    return decode_video(fetch_bytes(url, policy, "video"), policy)


def allowed_dir(path: str | None) -> str | None:
    """--allowed-local-media-path as a real path (must be an existing directory)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_dir():
        raise InputError(f"--allowed-local-media-path {path} is not a directory")
    return os.path.realpath(p)
