"""Hugging Face safetensors -> qvl_jax param tree: planning, streaming conversion, writing.

The conversion is planned before any tensor data is read: every HF key is matched against the key
table (`convert.table`), its dtype and shape are checked, and unknown, missing and duplicate keys are
reported together. Then each target array is produced one source tensor at a time and streamed to the
output file, so host memory stays at about one tensor whatever the checkpoint size.

Output (a directory): `params.safetensors` (Hugging Face's keys and shapes, cast to one dtype), the checkpoint's
`config.json` and tokenizer/processor files, and `qvl_jax.json` (format version, dtype, and the size
and sha256 of every other file). It is written into a hidden sibling directory and renamed into place
only when complete, with a rename that never replaces anything but the previous conversion that was
checked at the start (`force=True`); the output may not overlap the source checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import ctypes
except ImportError:  # a Python built without ctypes: renames fall back to os.rename
    ctypes = None

import ml_dtypes
import numpy as np
from safetensors import safe_open
from tqdm.auto import tqdm
from qvl_jax.convert.table import OUT_IN, TIED_LM_HEAD, TIED_SOURCE, Rule, expert_layout, rules_for

from qvl_jax.config import Qwen3VLConfig, read_json
from qvl_jax.errors import CheckpointError, QvlError, ResourceError

FORMAT_NAME = "qvl_jax.params"
# 3: Hugging Face's keys and shapes, one tensor per layer (the NNX state paths); 2: stacked layers
# under "/"-joined keys; 1: flax [in, out] "kernel" weights.
FORMAT_VERSION = 3
MANIFEST_FILE = "qvl_jax.json"
PARAMS_FILE = "params.safetensors"
# Written by the loader beside a converted checkpoint once its files passed verification
# (qvl_jax.checkpoint): part of a conversion as far as --force is concerned.
STAMP_FILE = "qvl_jax.verified.json"
# Files copied alongside the params so that a converted directory is self-contained.
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.json",
    "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json",
)

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
_ST_DTYPE = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}
_ST_TO_NP = {v: k for k, v in _ST_DTYPE.items()}

# Older exports (Qwen2-VL style) put the vision tower under `visual.` and the decoder under `model.`.
_LEGACY_PREFIXES = (
    (re.compile(r"^visual\."), "model.visual."),
    (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."),
)


def _canonical(key: str) -> str:
    for pattern, repl in _LEGACY_PREFIXES:
        key = pattern.sub(repl, key)
    return key


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    file: Path
    key: str  # the key as stored in the file
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string


@dataclasses.dataclass(frozen=True)
class Target:
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    rule: Rule
    sources: tuple[SourceTensor, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass
class Plan:
    config: Qwen3VLConfig
    hf_dir: Path
    targets: list[Target]
    tied_check: tuple[SourceTensor, SourceTensor] | None  # (lm_head, embedding) to compare

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.targets)


def _safe_open(path: Path):
    try:
        with open(path, "rb"):  # safetensors reports any failure to open (permission denied too) as "not found"
            pass
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    try:
        return safe_open(str(path), framework="numpy")
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for bad headers and truncation
        raise CheckpointError(f"{path.name}: not a valid safetensors file ({str(e).splitlines()[0]})") from None


def _checkpoint_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # JSON, decoding, nesting
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (hf_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{hf_dir}: shard(s) named in model.safetensors.index.json are missing: "
                                  + ", ".join(missing[:5]))
        return [hf_dir / f for f in files]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(hf_dir.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json found")


def read_sources(hf_dir: Path) -> dict[str, SourceTensor]:
    """Every tensor in the checkpoint, by canonical key, from the safetensors headers alone."""
    sources: dict[str, SourceTensor] = {}
    for path in _checkpoint_files(hf_dir):
        size = path.stat().st_size
        if size < 8:
            raise CheckpointError(f"{path.name}: truncated safetensors file ({size} bytes)")
        with _safe_open(path) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                sl = f.get_slice(key)
                canon = _canonical(key)
                if canon in sources:
                    raise CheckpointError(
                        f"duplicate tensor {key!r}: in {sources[canon].file.name} and {path.name}")
                sources[canon] = SourceTensor(path, key, tuple(sl.get_shape()), sl.get_dtype())
    return sources


def _file_metadata(hf_dir: Path) -> list[dict]:
    """The `__metadata__` of every checkpoint file (what it declares about itself)."""
    out = []
    for path in _checkpoint_files(hf_dir):
        with _safe_open(path) as f:
            out.append(f.metadata() or {})
    return out


def _source_dir(hf_dir: Path) -> Path:
    """The checkpoint directory's real path, or a one-line error naming why it cannot be read."""
    try:
        real = Path(os.path.realpath(hf_dir, strict=True))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint directory {hf_dir} does not exist") from None
    if not real.is_dir():
        raise CheckpointError(f"checkpoint path {hf_dir} is not a directory")
    os.listdir(real)  # an unreadable directory fails here as "permission denied", not later as "not found"
    return real


