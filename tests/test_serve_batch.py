"""Per-request media settings on the server (`mm_processor_kwargs`) and `qvl-jax batch`.

Server: a request's min_pixels / max_pixels / fps / num_frames give the answer the engine gives for
the processor called with the same keywords; a bad setting is a 400 naming
`mm_processor_kwargs.<key>`, and media that cannot fit the context are refused, all before any image
is decoded (a video too, where its container states its frame count) and with no blocks left behind.

Batch: results equal what the server answers over HTTP for the same bodies (greedy and seeded); every
bad line gets its own result line; a partial last line is cut off on resume; and a 200-request file
with 3 bad lines, killed (SIGKILL) halfway through the CLI and resumed, ends with 200 results, each
id once."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_util import Running
from test_serve_media import FPS, _mp4

NAME = "tiny"
ROOT = Path(__file__).resolve().parents[1]


def _png(seed: int, h: int, w: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _decoded(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",")[1])))


class Srv:
    def __init__(self):
        import qvl_jax
        from qvl_jax.processing.processor import Processor
        from qvl_jax.serving.app import ServerConfig, create_app

        self.model, self.proc = qvl_jax.load("tiny-random"), Processor.from_pretrained("tiny-random")
        self.engine = self.model.engine(max_num_seqs=8, max_model_len=256, decode_steps=4, max_num_batched_tokens=256)
        self.app = create_app(self.engine, self.proc, ServerConfig(served_model_name=NAME, max_pending=128,
                                                                   warm_up=False))
        self.running = Running(self.app)
        self.base = self.running.base
        self.start_blocks = self.engine.num_free_blocks

    def post(self, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
        return httpx.post(self.base + path, json=body, timeout=120)

    def alone(self, messages, max_tokens, **media):
        """The greedy answer and prompt length of the processor's output for HF messages and media
        settings, submitted to the engine directly (whose answers equal model.generate's: test_engine)."""
        inp = self.proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            literal_content=True, **media)
        inp.pop("attention_mask")
        out = self.engine.submit(inp, max_new_tokens=max_tokens, stop_token_ids=self.proc.eos_token_ids).result()
        toks = [t for t in out.tokens.tolist() if t not in self.proc.eos_token_ids]
        return self.proc.decode(toks), inp["input_ids"].shape[1]

    def wait_blocks(self, timeout=10.0):
        end = time.time() + timeout
        while self.engine.num_free_blocks != self.start_blocks and time.time() < end:
            time.sleep(0.05)
        return self.engine.num_free_blocks

    def close(self):
        self.running.close()
        self.engine.close()


@pytest.fixture(scope="module")
def srv():
    s = Srv()
    yield s
    s.close()


@pytest.fixture
def decodes(monkeypatch):
    """Counts image decodes (the server's, through media_io)."""
    from qvl_jax.processing import media_io

    calls = []
    real = media_io.load_image
    monkeypatch.setattr(media_io, "load_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"]
    return err


# ---------------------------------------------------------------------------------------------------
# mm_processor_kwargs


IMAGE = _png(1, 200, 300)
SMALL = {"min_pixels": 1024, "max_pixels": 4096}  # 200 x 300 -> 32 x 64 pixels instead of 192 x 288


