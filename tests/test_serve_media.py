"""Media in `qvl-jax serve` requests over real HTTP with the official openai client: video_url parts
(mp4 data URLs, streaming and not) answer as model.generate does for the same frames; local files
are read only under the allowed directory (no escape through .. or a symlink); remote media only when
allowed, size- and time-limited, with one-line OpenAI errors for every refusal; undecodable or
oversized videos are refused.

Two apps (the default policy, and an open one with small limits) share one engine; "remote" media
come from an http.server thread on 127.0.0.1."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

import av  # in the test extra: a missing PyAV fails the module rather than skipping it
from serve_util import Running


KEY = "sk-test-key"
NAME = "tiny"
LIMIT = 256 << 10  # the open app's max_bytes
IMAGE_PIXELS = 100_000  # the open app's max_image_pixels
VIDEO_PIXELS = 60_000  # the open app's max_video_pixels
TIMEOUT = 1.0  # the open app's remote timeout (s)
FPS = 4
MAX_TOKENS = 12


# ---------------------------------------------------------------------------------------------------
# Media made in the test


def _frames(seed: int, n: int = 8, h: int = 32, w: int = 48) -> list[np.ndarray]:
    """n frames, each its own random colour plus noise (so every frame differs)."""
    rs = np.random.RandomState(seed)
    return [np.clip(rs.randint(0, 256, 3) + rs.randint(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            for _ in range(n)]


def _mp4(frames: list[np.ndarray], fps: int = FPS) -> bytes:
    """H.264 in RGB at crf 0 (libx264rgb): lossless, so the frames the server decodes are these."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264rgb", rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "rgb24"
        s.options = {"crf": "0", "preset": "ultrafast"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return buf.getvalue()


def _wav() -> bytes:
    """A media file with an audio stream and no video stream."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode())
    return buf.getvalue()


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _data(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


IMAGE = np.random.RandomState(7).randint(0, 256, (64, 80, 3), dtype=np.uint8)
PNG = _png_bytes(IMAGE)
FRAMES = _frames(1)
MP4 = _mp4(FRAMES)
FRAMES_B = _frames(2)
MP4_B = _mp4(FRAMES_B)


def test_fixture_media_roundtrip():
    """The test's own premise: the mp4 decodes (with PyAV, not the server's code) to the frames encoded."""
    with av.open(io.BytesIO(MP4)) as c:
        assert float(c.streams.video[0].average_rate) == FPS
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == len(FRAMES) and all((a == b).all() for a, b in zip(decoded, FRAMES))
    assert LIMIT > max(len(PNG), len(MP4), len(MP4_B)) * 4 // 3 + 100  # fit as data URLs under the open limit
    assert len(FRAMES) * FRAMES[0].shape[0] * FRAMES[0].shape[1] < VIDEO_PIXELS


# ---------------------------------------------------------------------------------------------------
# Servers


class App:
    """One app (one media policy) on a real port, over a shared engine."""

    def __init__(self, shared, policy):
        from qvl_jax.serving.app import ServerConfig, create_app

        self.model, self.proc, self.engine = shared
        self.app = create_app(self.engine, self.proc, ServerConfig(
            served_model_name=NAME, api_key=KEY, max_body_bytes=4 << 20, max_pending=24, media=policy,
            warm_up=False))
        self.running = Running(self.app)
        self.base = self.running.base
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def close(self):
        self.running.close()

    def ask(self, messages, stream=False) -> str:
        """The greedy answer through the openai client."""
        kw = dict(model=NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        if not stream:
            r = self.client.chat.completions.create(**kw)
            assert r.choices[0].finish_reason in ("length", "stop")
            return r.choices[0].message.content
        text, finish = "", None
        for ch in self.client.chat.completions.create(**kw, stream=True):
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                finish = ch.choices[0].finish_reason or finish
        assert finish in ("length", "stop")
        return text

    def post(self, messages, timeout=60, **extra):
        body = {"model": NAME, "messages": messages, "max_tokens": 4, "temperature": 0, **extra}
        return httpx.post(self.base + "/v1/chat/completions", json=body, timeout=timeout,
                          headers={"Authorization": f"Bearer {KEY}"})

    def generate(self, messages) -> str:
        """model.generate's greedy answer for HF-style messages (media already decoded)."""
        inp = self.proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            literal_content=True)
        inp.pop("attention_mask")
        out = self.model.generate(**inp, max_new_tokens=MAX_TOKENS, stop_token_ids=self.proc.eos_token_ids)
        return self.proc.decode(out.tokens[0, :out.lengths[0]].tolist(), skip_special_tokens=True)