def make_plan(hf_dir: str | os.PathLike, dtype: str = "auto") -> Plan:
    try:
        return _make_plan(Path(hf_dir), dtype)
    except OSError as e:
        raise _os_error(e) from None


def _make_plan(hf_dir: Path, dtype: str) -> Plan:
    _source_dir(hf_dir)
    if dtype != "auto" and dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    config = Qwen3VLConfig.from_json_file(hf_dir / "config.json")
    sources = read_sources(hf_dir)

    layout = OUT_IN
    if config.is_moe:
        layout = expert_layout(config, {k: s.shape for k, s in sources.items()}, _file_metadata(hf_dir),
                               read_json(hf_dir / "config.json"))
    rules = rules_for(config, layout)
    claimed: set[str] = set()
    missing: list[str] = []
    targets: list[Target] = []
    for rule in rules:
        srcs = []
        for key in rule.source_keys():
            src = sources.get(key)
            if src is None:
                missing.append(key)
                continue
            claimed.add(key)
            if src.dtype not in _ST_TO_NP:
                raise CheckpointError(f"tensor {key!r} has dtype {src.dtype}; expected F32, BF16 or F16")
            if src.shape != rule.src_shape:
                raise CheckpointError(
                    f"tensor {key!r} has shape {list(src.shape)}; the config implies {list(rule.src_shape)}")
            srcs.append(src)
        if len(srcs) == len(rule.source_keys()):
            out_dtype = _ST_TO_NP[srcs[0].dtype] if dtype == "auto" else DTYPES[dtype]
            targets.append(Target(rule.target, rule.target_shape, out_dtype, rule, tuple(srcs)))

    tied_check = None
    if config.tie_word_embeddings and TIED_LM_HEAD in sources:
        head, emb = sources[TIED_LM_HEAD], sources.get(TIED_SOURCE)
        claimed.add(TIED_LM_HEAD)
        if emb is not None and head.shape != emb.shape:
            raise CheckpointError(f"tied {TIED_LM_HEAD!r} has shape {list(head.shape)}, "
                                  f"embedding has {list(emb.shape)}")
        tied_check = (head, emb) if emb is not None else None

    unknown = sorted(set(sources) - claimed)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}{more}")
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise CheckpointError(f"checkpoint has {len(unknown)} unexpected tensor(s) for this config: "
                              f"{', '.join(unknown[:5])}{more}")
    return Plan(config, hf_dir, targets, tied_check)


class _Reader:
    """Keeps each shard open once while a plan is materialised."""

    def __init__(self):
        self._open: dict[Path, object] = {}

    def get(self, src: SourceTensor) -> np.ndarray:
        handle = self._open.get(src.file)
        if handle is None:
            handle = self._open[src.file] = _safe_open(src.file).__enter__()
        try:
            return handle.get_tensor(src.key)
        except Exception as e:  # noqa: BLE001 - any safetensors failure is a bad file
            raise CheckpointError(f"{src.file.name}: cannot read tensor {src.key!r} ({str(e).splitlines()[0]})") from None

    def close(self):
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()