def test_mm_processor_kwargs_equal_generate(srv):
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                         {"type": "text", "text": "What is it?"}]}]
    hf = [{"role": "user", "content": [{"type": "image", "image": _decoded(IMAGE)},
                                       {"type": "text", "text": "What is it?"}]}]
    want, n_prompt = srv.alone(hf, 10, **SMALL)
    r = srv.post({"messages": msgs, "max_tokens": 10, "temperature": 0, "mm_processor_kwargs": SMALL}).json()
    assert r["choices"][0]["message"]["content"] == want and r["usage"]["prompt_tokens"] == n_prompt
    plain = srv.proc.apply_chat_template(hf, add_generation_prompt=True, tokenize=True)
    assert n_prompt < plain.shape[1]  # the setting took effect
    # video sampling: the frames the server decodes from the mp4 are these (lossless), at FPS
    frames = [np.random.RandomState(s).randint(0, 255, (32, 48, 3), dtype=np.uint8) for s in range(8)]
    video = "data:video/mp4;base64," + base64.b64encode(_mp4(frames)).decode()
    msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                         {"type": "text", "text": "And this?"}]}]
    hf = [{"role": "user", "content": [{"type": "video", "video": frames, "video_fps": float(FPS)},
                                       {"type": "text", "text": "And this?"}]}]
    lengths = set()
    for media in ({"num_frames": 8}, {"fps": 1.0}):  # 8 and 2 frames; the configured 2 fps gives 4
        want, n_prompt = srv.alone(hf, 10, **media)
        r = srv.post({"messages": msgs, "max_tokens": 10, "temperature": 0, "mm_processor_kwargs": media}).json()
        assert r["choices"][0]["message"]["content"] == want and r["usage"]["prompt_tokens"] == n_prompt
        lengths.add(n_prompt)
    assert len(lengths) == 2


def test_mm_processor_kwargs_refused_before_decoding(srv, decodes):
    ip, vp = srv.proc.image_processor, srv.proc.video_processor
    body = {"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _png(2, 64, 64)}}, {"type": "text", "text": "?"}]}]}
    for kwargs, key in [({"max_pixelz": 4096}, "max_pixelz"),
                        ({"max_pixels": ip.max_pixels + 1}, "max_pixels"),
                        ({"min_pixels": 5000, "max_pixels": 4096}, "min_pixels"),
                        ({"max_pixels": 100}, "max_pixels"),
                        ({"fps": 0}, "fps"), ({"fps": "fast"}, "fps"),
                        ({"num_frames": 3}, "num_frames"), ({"num_frames": vp.max_frames + 2}, "num_frames"),
                        ({"num_frames": 4, "fps": 1}, "num_frames")]:
        err = _error(srv.post({**body, "mm_processor_kwargs": kwargs}), 400)
        assert err["param"] == f"mm_processor_kwargs.{key}" and key in err["message"], err
        assert err["code"] == "invalid_mm_processor_kwargs"
    err = _error(srv.post({**body, "mm_processor_kwargs": [1, 2]}), 400)
    assert err["param"] == "mm_processor_kwargs"
    assert not decodes
    # Images that fill the context (4 x 64 tokens = 256 of 256, the 5th not even counted) are refused
    # from their headers, not decoded; with a smaller max_pixels the same request fits.
    many = {"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _png(i, 256, 256)}} for i in range(5)]}]}
    err = _error(srv.post(many), 400)
    assert err["code"] == "context_length_exceeded" and "at least 256 tokens (image 4" in err["message"] and not decodes
    ok = srv.post({**many, "mm_processor_kwargs": {"max_pixels": 4096}})
    assert ok.status_code == 200 and len(decodes) == 5
    assert srv.wait_blocks() == srv.start_blocks


def _video(container: str, n: int = 16, h: int = 256, w: int = 320) -> str:
    """A data: URL of n smooth frames (small when encoded) at FPS; mp4 states its frame count in the
    header, matroska does not."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = np.broadcast_to(np.array([16 * i, 100, 255 - 16 * i], np.uint8), (h, w, 3))
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        c.mux(s.encode())
    return f"data:video/{'mp4' if container == 'mp4' else 'x-matroska'};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def video_decodes(monkeypatch):
    """Counts video decodes (the server's, through media_io)."""
    from qvl_jax.processing import media_io

    calls = []
    real = media_io._decode_video
    monkeypatch.setattr(media_io, "_decode_video", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_videos_are_counted_from_their_header_before_decoding(srv, decodes, video_decodes):
    """An image (64 tokens) and a video whose MP4 header states 16 frames of 256 x 320 (8 frames
    sampled at the configured 2 fps: 224 tokens) fill the 256-token context: refused, naming the
    video and the setting to lower, with neither decoded. Sampled at fps 0.5 (80 tokens) the same
    request is answered. A Matroska file states no frame count: the same video is counted, and
    refused, once decoded. A header that states more pixels than the server's limit is a 413."""
    from qvl_jax.serving import media
    from qvl_jax.serving.protocol import ApiError

    def body(video, **kw):
        return {"max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png(3, 256, 256)}},
            {"type": "video_url", "video_url": {"url": video}}, {"type": "text", "text": "?"}]}], **kw}

    mp4, mkv = _video("mp4"), _video("matroska")
    err = _error(srv.post(body(mp4)), 400)
    assert err["code"] == "context_length_exceeded" and "at least 288 tokens (video 1, 8 of 16 frames: 224)" in \
        err["message"] and "mm_processor_kwargs.fps" in err["message"], err
    assert not decodes and not video_decodes
    assert srv.post(body(mp4, mm_processor_kwargs={"fps": 0.5})).status_code == 200
    assert len(decodes) == len(video_decodes) == 1
    err = _error(srv.post(body(mkv)), 400)
    assert err["code"] == "context_length_exceeded" and "(video 1, 8 of 16 frames: 224)" in err["message"], err
    assert len(video_decodes) == 2
    assert srv.wait_blocks() == srv.start_blocks
    data = base64.b64decode(mp4.split(",")[1])
    assert media.video_header(data, media.MediaPolicy(max_video_pixels=16 * 256 * 320)).frames == 16
    with pytest.raises(ApiError) as e:
        media.video_header(data, media.MediaPolicy(max_video_pixels=16 * 256 * 320 - 1))
    assert e.value.status == 413 and len(video_decodes) == 2


# ---------------------------------------------------------------------------------------------------
# batch


def _line(cid, body, url="/v1/chat/completions"):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def _bodies():
    content = [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": "Describe."}]
    return {
        "text": {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12, "temperature": 0},
        "image_small": {"messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0,
                        "mm_processor_kwargs": SMALL},
        "seeded_n2": {"messages": [{"role": "user", "content": "tell me"}], "max_tokens": 10, "temperature": 1.0,
                      "seed": 7, "n": 2},
        "logprobs": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "temperature": 0,
                     "logprobs": True, "top_logprobs": 2},
        "refused": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000},
    }


