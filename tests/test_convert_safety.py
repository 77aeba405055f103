"""The converter never deletes or replaces what it was not asked to, never leaves partial output behind,
and turns every filesystem failure into a one-line typed error."""

from __future__ import annotations

import argparse
import builtins
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from qvl_jax.convert import core, load_hf_params
from qvl_jax.convert.core import MANIFEST_FILE, PARAMS_FILE, convert_checkpoint
from safetensors.numpy import load_file, save_file

from qvl_jax.errors import CheckpointError, QvlError, ResourceError
from qvl_jax.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A tiny HF checkpoint the tests only read (those that change one copy it first)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("safety") / "hf")


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _work_dirs(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".qvl-jax-" in p.name)


def _fails(exc_type, match, *args, **kwargs) -> str:
    with pytest.raises(exc_type, match=match) as e:
        convert_checkpoint(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def _converted(src: Path, out: Path) -> Path:
    convert_checkpoint(src, out)
    return out


def _is_conversion_of(out: Path) -> bool:
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    return manifest["format"] == core.FORMAT_NAME and (out / PARAMS_FILE).is_file()


def _hook(monkeypatch, fn):
    """Runs fn() inside the conversion: after the output was checked, before the result is swapped in."""
    real = core._check_tied

    def patched(plan, reader):
        fn()
        return real(plan, reader)
    monkeypatch.setattr(core, "_check_tied", patched)


# 1. Never the source, never anything but an earlier conversion.

@pytest.mark.parametrize("where", ["same", "inside", "contains", "symlink_to_src", "through_symlinked_parent"])
@pytest.mark.parametrize("force", [False, True])
def test_output_overlapping_the_source_refused(src, tmp_path, where, force):
    hf = tmp_path / "models" / "hf"
    shutil.copytree(src, hf)
    (tmp_path / "link").symlink_to(hf)
    out = {"same": hf, "inside": hf / "converted", "contains": tmp_path / "models",
           "symlink_to_src": tmp_path / "link", "through_symlinked_parent": tmp_path / "link" / "sub"}[where]
    before = _snapshot(tmp_path / "models")
    message = _fails(CheckpointError, "source checkpoint directory", hf, out, force=force)
    assert str(hf) in message
    assert _snapshot(tmp_path / "models") == before
    assert not _work_dirs(hf) and not _work_dirs(tmp_path) and not _work_dirs(tmp_path / "models")


def _user_dir(out: Path):
    out.mkdir()
    (out / "notes.txt").write_text("mine")


def _user_file(out: Path):
    out.write_text("mine")


def _foreign_manifest(out: Path):
    out.mkdir()
    (out / MANIFEST_FILE).write_text(json.dumps({"format": "something else"}))


def _symlink_to_conversion(out: Path):
    out.symlink_to(out.parent / "real")


@pytest.mark.parametrize("make, match", [
    (_user_dir, "not a qvl_jax conversion"),
    (_user_file, "it is a file"),
    (_foreign_manifest, "not a qvl_jax manifest"),
    (_symlink_to_conversion, "symbolic link"),
])
def test_force_replaces_nothing_but_a_conversion(src, tmp_path, make, match):
    _converted(src, tmp_path / "real")
    out = tmp_path / "out"
    make(out)
    before = _snapshot(tmp_path)
    message = _fails(CheckpointError, f"refusing to replace .*{match}", src, out, force=True)
    assert str(out) in message
    assert _snapshot(tmp_path) == before and not _work_dirs(tmp_path)


def test_force_keeps_user_files_put_into_a_conversion(src, tmp_path):
    out = _converted(src, tmp_path / "out")
    (out / "my_notes.txt").write_text("mine")
    _fails(CheckpointError, "holds my_notes.txt, which a conversion does not write", src, out, force=True)
    assert (out / "my_notes.txt").read_text() == "mine"


@pytest.mark.parametrize("previous", ["conversion", "old_format", "damaged_manifest", "empty_dir"])
def test_force_replaces_an_earlier_conversion(src, tmp_path, previous):
    out = tmp_path / "out"
    if previous == "empty_dir":
        out.mkdir()
    else:
        _converted(src, out)
        manifest = out / MANIFEST_FILE
        if previous == "old_format":
            manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 1, "files": None}))
        elif previous == "damaged_manifest":
            manifest.write_text('{"format": "qvl_jax.par')
    convert_checkpoint(src, out, force=True)
    assert _is_conversion_of(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_output_without_force(src, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("mine")
    _fails(CheckpointError, "output directory .*dir already exists", src, tmp_path / "dir")
    _fails(CheckpointError, "output path .*file already exists and is not a directory", src, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine" and not _work_dirs(tmp_path)


# 2. The final step replaces nothing that appeared after the check.

@pytest.mark.parametrize("appears", ["dir", "empty_dir", "file"])
def test_output_appearing_during_conversion_is_kept(src, tmp_path, monkeypatch, appears):
    out = tmp_path / "out"

    def create():
        if appears == "file":
            out.write_text("theirs")
        else:
            out.mkdir()
            if appears == "dir":
                (out / "theirs.txt").write_text("theirs")
    _hook(monkeypatch, create)
    _fails(CheckpointError, "appeared while converting", src, out)
    assert not _work_dirs(tmp_path)
    if appears == "file":
        assert out.read_text() == "theirs"
    else:
        assert [p.name for p in out.iterdir()] == (["theirs.txt"] if appears == "dir" else [])


def test_without_renameat2_an_output_appearing_is_kept(src, tmp_path, monkeypatch):
    """Where RENAME_NOREPLACE is missing, the fallback still never replaces a file or a non-empty directory."""
    monkeypatch.setattr(core, "_renameat2", lambda: None)
    out = tmp_path / "out"
    _hook(monkeypatch, lambda: _user_dir(out))
    _fails(CheckpointError, "appeared while converting", src, out)
    assert (out / "notes.txt").read_text() == "mine" and not _work_dirs(tmp_path)
    monkeypatch.undo()
    convert_checkpoint(src, tmp_path / "other")
    assert core._renameat2() is not None  # this machine takes the RENAME_NOREPLACE path in the other tests


def test_force_replaces_only_the_checked_conversion(src, tmp_path, monkeypatch):
    out = _converted(src, tmp_path / "out")

    def swap_for_user_dir():
        shutil.rmtree(out)
        _user_dir(out)
    _hook(monkeypatch, swap_for_user_dir)
    _fails(CheckpointError, "changed while converting", src, out, force=True)
    assert (out / "notes.txt").read_text() == "mine" and not _work_dirs(tmp_path)


def test_force_when_the_conversion_vanished(src, tmp_path, monkeypatch):
    out = _converted(src, tmp_path / "out")
    _hook(monkeypatch, lambda: shutil.rmtree(out))
    _fails(CheckpointError, "removed while converting", src, out, force=True)
    assert not out.exists() and not _work_dirs(tmp_path)


@pytest.mark.parametrize("force", [False, True])
def test_concurrent_conversions_into_one_output(src, tmp_path, monkeypatch, force):
    """Both pass the check before either swaps in: exactly one wins, the other gets a CheckpointError."""
    out = tmp_path / "out"
    if force:
        _converted(src, out)
    barrier = threading.Barrier(2, timeout=60)
    _hook(monkeypatch, barrier.wait)
    results: list[object] = [None, None]

    def run(i):
        try:
            results[i] = convert_checkpoint(src, out, force=force)
        except BaseException as e:  # noqa: BLE001 - collected for the assertions below
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], CheckpointError), results
    assert "while converting" in str(errors[0])
    assert _is_conversion_of(out) and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# 3. float16 never stores inf silently.

def test_float16_overflow_refused(src, tmp_path):
    hf = shutil.copytree(src, tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    key = "model.language_model.layers.1.mlp.down_proj.weight"
    tensors[key][0, 0] = 1e6
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        message = _fails(CheckpointError, "float16", hf, tmp_path / "out", dtype="float16")
        assert key in message and "1e+06" in message and "bfloat16" in message
        with pytest.raises(CheckpointError, match=key):
            load_hf_params(hf, "float16")
    assert not (tmp_path / "out").exists() and not _work_dirs(tmp_path)
    convert_checkpoint(hf, tmp_path / "out", dtype="bfloat16")  # the suggested dtype works


def test_float16_in_range_converts(src, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_checkpoint(src, tmp_path / "out", dtype="float16")
    assert json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())["dtype"] == "float16"


# 4. Filesystem failures: one line, the real cause, the path; nothing left behind.

def _deny_open(monkeypatch, path: Path):
    real = builtins.open

    def fake(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", fake)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_unreadable_source_file(src, tmp_path, monkeypatch, name):
    _deny_open(monkeypatch, src / name)
    message = _fails(QvlError, "permission denied", src, tmp_path / "out")  # config.json: a ConfigError
    assert str(src / name) in message and "not found" not in message and "missing" not in message
    assert not (tmp_path / "out").exists() and not _work_dirs(tmp_path)


def test_unreadable_source_dir(src, tmp_path, monkeypatch):
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(p))) if Path(p) == src else real(p))
    message = _fails(CheckpointError, "^permission denied", src, tmp_path / "out")
    assert str(src) in message