def _check_tied(plan: Plan, reader: _Reader) -> None:
    if plan.tied_check is None:
        return
    head, emb = (reader.get(s) for s in plan.tied_check)
    if not np.array_equal(head, emb):
        raise CheckpointError(f"config says tie_word_embeddings=true but {TIED_LM_HEAD!r} differs from "
                              f"{TIED_SOURCE!r}")


def iter_target_chunks(plan: Plan, reader: _Reader) -> Iterator[tuple[Target, np.ndarray]]:
    """Yields (target, array in the target dtype) one tensor at a time."""
    for target in plan.targets:
        (src,) = target.sources
        arr = reader.get(src)
        if target.rule.swap is not None:  # the older fused-expert layout: [e, in, out] -> [e, out, in]
            arr = np.swapaxes(arr, *target.rule.swap)
        assert arr.shape == target.shape, (target.key, arr.shape, target.shape)
        yield target, _cast(arr, target.dtype, src.key)


def _cast(arr: np.ndarray, dtype: np.dtype, key: str) -> np.ndarray:
    """`arr` in `dtype`, refusing values that float16 cannot hold (they would become inf)."""
    if dtype != np.float16 or arr.dtype == np.float16:
        return np.ascontiguousarray(arr, dtype)
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype)
    if not np.isfinite(out).all():
        overflow = np.isinf(out) & ~np.isinf(arr)
        if overflow.any():
            peak = float(np.abs(arr[overflow].astype(np.float32)).max())
            raise CheckpointError(f"tensor {key!r} holds values up to {peak:.4g}, beyond float16's range "
                                  f"(±{float(np.finfo(np.float16).max):.0f}): convert with --dtype bfloat16 or "
                                  "float32 instead")
    return out


def load_hf_params(hf_dir: str | os.PathLike, dtype: str = "auto") -> tuple[Qwen3VLConfig, dict[str, np.ndarray]]:
    """Converts a Hugging Face checkpoint in memory: (config, flat {key: array})."""
    plan = make_plan(hf_dir, dtype)
    reader = _Reader()
    flat: dict[str, np.ndarray] = {}
    try:
        _check_tied(plan, reader)
        for target, arr in iter_target_chunks(plan, reader):
            flat[target.key] = arr
    finally:
        reader.close()
    return plan.config, flat