def _comparable(body: dict) -> dict:
    """A response body without what differs between two identical requests (id, time, cache hits)."""
    body = {k: v for k, v in body.items() if k not in ("id", "created")}
    if "usage" in body:
        body["usage"] = {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}
    return body


def _same(a, b, path="body") -> None:
    """a == b, floats (log-probabilities) within 1e-5: the engine batches the two runs' requests
    differently (a decode row may ride on another request's prefill chunk, `steps.mixed`), which
    moves float32 logits by rounding; every token, text and field must still be equal."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5), path
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _run(app, inp, out, **kw):
    from qvl_jax.serving.batch import run_batch

    return asyncio.run(run_batch(app, inp, out, progress=False, **kw))


def _results(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_batch_equals_server(srv, tmp_path):
    bodies = _bodies()
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(_line(k, b) + "\n" for k, b in bodies.items())
                   + _line("completion", {"prompt": "Once upon", "max_tokens": 6, "temperature": 0}, "/v1/completions")
                   + "\n")
    counts = _run(srv.app, inp, out, concurrency=8)
    assert counts == {"total": 6, "skipped": 0, "ok": 5, "failed": 1, "repaired_bytes": 0}
    results = {r["custom_id"]: r for r in _results(out)}
    assert sorted(results) == sorted([*bodies, "completion"])
    for cid, body in [*bodies.items(), ("completion", json.loads(inp.read_text().splitlines()[-1])["body"])]:
        r = srv.post(body, "/v1/completions" if cid == "completion" else "/v1/chat/completions")
        res = results[cid]
        assert set(res) == {"id", "custom_id", "response", "error"} and res["id"].startswith("batch_req_")
        assert res["response"]["status_code"] == r.status_code
        _same(_comparable(res["response"]["body"]), _comparable(r.json()), cid)
        if r.status_code == 200:
            assert res["error"] is None and res["response"]["request_id"] == res["response"]["body"]["id"]
        else:
            assert res["error"] == {"code": "context_length_exceeded", "message": r.json()["error"]["message"]}
    assert srv.wait_blocks() == srv.start_blocks


def test_batch_bad_lines_and_resume_repair(srv, tmp_path):
    from qvl_jax.errors import InputError

    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    lines = [
        _line("a", ok),
        "{not json",
        "[1, 2]",
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": ok}),  # no custom_id
        json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": ok, "extra": 1}),
        json.dumps({"custom_id": "c", "method": "GET", "url": "/v1/chat/completions", "body": ok}),
        json.dumps({"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": ok}),
        json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/chat/completions", "body": [1]}),
        _line("f", {**ok, "stream": True}),
        "",  # blank lines are not requests
        _line("a", ok),  # a repeated id
        _line("g", {**ok, "mm_processor_kwargs": {"size": 3}}),  # refused by the server: 400
        _line("h", {**ok, "messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": "x"}]}]}),
        _line("i", ok),
        json.dumps({"custom_id": "\ud800", "method": "GET"}),  # a lone surrogate (JSON escape) is written out too
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    counts = _run(srv.app, inp, out, concurrency=4)
    assert counts == {"total": 14, "skipped": 0, "ok": 2, "failed": 12, "repaired_bytes": 0}
    res = _results(out)
    by_line = {r["error"]["line"]: r for r in res if r["error"] and "line" in r["error"]}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 11, 15]
    assert by_line[15]["custom_id"] == "\ud800"
    for n, r in by_line.items():
        assert r["response"] is None and r["error"]["code"] == "invalid_line" and f"line {n}" in r["error"]["message"]
        assert "\n" not in r["error"]["message"]
    assert [by_line[n]["custom_id"] for n in (2, 3, 4, 5, 6, 7, 8, 9, 11)] == [None, None, None, "b", "c", "d", "e", "f",
                                                                                 None]
    assert "'extra'" in by_line[5]["error"]["message"] and "repeats line 1" in by_line[11]["error"]["message"]
    refused = {r["custom_id"]: r for r in res if r["response"] is not None and r["response"]["status_code"] == 400}
    assert refused["g"]["response"]["body"]["error"]["param"] == "mm_processor_kwargs.size"
    assert refused["g"]["error"]["code"] == "invalid_mm_processor_kwargs"
    assert refused["h"]["response"]["body"]["error"]["type"] == "invalid_request_error"  # an unknown content kind
    ids = [r["custom_id"] for r in res if r["custom_id"] is not None]
    assert len(ids) == len(set(ids)) and {"a", "i"} <= set(ids)

    # A kill mid-write: the last result cut short, and "i" lost. The rerun cuts the partial line off,
    # runs only "i" again, and writes nothing twice.
    data = out.read_bytes()
    keep = [x for x in data.splitlines(keepends=True) if json.loads(x)["custom_id"] != "i"]
    partial = b'{"id":"batch_req_x","custom_id":"i","resp'
    out.write_bytes(b"".join(keep) + partial)
    counts = _run(srv.app, inp, out)
    assert counts["repaired_bytes"] == len(partial)
    assert (counts["skipped"], counts["ok"], counts["failed"]) == (13, 1, 0)
    assert out.read_bytes().startswith(b"".join(keep)) and len(_results(out)) == len(res)
    # A rerun of a finished file does nothing.
    before = out.read_bytes()
    assert _run(srv.app, inp, out)["skipped"] == 14 and out.read_bytes() == before

    # OUT that is not a results file is refused and left as it was; so is OUT = IN.
    other = tmp_path / "notes.jsonl"
    for text in ('{"my": "data"}\n', "my notes, no newline", keep[0].decode() + "more notes"):
        other.write_text(text)
        with pytest.raises(InputError, match="not a batch result"):
            _run(srv.app, inp, other)
        assert other.read_text() == text
    with pytest.raises(InputError, match="is the input"):
        _run(srv.app, inp, inp)
    # One run at a time on one OUT (another process holding its lock).
    import fcntl

    with open(out, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(InputError, match="being written by another"):
            _run(srv.app, inp, out)
    assert out.read_bytes() == before
    assert srv.wait_blocks() == srv.start_blocks


def test_cli_batch_killed_and_resumed(srv, tmp_path):
    """200 requests with 3 bad lines through `qvl-jax batch`: SIGKILL once about half are written,
    then the rerun finishes: 200 results, each id once, the first run's lines kept as they were."""
    bad = {20: "{broken", 90: json.dumps({"custom_id": "r90", "method": "POST", "url": "/v1/x", "body": {}}),
           150: "[1, 2]"}
    lines = []
    for i in range(200):
        content = f"question {i}" if i % 10 else [{"type": "image_url", "image_url": {"url": _png(i, 32, 48)}},
                                                  {"type": "text", "text": f"q{i}"}]
        lines.append(bad.get(i) or _line(f"r{i}", {"messages": [{"role": "user", "content": content}],
                                                    "max_tokens": 8, "temperature": 0}))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "qvl_jax", "batch", str(inp), str(out), "--max-num-seqs", "8",
                             "--max-model-len", "256", "--no-progress"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 300
        while time.monotonic() < end and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 100:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = out.read_bytes()
    first_lines = first[:first.rfind(b"\n") + 1]
    assert 100 <= first_lines.count(b"\n") < 200
    # The rerun (the same runner, in this process) finishes the file.
    counts = _run(srv.app, inp, out, concurrency=16)
    res = _results(out)
    assert out.read_bytes().startswith(first_lines)
    assert len(res) == 200 and counts["skipped"] == first_lines.count(b"\n")
    ids = [r["custom_id"] or f"line {r['error']['line']}" for r in res]
    assert len(set(ids)) == 200
    assert set(ids) == {f"r{i}" for i in range(200) if i not in bad} | {"line 21", "r90", "line 151"}
    assert sum(r["error"] is not None for r in res) == 3
    assert all(r["response"]["status_code"] == 200 for r in res if r["error"] is None)
    assert srv.wait_blocks() == srv.start_blocks


