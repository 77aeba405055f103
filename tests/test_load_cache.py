"""`qvl_jax.load(HF_DIR)` goes through the CLI's convert-once cache (qvl_jax.hub): the first load
converts into $QVL_JAX_CACHE, later ones memory-map that conversion, and no load converts the whole
model into host memory. scripts/measure_load_rss.py measures the peak RSS at 2B widths."""

from __future__ import annotations

import os
import shutil

import numpy as np

import qvl_jax
import qvl_jax.convert
from qvl_jax.convert.core import MANIFEST_FILE


def _count_conversions(monkeypatch) -> list:
    calls = []
    real = qvl_jax.convert.convert_checkpoint
    monkeypatch.setattr(qvl_jax.convert, "convert_checkpoint", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def _no_in_memory_conversion(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("the whole checkpoint was converted in host memory")

    monkeypatch.setattr(qvl_jax.convert.core, "load_hf_params", refuse)


def test_hf_dir_converts_once_then_reuses_the_cache(hf_checkpoint, jax_model, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QVL_JAX_CACHE", str(cache))
    calls = _count_conversions(monkeypatch)
    _no_in_memory_conversion(monkeypatch)
    _, hf_dir = hf_checkpoint("untied")
    first = qvl_jax.load(hf_dir)
    converted = [p for p in (cache / "converted").iterdir()]
    assert len(calls) == 1 and [os.fspath(p) for p in converted] == [first.path]
    mtime = (converted[0] / MANIFEST_FILE).stat().st_mtime_ns
    again = qvl_jax.load(hf_dir)
    assert len(calls) == 1 and again.path == first.path
    assert (converted[0] / MANIFEST_FILE).stat().st_mtime_ns == mtime
    ids = np.random.RandomState(4).randint(0, 290, size=(1, 9))
    want = jax_model("untied").logits(ids)  # the session's float32 conversion, through the converter
    np.testing.assert_array_equal(first.logits(ids), want)
    np.testing.assert_array_equal(again.logits(ids), want)
    half = qvl_jax.load(hf_dir, dtype="bfloat16")  # cast on load: the same conversion serves every dtype
    assert len(calls) == 1 and half.path == first.path
    assert str(half.params["model"]["language_model"]["norm"]["weight"][...].dtype) == "bfloat16"
    assert half.generation_defaults == first.generation_defaults


def test_edited_hf_dir_converts_again_and_drops_the_old_conversion(hf_checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QVL_JAX_CACHE", str(cache))
    calls = _count_conversions(monkeypatch)
    _, src = hf_checkpoint("tied")
    hf_dir = shutil.copytree(src, tmp_path / "hf")
    old = qvl_jax.load(hf_dir).path
    cfg = hf_dir / "generation_config.json"
    cfg.write_text(cfg.read_text().replace("\n", "\n "))  # same meaning, other size: a changed file
    new = qvl_jax.load(hf_dir).path
    assert len(calls) == 2 and new != old
    assert [os.fspath(p) for p in (cache / "converted").iterdir()] == [new]


def test_converted_dir_loads_in_place(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_JAX_CACHE", str(tmp_path / "cache"))
    calls = _count_conversions(monkeypatch)
    path = converted("tied")
    assert qvl_jax.load(path).path == os.fspath(path)
    assert calls == [] and not (tmp_path / "cache").exists()