def _header(plan: Plan, metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in plan.targets:
        header[t.key] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned for memory mapping
    return struct.pack("<Q", len(raw)) + raw


def _progress(total: int, desc: str):
    # disable=None: a live bar on a terminal, silence in logs and CI.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=None)


# Work directories (the conversion being written, a previous one set aside) are hidden siblings of
# the output whose names only we create; a marker inside names the owning process.
_WORK_DIR = re.compile(r"^\..+\.qvl-jax-(tmp|old)-[0-9a-f]{12}$")
_OWNER_FILE = ".qvl_jax_owner.json"
_STALE_AFTER_S = 24 * 3600


def _os_error(e: OSError, out: Path | None = None) -> QvlError:
    """A one-line typed error for a filesystem failure, naming the cause and the path."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = out if out is not None else e.filename
        return ResourceError(f"no space left on device while writing {where}: free some space or convert "
                             "into a directory on another disk")
    where = "" if e.filename is None else f": {os.fsdecode(e.filename)}"
    if e.filename2 is not None:
        where += f" -> {os.fsdecode(e.filename2)}"
    cause = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.ELOOP: "symbolic link loop (too many levels of symbolic links)",
             errno.ENOTDIR: "a component of the path is not a directory",
             errno.EROFS: "read-only file system"}.get(e.errno, (e.strerror or str(e)).lower())
    return CheckpointError(f"{cause}{where}")


def _real_output_path(out: Path) -> Path:
    """`out` with the symlinks of its existing part resolved (it need not exist yet)."""
    head, tail = out, []
    while True:
        try:
            return Path(os.path.realpath(head, strict=True), *reversed(tail))
        except FileNotFoundError:
            if head.parent == head:
                raise
            tail.append(head.name)
            head = head.parent
        except NotADirectoryError:
            blocker = next((p for p in reversed(out.parents) if os.path.lexists(p) and not os.path.isdir(p)), head)
            raise CheckpointError(f"cannot create output directory {out}: {blocker} is a file, not a directory") from None


def _check_not_overlapping(src: Path, out: Path) -> None:
    """Refuses an output that is the source checkpoint, lies inside it or contains it (symlinks and
    bind mounts included: directories are compared by device and inode)."""
    def ident(p: Path) -> tuple[int, int]:
        st = os.stat(p)
        return st.st_dev, st.st_ino

    real = _real_output_path(out)
    src_id = ident(src)
    out_chain = [ident(p) for p in (real, *real.parents) if os.path.exists(p)]
    if out_chain and os.path.exists(real) and out_chain[0] == src_id:
        raise CheckpointError(f"output {out} is the source checkpoint directory {src}: choose another output directory")
    if src_id in out_chain:
        raise CheckpointError(f"output {out} lies inside the source checkpoint directory {src}: choose a "
                              "directory outside it")
    if os.path.exists(real) and ident(real) in {ident(p) for p in src.parents}:
        raise CheckpointError(f"output {out} contains the source checkpoint directory {src}: choose another "
                              "output directory")


def _check_previous_conversion(d: Path) -> None:
    """Raises unless directory `d` is empty or holds only files a qvl_jax conversion writes, with its manifest."""
    names = os.listdir(d)
    if not names:
        return
    refuse = f"refusing to replace {d} with --force"
    if MANIFEST_FILE not in names:
        raise CheckpointError(f"{refuse}: it is not a qvl_jax conversion (no {MANIFEST_FILE}); remove it yourself "
                              "or choose another output directory")
    if not stat.S_ISREG(os.lstat(d / MANIFEST_FILE).st_mode):
        raise CheckpointError(f"{refuse}: its {MANIFEST_FILE} is not a regular file")
    try:
        manifest = json.loads((d / MANIFEST_FILE).read_bytes())
    except (ValueError, RecursionError):
        manifest = {"format": FORMAT_NAME}  # a damaged manifest: the file names below still decide
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{refuse}: its {MANIFEST_FILE} is not a qvl_jax manifest")
    files = manifest.get("files")
    known = {MANIFEST_FILE, PARAMS_FILE, STAMP_FILE, *AUX_FILES, *(files if isinstance(files, dict) else ())}
    foreign = sorted(n for n in names if (n not in known and not n.startswith(f".{STAMP_FILE}.tmp-"))
                     or not stat.S_ISREG(os.lstat(d / n).st_mode))
    if foreign:
        more = f" (and {len(foreign) - 5} more)" if len(foreign) > 5 else ""
        raise CheckpointError(f"{refuse}: it holds {', '.join(foreign[:5])}{more}, which a conversion does not "
                              "write; move them out or choose another output directory")


def _check_output(out: Path, force: bool) -> tuple[int, int] | None:
    """None when nothing is at `out`; else the identity of the directory `force` may replace."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return None
    if not force:
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"output directory {out} already exists (use --force to replace a previous "
                                  "conversion)")
        raise CheckpointError(f"output path {out} already exists and is not a directory")
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"refusing to replace {out} with --force: it is a symbolic link, not a previous "
                              "conversion; remove it yourself or choose another output directory")
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"refusing to replace {out} with --force: it is a file, not a previous conversion; "
                              "remove it yourself or choose another output directory")
    _check_previous_conversion(out)
    return st.st_dev, st.st_ino


