"""Bad input and failures: each case gives a clean error of the documented type with a one-line
message that names the problem, or (for odd but valid inputs) the same result as transformers.

Expected values come from transformers, from PIL, or from arithmetic written out here, never from
qvl_jax itself (except where two qvl_jax inputs that must mean the same image are compared).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoImageProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

import qvl_jax
from qvl_jax.checkpoint import MANIFEST_FILE
from qvl_jax.config import Qwen3VLConfig
from hf_reference import IMAGE_CONFIG, one_line_error
from qvl_jax.errors import CheckpointError, InputError
from qvl_jax.processing.image_processing import ImageProcessor
from qvl_jax.api import prepare_inputs
from qvl_jax.processing.processor import Processor

MAX_PIXELS = IMAGE_CONFIG["size"]["longest_edge"]


@pytest.fixture(scope="module")
def hf_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3vl_preprocessor")
    (d / "preprocessor_config.json").write_text(json.dumps(IMAGE_CONFIG))
    proc = AutoImageProcessor.from_pretrained(str(d))
    assert type(proc).__name__ == "Qwen2VLImageProcessorPil"
    return proc


@pytest.fixture(scope="module")
def ours():
    return ImageProcessor.from_dict(IMAGE_CONFIG)


def assert_same(out, ref):
    ref_pv = np.asarray(ref["pixel_values"])
    np.testing.assert_array_equal(out["image_grid_thw"], np.asarray(ref["image_grid_thw"]))
    assert out["pixel_values"].dtype == np.float32
    assert out["pixel_values"].shape == ref_pv.shape
    assert np.abs(out["pixel_values"] - ref_pv).max() <= 1e-5


# ----------------------------------------------------------------------------------------------------
# 1. property test: random sizes and PIL modes, against transformers


def _make_image(mode: str, h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode in ("RGB", "RGBA", "L", "LA", "CMYK"):
        if mode in ("RGBA", "LA"):
            base = rgb.convert(mode[:-1])
            alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
            base.putalpha(alpha)
            return base
        if mode == "CMYK":
            return Image.frombytes("CMYK", (w, h), rng.integers(0, 256, (h, w, 4), dtype=np.uint8).tobytes())
        return rgb.convert(mode)
    if mode in ("P", "P_transparent"):
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        if mode == "P_transparent":
            img.info["transparency"] = int(rng.integers(0, 32))
        return img
    if mode == "I;16":
        return Image.frombytes("I;16", (w, h), rng.integers(0, 65536, (h, w), dtype="<u2").tobytes())
    if mode == "I":
        return Image.fromarray(rng.integers(-300, 700, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray((rng.random((h, w)) * 600 - 200).astype(np.float32))
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    raise AssertionError(mode)


MODES = ["RGB", "RGBA", "L", "LA", "P", "P_transparent", "CMYK", "I;16", "I", "F", "1"]


@st.composite
def image_sizes(draw):
    if draw(st.booleans()):  # ordinary sizes, 1 pixel included
        return draw(st.integers(1, 300)), draw(st.integers(1, 300))
    # extreme aspect ratios around the 200:1 limit
    short = draw(st.integers(1, 5))
    long = draw(st.integers(short * 195, short * 205 + 1))
    return (short, long) if draw(st.booleans()) else (long, short)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(size=image_sizes(), seed=st.integers(0, 2**16))
def test_random_images_match_transformers_or_both_refuse(mode, size, seed, ours, hf_images):
    h, w = size
    img = _make_image(mode, h, w, seed)
    assert img.size == (w, h)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = hf_images(img.copy())
    except ValueError as e:
        # transformers refuses (the aspect ratio): we must refuse too, with an InputError naming it
        assert "aspect ratio" in str(e)
        one_line_error(InputError, lambda: ours(img), r"aspect ratio .* exceeds the 200:1 limit")
        assert max(h, w) / min(h, w) > 200
        return
    assert max(h, w) / min(h, w) <= 200
    assert_same(ours(img), ref)


# ----------------------------------------------------------------------------------------------------
# 2. image files


def test_large_image_file_is_resized_within_max_pixels(ours, tmp_path):
    path = tmp_path / "large.png"
    colour = (200, 30, 90)
    Image.new("RGB", (5000, 4000), colour).save(path)  # 20M pixels > max_pixels = 4096 * 4096
    out = ours(path)
    t, gh, gw = out["image_grid_thw"][0].tolist()
    assert (t, gh * 16, gw * 16) == (1, *hf_smart_resize(4000, 5000, 32, 65536, MAX_PIXELS))
    assert gh * gw * 16 * 16 <= MAX_PIXELS
    # a solid colour stays that colour: (c / 255 - 0.5) / 0.5 in every patch, channel by channel
    per_channel = out["pixel_values"].reshape(-1, 3, 2 * 16 * 16)
    expected = ((np.asarray(colour, np.float64) / 255 - 0.5) / 0.5).astype(np.float32)
    assert np.abs(per_channel - expected[None, :, None]).max() <= 1e-6


def test_decompression_bomb_guard(ours, hf_images, tmp_path, monkeypatch):
    # PIL's guard, scaled down: warning above MAX_IMAGE_PIXELS, error above twice that
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    rng = np.random.default_rng(3)
    warn_path, bomb_path = tmp_path / "big.png", tmp_path / "bomb.png"
    Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)).save(warn_path)  # 15000 px
    Image.fromarray(rng.integers(0, 256, (100, 300, 3), dtype=np.uint8)).save(bomb_path)  # 30000 px
    # the warning range: decoded (PIL warns), same result as transformers
    with pytest.warns(Image.DecompressionBombWarning):
        out = ours(warn_path)
    with pytest.warns(Image.DecompressionBombWarning):
        ref = hf_images(str(warn_path))
    assert_same(out, ref)
    # above the limit: transformers fails on it too; we give an InputError naming the file
    with pytest.raises(Image.DecompressionBombError):
        hf_images(str(bomb_path))
    one_line_error(InputError, lambda: ours(bomb_path), r"cannot read image file .*bomb\.png.*decompression bomb")


def _gif_frame(seed, h=40, w=56):
    # few colours, so the GIF palette keeps every frame exact
    idx = np.random.default_rng(seed).integers(0, 4, (h, w))
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255], [255, 255, 255]], np.uint8)
    return colours[idx]


def test_animated_gif_uses_its_first_frame(ours, hf_images, tmp_path):
    frames = [_gif_frame(s) for s in (10, 11, 12)]
    gif = tmp_path / "anim.gif"
    Image.fromarray(frames[0]).save(gif, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]],
                                    duration=100, loop=0)
    with Image.open(gif) as im:
        assert im.n_frames == 3
    out = ours(gif)
    assert_same(out, hf_images(str(gif)))
    still = tmp_path / "first.png"
    Image.fromarray(frames[0]).save(still)
    assert_same(out, hf_images(str(still)))
    # and not the second frame (so the check above can fail)
    second = ours(frames[1])
    assert np.abs(second["pixel_values"] - out["pixel_values"]).max() > 0.1


@pytest.mark.parametrize("fmt, cut", [("PNG", 0.5), ("PNG", 20), ("JPEG", 20)], ids=["png_half", "png_header", "jpeg_header"])
def test_truncated_image_file(fmt, cut, ours, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (120, 90, 3), dtype=np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * cut)] if cut < 1 else data[:cut])
    one_line_error(InputError, lambda: ours(path), rf"cannot read image file .*cut\.{fmt.lower()}")


def test_directory_and_non_image_files(ours, tmp_path):
    d = tmp_path / "photos.png"
    d.mkdir()
    one_line_error(InputError, lambda: ours(d), r"photos\.png.* is a directory")
    text = tmp_path / "notes.png"
    text.write_text("hello, this is text\n")
    one_line_error(InputError, lambda: ours(str(text)), r"cannot read image file .*notes\.png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    one_line_error(InputError, lambda: ours(empty), r"cannot read image file .*empty\.jpg")


# ----------------------------------------------------------------------------------------------------
# 3. prompts


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from qvl_jax.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf")


def test_empty_prompt_processor(tiny_dir):
    proc = Processor.from_pretrained(tiny_dir)
    one_line_error(InputError, lambda: proc(text=""), r"text 0 is empty")
    one_line_error(InputError, lambda: proc(text=["describe", ""]), r"text 1 is empty")
    # a non-empty prompt still works, and the chat template always adds tokens to an empty message
    assert proc(text="x")["input_ids"].shape[1] >= 1
    chat = proc.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)
    assert chat["input_ids"].shape[1] > 0


def test_empty_input_ids_prepare_inputs(tiny_dir):
    cfg = Qwen3VLConfig.from_json_file(tiny_dir / "config.json")
    for empty in ([], [[]], np.zeros((1, 0), np.int64), np.zeros((2, 0), np.int32)):
        one_line_error(InputError, lambda: prepare_inputs(cfg, empty), r"input_ids is empty")
    # the check is about emptiness, not the dtype of an empty list
    prepare_inputs(cfg, [[1, 2, 3]])


def _cli(args, cache, timeout=240):
    env = dict(os.environ, QVL_JAX_CACHE=str(cache), QVL_JAX_COMPILATION_CACHE="0", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "qvl_jax", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_cli_bad_image_files_exit_2_with_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    folder = tmp_path / "somedir"
    folder.mkdir()
    for path, pattern in ((corrupt, "cannot read image file"), (folder, "is a directory")):
        r = _cli(["generate", "--image", str(path), "--prompt", "x", "--max-new-tokens", "2"], tmp_path / "cache")
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, r.stderr
        assert pattern in errors[0] and path.name in errors[0], errors[0]
        assert r.stdout == ""


# ----------------------------------------------------------------------------------------------------
# 4. converted checkpoint integrity


@pytest.fixture
def converted_copy(tiny_dir, tmp_path):
    from qvl_jax.convert import convert_checkpoint

    return convert_checkpoint(tiny_dir, tmp_path / "conv", dtype="float32")


def test_changed_params_byte_caught_by_verify(converted_copy):
    out = converted_copy
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    params = out / manifest["params_file"]
    qvl_jax.load(out, verify=True)  # intact: passes
    data = bytearray(params.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    pos = header + (len(data) - header) // 2  # inside the tensor data, not the header
    data[pos] ^= 0x40
    params.write_bytes(bytes(data))
    assert params.stat().st_size == manifest["params_bytes"]
    one_line_error(CheckpointError, lambda: qvl_jax.load(out, verify=True), r"sha256 differs.*changed; convert it again")
    # By default too: the write made the verification stamp stale, so the load verifies again.
    one_line_error(CheckpointError, lambda: qvl_jax.load(out), r"sha256 differs.*changed; convert it again")
    qvl_jax.load(out, verify=False)  # without verification only the size is checked: the flipped byte loads


def test_verify_needs_a_recorded_hash(converted_copy):
    out = converted_copy
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    del manifest["params_sha256"]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    one_line_error(CheckpointError, lambda: qvl_jax.load(out, verify=True), r"no params_sha256")


def test_broken_manifest_and_missing_params(converted_copy):
    out = converted_copy
    manifest_text = (out / MANIFEST_FILE).read_text()
    params_file = json.loads(manifest_text)["params_file"]

    (out / MANIFEST_FILE).write_text("{not json")
    one_line_error(CheckpointError, lambda: qvl_jax.load(out), rf"{MANIFEST_FILE}: not valid JSON")
    (out / MANIFEST_FILE).write_text("[1, 2]")
    one_line_error(CheckpointError, lambda: qvl_jax.load(out), r"not a qvl_jax params manifest")

    (out / MANIFEST_FILE).unlink()
    one_line_error(CheckpointError, lambda: qvl_jax.load(out), rf"no {MANIFEST_FILE} manifest.*convert it again")

    (out / MANIFEST_FILE).write_text(manifest_text)
    (out / params_file).unlink()
    one_line_error(CheckpointError, lambda: qvl_jax.load(out), rf"{params_file} is missing")


def test_params_larger_than_free_memory_refused_before_loading(converted_copy, monkeypatch):
    import jax

    from qvl_jax import ResourceError
    from qvl_jax import errors as errors_mod
    from qvl_jax.sharding import make_mesh

    out = converted_copy
    need = sum(a.nbytes for a in jax.tree.leaves(qvl_jax.load(out).params))
    monkeypatch.setattr(errors_mod, "device_free_bytes", lambda: need - 1)
    one_line_error(ResourceError, lambda: qvl_jax.load(out), r"params need 0\.\d\d GiB on the device but .* free")
    qvl_jax.load(out, dtype="bfloat16")  # half the bytes fit
    qvl_jax.load(out, mesh=make_mesh(dp=1, tp=8))  # so does one device's block of each param
    monkeypatch.setattr(errors_mod, "device_free_bytes", lambda: need)
    qvl_jax.load(out)


def _xla_error(status: str):
    """A real JaxRuntimeError of the given status, as XLA raises it."""
    import jax
    import jax.numpy as jnp

    if status == "RESOURCE_EXHAUSTED":
        try:
            jnp.zeros((2 ** 62,), jnp.int8).block_until_ready()
        except jax.errors.JaxRuntimeError as e:
            return e
        raise AssertionError("a 4 EiB allocation succeeded")
    return jax.errors.JaxRuntimeError(f"{status}: something else went wrong")


@pytest.mark.parametrize("entry", ["logits", "generate", "stream", "chat"])
def test_device_out_of_memory_is_one_line_resource_error(entry, jax_model, monkeypatch):
    """XLA running out of device memory mid-request (activations, not the checked KV cache) ends as a
    ResourceError naming the problem; any other runtime error is not relabelled."""
    from qvl_jax.engine import generate as gen_mod
    from qvl_jax import api as model_mod
    from qvl_jax.errors import ResourceError

    m = jax_model("tied")
    ids = np.arange(1, 9)[None]
    calls = {"logits": lambda: m.logits(ids),
             "generate": lambda: m.generate(input_ids=ids, max_new_tokens=3),
             "stream": lambda: list(m.stream(input_ids=ids, max_new_tokens=3)),
             "chat": lambda: m.chat_session().generate(input_ids=ids, max_new_tokens=3)}
    for status, expect in (("RESOURCE_EXHAUSTED", ResourceError), ("INTERNAL", type(_xla_error("INTERNAL")))):
        err = _xla_error(status)

        def boom(*a, **k):
            raise err
        monkeypatch.setattr(model_mod, "forward_logits", boom)
        monkeypatch.setattr(gen_mod.Generator, "start", boom)
        if expect is ResourceError:
            one_line_error(ResourceError, calls[entry],
                           rf"^{'chat generate' if entry == 'chat' else entry} ran out of device memory "
                           r"\(Out of memory allocating \d+ bytes\.\): use fewer or smaller images or videos, "
                           r"a shorter prompt or a smaller batch$")
        else:
            with pytest.raises(expect) as info:
                calls[entry]()
            assert info.value is err
        monkeypatch.undo()
