"""Verification of a converted checkpoint by default: the first load after a conversion, a copy or
any change recomputes every file's sha256 (a flipped bit is a CheckpointError, never a model that
answers differently); a stamp beside the files lets later loads of the same files skip the hashes;
the CLI's --verify recomputes them whatever the stamp says."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

import qvl_jax
from qvl_jax import checkpoint, cli
from qvl_jax.checkpoint import STAMP_FILE
from qvl_jax.convert.core import MANIFEST_FILE, PARAMS_FILE
from qvl_jax.errors import CheckpointError


@pytest.fixture
def hashes(monkeypatch):
    """The files hashed so far (checkpoint._sha256 is looked up at call time)."""
    seen = []
    real = checkpoint._sha256

    def counting(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(checkpoint, "_sha256", counting)
    return seen


def _settle():
    """Lets the files' ctimes age past the window in which a stamp is not trusted (a write within
    the same clock tick could leave them unchanged)."""
    time.sleep(checkpoint._RACY_NS / 1e9 + 0.05)


def _flip_bit(params, keep_mtime: bool = False):
    st = params.stat()
    data = bytearray(params.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0x01  # inside the tensor data: the header stays valid
    params.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(params, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def copy(converted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(converted("tied"), out)  # copy2: mtimes kept, and a stamp there is copied too
    return out


def _listed(out):
    """Every file the manifest lists, the params file among them: each hashed once."""
    files = json.loads((out / MANIFEST_FILE).read_text())["files"]
    assert PARAMS_FILE in files
    return len(files)


def test_flipped_bit_in_a_copy_is_caught_by_default(copy):
    # Even with its mtime put back and the source's fresh stamp copied beside it: a copy has new
    # inodes and ctimes, so the stamp is stale and the first load verifies.
    src = copy.parent / "src"
    shutil.copytree(copy, src)
    _settle()
    qvl_jax.load(src)
    assert (src / STAMP_FILE).is_file()
    damaged = copy.parent / "damaged"
    shutil.copytree(src, damaged)
    assert (damaged / STAMP_FILE).read_text() == (src / STAMP_FILE).read_text()
    _flip_bit(damaged / PARAMS_FILE, keep_mtime=True)
    with pytest.raises(CheckpointError, match=r"params\.safetensors: sha256 differs .*convert it again") as e:
        qvl_jax.load(damaged)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="sha256 differs"):  # no stamp was written for it
        qvl_jax.load(damaged)
    qvl_jax.load(damaged, verify=False)  # the opt-out checks only the size: the flipped bit loads


def test_fresh_stamp_skips_the_hashes_and_a_change_makes_it_stale(copy, hashes):
    _settle()
    qvl_jax.load(copy)
    assert sorted(hashes) == sorted(json.loads((copy / MANIFEST_FILE).read_text())["files"])  # each once
    stamp = json.loads((copy / STAMP_FILE).read_text())
    assert set(stamp["files"]) == {MANIFEST_FILE, *hashes}
    hashes.clear()
    qvl_jax.load(copy)  # stamp fresh: nothing hashed, so no slower than before the stamp existed
    assert hashes == []
    qvl_jax.load(copy, verify=True)  # always, when asked
    assert len(hashes) == _listed(copy)
    hashes.clear()
    with open(copy / "generation_config.json", "a", encoding="utf-8") as f:
        f.write(" ")  # still valid JSON: only the hash can tell
    with pytest.raises(CheckpointError, match=r"generation_config\.json: sha256 differs"):
        qvl_jax.load(copy)
    _flip_bit(copy / PARAMS_FILE)  # a damaged params file: never passes on an older stamp
    with pytest.raises(CheckpointError, match=r"params\.safetensors: sha256 differs"):
        qvl_jax.load(copy)


def test_no_stamp_while_the_files_are_too_new(copy, hashes, monkeypatch):
    # "Too new": changed within the last _RACY_NS; widened so that a slow load (a busy machine took
    # over the second between the copy and the check) still counts as one right after the copy.
    monkeypatch.setattr(checkpoint, "_RACY_NS", 3600 * 10**9)
    # The source's stamp (an earlier test loaded it) came along with the copy: no stamp before the load.
    (copy / STAMP_FILE).unlink(missing_ok=True)
    qvl_jax.load(copy)  # just copied: a write in the same clock tick could go unseen
    assert hashes and not (copy / STAMP_FILE).exists()


def test_a_stamp_that_is_garbage_is_ignored(copy, hashes):
    (copy / STAMP_FILE).write_text("{not json")
    qvl_jax.load(copy)
    assert len(hashes) == _listed(copy)


def test_cli_verify(copy, capsys, hashes):
    _settle()
    assert cli.main(["info", "--model", str(copy), "--verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True
    assert len(hashes) == _listed(copy) and (copy / STAMP_FILE).is_file()
    hashes.clear()
    assert cli.main(["info", "--model", str(copy), "--verify", "--json"]) == 0  # a fresh stamp does not skip it
    assert len(hashes) == _listed(copy)
    capsys.readouterr()
    _flip_bit(copy / PARAMS_FILE, keep_mtime=True)
    assert cli.main(["info", "--model", str(copy), "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "params.safetensors: sha256 differs" in err[0], err
    for command in ("generate", "serve", "finetune"):
        args = cli.build_parser([command]).parse_args(
            [command, "--verify"] + {"generate": ["--prompt", "x"], "serve": [],
                                     "finetune": ["--data", "d", "--out", "o"]}[command])
        assert args.verify is True


def test_convert_force_replaces_a_verified_conversion(hf_checkpoint, tmp_path):
    """The stamp (and a killed writer's temporary) is part of a conversion for --force, which
    refuses to replace directories holding files a conversion does not write."""
    from qvl_jax.convert import convert_checkpoint

    _, hf = hf_checkpoint("tied")
    out = convert_checkpoint(hf, tmp_path / "out", dtype="float32")
    _settle()
    qvl_jax.load(out)
    assert (out / STAMP_FILE).is_file()
    (out / f".{STAMP_FILE}.tmp-0123456789ab").write_bytes(b"{")
    convert_checkpoint(hf, out, dtype="float32", force=True)
    assert not (out / STAMP_FILE).exists()
    qvl_jax.load(out)