def _process_start(pid: int) -> str | None:
    """The process's start time since boot (Linux), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def _alive(pid: int, start: object) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user's
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _make_work_dir(parent: Path, name: str, kind: str) -> Path:
    """A new hidden sibling directory owned by this process; os.mkdir (not mkdtemp's 0700) so that the
    converted directory gets the umask's permissions."""
    while True:
        d = parent / f".{name[:200]}.qvl-jax-{kind}-{secrets.token_hex(6)}"
        try:
            os.mkdir(d, 0o777)
            break
        except FileExistsError:
            continue
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}
        (d / _OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d


def _is_stale(d: Path, host: str, now: float) -> bool:
    try:
        owner = json.loads((d / _OWNER_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        owner = None
    if isinstance(owner, dict) and owner.get("host") == host and type(owner.get("pid")) is int and owner["pid"] > 0:
        return not _alive(owner["pid"], owner.get("start"))
    return now - os.lstat(d).st_mtime > _STALE_AFTER_S


def _remove_stale_work_dirs(parent: str | os.PathLike) -> list[Path]:
    """Removes the work directories that killed conversions left in `parent`: only directories named as
    we name them, and only when their process is gone (same host) or they are a day old. Returns them."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    host, now, removed = socket.gethostname(), time.time(), []
    for entry in entries:
        try:
            if _WORK_DIR.match(entry.name) and entry.is_dir(follow_symlinks=False) and _is_stale(Path(entry.path), host, now):
                shutil.rmtree(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # not ours to fight over: another process may be removing it too
    return removed


def _make_parents(d: Path) -> list[Path]:
    """Creates `d` and its missing parents; returns those created, outermost first."""
    missing = []
    while not os.path.isdir(d):
        missing.append(d)
        d = d.parent
    created = []
    for p in reversed(missing):
        try:
            os.mkdir(p)
        except FileExistsError:
            if not os.path.isdir(p):
                raise
            continue
        created.append(p)
    return created


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


@functools.cache
def _renameat2():
    if ctypes is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename_noreplace(src: Path, dst: Path) -> None:
    """os.rename that fails when `dst` exists, an empty directory included (Linux renameat2)."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), os.fsdecode(src), None, os.fsdecode(dst))
    # Without RENAME_NOREPLACE, rename still fails onto a file or a non-empty directory; only an empty
    # directory made in the instant between these two calls would be replaced.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst))
    os.rename(src, dst)


def _rename_into_place(tmp: Path, out: Path) -> None:
    try:
        _rename_noreplace(tmp, out)
    except OSError:
        if os.path.lexists(out):
            raise CheckpointError(f"{out} appeared while converting (another conversion into it?): it was left "
                                  "as it is and this conversion was discarded") from None
        raise


def _is_checked(path: Path, checked: tuple[int, int]) -> bool:
    st = os.lstat(path)
    if (st.st_dev, st.st_ino) != checked or not stat.S_ISDIR(st.st_mode):
        return False
    try:
        _check_previous_conversion(path)
    except CheckpointError:
        return False
    return True


def _swap_in(tmp: Path, out: Path, checked: tuple[int, int] | None) -> None:
    """Renames the finished conversion `tmp` to `out`, replacing only the directory checked at the start."""
    if checked is None:
        _rename_into_place(tmp, out)
        return
    aside_dir = _make_work_dir(out.parent, out.name, "old")
    aside = aside_dir / "previous"
    moved = verified = False
    try:
        try:
            os.rename(out, aside)
        except FileNotFoundError:
            raise CheckpointError(f"{out} was removed while converting (another conversion into it?): this "
                                  "conversion was discarded") from None
        moved = True
        verified = _is_checked(aside, checked)
        if not verified:
            raise CheckpointError(f"{out} changed while converting (another conversion into it?): it was left "
                                  "as it is and this conversion was discarded")
        _rename_into_place(tmp, out)
        moved = False  # done: the previous conversion in aside_dir goes below
    except BaseException:
        if moved:
            try:
                _rename_noreplace(aside, out)
                moved = False
            except OSError:
                pass
        if moved and not verified:  # somebody else's, and its place is taken: keep it, out of our cleanup's reach
            kept = out.parent / f".{out.name[:200]}.qvl-jax-kept-{secrets.token_hex(6)}"
            with contextlib.suppress(OSError):
                os.unlink(aside_dir / _OWNER_FILE)
            os.rename(aside_dir, kept)
            raise CheckpointError(f"{out} changed while converting and was replaced meanwhile: what was there is "
                                  f"kept at {kept / aside.name}; this conversion was discarded") from None
        raise
    finally:
        if not (moved and not verified):
            shutil.rmtree(aside_dir, ignore_errors=True)


def _copy_file(src: Path, dst: Path) -> dict[str, object]:
    """Copies the bytes (not the mode: the umask decides); returns their size and sha256."""
    sha, size = hashlib.sha256(), 0
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        while chunk := fi.read(1 << 20):
            fo.write(chunk)
            sha.update(chunk)
            size += len(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    return {"bytes": size, "sha256": sha.hexdigest()}


def _write_conversion(plan: Plan, tmp: Path) -> None:
    """Writes params, copied files and the manifest into the (new, empty but for its owner file) `tmp`."""
    hf_dir = plan.hf_dir
    reader = _Reader()
    try:
        _check_tied(plan, reader)
        dtypes = sorted({str(t.dtype) for t in plan.targets})
        metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
        sha = hashlib.sha256()
        written = 0
        with open(tmp / PARAMS_FILE, "xb") as f, _progress(plan.nbytes, f"converting {hf_dir.name}") as bar:
            head = _header(plan, metadata)
            f.write(head)
            sha.update(head)
            for _, arr in iter_target_chunks(plan, reader):
                # One tensor at a time, written from its own buffer (no bytes copy): host memory stays
                # at about two tensors (the one read and its converted layout) whatever the model size.
                data = arr.reshape(-1).view(np.uint8)
                f.write(data)
                sha.update(data)
                written += data.size
                bar.update(data.size)
            f.flush()
            os.fsync(f.fileno())
    finally:
        reader.close()
    if written != plan.nbytes:  # cannot happen unless the plan and the data disagree
        raise CheckpointError(f"internal error: wrote {written} bytes, planned {plan.nbytes}")
    files = {PARAMS_FILE: {"bytes": len(head) + written, "sha256": sha.hexdigest()}}
    for name in AUX_FILES:
        if (hf_dir / name).is_file():
            files[name] = _copy_file(hf_dir / name, tmp / name)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "params_file": PARAMS_FILE,
        "params_bytes": files[PARAMS_FILE]["bytes"],
        "params_sha256": files[PARAMS_FILE]["sha256"],
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "num_params": int(sum(np.prod(t.shape, dtype=np.int64) for t in plan.targets)),
        "tie_word_embeddings": plan.config.tie_word_embeddings,
        "source": str(hf_dir.resolve()),
        "files": files,  # every file of the directory but this manifest
    }
    with open(tmp / MANIFEST_FILE, "x", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.unlink(tmp / _OWNER_FILE)


def convert_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto",
                       force: bool = False) -> Path:
    """Converts an HF Qwen3-VL checkpoint directory into a qvl_jax directory; returns its path.

    Nothing is left at `out_dir` unless the whole conversion succeeds. `force=True` replaces only an
    earlier conversion (or an empty directory) at `out_dir`, and only the one it found at the start.
    The output may not be, contain or lie inside the source checkpoint. Every failure is a one-line
    CheckpointError (ResourceError for a full disk); KeyboardInterrupt removes the partial output.
    """
    out = Path(os.path.abspath(out_dir))
    try:
        _convert(Path(hf_dir), out, dtype, force)
    except OSError as e:
        raise _os_error(e, out) from None
    return Path(out_dir)


def _convert(hf_dir: Path, out: Path, dtype: str, force: bool) -> None:
    if out.parent == out:
        raise CheckpointError(f"output directory {out} is a filesystem root: choose a directory below it")
    _check_not_overlapping(_source_dir(hf_dir), out)
    checked = _check_output(out, force)
    plan = make_plan(hf_dir, dtype)
    created = _make_parents(out.parent)
    tmp = None
    try:
        _remove_stale_work_dirs(out.parent)
        try:
            tmp = _make_work_dir(out.parent, out.name, "tmp")
        except PermissionError:
            raise CheckpointError(f"permission denied: cannot create directories in {out.parent}") from None
        _write_conversion(plan, tmp)
        _swap_in(tmp, out, checked)
        tmp = None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):  # the parents this call made, innermost first, while empty
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
