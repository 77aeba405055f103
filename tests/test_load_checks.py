"""A converted directory is checked against its own config on every load (names, shapes, dtypes
from the header: cheap), and every file against the manifest's hashes (verify=True, or by default
on the first load after a change; tests/test_verify_stamp.py): an edited config.json or header is a
one-line CheckpointError, never a model that loads and answers wrongly. The header checks below
load with verify=False, so that they are what catches the edit."""

from __future__ import annotations

import json
import shutil

import pytest

import qvl_jax
from qvl_jax import CheckpointError
from qvl_jax.checkpoint import STAMP_FILE
from qvl_jax.convert.core import MANIFEST_FILE, PARAMS_FILE


def _copy(converted, name, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(converted(name), out)
    return out


def _edit_config(out, edit):
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))


def _one_line(match, fn):
    with pytest.raises(CheckpointError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_config_with_fewer_layers_refused(converted, tmp_path):
    out = _copy(converted, "tied", tmp_path)
    qvl_jax.load(out)  # sound before the edit
    _edit_config(out, lambda c: c["text_config"].update(num_hidden_layers=2))
    _one_line(r"does not match its config\.json: params unexpected \d+ \(model\.language_model\.layers\.2\.",
              lambda: qvl_jax.load(out, verify=False))
    _one_line(r"config\.json: sha256 differs", lambda: qvl_jax.load(out))  # by default the hash sees it first


def test_config_with_other_width_refused(converted, tmp_path):
    out = _copy(converted, "untied", tmp_path)
    _edit_config(out, lambda c: c["text_config"].update(intermediate_size=96))
    _one_line(r"param 'model\.language_model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \[\d+, \d+\] but config\.json "
              r"implies", lambda: qvl_jax.load(out, verify=False))


def test_flipped_tie_flag_refused(converted, tmp_path):
    out = _copy(converted, "tied", tmp_path)
    _edit_config(out, lambda c: c.update(tie_word_embeddings=False))
    _one_line(r"says tie_word_embeddings=False but the params were converted with True",
              lambda: qvl_jax.load(out, verify=False))


def test_header_dtype_changed_refused(converted, tmp_path):
    out = _copy(converted, "tied", tmp_path)
    data = bytearray((out / PARAMS_FILE).read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].decode()
    assert '"dtype":"F32"' in header
    data[8:8 + n] = header.replace('"dtype":"F32"', '"dtype":"I32"', 1).encode()  # same size, other type
    (out / PARAMS_FILE).write_bytes(bytes(data))
    _one_line(r"has dtype I32 but the manifest says \['float32'\]", lambda: qvl_jax.load(out, verify=False))


def test_verify_covers_every_file(converted, tmp_path):
    src = converted("tied")
    files = json.loads((src / MANIFEST_FILE).read_text())["files"]
    assert set(files) == {p.name for p in src.iterdir()} - {MANIFEST_FILE, STAMP_FILE}
    for name in sorted(set(files) - {PARAMS_FILE}):
        out = tmp_path / name
        shutil.copytree(src, out)
        with open(out / name, "a", encoding="utf-8") as f:
            f.write(" ")  # whitespace: still valid JSON, so only the hash can tell
        _one_line(rf"{name}: sha256 differs from the one recorded at conversion",
                  lambda: qvl_jax.load(out, verify=True))


def test_deeply_nested_manifest_is_one_line_error(converted, tmp_path):
    out = _copy(converted, "tied", tmp_path)
    (out / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)
    _one_line("not valid JSON", lambda: qvl_jax.load(out))


def test_load_without_a_name_is_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_JAX_CACHE", str(tmp_path))
    assert qvl_jax.load(None).config.text.vocab_size == qvl_jax.load("tiny-random").config.text.vocab_size
