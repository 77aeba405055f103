"""Inputs a user can get wrong, each a one-line typed error and never a silent coercion: generation
seeds and token ids, prompts that are not UTF-8, processor configs asking for absurd sizes, and
frame directories holding something other than frames."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import qvl_jax
from qvl_jax.engine import sampling
from qvl_jax.errors import CheckpointError, ConfigError, InputError
from qvl_jax.processing.image_processing import ImageProcessor
from qvl_jax.processing.processor import Processor
from qvl_jax.processing.video_processing import VideoProcessor
from qvl_jax.tiny import write_tiny_checkpoint


def one_line(exc, fn, pattern):
    with pytest.raises(exc, match=pattern) as err:
        fn()
    assert "\n" not in str(err.value)
    return err.value


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-random")


@pytest.fixture(scope="module")
def tiny_converted(tiny_dir, tmp_path_factory):
    from qvl_jax.convert import convert_checkpoint

    return convert_checkpoint(tiny_dir, tmp_path_factory.mktemp("conv") / "model", dtype="float32")


@pytest.fixture(scope="module")
def model(tiny_converted):
    return qvl_jax.load(tiny_converted)


@pytest.fixture(scope="module")
def proc(tiny_dir):
    return Processor.from_pretrained(tiny_dir)


IDS = np.array([[5, 6, 7, 8]])


# ----------------------------------------------------------------------------------------------------
# seeds and token ids


@pytest.mark.parametrize("seed, pattern", [
    (2**64, r"seed must lie in \[0, 2\*\*64\)"),
    (-1, r"seed must lie in \[0, 2\*\*64\), got -1"),
    (1.5, "seed must be an integer, got 1.5"),
    (2.0, "seed must be an integer, got 2.0"),
    ("3", "seed must be an integer, got '3'"),
    (True, "seed must be an integer, got True"),
    (np.bool_(True), "seed must be an integer"),
])
def test_bad_seeds(seed, pattern, model):
    one_line(InputError, lambda: sampling.prng_key(seed), pattern)
    one_line(InputError, lambda: model.generate(input_ids=IDS, max_new_tokens=2, temperature=0.7, seed=seed), pattern)


def test_seeds_use_all_64_bits():
    import jax

    def data(seed):
        return tuple(np.asarray(jax.random.key_data(sampling.prng_key(seed))).tolist())

    # jax.random.key alone keeps the low 32 bits: these would all be one stream
    seeds = [1, 2**32 + 1, 2**63 + 1, 2**64 - 1, 2**32 - 1]
    assert len({data(s) for s in seeds}) == len(seeds)
    assert data(7) == tuple(np.asarray(jax.random.key_data(jax.random.key(7))).tolist())  # small seeds unchanged
    assert data(np.uint64(2**64 - 1)) == data(2**64 - 1)


@pytest.mark.parametrize("stop, pattern", [
    ("5", r"stop_token_ids must be an int or a list of ints, got '5'"),
    (["5"], r"stop_token_ids\[0\] must be an integer token id, got '5'"),
    ([3.7], r"stop_token_ids\[0\] must be an integer token id, got 3.7"),
    (3.0, r"stop_token_ids must be an int or a list of ints, got 3.0"),
    ([True], r"stop_token_ids\[0\] must be an integer token id, got True"),
    (True, r"stop_token_ids must be an int or a list of ints, got True"),
    ([[5]], r"stop_token_ids\[0\] must be an integer token id, got \[5\]"),
    ([2**32 + 5], r"stop_token_ids\[0\] must lie in \[0, 2\*\*31\), got 4294967301"),  # wrapped to 5 before
    ([-1], r"stop_token_ids\[0\] must lie in \[0, 2\*\*31\), got -1"),
    (np.array([1.5]), r"stop_token_ids must be an int or a 1-D list of ints"),
    ([600], r"stop_token_ids must lie in \[0, 512\)"),
])
def test_bad_stop_token_ids(stop, pattern, model):
    one_line(InputError, lambda: model.generate(input_ids=IDS, max_new_tokens=2, stop_token_ids=stop), pattern)


@pytest.mark.parametrize("pad, pattern", [
    ("0", "pad_token_id must be an integer token id, got '0'"),
    (3.7, "pad_token_id must be an integer token id, got 3.7"),
    (True, "pad_token_id must be an integer token id, got True"),
    (2**31, r"pad_token_id must lie in \[0, 2\*\*31\)"),
    (-2, r"pad_token_id must lie in \[0, 2\*\*31\)"),
    (512, r"pad_token_id must lie in \[0, 512\)"),
])
def test_bad_pad_token_id(pad, pattern, model):
    one_line(InputError, lambda: model.generate(input_ids=IDS, max_new_tokens=2, pad_token_id=pad), pattern)


def test_good_token_ids_still_accepted():
    assert sampling.token_ids("s", 5) == [5]
    assert sampling.token_ids("s", np.int64(5)) == [5]
    assert sampling.token_ids("s", (1, np.int32(2))) == [1, 2]
    assert sampling.token_ids("s", np.array([3, 4], np.int64)) == [3, 4]
    assert sampling.token_ids("s", []) == []


def test_bool_sampling_values_are_refused(model):
    one_line(InputError, lambda: model.generate(input_ids=IDS, max_new_tokens=2, temperature=True),
             "temperature must be a number")


def test_bad_generation_config_fails_the_load(tiny_converted, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_converted, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": ["<|im_end|>"]}))
    # verify=False: by default the edited file is first caught as a changed checkpoint (test_verify_stamp).
    one_line(ConfigError, lambda: qvl_jax.load(d, verify=False), "eos_token_id must be a token id")


# ----------------------------------------------------------------------------------------------------
# prompts that are not UTF-8


@pytest.mark.parametrize("call, pattern", [
    (lambda p: p(text="caf\udce9"), r"text is not valid UTF-8: '\\udce9' at character 3"),
    (lambda p: p(text=["ok", "\ud800"]), r"text 1 is not valid UTF-8"),
    (lambda p: p.encode("a\udcff"), r"text is not valid UTF-8"),
    (lambda p: p.apply_chat_template([{"role": "user", "content": "x\ud83d"}], tokenize=True),
     r"message 0 \(user\) content is not valid UTF-8"),
    (lambda p: p.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "\udcc3("}]}], add_generation_prompt=True),
     r"message 0 \(user\), content item 0 text is not valid UTF-8"),
])
def test_lone_surrogates_in_prompts(call, pattern, proc):
    one_line(InputError, lambda: call(proc), pattern)


def test_unreadable_processor_files_say_permission_denied(tiny_dir, monkeypatch):
    from pathlib import Path

    real_is_file = Path.is_file

    def is_file(self):  # tests run as root, where chmod cannot deny anything
        if self.name == "tokenizer_config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    one_line(CheckpointError, lambda: Processor.from_pretrained(tiny_dir),
             f"^permission denied: {tiny_dir / 'tokenizer_config.json'}$")


# ----------------------------------------------------------------------------------------------------
# processor configs asking for absurd sizes: refused when read, before any image is touched


@pytest.mark.parametrize("cls, config, pattern", [
    (ImageProcessor, {"max_pixels": 10**12}, r"max_pixels \(size\['longest_edge'\]\)=1000000000000 is beyond"),
    (ImageProcessor, {"size": {"shortest_edge": 65536, "longest_edge": 10**12}}, "max_pixels"),
    (ImageProcessor, {"max_pixels": 1e12}, r"max_pixels .* must be a positive integer, got 1000000000000\.0"),
    (ImageProcessor, {"min_pixels": 2**30, "max_pixels": 2**30}, r"min_pixels .*=1073741824 is beyond"),
    (ImageProcessor, {"patch_size": 0}, "patch_size must be a positive integer, got 0"),
    (ImageProcessor, {"merge_size": 0}, "merge_size must be a positive integer, got 0"),
    (ImageProcessor, {"temporal_patch_size": 0}, "temporal_patch_size must be a positive integer"),
    (ImageProcessor, {"temporal_patch_size": 10**6}, "temporal_patch_size=1000000 is beyond"),
    (ImageProcessor, {"patch_size": 10**6}, r"patch_size \* merge_size = 2000000 makes one merge block"),
    (ImageProcessor, {"patch_size": 14.0}, "patch_size must be a positive integer, got 14.0"),
    (ImageProcessor, {"image_mean": ["0.5", 0.5, 0.5]}, "image_mean must be 3 finite numbers"),
    (ImageProcessor, {"image_std": [float("nan")] * 3}, "image_std must be 3 finite numbers"),
    (ImageProcessor, {"rescale_factor": float("inf")}, "rescale_factor must be a finite positive number"),
    (VideoProcessor, {"size": {"shortest_edge": 4096, "longest_edge": 10**13}}, "max_pixels"),
    (VideoProcessor, {"num_frames": 10**9, "fps": None}, "num_frames=1000000000 is beyond"),
    (VideoProcessor, {"max_frames": 10**9}, "max_frames=1000000000 is beyond"),
    (VideoProcessor, {"fps": float("inf")}, "fps must be a finite positive number"),
])
def test_absurd_processor_configs(cls, config, pattern):
    one_line(ConfigError, lambda: cls.from_dict(config), pattern)


@pytest.mark.parametrize("name, config", [
    ("preprocessor_config.json", {"size": {"shortest_edge": 10**9, "longest_edge": 10**12}}),
    ("video_preprocessor_config.json", {"size": {"shortest_edge": 4096, "longest_edge": 10**12}}),
])
def test_checkpoint_with_absurd_processor_config(name, config, tiny_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    (d / name).write_text(json.dumps(config))
    one_line(ConfigError, lambda: Processor.from_pretrained(d), "is beyond the supported limit")


def test_video_fps_must_be_a_finite_number():
    video = np.zeros((4, 32, 32, 3), np.uint8)
    one_line(InputError, lambda: VideoProcessor()(video, video_fps=float("inf")), "video fps must be a finite")
    one_line(InputError, lambda: VideoProcessor()(video, video_fps="24"), "video_fps must be a number or one")
    one_line(InputError, lambda: VideoProcessor()(video, video_fps=["24"]), "video fps must be a finite")


# ----------------------------------------------------------------------------------------------------
# frame directories (cli --video DIR)


def _frames(d, n=4, size=(40, 48)):
    d.mkdir()
    for i in range(n):
        Image.fromarray(np.full((*size, 3), 40 * i, np.uint8)).save(d / f"{i:03d}.png")
    return d


def test_frame_directory_reads_frames_in_order(tmp_path):
    from qvl_jax.cli import _load_video

    d = _frames(tmp_path / "frames")
    (d / ".DS_Store").write_bytes(b"\0\1")  # hidden files are the file manager's, not frames
    item = _load_video(str(d), 2.0)
    assert item["video_fps"] == 2.0 and [np.asarray(f)[0, 0, 0] for f in item["video"]] == [0, 40, 80, 120]
    assert "video_fps" not in _load_video(str(d), None)


@pytest.mark.parametrize("make, pattern", [
    (lambda d: (d / "notes.txt").write_text("not a frame"), r"holds 'notes.txt', which is not a readable image"),
    (lambda d: (d / "004.png").write_bytes(b"\x89PNG\r\n\x1a\n broken"), r"holds '004.png', which is not a readable"),
    (lambda d: (d / "sub").mkdir(), r"holds 'sub', which is not a file"),
])
def test_frame_directory_with_something_else(make, pattern, tmp_path):
    from qvl_jax.cli import _load_video

    d = _frames(tmp_path / "frames")
    make(d)
    one_line(InputError, lambda: _load_video(str(d), None), pattern)


@pytest.mark.parametrize("limit", [200, 400], ids=["bomb_error", "bomb_warning"])
def test_frame_directory_decompression_bomb(limit, tmp_path, monkeypatch):
    """A 20x25 frame is 500 pixels: over twice a limit of 200 PIL raises DecompressionBombError; over a
    limit of 400 but under twice it PIL only warns, which a frame directory refuses too."""
    from qvl_jax.cli import _load_video

    d = _frames(tmp_path / "frames", size=(20, 25))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    one_line(InputError, lambda: _load_video(str(d), None), r"frame '000.png' in .* is too large: Image size \(500")


def test_empty_frame_directory(tmp_path):
    from qvl_jax.cli import _load_video

    (tmp_path / "frames").mkdir()
    one_line(InputError, lambda: _load_video(str(tmp_path / "frames"), None), "holds no frame images")