def test_cli_batch_errors(tmp_path, capsys):
    from qvl_jax import cli

    assert cli.main(["batch", str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such batch input file") and err.count("\n") == 1
    assert not (tmp_path / "out.jsonl").exists()
    (tmp_path / "in.jsonl").write_text("")
    assert cli.main(["batch", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--concurrency", "0"]) == 2
    assert capsys.readouterr().err == "error: --concurrency must be at least 1, got 0\n"
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_generate_media_flags(tmp_path, capsys, monkeypatch):
    """generate's --min-pixels / --max-pixels / --fps / --num-frames are the processor's keywords; a bad
    one is a one-line error before the model is loaded."""
    import qvl_jax
    from qvl_jax import cli
    from qvl_jax.processing.processor import Processor

    monkeypatch.setenv("QVL_JAX_COMPILATION_CACHE", "0")
    path = tmp_path / "pic.png"
    _decoded(_png(4, 200, 300)).save(path)
    proc = Processor.from_pretrained("tiny-random")
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "Hi"}]}]
    sizes = [proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kw).shape[1]
             for kw in ({}, {"min_pixels": 1024, "max_pixels": 4096})]
    assert sizes[0] > sizes[1]
    rc = cli.main(["generate", "--model", "tiny-random", "--image", str(path), "--prompt", "Hi", "--max-new-tokens", "1", "--json",
                   "--min-pixels", "1024", "--max-pixels", "4096"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["prompt_tokens"] == sizes[1]
    monkeypatch.setattr(qvl_jax, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    for flags, message in [(["--num-frames", "3"], "num_frames must be a multiple of 2"),
                           (["--fps", "0"], "fps must be a finite number > 0"),
                           (["--max-pixels", "10"], "max_pixels must be at least 1,024")]:
        rc = cli.main(["generate", "--model", "tiny-random", "--image", str(path), "--prompt", "Hi", *flags])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