@pytest.fixture(scope="module")
def shared():
    import qvl_jax
    from qvl_jax.processing.processor import Processor

    model = qvl_jax.load("tiny-random")
    engine = model.engine(max_num_seqs=8, max_model_len=256, decode_steps=4, max_num_batched_tokens=256)
    yield model, Processor.from_pretrained("tiny-random"), engine
    engine.close()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """allowed/ (the open app's local media directory) holding the media, outside/ beside it holding
    copies, and the ways out of allowed/: a symlinked file, a symlinked directory."""
    root = tmp_path_factory.mktemp("local")
    allowed, outside, sibling = root / "allowed", root / "outside", root / "allowed2"
    for d in (allowed, outside, sibling):
        d.mkdir()
        (d / "a.png").write_bytes(PNG)
        (d / "v.mp4").write_bytes(MP4)
    (allowed / "my pic.png").write_bytes(PNG)
    (allowed / "link.png").symlink_to(outside / "a.png")
    (allowed / "link.mp4").symlink_to(outside / "v.mp4")
    (allowed / "inner.png").symlink_to(allowed / "a.png")  # a symlink that stays inside is fine
    (allowed / "sub").symlink_to(outside, target_is_directory=True)
    os.mkfifo(allowed / "fifo.png")
    return {"allowed": allowed, "outside": outside, "sibling": sibling}


@pytest.fixture(scope="module")
def plain(shared):
    """The default policy: data: URLs only."""
    from qvl_jax.serving.media import MediaPolicy

    a = App(shared, MediaPolicy())
    yield a
    a.close()


@pytest.fixture(scope="module")
def open_app(shared, dirs):
    """Local files under allowed/, remote media, and small limits."""
    from qvl_jax.serving.media import MediaPolicy

    a = App(shared, MediaPolicy(allowed_local_path=os.path.realpath(dirs["allowed"]), allow_remote=True,
                                max_bytes=LIMIT, max_image_pixels=IMAGE_PIXELS, max_video_pixels=VIDEO_PIXELS,
                                timeout_s=TIMEOUT))
    yield a
    a.close()


class Remote:
    """An HTTP server on 127.0.0.1 with one route per behaviour the fetcher must handle."""

    def __init__(self):
        self.release = threading.Event()  # ends the stalled handlers at teardown
        self.written: dict[str, int] = {}
        self.finished: dict[str, threading.Event] = {p: threading.Event() for p in ("/big.png", "/endless.png")}
        self.hits: list[str] = []
        remote = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, body=b"", ctype="application/octet-stream", length=True, headers=()):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _flood(self, declared: bool):
                """64 MiB in 64 KiB chunks, until the client hangs up; records what went out."""
                total, sent, chunk = 64 << 20, 0, b"\x89PNG" * (16 << 10)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    if declared:
                        self.send_header("Content-Length", str(total))
                    self.end_headers()
                    while sent < total:
                        self.wfile.write(chunk)
                        sent += len(chunk)
                except OSError:  # the client hung up
                    pass
                finally:
                    remote.written[self.path] = sent
                    remote.finished[self.path].set()

            def do_GET(self):
                remote.hits.append(self.path)
                p = self.path
                if p == "/a.png":
                    self._send(200, PNG, "image/png")
                elif p == "/v.mp4":
                    self._send(200, MP4, "video/mp4")
                elif p == "/missing.png":
                    self._send(404, b"not here", "text/plain")
                elif p == "/page.html":
                    self._send(200, b"<html><body>hello</body></html>", "text/html")
                elif p == "/redirect.png":
                    self._send(302, headers=[("Location", "/a.png")])
                elif p == "/loop.png":
                    self._send(302, headers=[("Location", "/loop.png")])
                elif p in ("/big.png", "/endless.png"):
                    self._flood(declared=p == "/big.png")
                elif p == "/stall.png":  # no answer at all for much longer than the timeout
                    remote.release.wait(10 * TIMEOUT)
                elif p == "/trickle.png":  # headers at once, then 50 bytes every 0.2 s: never a read timeout
                    try:
                        self.send_response(200)
                        self.send_header("Content-Length", str(100_000))
                        self.end_headers()
                        for _ in range(2000):
                            self.wfile.write(b"x" * 50)
                            self.wfile.flush()
                            if remote.release.wait(0.2):
                                break
                    except OSError:
                        pass
                else:
                    self._send(404)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def remote():
    r = Remote()
    yield r
    r.close()


