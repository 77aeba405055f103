"""One video file, three ways in: `qvl-jax generate --video` (the CLI's content item), the server's
video_url (a local path and a data: URL, through the same request-to-messages code the app runs) and a
fine-tuning record (training/data's encode_record) must give the processor the same frames at the same
source frame rate, so the same pixel_values_videos, video_grid_thw and `<t seconds>` timestamps.

The clip is 10 fps: a loader that drops the file's rate falls back to 24 fps, which samples fewer frames
(another grid) and writes other timestamps."""

from __future__ import annotations

import base64
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from qvl_jax import cli
from qvl_jax.processing.processor import Processor
from qvl_jax.processing.tokenizer_files import write_tiny_tokenizer
from qvl_jax.processing.video_processing import sample_frame_indices, video_timestamps
from qvl_jax.serving import app
from qvl_jax.serving.media import MediaPolicy
from qvl_jax.serving.protocol import ChatCompletionRequest
from qvl_jax.training.data import encode_record, read_jsonl
from test_serve_media import _mp4  # the lossless H.264 writer the serving tests use

FPS = 10
N_FRAMES = 30  # 3 s at 10 fps
PROMPT = "What happens?"
# the tiny-random checkpoint's video preprocessing: 2 fps sampling, 2..8 frames, small frames
VIDEO_CONFIG = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3, "fps": 2, "min_frames": 2, "max_frames": 8,
                "size": {"shortest_edge": 32 * 32, "longest_edge": 8 * 256 * 16 * 16}}


def _clip_frames() -> list[np.ndarray]:
    """Distinct frames: a random colour each, plus noise, so any other frame choice changes the pixels."""
    rs = np.random.RandomState(0)
    return [np.clip(rs.randint(0, 256, 3) + rs.randint(-40, 40, (32, 48, 3)), 0, 255).astype(np.uint8)
            for _ in range(N_FRAMES)]


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    (d / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_CONFIG))
    return Processor.from_pretrained(d)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """clip.mp4 (10 fps) and frames/ (the same frames as PNGs) in one directory."""
    d = tmp_path_factory.mktemp("media")
    frames = _clip_frames()
    (d / "clip.mp4").write_bytes(_mp4(frames, FPS))
    (d / "frames").mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(d / "frames" / f"{i:03d}.png")
    return d


def _cli(proc, path: str, fps: float | None) -> dict:
    """What `qvl-jax generate --video PATH [--video-fps F] --prompt ...` hands the model."""
    content = [cli._load_video(path, fps), {"type": "text", "text": PROMPT}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)


def _server(proc, url: str, allowed: str) -> dict:
    """What the server's chat endpoint hands the engine for a video_url part."""
    st = SimpleNamespace(cfg=app.ServerConfig(media=MediaPolicy(allowed_local_path=os.path.realpath(allowed))),
                         processor=proc, engine=SimpleNamespace(max_model_len=4096), token_chars=16)
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": PROMPT}]}])
    (inputs,) = app._chat_inputs(st, req)
    return inputs


def _finetune(proc, tmp_path, video: str, fps: float | None) -> dict:
    """What `qvl-jax finetune` trains on for a JSONL record naming the video."""
    item = {"type": "video", "video": video, **({"video_fps": fps} if fps is not None else {})}
    record = {"messages": [{"role": "user", "content": [item, {"type": "text", "text": PROMPT}]},
                           {"role": "assistant", "content": "A clip."}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
    (rec,) = read_jsonl(tmp_path / "train.jsonl")
    return encode_record(rec, proc)


def _timestamps(proc, ids) -> list[str]:
    return re.findall(r"<(\d+\.\d) seconds>", proc.decode(np.asarray(ids).reshape(-1).tolist()))


def _assert_same(proc, want: dict, got: dict, prefix: bool = False):
    np.testing.assert_array_equal(got["video_grid_thw"], want["video_grid_thw"])
    np.testing.assert_array_equal(got["pixel_values_videos"], want["pixel_values_videos"])
    a, b = np.asarray(want["input_ids"]).reshape(-1), np.asarray(got["input_ids"]).reshape(-1)
    # a training record also holds the assistant's answer after the prompt
    np.testing.assert_array_equal(b[:len(a)] if prefix else b, a)
    assert _timestamps(proc, b) == _timestamps(proc, a)


def test_video_file_is_the_same_in_generate_serve_and_finetune(proc, media, tmp_path):
    path = str(media / "clip.mp4")
    want = _cli(proc, path, None)
    # Sampled at the file's 10 fps: 2 fps of 3 s is 6 frames, 3 grid steps, and their timestamps.
    indices = sample_frame_indices(N_FRAMES, FPS, fps=2, min_frames=2, max_frames=8)
    assert len(indices) == 6 and want["video_grid_thw"][0, 0] == 3
    assert _timestamps(proc, want["input_ids"]) == [f"{t:.1f}" for t in video_timestamps(indices, FPS)]

    data_url = "data:video/mp4;base64," + base64.b64encode((media / "clip.mp4").read_bytes()).decode()
    for url in (path, "file://" + path, data_url):
        _assert_same(proc, want, _server(proc, url, str(media)))
    _assert_same(proc, want, _finetune(proc, tmp_path, path, None), prefix=True)
    # relative to the JSONL file, as records usually name their media
    (tmp_path / "clip.mp4").write_bytes((media / "clip.mp4").read_bytes())
    _assert_same(proc, want, _finetune(proc, tmp_path, "clip.mp4", None), prefix=True)


def test_video_fps_overrides_the_file_rate_the_same_way(proc, media, tmp_path):
    path = str(media / "clip.mp4")
    want = _cli(proc, path, 5.0)
    assert want["video_grid_thw"][0, 0] != _cli(proc, path, None)["video_grid_thw"][0, 0]
    _assert_same(proc, want, _finetune(proc, tmp_path, path, 5.0), prefix=True)


def test_frame_directory_is_the_same_in_generate_and_finetune(proc, media, tmp_path):
    """A directory of frames has no rate of its own: the caller's, in both; and its frames are the
    video file's frames (libx264rgb at crf 0 is lossless)."""
    frames = str(media / "frames")
    want = _cli(proc, frames, FPS)
    _assert_same(proc, want, _finetune(proc, tmp_path, frames, FPS), prefix=True)
    _assert_same(proc, want, _cli(proc, str(media / "clip.mp4"), None))
