"""Small file-system helpers shared by the writers of directories (the tiny checkpoint, PEFT
adapters, Hugging Face checkpoints)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path


def cache_dir() -> Path:
    """The project's cache: $QVL_JAX_CACHE, else ~/.cache/qvl_jax (converted checkpoints, the XLA
    compilation cache, the CPU kernel's library)."""
    return Path(os.environ.get("QVL_JAX_CACHE", Path.home() / ".cache" / "qvl_jax"))


def temp_sibling(directory: Path) -> Path:
    """A new hidden directory beside `directory` to write into and rename into place. Made with
    os.mkdir, not mkdtemp (0700), so that the finished directory has the umask's permissions."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = directory.parent / f".{directory.name[:200]}.tmp-{secrets.token_hex(6)}"
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


def write_atomic(path: Path, data: bytes) -> None:
    """Writes `path` whole or not at all: into a hidden sibling file, then renamed over it (a
    reader sees the old file or the new one, never a part)."""
    tmp = path.parent / f".{path.name[:200]}.tmp-{secrets.token_hex(6)}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def new_directory(directory: Path):
    """Writes a new directory whole or not at all: yields a `temp_sibling` to fill, then renames it
    to `directory` (which may exist only empty: checked by the caller); on an error the temporary
    one goes and `directory` is left as it was."""
    tmp = temp_sibling(directory)
    try:
        yield tmp
        if directory.exists():
            directory.rmdir()  # empty, checked by the caller
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