_CASES = r"""
import json, sys
from qvl_jax.convert import convert_checkpoint
for src, out in json.loads(sys.argv[1]):
    try:
        convert_checkpoint(src, out)
        print("converted")
    except Exception as e:
        print(type(e).__name__, e)
"""


def test_permission_denied_for_real(src, tmp_path):
    """Real permission bits; as root (which bypasses them) in a child without CAP_DAC_OVERRIDE."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: permission bits cannot be enforced")
        prefix = [shutil.which("setpriv"), "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
    hf_dir, hf_file = shutil.copytree(src, tmp_path / "hf_dir"), shutil.copytree(src, tmp_path / "hf_file")
    parent = tmp_path / "parent"
    parent.mkdir()
    denied = {hf_dir: 0o000, hf_file / "model.safetensors": 0o000, parent: 0o555}
    for path, mode in denied.items():
        if os.geteuid() == 0:
            os.chown(path, 65534, -1)  # root's powers dropped, "other" permissions apply to it
        path.chmod(mode)
    cases = [(str(hf_dir), str(tmp_path / "o1")), (str(hf_file), str(tmp_path / "o2")),
             (str(src), str(parent / "o3"))]
    try:
        run = subprocess.run([*prefix, sys.executable, "-c", _CASES, json.dumps(cases)],
                             capture_output=True, text=True, check=False)
    finally:
        for path in denied:
            path.chmod(0o755)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and len(lines) == 3, run.stdout + run.stderr
    for line, path in zip(lines, [hf_dir, hf_file / "model.safetensors", parent]):
        assert line.startswith("CheckpointError permission denied") and str(path) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_dir", "hf_file", "parent"]
    assert list(parent.iterdir()) == []


def test_unwritable_output_parent(src, tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    real = os.mkdir

    def fake(path, *args, **kwargs):
        if Path(path).parent == parent:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", fake)
    message = _fails(CheckpointError, "^permission denied", src, parent / "out")
    assert str(parent) in message and list(parent.iterdir()) == []


def test_disk_full(src, tmp_path, monkeypatch):
    real = builtins.open

    class FullDisk:
        def __init__(self, f):
            self._f, self._writes = f, 0

        def write(self, data):
            self._writes += 1
            if self._writes > 1:  # the header fits, the first tensor does not
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def fake(file, *args, **kwargs):
        f = real(file, *args, **kwargs)
        return FullDisk(f) if isinstance(file, (str, os.PathLike)) and Path(file).name == PARAMS_FILE else f
    monkeypatch.setattr(builtins, "open", fake)
    out = tmp_path / "out"
    message = _fails(ResourceError, "no space left on device", src, out)
    assert str(out) in message
    assert not out.exists() and not _work_dirs(tmp_path)


def test_symlink_loops(src, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    _fails(CheckpointError, "symbolic link loop", tmp_path / "a", tmp_path / "out")
    _fails(CheckpointError, "symbolic link loop", src, tmp_path / "a" / "out")
    for force in (False, True):  # the output itself a loop
        _fails(CheckpointError, "symbolic link loop", src, tmp_path / "a", force=force)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_output_parent_is_a_file(src, tmp_path):
    (tmp_path / "f").write_text("mine")
    message = _fails(CheckpointError, "is a file, not a directory", src, tmp_path / "f" / "sub" / "out")
    assert str(tmp_path / "f") in message and (tmp_path / "f").read_text() == "mine"


def test_missing_output_parents_created_and_removed_on_failure(src, tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "out"
    _hook(monkeypatch, lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, out)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    convert_checkpoint(src, out)
    assert _is_conversion_of(out)


def test_interrupt_leaves_nothing(src, tmp_path, monkeypatch):
    calls = []
    real = core._Reader.get

    def get(self, s):
        calls.append(s)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, s)
    monkeypatch.setattr(core._Reader, "get", get)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_forced_swap_keeps_the_previous_conversion(src, tmp_path, monkeypatch):
    out = _converted(src, tmp_path / "out")
    before = _snapshot(out)
    real = core._rename_noreplace

    def rename(a, b):
        if Path(b) == out and ".qvl-jax-tmp-" in Path(a).name:
            raise KeyboardInterrupt
        return real(a, b)
    monkeypatch.setattr(core, "_rename_noreplace", rename)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, out, force=True)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_interrupt_exit_code(src, tmp_path, monkeypatch, capsys):
    from qvl_jax.convert.__main__ import run

    monkeypatch.setattr(core, "_check_tied", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    args = argparse.Namespace(hf_dir=str(src), out_dir=str(tmp_path / "out"), dtype="auto", force=False)
    assert run(args) == 130
    assert "interrupted" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_cli_one_line_error(src, tmp_path):
    (tmp_path / "f").write_text("mine")
    run = subprocess.run([sys.executable, "-m", "qvl_jax.convert", str(src), str(tmp_path / "f" / "out")],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a directory" in lines[0]


# 5. Work directories of killed conversions are removed, and nothing else.

def test_stale_work_dirs_removed(src, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = __import__("socket").gethostname()

    def work_dir(name, owner=None, age_s=0.0):
        d = tmp_path / name
        d.mkdir()
        (d / "params.safetensors").write_bytes(b"partial")
        if owner is not None:
            (d / core._OWNER_FILE).write_text(json.dumps(owner))
        t = time.time() - age_s
        os.utime(d, (t, t))
        return d

    stale = [
        work_dir(".m.qvl-jax-tmp-0123456789ab", {"pid": dead.pid, "host": host, "start": None}),
        work_dir(".x.qvl-jax-old-0123456789ab", {"pid": dead.pid, "host": host, "start": None}),
        work_dir(".m.qvl-jax-tmp-aaaaaaaaaaaa", age_s=2 * 86400),  # killed before writing its owner file
        work_dir(".m.qvl-jax-tmp-bbbbbbbbbbbb", {"pid": 1, "host": host, "start": "never"}),  # a reused pid
    ]
    kept = [
        work_dir(".m.qvl-jax-tmp-cccccccccccc", {"pid": os.getpid(), "host": host,
                                                 "start": core._process_start(os.getpid())}, age_s=2 * 86400),
        work_dir(".m.qvl-jax-tmp-dddddddddddd"),  # fresh, no owner file yet
        work_dir(".m.qvl-jax-tmp-eeeeeeeeeeee", {"pid": dead.pid, "host": "elsewhere"}),  # recent, another host
        work_dir(".m.tmp-0123456789ab", age_s=2 * 86400),  # an older naming, maybe not ours
        work_dir(".m.qvl-jax-tmp-notours", age_s=2 * 86400),
        work_dir("m.qvl-jax-tmp-0123456789ab", age_s=2 * 86400),
        work_dir(".m.qvl-jax-kept-0123456789ab", age_s=2 * 86400),
    ]
    target = work_dir("target", age_s=2 * 86400)
    (tmp_path / ".m.qvl-jax-tmp-ffffffffffff").symlink_to(target)
    file_like = tmp_path / ".m.qvl-jax-old-ffffffffffff"
    file_like.write_text("not a directory")
    os.utime(file_like, (0, 0))

    convert_checkpoint(src, tmp_path / "new")
    for d in stale:
        assert not d.exists(), d
    for d in [*kept, target]:
        assert (d / "params.safetensors").read_bytes() == b"partial", d
    assert (tmp_path / ".m.qvl-jax-tmp-ffffffffffff").is_symlink() and file_like.is_file()


# 6 and 7. Permissions from the umask; a manifest covering every file.

@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_output_permissions_follow_the_umask(src, tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        out = convert_checkpoint(src, tmp_path / "out")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == dir_mode
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: file_mode for p in out.iterdir()}


def test_manifest_covers_every_file(src, tmp_path):
    out = convert_checkpoint(src, tmp_path / "out")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    files = manifest["files"]
    assert set(files) == {p.name for p in out.iterdir()} - {MANIFEST_FILE}
    assert {"config.json", "tokenizer.json", PARAMS_FILE} <= set(files)
    for name, entry in files.items():
        data = (out / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert manifest["params_bytes"] == files[PARAMS_FILE]["bytes"]
    assert manifest["params_sha256"] == files[PARAMS_FILE]["sha256"]


def test_relative_paths(src, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = convert_checkpoint(os.path.relpath(src), "out")
    assert out == Path("out") and _is_conversion_of(tmp_path / "out")
