"""Per-call media settings (min_pixels, max_pixels, fps, num_frames) on Processor.apply_chat_template
and Processor.__call__, against transformers' Qwen3VLProcessor given the same keywords; and every bad
setting is a one-line InputError naming its key, before any image is decoded.

The transformers processor and our processor come from test_processor.py's fixtures (our tokenizer
directory, transformers' PIL image processor, its video processor with the PIL stand-in for
torchvision)."""

from __future__ import annotations

import numpy as np
import pytest

from hf_reference import install_torchvision_stand_in, one_line_error
from qvl_jax.errors import InputError
from qvl_jax.processing.media_settings import MediaSettingError, check_media_settings
from test_processor import IMAGE_KEYS, VIDEO_KEYS, assert_same_inputs, hf_proc, hf_tok, image, model_dir, pixels, proc

__all__ = ["hf_proc", "hf_tok", "model_dir", "proc"]  # fixtures, used by name

SOURCE_FPS = 10.0
KEYS = IMAGE_KEYS + VIDEO_KEYS[3:]


@pytest.fixture
def torchvision_stand_in(monkeypatch):
    install_torchvision_stand_in(monkeypatch)


def _messages():
    return [{"role": "user", "content": [{"type": "image", "image": image(300, 420, 1)},
                                         {"type": "video", "video": pixels((30, 48, 80, 3), 2), "video_fps": SOURCE_FPS},
                                         {"type": "text", "text": "Compare them."}]}]


@pytest.mark.parametrize("settings", [
    {},
    {"min_pixels": 4096, "max_pixels": 40000},  # smaller than the configured range: fewer tokens
    {"min_pixels": 200000, "max_pixels": 400000},  # larger: the image is enlarged
    {"max_pixels": 100000},  # only one of the two
    {"fps": 4.0},  # more frames than the configured 2 fps
    {"num_frames": 10},
])
def test_settings_match_transformers(settings, proc, hf_proc, torchvision_stand_in):
    hf_kwargs = dict(settings, fps=None) if "num_frames" in settings else settings  # transformers' default fps clashes
    ref = hf_proc.apply_chat_template(
        _messages(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np",
        processor_kwargs={"cap_pixels_per_frame": False, **hf_kwargs,
                          "video_metadata": [{"fps": SOURCE_FPS, "total_num_frames": 30}]})
    out = proc.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=True, return_dict=True, **settings)
    assert_same_inputs(out, ref, KEYS)
    if settings:  # the setting took effect: not the configured processors' answer
        plain = proc.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=True, return_dict=True)
        assert plain["input_ids"].shape != out["input_ids"].shape


def test_call_takes_the_same_keywords(proc, hf_proc):
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    img = image(500, 260, 3)
    ref = hf_proc(text=text, images=img, min_pixels=1024, max_pixels=20000, return_tensors="np")
    out = proc(text=text, images=img, min_pixels=1024, max_pixels=20000)
    assert_same_inputs(out, ref, IMAGE_KEYS)
    assert out["image_grid_thw"].tolist() != proc(text=text, images=img)["image_grid_thw"].tolist()


BAD = [
    ({"max_pixels": 10}, "max_pixels", "at least 1,024"),  # under one 32 x 32 merge block
    ({"max_pixels": 2**31}, "max_pixels", "supported limit"),
    ({"max_pixels": 40000}, "max_pixels", "below the configured min_pixels"),
    ({"min_pixels": 0}, "min_pixels", "at least 1"),
    ({"min_pixels": 5000, "max_pixels": 4096}, "min_pixels", "larger than"),
    ({"min_pixels": 1.5e5}, "min_pixels", "must be an integer"),
    ({"max_pixels": True}, "max_pixels", "must be an integer"),
    ({"fps": 0}, "fps", "finite number > 0"),
    ({"fps": float("nan")}, "fps", "finite number > 0"),
    ({"fps": "2"}, "fps", "finite number > 0"),
    ({"num_frames": 1}, "num_frames", "at least 2"),
    ({"num_frames": 7}, "num_frames", "multiple of 2"),
    ({"num_frames": 4, "fps": 2.0}, "num_frames", "mutually exclusive"),
    ({"num_frames": 2**20}, "num_frames", "supported limit"),
]


@pytest.mark.parametrize("settings,key,message", BAD)
def test_bad_settings_are_one_line_errors(settings, key, message, proc, monkeypatch):
    # nothing is decoded or rendered first
    monkeypatch.setattr("qvl_jax.processing.image_processing.load_image", _never)
    monkeypatch.setattr("qvl_jax.processing.video_processing.load_image", _never)
    e = one_line_error(InputError, lambda: proc.apply_chat_template(_messages(), tokenize=True, **settings), message)
    assert isinstance(e, MediaSettingError) and e.key == key and key in str(e)
    text = "<|vision_start|><|image_pad|><|vision_end|>"
    e = one_line_error(InputError, lambda: proc(text=text, images=image(64, 64, 0), **settings), message)
    assert e.key == key


def _never(*a, **k):
    raise AssertionError("media decoded before the settings were checked")


def test_strict_limits_and_unknown_keys(proc):
    ip, vp = proc.image_processor, proc.video_processor

    def check(settings):
        return check_media_settings(settings, ip, vp, strict=True, where="mm_processor_kwargs.")

    assert check({"max_pixels": ip.max_pixels, "num_frames": vp.max_frames, "min_pixels": None}) == \
        {"max_pixels": ip.max_pixels, "num_frames": vp.max_frames}
    for settings, key, message in [
        ({"max_pixels": ip.max_pixels + 1}, "max_pixels", "more than the configured max_pixels"),
        ({"min_pixels": ip.max_pixels + 1}, "min_pixels", "configured max_pixels"),
        ({"num_frames": vp.max_frames + 2}, "num_frames", "more than the configured max_frames"),
        ({"max_pixel": 4096}, "max_pixel", "not a known setting"),
        ({"do_resize": False}, "do_resize", "not a known setting"),
    ]:
        e = one_line_error(MediaSettingError, lambda: check(settings), message)
        assert e.key == key and f"mm_processor_kwargs.{key}" in str(e)
    e = one_line_error(MediaSettingError, lambda: check([("fps", 1)]), "must be an object")
    assert e.key is None
    assert np.isfinite(check({"fps": 3})["fps"]) and isinstance(check({"fps": 3})["fps"], float)
