"""Where a model comes from: `tiny-random`, a local directory, or a Hugging Face hub id.

    resolve_model(spec) -> a converted qvl_jax directory (what `qvl_jax.load` and the CLI read)
    model_files(spec)   -> the directory holding the checkpoint's own files (config, tokenizer,
                           chat template, processor configs), without converting anything

A Hugging Face checkpoint directory is converted once into the cache (`$QVL_JAX_CACHE`, else
~/.cache/qvl_jax), keyed by its path and by the name, size and mtime of every file under it, so an
edited chat template or tokenizer file gives a fresh conversion rather than a stale one. Both
`qvl_jax.load` and the CLI's --model go through it: the conversion streams one tensor at a time and
the load memory-maps the result, so neither holds the whole model in host memory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

from qvl_jax.errors import CheckpointError, InputError
from qvl_jax.files import cache_dir  # noqa: F401  (qvl_jax.hub.cache_dir, as the CLI imports it)

DEFAULT_MODEL = "tiny-random"
TINY_MOE_MODEL = "tiny-random-moe"  # its Mixture-of-Experts sibling (qvl_jax.tiny)


def _log(msg: str, log: bool) -> None:
    if log:
        print(msg, file=sys.stderr, flush=True)


def _permission_denied(e: PermissionError) -> CheckpointError:
    return CheckpointError(f"permission denied: {e.filename or e}")


def _is_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not spec.endswith("/")


def model_files(spec: str | os.PathLike | None = DEFAULT_MODEL, log: bool = True) -> Path:
    """The directory holding a model's files as published (HF layout) or as converted: the built-in
    tiny checkpoint (built on first use), a local directory, or a hub snapshot (downloaded)."""
    if spec is None or (isinstance(spec, str) and spec in (DEFAULT_MODEL, TINY_MOE_MODEL)):
        from qvl_jax.tiny import TINY_NAME, write_tiny_checkpoint  # lazy: CLI start-up (tiny imports numpy)

        name = TINY_MOE_MODEL if spec == TINY_MOE_MODEL else TINY_NAME
        hf = cache_dir() / name
        if spec is None:
            _log(f"*** no --model given: using the built-in {TINY_NAME} model (random weights, random text) ***", log)
        try:
            if not (hf / "config.json").is_file():
                _log(f"building the {name} checkpoint in {hf}...", log)
                write_tiny_checkpoint(hf, moe=name == TINY_MOE_MODEL)
        except PermissionError as e:
            raise _permission_denied(e) from None
        return hf
    if not isinstance(spec, (str, os.PathLike)):
        raise InputError(f"a model is a directory, a hub id or {DEFAULT_MODEL!r}, got {type(spec).__name__}")
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            from qvl_jax.checkpoint import is_converted  # lazy: CLI start-up (checkpoint imports JAX)

            if is_converted(path) or (path / "config.json").is_file():
                return path
            os.listdir(path)  # an unreadable directory says so, not "no checkpoint"
            raise CheckpointError(f"{path} is neither a converted qvl_jax directory nor a Hugging Face checkpoint")
        exists = path.exists()
    except PermissionError as e:
        raise _permission_denied(e) from None
    if isinstance(spec, str) and _is_hub_id(spec) and not exists:
        return _download(spec, log)
    raise CheckpointError(f"no model directory {os.fspath(spec)!r}: it does not exist, and it does not look like "
                          "a hub id such as Qwen/Qwen3-VL-2B-Instruct")


def resolve_model(spec: str | os.PathLike | None = DEFAULT_MODEL, log: bool = True) -> Path:
    """A loadable (converted) model directory for `spec`: "tiny-random" (None: the same, with a
    notice that no model was chosen), a converted qvl_jax directory (returned as is), a Hugging Face
    checkpoint directory or a hub id such as Qwen/Qwen3-VL-2B-Instruct (converted into the cache
    once). log=False keeps stderr quiet (building, downloading, converting notices)."""
    from qvl_jax.checkpoint import is_converted  # lazy: CLI start-up (checkpoint imports JAX)
    from qvl_jax.convert.core import PARAMS_FILE  # lazy: CLI start-up (the converter imports numpy)

    path = model_files(spec, log)
    try:
        # A converted directory missing its manifest goes to the loader too, which says what is wrong.
        if is_converted(path) or (path / PARAMS_FILE).exists():
            return path
        return converted_from_hf(path, log)
    except PermissionError as e:
        raise _permission_denied(e) from None


def conversion_key(hf_dir: Path) -> str:
    """Hash of every file under hf_dir (relative path, size, mtime_ns): weights, config, tokenizer,
    chat template, processor and generation configs all reach the converted directory."""
    entries = []
    for root, dirs, files in os.walk(hf_dir, onerror=_raise):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            st = os.stat(p)  # follows the hub cache's symlinks to the blobs
            entries.append(f"{os.path.relpath(p, hf_dir)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def _raise(e: OSError) -> None:
    raise e


def converted_from_hf(hf_dir: Path, log: bool = True) -> Path:
    """Converts an HF checkpoint into the cache once; later calls reuse it. A cached conversion this
    version cannot read (another params format, a broken manifest) is converted again in its place:
    the cache is ours to rebuild. Older conversions of the same directory are removed once a new one
    exists, so editing a file does not leave a stale copy of the weights behind."""
    from qvl_jax.checkpoint import read_manifest  # lazy: CLI start-up (checkpoint imports JAX)
    from qvl_jax.convert import convert_checkpoint  # lazy: CLI start-up (the converter imports numpy)

    hf_dir = Path(hf_dir).resolve()
    where = hashlib.sha256(str(hf_dir).encode()).hexdigest()[:8]
    out = cache_dir() / "converted" / f"{hf_dir.name}-{where}-{conversion_key(hf_dir)}"
    try:
        read_manifest(out)
        return out
    except CheckpointError as e:
        stale = out.exists()
        _log(f"converting {hf_dir} into {out} (once)" + (f"; the cached one is unusable: {e}" if stale else "")
             + "...", log)
        try:
            convert_checkpoint(hf_dir, out, force=stale)
        except CheckpointError:
            if not _usable(out):  # else another process converting the same directory finished first
                raise
    prefix = f"{hf_dir.name}-{where}-"
    for old in out.parent.iterdir():
        if old.name.startswith(prefix) and len(old.name) == len(out.name) and old != out and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return out


def _usable(converted: Path) -> bool:
    from qvl_jax.checkpoint import read_manifest  # lazy: CLI start-up (checkpoint imports JAX)

    try:
        read_manifest(converted)
        return True
    except CheckpointError:
        return False


def _download(repo_id: str, log: bool = True) -> Path:
    try:
        from huggingface_hub import snapshot_download  # lazy: CLI start-up (~0.2 s to import)

        _log(f"downloading {repo_id}...", log)
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as e:  # offline, unknown repo, no access: one line either way
        raise CheckpointError(f"cannot download {repo_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from None


__all__ = ["DEFAULT_MODEL", "TINY_MOE_MODEL", "cache_dir", "conversion_key", "converted_from_hf", "model_files", "resolve_model"]
