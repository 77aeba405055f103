"""The user's path end to end: the built-in tiny checkpoint, our processor feeding generation, the
CLI, and the benchmark's smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qvl_jax
from parity import LOGITS_RTOL, rel_err
from qvl_jax.processing.processor import Processor
from qvl_jax.tiny import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "house.png"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-random")


@pytest.fixture(scope="module")
def messages():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 140, 3), dtype=np.uint8))
    return [{"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": "What is in this picture?"}]}]


def _hf_processor(model_dir: Path):
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.processing_utils import ProcessorMixin

    video_cfg = json.loads((model_dir / "video_preprocessor_config.json").read_text())
    video_kwargs = {k: v for k, v in video_cfg.items() if not k.endswith(("_class", "_type"))}
    with pytest.MonkeyPatch.context() as mp:
        # transformers checks the video processor class by a name that needs torchvision to resolve
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
        return Qwen3VLProcessor(image_processor=AutoImageProcessor.from_pretrained(str(model_dir)),
                                tokenizer=AutoTokenizer.from_pretrained(str(model_dir)),
                                video_processor=Qwen3VLVideoProcessor(**video_kwargs),
                                chat_template=(model_dir / "chat_template.jinja").read_text())


def test_tiny_checkpoint_is_a_real_hf_checkpoint(tiny_dir, messages):
    """transformers loads it with no missing or unexpected keys, and our logits equal its logits on
    a prompt built by our processor."""
    from transformers import Qwen3VLForConditionalGeneration

    hf, info = Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf = hf.eval().to(torch.float32)
    proc = Processor.from_pretrained(tiny_dir)
    inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    model = qvl_jax.load(tiny_dir)
    ours = model.logits(**inputs)
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).logits.numpy()
    assert rel_err(ours, ref) <= LOGITS_RTOL


def test_our_processor_drives_generate_like_transformers_processor(tiny_dir, messages):
    ours = Processor.from_pretrained(tiny_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    hf_proc = _hf_processor(tiny_dir)
    text = hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    theirs = dict(hf_proc(text=[text], images=[messages[0]["content"][0]["image"]], return_tensors="np"))
    model = qvl_jax.load(tiny_dir)
    a = model.generate(**ours, max_new_tokens=12, stop_token_ids=[])
    b = model.generate(**{k: v for k, v in theirs.items() if k != "token_type_ids"}, max_new_tokens=12,
                       stop_token_ids=[])
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_generation_stops_at_im_end_by_default(tiny_dir):
    model = qvl_jax.load(tiny_dir)
    assert model.generation_defaults["eos_token_id"] == Processor.from_pretrained(tiny_dir).eos_token_ids


def _cli(*args, cache: Path, timeout=240):
    env = dict(os.environ, QVL_JAX_CACHE=str(cache), QVL_JAX_COMPILATION_CACHE="0")
    return subprocess.run([sys.executable, "-m", "qvl_jax", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def test_cli_generate_with_builtin_model(tmp_path):
    run = _cli("generate", "--image", str(EXAMPLE), "--prompt", "What is in this picture?",
               "--max-new-tokens", "8", cache=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "tiny-random" in run.stderr  # says loudly which model answered
    assert run.stdout.strip()
    js = _cli("generate", "--model", "tiny-random", "--image", str(EXAMPLE), "--prompt", "Hi",
              "--max-new-tokens", "6", "--json", "--temperature", "0.7", "--seed", "1", cache=tmp_path)
    assert js.returncode == 0, js.stderr
    out = json.loads(js.stdout)
    assert 1 <= out["new_tokens"] <= 6 and isinstance(out["text"], str) and out["prompt_tokens"] > 20
    # a conversion cached by an older qvl_jax (another params format) is converted again, not an error
    from qvl_jax.checkpoint import FORMAT_VERSION, MANIFEST_FILE

    (manifest,) = tmp_path.glob(f"converted/tiny-random-*/{MANIFEST_FILE}")
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), format_version=FORMAT_VERSION - 1)))
    info = _cli("info", "--json", cache=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "the cached one is unusable" in info.stderr and "params format version" in info.stderr
    assert json.loads(manifest.read_text())["format_version"] == FORMAT_VERSION


def test_cli_errors_are_one_line(tmp_path):
    for args, message in [(("generate", "--model", str(tmp_path / "nope"), "--prompt", "x"), "no model directory"),
                          (("generate", "--image", str(tmp_path / "missing.png"), "--prompt", "x"), "missing.png"),
                          (("generate", "--prompt", "x", "--temperature", "-1"), "temperature must be >= 0")]:
        run = _cli(*args, cache=tmp_path)
        assert run.returncode == 2, (args, run.stderr)
        err = [line for line in run.stderr.strip().splitlines() if not line.startswith(("***", "building",
                                                                                      "converting"))]
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], run.stderr


def test_cli_info(tmp_path):
    run = _cli("info", "--json", cache=tmp_path)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["parameters"] > 0 and info["text"]["layers"] == 4


def test_bench_quick_emits_json(tmp_path):
    env = dict(os.environ, QVL_JAX_CACHE=str(tmp_path))
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.strip().splitlines()]
    assert {line["case"] for line in lines} == {"decode1", "decode8", "image"}
    for line in lines:
        for key in ("device", "dtype", "batch", "prompt_tokens", "prefill_ms", "ttft_ms", "decode_tok_s",
                    "compile_s", "peak_memory_bytes", "bandwidth_floor_fraction", "hf_decode_tok_s",
                    "decode_speedup_vs_hf", "compilation_cache"):
            assert key in line, key
        assert line["decode_tok_s"] > 0
        assert line["compilation_cache"] == "cold"  # a fresh cache directory


def test_cli_mesh(tmp_path):
    """--tp / --dp shard the model (the test session has 8 fake CPU devices, inherited via XLA_FLAGS)."""
    run = _cli("generate", "--prompt", "Hi", "--max-new-tokens", "4", "--dp", "2", "--tp", "4", "--json",
               cache=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["new_tokens"] >= 1
    bad = _cli("generate", "--prompt", "Hi", "--dp", "3", "--tp", "3", cache=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: dp * tp = 3 * 3 = 9")


def test_cli_video_file_and_frame_directory(tmp_path):
    """A video file (decoded with PyAV, the `video` extra) and a directory of frames both reach the
    model: the same frames give the same answer either way."""
    import av

    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(6)]
    frame_dir = tmp_path / "frames"
    frame_dir.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(frame_dir / f"{i:03d}.png")
    video = tmp_path / "clip.mkv"
    with av.open(str(video), "w") as out:
        stream = out.add_stream("ffv1", rate=2)  # lossless: decoded frames equal the PNG frames
        stream.width, stream.height, stream.pix_fmt = 96, 64, "bgr0"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="bgr0")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    answers = []
    for src, extra in ((video, ()), (frame_dir, ("--video-fps", "2"))):
        run = _cli("generate", "--video", str(src), *extra, "--prompt", "What happens?", "--max-new-tokens", "6",
                   "--json", cache=tmp_path)
        assert run.returncode == 0, run.stderr
        answers.append(json.loads(run.stdout))
    assert answers[0]["tokens"] == answers[1]["tokens"]
    assert answers[0]["prompt_tokens"] == answers[1]["prompt_tokens"] > 30
    # the frame rate reaches the processor: at 24 fps the 6 frames last 0.25 s and sample differently
    fast = _cli("generate", "--video", str(frame_dir), "--video-fps", "24", "--prompt", "What happens?",
                "--max-new-tokens", "2", "--json", cache=tmp_path)
    assert fast.returncode == 0, fast.stderr
    assert json.loads(fast.stdout)["prompt_tokens"] != answers[1]["prompt_tokens"]


def test_cli_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = _cli("generate", "--model", "Qwen/Qwen3-VL-2B-Instruct", "--prompt", "x", cache=tmp_path)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot download Qwen/Qwen3-VL-2B-Instruct: "), run.stderr
    assert not (tmp_path / "converted").exists()