# ---------------------------------------------------------------------------------------------------
# Helpers


def _image_msg(url, text="What is in this picture?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _video_msg(url, text="What happens in this video?"):
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _hf_video(frames, text="What happens in this video?"):
    return [{"role": "user", "content": [{"type": "video", "video": np.stack(frames), "video_fps": float(FPS)},
                                         {"type": "text", "text": text}]}]


def _hf_image(array, text="What is in this picture?"):
    return [{"role": "user", "content": [{"type": "image", "image": array}, {"type": "text", "text": text}]}]


def _error(r, status, code="invalid_media", has=None) -> str:
    """The response is OpenAI's error object with this status and code; returns its one-line message."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == "invalid_request_error" and err["code"] == code, err
    msg = err["message"]
    assert msg and "\n" not in msg and "Traceback" not in r.text and len(msg) < 300, msg
    if has is not None:
        assert has in msg, msg
    return msg


@pytest.fixture(scope="module")
def answers(plain):
    """model.generate's answers for the test's image and videos (the expected side: raw frames and
    pixels, never the server's decoding)."""
    out = {"image": plain.generate(_hf_image(IMAGE)), "video": plain.generate(_hf_video(FRAMES)),
           "video_b": plain.generate(_hf_video(FRAMES_B))}
    # The tiny model's answer depends on the media, so an equality below says something.
    assert out["video"] != out["video_b"]
    return out


# ---------------------------------------------------------------------------------------------------
# 1. video_url as a data: URL


def test_video_data_url_equals_generate(plain, answers):
    for frames, mp4, want in ((FRAMES, MP4, answers["video"]), (FRAMES_B, MP4_B, answers["video_b"])):
        msgs = _video_msg(_data("video/mp4", mp4))
        assert plain.ask(msgs) == want
        assert plain.ask(msgs, stream=True) == want
    # The prompt is the processor's for these frames at the stream's frame rate (4 fps: the timestamps).
    want_tokens = plain.proc.apply_chat_template(_hf_video(FRAMES), add_generation_prompt=True, tokenize=True,
                                                 literal_content=True)[0]
    r = plain.client.chat.completions.create(model=NAME, messages=_video_msg(_data("video/mp4", MP4)), max_tokens=1)
    assert r.usage.prompt_tokens == len(want_tokens)
    # video_url as a bare string, an image and a video in one message.
    r = plain.post([{"role": "user", "content": [{"type": "video_url", "video_url": _data("video/mp4", MP4)},
                                                 {"type": "text", "text": "What happens in this video?"}]}],
                   max_tokens=MAX_TOKENS)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == answers["video"]
    both = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data("image/png", PNG)}},
                                         {"type": "video_url", "video_url": {"url": _data("video/mp4", MP4)}},
                                         {"type": "text", "text": "Compare."}]}]
    hf_both = [{"role": "user", "content": [{"type": "image", "image": IMAGE},
                                            {"type": "video", "video": np.stack(FRAMES), "video_fps": float(FPS)},
                                            {"type": "text", "text": "Compare."}]}]
    assert plain.ask(both) == plain.generate(hf_both)


# ---------------------------------------------------------------------------------------------------
# 2. Local media


def test_local_media_refused_without_allowed_dir(plain, dirs, answers):
    a = dirs["allowed"]
    for kind, name in (("image", "a.png"), ("video", "v.mp4")):
        msg = _image_msg if kind == "image" else _video_msg
        for url in (f"{a}/{name}", f"file://{a}/{name}"):
            _error(plain.post(msg(url)), 400, has="--allowed-local-media-path")
    # A streaming request is refused the same way (before any event is sent).
    _error(plain.post(_image_msg(f"{a}/a.png"), stream=True), 400, has="--allowed-local-media-path")
    with pytest.raises(openai.BadRequestError) as e:
        plain.client.chat.completions.create(model=NAME, messages=_video_msg(f"file://{a}/v.mp4"), max_tokens=2)
    assert e.value.status_code == 400 and e.value.body["code"] == "invalid_media"


