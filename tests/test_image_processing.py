"""Image / video preprocessing against transformers.

Images are compared with the processor `AutoImageProcessor` builds for Qwen3-VL's
preprocessor_config.json when torchvision is absent (`Qwen2VLImageProcessorPil`): same grids, pixel
values within 1e-5. transformers' video processor needs torchvision, which is not installed, so the
video tests run its real code with a stand-in for the four torchvision functions it calls (`resize`,
`normalize`, `grayscale_to_rgb`, `InterpolationMode`): with a PIL resize the rest of its pipeline
(sampling, sizes, normalisation, padding, patch order, metadata) must match exactly, and with torch's
native uint8 bicubic (what torchvision runs on CPU) the pixels must agree to the documented kernel
difference. Every expected value comes from transformers, never from qvl_jax.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from transformers import AutoImageProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_smart_resize_video
from transformers.video_utils import VideoMetadata as HFVideoMetadata

from hf_reference import (HF_VIDEO_KWARGS, IMAGE_CONFIG, VIDEO_CONFIG, InterpolationMode,
                          install_torchvision_stand_in, pil_resize)
from qvl_jax.errors import ConfigError
from qvl_jax.processing.image_processing import ImageProcessor, load_image, smart_resize
from qvl_jax.processing.video_processing import (
    VideoProcessor,
    sample_frame_indices,
    smart_resize_video,
    video_timestamps,
)




@pytest.fixture(scope="module")
def hf_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3vl_preprocessor")
    (d / "preprocessor_config.json").write_text(json.dumps(IMAGE_CONFIG))
    proc = AutoImageProcessor.from_pretrained(str(d))
    assert type(proc).__name__ == "Qwen2VLImageProcessorPil"  # the PIL backend is what we reproduce
    return proc


@pytest.fixture(scope="module")
def ours():
    return ImageProcessor.from_dict(IMAGE_CONFIG)


def pixels(shape, seed, high=256, dtype=np.uint8):
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def assert_same(out, ref):
    ref_pv = np.asarray(ref["pixel_values"])
    np.testing.assert_array_equal(out["image_grid_thw"], np.asarray(ref["image_grid_thw"]))
    assert out["image_grid_thw"].dtype == np.int64
    assert out["pixel_values"].dtype == np.float32
    assert out["pixel_values"].shape == ref_pv.shape
    assert np.abs(out["pixel_values"] - ref_pv).max() <= 1e-5


# ----------------------------------------------------------------------------------------------------
# images: each case builds (our input, transformers' input, transformers' call kwargs)


def _rgb(h, w, seed):
    return Image.fromarray(pixels((h, w, 3), seed))


def _palette(h, w, seed, transparency=None):
    img = _rgb(h, w, seed).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if transparency is not None:
        img.info["transparency"] = transparency
    return img


def _rgba_with_holes(h, w, seed):
    a = pixels((h, w, 4), seed)
    a[: h // 3, :, 3] = 0  # fully transparent rows: blended to white, or dropped for files
    a[h // 3 : h // 2, :, 3] = 255
    return a


PIL_CASES = {
    "rgb_1x1": lambda: _rgb(1, 1, 0),
    "rgb_1x40": lambda: _rgb(1, 40, 1),
    "rgb_40x1": lambda: _rgb(40, 1, 2),
    "rgb_31x33": lambda: _rgb(31, 33, 3),
    "rgb_20x3000": lambda: _rgb(20, 3000, 4),
    "rgb_3000x20": lambda: _rgb(3000, 20, 5),
    "rgb_17x500": lambda: _rgb(17, 500, 6),
    "rgb_256x256_no_resize": lambda: _rgb(256, 256, 7),
    "rgb_300x300": lambda: _rgb(300, 300, 8),
    "rgb_481x641": lambda: _rgb(481, 641, 9),
    "rgb_600x200": lambda: _rgb(600, 200, 10),
    "rgba": lambda: Image.fromarray(_rgba_with_holes(45, 70, 11)),
    "la": lambda: Image.fromarray(pixels((50, 37, 2), 12)),
    "l": lambda: Image.fromarray(pixels((33, 90, 1), 13)[..., 0]),
    "one_bit": lambda: Image.fromarray(pixels((40, 40), 14, high=2).astype(bool)),
    "p": lambda: _palette(64, 48, 15),
    "p_transparent_index": lambda: _palette(64, 48, 16, transparency=5),
    "p_transparent_bytes": lambda: _palette(48, 64, 17, transparency=bytes(range(0, 256, 4))),
    "cmyk": lambda: Image.frombytes("CMYK", (70, 50), pixels((50, 70, 4), 18).tobytes()),
    "i16": lambda: Image.frombytes("I;16", (60, 40), pixels((40, 60), 19, high=400, dtype="<u2").tobytes()),
    "i32": lambda: Image.fromarray(pixels((40, 60), 20, high=400, dtype=np.int32)),
    "float": lambda: Image.fromarray(np.random.default_rng(21).random((40, 60)).astype(np.float32) * 300),
    "ycbcr": lambda: _rgb(40, 60, 22).convert("YCbCr"),
}


@pytest.mark.parametrize("name", sorted(PIL_CASES))
def test_pil_image_matches_transformers(name, ours, hf_images):
    img = PIL_CASES[name]()
    assert_same(ours(img), hf_images(img))


@pytest.mark.parametrize("name", ["rgb_31x33", "rgb_481x641", "rgba", "cmyk"])
def test_pixel_values_are_bit_exact(name, ours, hf_images):
    # Same PIL resize and the same float64-rescale / float32-normalise steps, so not even the last bit
    # differs; a fused or reordered normalisation would still pass the 1e-5 check above.
    img = PIL_CASES[name]()
    np.testing.assert_array_equal(ours(img)["pixel_values"], np.asarray(hf_images(img)["pixel_values"]))


NUMPY_CASES = {
    # name: (array, kwargs for transformers' call)
    "hwc3": (pixels((37, 91, 3), 30), {}),
    "hwc4_alpha": (_rgba_with_holes(41, 29, 31), {}),
    "hwc1": (pixels((50, 22, 1), 32), {}),
    # transformers reads a (3, W, 3) array as channels-first unless told; we always read [H, W, C]
    "hwc3_height3": (pixels((3, 50, 3), 33), {"input_data_format": "channels_last"}),
    "non_contiguous": (pixels((60, 80, 3), 34)[::-1, ::2], {}),
}


@pytest.mark.parametrize("name", sorted(NUMPY_CASES))
def test_numpy_image_matches_transformers(name, ours, hf_images):
    array, kwargs = NUMPY_CASES[name]
    assert_same(ours(array), hf_images(np.ascontiguousarray(array), **kwargs))


def test_numpy_grayscale_2d_matches_transformers_hw1(ours, hf_images):
    # transformers refuses 2-D arrays; its [H, W, 1] reading is what a grayscale image means
    gray = pixels((45, 77), 35)
    assert_same(ours(gray), hf_images(gray[..., None]))


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


FILE_CASES = {
    "png_rgb": lambda d: _save(_rgb(70, 45, 40), d / "rgb.png"),
    # a file's alpha is dropped, not blended (transformers' load_image does convert("RGB") first)
    "png_rgba": lambda d: _save(Image.fromarray(_rgba_with_holes(50, 66, 41)), d / "rgba.png"),
    "png_p_transparent": lambda d: _save(_palette(40, 52, 42, transparency=3), d / "p.png"),
    "png_i16": lambda d: _save(
        Image.frombytes("I;16", (50, 30), pixels((30, 50), 43, high=400, dtype="<u2").tobytes()), d / "i16.png"
    ),
    "png_la": lambda d: _save(Image.fromarray(pixels((30, 50, 2), 44)), d / "la.png"),
    "jpeg_rgb": lambda d: _save(_rgb(90, 130, 45), d / "rgb.jpg", quality=90),
    "jpeg_cmyk": lambda d: _save(Image.frombytes("CMYK", (64, 40), pixels((40, 64, 4), 46).tobytes()), d / "c.jpg"),
}


@pytest.mark.parametrize("name", sorted(FILE_CASES))
@pytest.mark.parametrize("as_path", [False, True], ids=["str", "pathlib"])
def test_file_matches_transformers(name, as_path, ours, hf_images, tmp_path):
    path = FILE_CASES[name](tmp_path)
    # transformers only takes str paths
    assert_same(ours(path if as_path else str(path)), hf_images(str(path)))


def test_exif_orientation_is_applied_for_files_as_transformers_does(ours, hf_images, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img = _rgb(40, 300, 47)  # wide as stored, tall as displayed
    path = _save(img, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    ref = hf_images(str(path))
    out = ours(path)
    assert_same(out, ref)
    _, gh, gw = np.asarray(ref["image_grid_thw"])[0]
    assert gh > gw  # the reference did rotate, so this case really tests EXIF handling
    # a PIL image handed over directly is not rotated (neither is it by transformers)
    opened = Image.open(path)
    assert_same(ours(opened), hf_images(opened))
    assert tuple(ours(opened)["image_grid_thw"][0][1:]) != (gh, gw)


def test_several_images_in_one_call(ours, hf_images, tmp_path):
    path = str(_save(_rgb(33, 65, 50), tmp_path / "a.png"))
    batch = [_rgb(100, 60, 51), pixels((20, 45, 3), 52), path, PIL_CASES["rgba"](), PIL_CASES["rgb_1x40"]()]
    assert_same(ours(batch), hf_images(batch))
    nested = [[batch[0], batch[1]], [batch[3]]]
    assert_same(ours(nested), hf_images(nested))


@pytest.mark.parametrize(
    "ours_kwargs, hf_kwargs",
    [
        (dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 20), dict(size={"shortest_edge": 4096, "longest_edge": 20480})),
        (dict(size={"shortest_edge": 512 * 512, "longest_edge": 600 * 600}), dict(size={"shortest_edge": 262144, "longest_edge": 360000})),
        (dict(size={"shortest_edge": 1, "longest_edge": 10**9}), dict(min_pixels=1, max_pixels=10**9)),
    ],
    ids=["small_budget", "large_minimum", "min_max_pixels_kwargs"],
)
def test_non_default_pixel_limits(ours_kwargs, hf_kwargs, hf_images):
    proc = ImageProcessor(**ours_kwargs)
    for img in [_rgb(480, 640, 60), _rgb(31, 33, 61), _rgb(20, 700, 62)]:
        with pytest.warns(FutureWarning) if "min_pixels" in hf_kwargs else contextlib.nullcontext():
            ref = hf_images(img, **hf_kwargs)
        assert_same(proc(img), ref)


def test_from_dict_reads_the_checkpoint_config(hf_images):
    proc = ImageProcessor.from_dict(IMAGE_CONFIG)
    assert (proc.min_pixels, proc.max_pixels) == (hf_images.size.shortest_edge, hf_images.size.longest_edge)
    assert (proc.patch_size, proc.merge_size, proc.temporal_patch_size) == (
        hf_images.patch_size, hf_images.merge_size, hf_images.temporal_patch_size
    )
    assert proc.image_mean == tuple(hf_images.image_mean) and proc.image_std == tuple(hf_images.image_std)
    assert proc.rescale_factor == hf_images.rescale_factor and proc.resample == int(hf_images.resample)
    assert ImageProcessor() == proc  # the defaults are Qwen3-VL's config
    with pytest.raises(ConfigError, match="do_resize"):
        ImageProcessor.from_dict({**IMAGE_CONFIG, "do_resize": False})
    with pytest.raises(ConfigError, match="longest_edge"):
        ImageProcessor.from_dict({**IMAGE_CONFIG, "size": {"shortest_edge": 10}})


def test_grid_thw_helper_matches_transformers_patch_count(ours, hf_images):
    for h, w in [(1, 1), (31, 33), (480, 640), (20, 3000), (5000, 3000)]:
        t, gh, gw = ours.grid_thw(h, w)
        assert t == 1 and gh * gw == hf_images.get_number_of_image_patches(h, w)


# ----------------------------------------------------------------------------------------------------
# smart_resize

SIZE_SETTINGS = [
    (32, 65536, 16777216),
    (28, 56 * 56, 28 * 28 * 1280),
    (32, 4096, 20480),
    (32, 1, 10**12),
    (14, 3136, 1003520),
]


@settings(max_examples=400, deadline=None, database=None)
@given(
    h=st.integers(1, 6000),
    w=st.integers(1, 6000),
    setting=st.sampled_from(SIZE_SETTINGS),
)
def test_smart_resize_matches_transformers(h, w, setting):
    factor, lo, hi = setting
    try:
        expected = hf_smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
    except ValueError:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(h, w, factor, lo, hi)
        return
    assert smart_resize(h, w, factor, lo, hi) == expected


def test_smart_resize_edge_pairs_match_transformers():
    pairs = [(1, 1), (1, 200), (200, 1), (16, 16), (48, 48), (80, 80), (15, 3000), (20, 4000), (4096, 4096),
             (4097, 4097), (10000, 60), (8192, 8192), (255, 257), (1080, 1920), (1920, 1080)]
    for factor, lo, hi in SIZE_SETTINGS:
        for h, w in pairs:
            assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor=factor, min_pixels=lo,
                                                                        max_pixels=hi), (h, w, factor)


@pytest.mark.parametrize("h, w", [(1, 201), (300, 1), (10, 2500)])
def test_aspect_ratio_over_200_is_an_error(h, w, ours):
    with pytest.raises(ValueError):
        hf_smart_resize(h, w, factor=32, min_pixels=65536, max_pixels=16777216)
    ratio = max(h, w) / min(h, w)
    with pytest.raises(ValueError, match=rf"aspect ratio {ratio:g}\b") as err:
        smart_resize(h, w)
    assert "\n" not in str(err.value) and "200" in str(err.value)
    with pytest.raises(ValueError, match="aspect ratio"):
        ours(_rgb(h, w, 70))


@settings(max_examples=300, deadline=None, database=None)
@given(
    t=st.integers(1, 900),
    h=st.integers(1, 3000),
    w=st.integers(1, 3000),
    setting=st.sampled_from([(32, 4096, 25165824), (32, 131072, 786432), (28, 3136, 600000)]),
)
def test_video_smart_resize_matches_transformers(t, h, w, setting):
    factor, lo, hi = setting
    try:
        expected = hf_smart_resize_video(t, h, w, temporal_factor=2, factor=factor, min_pixels=lo, max_pixels=hi)
    except ValueError:
        with pytest.raises(ValueError):
            smart_resize_video(t, h, w, 2, factor, lo, hi)
        return
    assert smart_resize_video(t, h, w, 2, factor, lo, hi) == expected


# ----------------------------------------------------------------------------------------------------
# video: frame choice and timestamps


@pytest.mark.parametrize("target_fps", [2, 1, 0.5, 4])
def test_frame_indices_match_transformers(target_fps):
    hf = Qwen3VLVideoProcessor(fps=target_fps)
    rng = np.random.default_rng(80)
    totals = [1, 2, 3, 4, 5, 7, 12, 24, 25, 48, 49, 100, 101, 1000, 9999, 50000] + list(rng.integers(1, 3000, 20))
    for total in totals:
        for source_fps in [None, 1, 12, 23.976, 24, 25, 29.97, 30, 60, 240]:
            meta = HFVideoMetadata(total_num_frames=int(total), fps=source_fps)
            expected = hf.sample_frames(meta)
            got = sample_frame_indices(int(total), source_fps, fps=target_fps)
            np.testing.assert_array_equal(got, expected, err_msg=f"total={total} fps={source_fps}")


def test_frame_indices_fixed_count_and_limits_match_transformers():
    hf = Qwen3VLVideoProcessor(min_frames=6, max_frames=11)
    proc = VideoProcessor(min_frames=6, max_frames=11)
    for total in [1, 5, 6, 11, 12, 40, 500, 5000]:
        for source_fps in [None, 2, 30]:
            expected = hf.sample_frames(HFVideoMetadata(total_num_frames=total, fps=source_fps))
            np.testing.assert_array_equal(proc.sample_frame_indices(total, source_fps), expected)
        for n in [1, 2, 7, 16]:
            expected = hf.sample_frames(HFVideoMetadata(total_num_frames=total, fps=30), num_frames=n)
            np.testing.assert_array_equal(sample_frame_indices(total, 30, fps=None, num_frames=n), expected)


def test_timestamps_match_the_processor_helper():
    rng = np.random.default_rng(81)
    cases = [[0], [0, 1], [0, 3, 6], [0, 12, 24, 36], list(range(9)), sorted(rng.integers(0, 5000, 31).tolist())]
    for indices in cases:
        for fps in [1, 23.976, 24, 30, 59.94]:
            for tp in [2, 3]:
                expected = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, tp)
                assert video_timestamps(np.asarray(indices), fps, tp) == expected
    # unknown fps: the processor assumes 24
    assert video_timestamps([0, 5, 10], None) == Qwen3VLProcessor._calculate_timestamps(None, [0, 5, 10], 24, 2)


# ----------------------------------------------------------------------------------------------------
# video: transformers' real pipeline with a stand-in for torchvision


def _torch_uint8_resize(x, size, interpolation, antialias=True):
    # what torchvision's resize runs for uint8 bicubic on CPU: torch's native uint8 antialiased kernel
    assert interpolation is InterpolationMode.BICUBIC and x.dtype == torch.uint8
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    out = torch.nn.functional.interpolate(
        x.reshape(-1, c, h, w), size=list(size), mode="bicubic", antialias=antialias, align_corners=False
    )
    return out.reshape(*lead, c, *size)


def _hf_video(videos, metadata=None, **kwargs):
    hf = Qwen3VLVideoProcessor(**HF_VIDEO_KWARGS)
    kwargs.setdefault("cap_pixels_per_frame", False)
    out = hf(videos, video_metadata=metadata, return_metadata=True, **kwargs)
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def _video(t, h, w, seed):
    return pixels((t, h, w, 3), seed)


VIDEO_CASES = {
    # name: (videos, source fps per video (None = unknown), our extra options, transformers' extra kwargs)
    "array_30fps": ([_video(37, 48, 80, 90)], [30.0], {}, {}),
    "array_unknown_fps": ([_video(60, 64, 40, 91)], [None], {}, {}),
    "three_frames_padded": ([_video(3, 70, 50, 92)], [2.0], {}, {}),
    "tiny_frames_upscaled": ([_video(9, 7, 20, 93)], [5.0], {}, {}),
    "long_budget_bound": ([_video(400, 96, 128, 94)], [10.0], {}, {}),
    "pil_frames": ([[Image.fromarray(f) for f in _video(13, 45, 77, 95)]], [6.0], {}, {}),
    "gray_frames": ([pixels((10, 40, 56, 1), 96)], [4.0], {}, {}),
    "no_sampling_odd": ([_video(5, 36, 52, 97)], [None], {"do_sample_frames": False}, {"do_sample_frames": False}),
    "fixed_count": ([_video(50, 40, 40, 98)], [25.0], {"fps": None, "num_frames": 7}, {"fps": None, "num_frames": 7}),
    # frames above max_video_tokens * 32 * 32 pixels: the per-frame token ceiling decides the size
    "cap_pixels": ([_video(8, 1000, 1000, 99)], [4.0], {"cap_pixels_per_frame": True},
                   {"cap_pixels_per_frame": True}),
    # 40000 // 20 frames is below 1.05 * shortest_edge: the per-frame floor decides the size
    "cap_pixels_floor": ([_video(40, 200, 204, 102)], [4.0],
                         {"cap_pixels_per_frame": True, "size": {"shortest_edge": 4096, "longest_edge": 40000}},
                         {"cap_pixels_per_frame": True, "size": {"shortest_edge": 4096, "longest_edge": 40000}}),
    "two_videos": ([_video(30, 50, 70, 100), _video(12, 90, 34, 101)], [15.0, 3.0], {}, {}),
}


def _run_both(name, monkeypatch, resize):
    videos, rates, ours_opts, hf_opts = VIDEO_CASES[name]
    install_torchvision_stand_in(monkeypatch, resize)
    # with no rate at all, let transformers build its own default metadata, as a caller without one would
    meta = None if all(r is None for r in rates) else [{"total_num_frames": len(v), "fps": r}
                                                        for v, r in zip(videos, rates)]
    ref = _hf_video([v if isinstance(v, np.ndarray) else list(v) for v in videos], meta, **hf_opts)
    proc = VideoProcessor.from_dict({**VIDEO_CONFIG, **ours_opts})
    out = proc(videos if len(videos) > 1 else videos[0], video_fps=rates if len(rates) > 1 else rates[0])
    return out, ref


@pytest.mark.parametrize("name", sorted(VIDEO_CASES))
def test_video_matches_transformers_pipeline(name, monkeypatch):
    out, ref = _run_both(name, monkeypatch, pil_resize)
    np.testing.assert_array_equal(out["video_grid_thw"], ref["video_grid_thw"])
    assert out["video_grid_thw"].dtype == np.int64
    assert out["pixel_values_videos"].dtype == np.float32
    assert out["pixel_values_videos"].shape == ref["pixel_values_videos"].shape
    assert np.abs(out["pixel_values_videos"] - ref["pixel_values_videos"]).max() <= 1e-5
    for ours_meta, hf_meta in zip(out["video_metadata"], ref["video_metadata"]):
        np.testing.assert_array_equal(ours_meta.frames_indices, hf_meta.frames_indices)
        assert ours_meta.total_num_frames == hf_meta.total_num_frames
        # the processor writes these timestamps into the prompt (fps 24 when unknown)
        hf_fps = 24 if hf_meta.fps is None else hf_meta.fps
        expected = Qwen3VLProcessor._calculate_timestamps(None, hf_meta.frames_indices, hf_fps, 2)
        assert ours_meta.timestamps() == expected


@pytest.mark.parametrize("name", ["array_30fps", "tiny_frames_upscaled", "two_videos"])
def test_video_pixels_close_to_torchvision_cpu_kernel(name, monkeypatch):
    # torch's uint8 bicubic differs from PIL's by up to 2 uint8 levels on <1% of pixels (measured);
    # one level is 1/127.5 after normalisation
    out, ref = _run_both(name, monkeypatch, _torch_uint8_resize)
    np.testing.assert_array_equal(out["video_grid_thw"], ref["video_grid_thw"])
    diff = np.abs(out["pixel_values_videos"] - ref["pixel_values_videos"])
    assert diff.max() <= 3 / 127.5 + 1e-6
    assert (diff > 1e-6).mean() < 0.02


def test_two_identical_frames_patchify_like_the_image():
    # In transformers this holds for the torchvision image processor (same resize, same fused
    # normalisation, same patch order as the video processor); both paths here resize with PIL.
    image = pixels((70, 110, 3), 110)
    images = ImageProcessor(min_pixels=4096, max_pixels=200000)
    videos = VideoProcessor(min_pixels=2 * 4096, max_pixels=2 * 200000, do_sample_frames=False)
    a = images(image)
    v = videos(np.stack([image, image]))
    np.testing.assert_array_equal(v["video_grid_thw"], a["image_grid_thw"])
    assert np.abs(v["pixel_values_videos"] - a["pixel_values"]).max() <= 1e-6
    # and the image path matches transformers, so the video path does too, up to the resize kernel
    assert a["image_grid_thw"].tolist() == [[1, 4, 6]]


def test_video_processor_from_dict_and_defaults():
    hf = Qwen3VLVideoProcessor()
    proc = VideoProcessor()
    assert (proc.min_pixels, proc.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge)
    assert (proc.fps, proc.min_frames, proc.max_frames, proc.num_frames) == (hf.fps, hf.min_frames, hf.max_frames,
                                                                            hf.num_frames)
    assert proc.do_sample_frames == hf.do_sample_frames and proc.max_video_tokens == hf.max_video_tokens
    cfg = VideoProcessor.from_dict(VIDEO_CONFIG)
    assert (cfg.min_pixels, cfg.max_pixels) == (4096, 25165824)


# ----------------------------------------------------------------------------------------------------
# errors: one line, naming the problem


def _one_line_error(fn, pattern):
    with pytest.raises(ValueError, match=pattern) as err:
        fn()
    assert "\n" not in str(err.value)


def test_bad_image_files(tmp_path, ours):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    _one_line_error(lambda: ours(str(garbage)), r"cannot read image file .*garbage\.png")
    buf = io.BytesIO()
    _rgb(200, 200, 120).save(buf, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _one_line_error(lambda: ours(truncated), r"cannot read image file .*truncated\.jpg.*truncated")
    _one_line_error(lambda: ours(tmp_path / "missing.png"), r"not found.*missing\.png")
    _one_line_error(lambda: load_image(str(tmp_path)), r"not found")  # a directory


def test_zero_size_images(ours):
    _one_line_error(lambda: ours(Image.new("RGB", (0, 5))), r"zero size")
    _one_line_error(lambda: ours(np.zeros((0, 5, 3), np.uint8)), r"zero size")
    _one_line_error(lambda: ours(np.zeros((5, 0), np.uint8)), r"zero size")
    _one_line_error(lambda: smart_resize(0, 10), r"zero size")


def test_unsupported_inputs(ours):
    _one_line_error(lambda: ours(42), r"unsupported image type int")
    _one_line_error(lambda: ours([_rgb(40, 40, 0), {"image": 1}]), r"unsupported image type dict")
    _one_line_error(lambda: ours(torch.zeros(3, 40, 40, dtype=torch.uint8)), r"unsupported image type torch\.Tensor")
    _one_line_error(lambda: ours(np.zeros((40, 40, 3), np.float32)), r"must be uint8.*float32")
    _one_line_error(lambda: ours(np.zeros((40, 40, 2), np.uint8)), r"C in \(1, 3, 4\).*\(40, 40, 2\)")
    _one_line_error(lambda: ours([]), r"no images")


def test_bad_videos():
    proc = VideoProcessor()
    _one_line_error(lambda: proc([]), r"video 0 has 0 frames")
    _one_line_error(lambda: proc(np.zeros((0, 40, 40, 3), np.uint8)), r"video 0 has 0 frames")
    _one_line_error(lambda: proc([np.zeros((4, 40, 40, 3), np.uint8), []]), r"video 1 has 0 frames")
    # a single frame cannot fill a temporal patch; transformers fails on it as well
    _one_line_error(lambda: proc(np.zeros((1, 40, 40, 3), np.uint8)), r"1 frame.*temporal_patch_size=2")
    _one_line_error(lambda: proc(np.zeros((40, 40, 3), np.uint8)), r"\[T, H, W, C\]")
    _one_line_error(lambda: proc("clip.mp4"), r"cannot decode video file")
    _one_line_error(lambda: proc(7), r"unsupported video type int")
    _one_line_error(lambda: proc([pixels((40, 40, 3), 1), pixels((40, 48, 3), 2)]), r"share one size")
    _one_line_error(lambda: proc(np.zeros((4, 40, 40, 3), np.uint8), video_fps=[1, 2]), r"1 videos but 2")
    _one_line_error(lambda: VideoProcessor(num_frames=8), r"mutually exclusive")
    _one_line_error(lambda: sample_frame_indices(10, 30, fps=2, num_frames=3), r"mutually exclusive")
