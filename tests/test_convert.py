"""The converter: sharded and single checkpoints, both config dialects, and every rejection it owes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qvl_jax
from qvl_jax.convert import MANIFEST_FILE, PARAMS_FILE, convert_checkpoint
from hf_models import build_tiny
from parity import LOGITS_RTOL, rel_err
from qvl_jax import CheckpointError


def _copy_hf(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_single(hf_dir, mutate):
    """Load the single-file checkpoint, let `mutate` change the tensor dict, write it back."""
    path = hf_dir / "model.safetensors"
    tensors = load_file(str(path))
    mutate(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _assert_fails_cleanly(hf_dir, out, match):
    with pytest.raises(CheckpointError, match=match) as e:
        convert_checkpoint(hf_dir, out)
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temp dir left behind"


def _logits(model_dir, ids):
    return qvl_jax.load(model_dir).logits(ids)


def test_sharded_checkpoint_converts_and_matches(tmp_path):
    hf = build_tiny("untied", seed=3)
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 3
    out = convert_checkpoint(tmp_path / "hf", tmp_path / "out", dtype="float32")
    ids = np.random.RandomState(0).randint(0, 290, size=(1, 13))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert rel_err(_logits(out, ids), ref) <= LOGITS_RTOL


def test_tied_lm_head_not_stored(converted, hf_checkpoint):
    out = converted("tied")
    with safe_open(str(out / PARAMS_FILE), "numpy") as f:
        keys = set(f.keys())
        assert not any(k.startswith("lm_head") for k in keys)
        hf, _ = hf_checkpoint("tied")
        # Hugging Face's keys and shapes, the tied head excepted
        want = {k: list(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        assert {k: f.get_slice(k).get_shape() for k in keys} == want
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    n_hf = sum(p.numel() for p in hf.parameters())  # parameters() counts the tied matrix once
    assert manifest["num_params"] == n_hf
    assert manifest["tie_word_embeddings"] is True and manifest["dtype"] == "float32"


def test_untied_lm_head_stored(converted):
    with safe_open(str(converted("untied") / PARAMS_FILE), "numpy") as f:
        assert f.get_slice("lm_head.weight").get_shape() == [352, 96]


def test_bfloat16_conversion(hf_checkpoint, tmp_path):
    _, hf_dir = hf_checkpoint("tied")
    out = convert_checkpoint(hf_dir, tmp_path / "bf16", dtype="bfloat16")
    m = qvl_jax.load(out)
    assert str(m.params["model"]["language_model"]["norm"]["weight"][...].dtype) == "bfloat16"
    assert json.loads((out / MANIFEST_FILE).read_text())["dtype"] == "bfloat16"


def test_released_config_dialect_converts_identically(hf_checkpoint, converted, tmp_path):
    _, hf_dir = hf_checkpoint("tied")
    legacy = _copy_hf(hf_dir, tmp_path / "legacy")
    cfg = json.loads((legacy / "config.json").read_text())
    t = cfg["text_config"]
    rp = t.pop("rope_parameters")
    t["rope_theta"] = rp.pop("rope_theta")
    t["rope_scaling"] = rp
    cfg["vision_config"].pop("rope_parameters")
    (legacy / "config.json").write_text(json.dumps(cfg))
    out = convert_checkpoint(legacy, tmp_path / "out", dtype="float32")
    ids = np.arange(40, 60)[None]
    np.testing.assert_array_equal(_logits(out, ids), _logits(converted("tied"), ids))


def test_legacy_key_prefixes_accepted(hf_checkpoint, converted, tmp_path):
    """`visual.*` / `model.layers.*` (older export naming) map to the same params."""
    _, hf_dir = hf_checkpoint("tied")
    legacy = _copy_hf(hf_dir, tmp_path / "legacy")

    def rename(t):
        for k in list(t):
            new = k.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
            t[new] = t.pop(k)
    _rewrite_single(legacy, rename)
    out = convert_checkpoint(legacy, tmp_path / "out", dtype="float32")
    ids = np.arange(5, 25)[None]
    np.testing.assert_array_equal(_logits(out, ids), _logits(converted("tied"), ids))


def test_tied_checkpoint_with_equal_lm_head_accepted(hf_checkpoint, tmp_path):
    _, hf_dir = hf_checkpoint("tied")
    d = _copy_hf(hf_dir, tmp_path / "hf")
    _rewrite_single(d, lambda t: t.__setitem__("lm_head.weight", t["model.language_model.embed_tokens.weight"].clone()))
    out = convert_checkpoint(d, tmp_path / "out")
    with safe_open(str(out / PARAMS_FILE), "numpy") as f:
        assert "lm_head/weight" not in f.keys()


def test_tied_checkpoint_with_different_lm_head_rejected(hf_checkpoint, tmp_path):
    _, hf_dir = hf_checkpoint("tied")
    d = _copy_hf(hf_dir, tmp_path / "hf")
    _rewrite_single(d, lambda t: t.__setitem__("lm_head.weight", torch.randn(320, 64)))
    _assert_fails_cleanly(d, tmp_path / "out", "differs from")


@pytest.mark.parametrize("mutate, match", [
    (lambda t: t.__setitem__("model.visual.extra_adapter.weight", torch.zeros(3)), "unexpected tensor.*extra_adapter"),
    (lambda t: t.pop("model.language_model.layers.1.self_attn.k_norm.weight"), "missing 1 tensor.*layers.1.self_attn.k_norm"),
    (lambda t: t.__setitem__("model.language_model.layers.0.mlp.up_proj.weight", torch.zeros(128, 65)),
     r"layers.0.mlp.up_proj.weight' has shape \[128, 65\]; the config implies \[128, 64\]"),
    (lambda t: t.__setitem__("model.language_model.norm.weight", torch.zeros(64, dtype=torch.int32)), "dtype I32"),
    (lambda t: t.__setitem__("model.language_model.layers.7.input_layernorm.weight", torch.zeros(64)),
     "unexpected tensor.*layers.7"),
])
def test_bad_tensors_rejected(mutate, match, hf_checkpoint, tmp_path):
    _, hf_dir = hf_checkpoint("tied")
    d = _copy_hf(hf_dir, tmp_path / "hf")
    _rewrite_single(d, mutate)
    _assert_fails_cleanly(d, tmp_path / "out", match)


def test_truncated_file_rejected(hf_checkpoint, tmp_path):
    _, hf_dir = hf_checkpoint("tied")
    d = _copy_hf(hf_dir, tmp_path / "hf")
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _assert_fails_cleanly(d, tmp_path / "out", "model.safetensors: not a valid safetensors file")


def test_corrupt_header_rejected(hf_checkpoint, tmp_path):
    _, hf_dir = hf_checkpoint("tied")
    d = _copy_hf(hf_dir, tmp_path / "hf")
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32
    path.write_bytes(bytes(data))
    _assert_fails_cleanly(d, tmp_path / "out", "not a valid safetensors file")


def test_duplicate_key_across_shards_rejected(tmp_path):
    hf = build_tiny("tied")
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    first = load_file(str(shards[0]))
    second = load_file(str(shards[1]))
    key = next(iter(first))
    second[key] = first[key]
    save_file(second, str(shards[1]), metadata={"format": "pt"})
    _assert_fails_cleanly(tmp_path / "hf", tmp_path / "out", "duplicate tensor")


def test_missing_shard_rejected(tmp_path):
    hf = build_tiny("tied")
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
    sorted((tmp_path / "hf").glob("model-*.safetensors"))[1].unlink()
    _assert_fails_cleanly(tmp_path / "hf", tmp_path / "out", "shard.*missing")


def test_no_checkpoint_files(tmp_path, hf_checkpoint):
    _, hf_dir = hf_checkpoint("tied")
    (tmp_path / "hf").mkdir()
    shutil.copy(hf_dir / "config.json", tmp_path / "hf")
    _assert_fails_cleanly(tmp_path / "hf", tmp_path / "out", "no model.safetensors")


def test_existing_output_needs_force(hf_checkpoint, tmp_path):
    _, hf_dir = hf_checkpoint("tied")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(hf_dir, out)
    with pytest.raises(CheckpointError, match="refusing to replace"):  # --force replaces only a conversion
        convert_checkpoint(hf_dir, out, force=True)
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    convert_checkpoint(hf_dir, out, force=True)  # an empty directory
    convert_checkpoint(hf_dir, out, force=True)  # an earlier conversion
    assert (out / MANIFEST_FILE).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_converted_dir_changed_after_conversion(converted, tmp_path):
    out = _copy_hf(converted("tied"), tmp_path / "copy")
    with open(out / PARAMS_FILE, "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(CheckpointError, match="was changed or truncated"):
        qvl_jax.load(out)


def test_converted_dir_from_other_format_version(converted, tmp_path):
    out = _copy_hf(converted("tied"), tmp_path / "copy")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["format_version"] = 999
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 999"):
        qvl_jax.load(out)


def test_load_nonexistent(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        qvl_jax.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither a converted"):
        qvl_jax.load(tmp_path)


def test_conversion_streams_tensors(tmp_path):
    """Peak host memory while converting stays well below the checkpoint size (tensor-at-a-time)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=2048, hidden_size=128, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[6, 5, 5])),
        vision_config=dict(depth=8, hidden_size=128, intermediate_size=512, num_heads=2, out_hidden_size=128,
                           patch_size=4, num_position_embeddings=64, deepstack_visual_indexes=[2]),
        tie_word_embeddings=False, image_token_id=2000, video_token_id=2001,
        vision_start_token_id=2002, vision_end_token_id=2003)
    Qwen3VLForConditionalGeneration(cfg).save_pretrained(str(tmp_path / "hf"))
    size = (tmp_path / "hf" / "model.safetensors").stat().st_size
    tracemalloc.start()
    try:
        convert_checkpoint(tmp_path / "hf", tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 10 * 2**20
    assert peak < 0.4 * size, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB checkpoint"


def test_cli_convert(hf_checkpoint, tmp_path):
    _, hf_dir = hf_checkpoint("tied")
    run = subprocess.run([sys.executable, "-m", "qvl_jax.convert", str(hf_dir), str(tmp_path / "out"), "--dtype", "float32"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "converted" in run.stdout and (tmp_path / "out" / MANIFEST_FILE).is_file()
    again = subprocess.run([sys.executable, "-m", "qvl_jax.convert", str(hf_dir), str(tmp_path / "out")],
                           capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.strip().startswith("error: ") and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_load_holds_one_copy_of_the_weights(converted):
    """Loading fills the abstract model's state in place: no second copy of the weights stays alive
    beside the state the caller holds."""
    import jax

    from qvl_jax.checkpoint import load_state

    def live() -> int:
        return sum(a.nbytes for a in jax.live_arrays())

    before = live()
    cfg, graphdef, params = load_state(converted("untied"))
    held = sum(a.nbytes for a in jax.tree.leaves(params))
    model = qvl_jax.Model(cfg, graphdef, params)
    assert model.module.model.language_model.layers[0].self_attn.q_proj.weight[...] is not None
    assert live() - before <= held * 1.01, f"{(live() - before) / held:.2f}x the loaded params are alive"