def test_local_media_under_allowed_dir(open_app, dirs, answers):
    a = dirs["allowed"]
    for url in (f"{a}/a.png", f"file://{a}/a.png", f"file://{a}/my%20pic.png", f"{a}/inner.png",
                f"{a}/./a.png", f"file://localhost{a}/a.png"):
        assert open_app.ask(_image_msg(url)) == answers["image"], url
    for url in (f"{a}/v.mp4", f"file://{a}/v.mp4"):
        assert open_app.ask(_video_msg(url)) == answers["video"], url
    assert open_app.ask(_video_msg(f"{a}/v.mp4"), stream=True) == answers["video"]


def test_local_media_escapes_refused(open_app, dirs):
    a, o, s = dirs["allowed"], dirs["outside"], dirs["sibling"]
    under = "not under the allowed local media directory"
    for kind, name in (("image", "a.png"), ("video", "v.mp4")):
        msg = _image_msg if kind == "image" else _video_msg
        link = "link.png" if kind == "image" else "link.mp4"
        for path in (f"{o}/{name}",  # exists, outside
                     f"{a}/../outside/{name}",  # .. out of the directory
                     f"{a}/{link}",  # a symlink to a file outside
                     f"{a}/sub/{name}",  # through a symlinked directory
                     f"{s}/{name}"):  # a sibling whose name starts with the allowed one's
            for url in (path, "file://" + path, "file://" + path.replace("..", "%2e%2e")):
                _error(open_app.post(msg(url)), 400, has=under)
    # Not a file to read: relative, missing, a directory, a FIFO (would block), a NUL, a bad file URL.
    _error(open_app.post(_image_msg("a.png")), 400, has=under)
    _error(open_app.post(_image_msg(f"{a}/missing.png")), 400, has="no such image file")
    _error(open_app.post(_image_msg(f"{a}")), 400, has="not a regular file")
    _error(open_app.post(_image_msg(f"{a}/fifo.png"), timeout=10), 400, has="not a regular file")
    _error(open_app.post(_image_msg(f"{a}/a.png\x00.txt")), 400, has="NUL")
    _error(open_app.post(_image_msg(f"file://{a}/a.png%00.txt")), 400, has="NUL")
    _error(open_app.post(_image_msg("file://[oops/a.png")), 400, has="invalid image file URL")
    # A file over the size limit is refused before it is read.
    (a / "huge.mp4").write_bytes(b"\0" * (LIMIT + 1))
    _error(open_app.post(_video_msg(f"{a}/huge.mp4")), 413, code="media_too_large", has=f"{LIMIT:,} bytes")
    # An absolute path with a ':' in it is a path, not a URL scheme.
    (a / "t:1.png").write_bytes(PNG)
    assert open_app.post(_image_msg(f"{a}/t:1.png")).status_code == 200


# ---------------------------------------------------------------------------------------------------
# 3. Remote media


def test_remote_refused_without_allow_remote(plain, remote):
    before = len(remote.hits)
    _error(plain.post(_image_msg(remote.base + "/a.png")), 400, has="--allow-remote-media")
    _error(plain.post(_video_msg(remote.base + "/v.mp4")), 400, has="--allow-remote-media")
    assert len(remote.hits) == before  # not even fetched


def test_remote_media_equals_data_url(open_app, remote, answers):
    data_image = open_app.ask(_image_msg(_data("image/png", PNG)))
    data_video = open_app.ask(_video_msg(_data("video/mp4", MP4)))
    assert (data_image, data_video) == (answers["image"], answers["video"])
    assert open_app.ask(_image_msg(remote.base + "/a.png")) == data_image
    assert open_app.ask(_image_msg(remote.base + "/redirect.png")) == data_image
    assert open_app.ask(_video_msg(remote.base + "/v.mp4")) == data_video
    assert open_app.ask(_video_msg(remote.base + "/v.mp4"), stream=True) == data_video


def test_remote_refusals(open_app, remote):
    b = remote.base
    msg = _error(open_app.post(_image_msg(b + "/missing.png")), 400, has="HTTP 404")
    _error(open_app.post(_video_msg(b + "/missing.png")), 400, has="HTTP 404")
    assert "image" in msg
    _error(open_app.post(_image_msg(b + "/page.html")), 400, has="cannot decode the image")
    _error(open_app.post(_video_msg(b + "/page.html")), 400, has="cannot decode the video")
    _error(open_app.post(_image_msg(b + "/loop.png")), 400, has="TooManyRedirects")
    _error(open_app.post(_image_msg("http://127.0.0.1:1/a.png")), 400, has="cannot fetch the image")
    _error(open_app.post(_image_msg("http://[oops/a.png")), 400, has="cannot fetch the image")
    _error(open_app.post(_image_msg("http://\x01/a.png")), 400, has="cannot fetch the image")
    _error(open_app.post(_image_msg("ftp://127.0.0.1/a.png")), 400, has="unsupported image URL scheme")


@pytest.mark.parametrize("path", ["/big.png", "/endless.png"])
def test_remote_too_large_is_not_read(open_app, remote, path):
    """Over max_bytes: 413, and the fetch hangs up instead of reading the 64 MiB on offer (declared
    in Content-Length, or not declared at all)."""
    t0 = time.perf_counter()
    _error(open_app.post(_image_msg(remote.base + path)), 413, code="media_too_large", has=f"{LIMIT:,} bytes")
    assert time.perf_counter() - t0 < 10
    assert remote.finished[path].wait(10), "the fetch kept the connection open"
    assert remote.written[path] < 24 << 20, remote.written[path]  # the limit + what socket buffers took


@pytest.mark.parametrize("path", ["/stall.png", "/trickle.png"])
def test_remote_timeout(open_app, remote, path):
    """A server that never answers, or trickles bytes slower than the timeout allows: a clear 400
    within about twice the timeout (each read has the timeout; the deadline is checked between them)."""
    t0 = time.perf_counter()
    _error(open_app.post(_image_msg(remote.base + path), timeout=15), 400, has=f"timed out after {TIMEOUT:g} s")
    assert time.perf_counter() - t0 < 2 * TIMEOUT + 1.5


# ---------------------------------------------------------------------------------------------------
# 4. Undecodable and oversized media


def test_bad_videos(open_app, plain, remote):
    v = lambda data: _video_msg(_data("video/mp4", data))  # noqa: E731
    for app in (plain, open_app):
        _error(app.post(v(b"this is not a video at all" * 10)), 400, has="cannot decode the video")
    _error(open_app.post(v(MP4[: len(MP4) // 3])), 400)  # truncated: fails or has no frames
    _error(open_app.post(v(_wav())), 400, has="no video stream")
    _error(open_app.post(_video_msg("data:video/mp4;base64,%%%")), 400, has="not valid base64")
    _error(open_app.post(_video_msg("data:video/mp4,abc")), 400, has="must be base64")
    # A playlist naming other URLs is not followed (FFmpeg's hls/concat demuxers).
    before = len(remote.hits)
    for pl in (f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{remote.base}/seg.ts\n#EXT-X-ENDLIST\n",
               f"ffconcat version 1.0\nfile '{remote.base}/v.mp4'\n"):
        _error(open_app.post(v(pl.encode())), 400)
    assert len(remote.hits) == before
    # Too many decoded pixels: 16 frames of 64x64 (65,536 pixels) against the 60,000 limit; and one
    # frame larger than the whole limit (refused from the stream's header, before decoding).
    flat = [np.full((64, 64, 3), 10 * i, np.uint8) for i in range(16)]
    _error(open_app.post(v(_mp4(flat))), 413, code="media_too_large", has=f"{VIDEO_PIXELS:,} pixels")
    _error(open_app.post(v(_mp4([np.zeros((256, 256, 3), np.uint8)] * 2))), 413, code="media_too_large")
    # Under the default limits the same 16 frames are fine.
    assert plain.post(v(_mp4(flat))).status_code == 200
    # An encoded video over max_bytes, as a data URL.
    _error(open_app.post(v(b"\0" * (LIMIT + 3))), 413, code="media_too_large", has=f"{LIMIT:,} bytes")


def test_bad_images(open_app):
    big = _png_bytes(np.zeros((320, 320, 3), np.uint8))  # 102,400 pixels, a few hundred bytes
    assert len(big) < LIMIT
    _error(open_app.post(_image_msg(_data("image/png", big))), 413, code="media_too_large",
           has=f"{IMAGE_PIXELS:,} pixels")
    _error(open_app.post(_image_msg(_data("image/png", PNG[: len(PNG) // 2]))), 400, has="cannot decode the image")
    _error(open_app.post(_image_msg(_data("image/png", MP4))), 400, has="cannot decode the image")
