"""Hugging Face safetensors -> qvl_jax param tree: planning, streaming conversion, writing.

The conversion is planned before any tensor data is read: every HF key is matched against the key
table (`convert.table`), its dtype and shape are checked, and unknown, missing and duplicate keys are
reported together. Then each target array is produced one source tensor at a time and streamed to the
output file, so host memory stays at about one tensor whatever the checkpoint size.

Output (a directory): `params.safetensors` (flat keys joined by '/', stacked layers), the checkpoint's
`config.json` and tokenizer/processor files, and `qvl_jax.json` (format version, dtype, size, sha256).
It is written into a temporary sibling directory and renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from qvl_jax.convert.table import TIED_LM_HEAD, TIED_SOURCE, Rule, rules_for
from qvl_jax.config import Qwen3VLConfig
from qvl_jax.errors import CheckpointError

FORMAT_NAME = "qvl_jax.params"
FORMAT_VERSION = 2  # 2: Linear weights in [out, in] layout under "weight" (1: flax [in, out] "kernel")
MANIFEST_FILE = "qvl_jax.json"
PARAMS_FILE = "params.safetensors"
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
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="numpy")
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file {path}") from None
    except Exception as e:  # safetensors raises its own error type for bad headers and truncation
        raise CheckpointError(f"{path.name}: not a valid safetensors file ({str(e).splitlines()[0]})") from None


def _checkpoint_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
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
            for key in f.keys():
                sl = f.get_slice(key)
                canon = _canonical(key)
                if canon in sources:
                    raise CheckpointError(
                        f"duplicate tensor {key!r}: in {sources[canon].file.name} and {path.name}")
                sources[canon] = SourceTensor(path, key, tuple(sl.get_shape()), sl.get_dtype())
    return sources


def make_plan(hf_dir: str | os.PathLike, dtype: str = "auto") -> Plan:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {hf_dir} does not exist")
    if dtype != "auto" and dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    config = Qwen3VLConfig.from_json_file(hf_dir / "config.json")
    sources = read_sources(hf_dir)

    rules = rules_for(config)
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
        except Exception as e:
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


def iter_target_chunks(plan: Plan, reader: _Reader) -> Iterator[tuple[Target, int, np.ndarray]]:
    """Yields (target, stack index or -1, converted array) one source tensor at a time."""
    for target in plan.targets:
        for i, src in enumerate(target.sources):
            arr = target.rule.transform.apply(reader.get(src))
            expected = target.shape[1:] if target.rule.count is not None else target.shape
            assert arr.shape == expected, (target.key, arr.shape, expected)
            yield target, (i if target.rule.count is not None else -1), np.ascontiguousarray(arr, target.dtype)


def load_hf_params(hf_dir: str | os.PathLike, dtype: str = "auto") -> tuple[Qwen3VLConfig, dict[str, np.ndarray]]:
    """Converts a Hugging Face checkpoint in memory: (config, flat {key: array})."""
    plan = make_plan(hf_dir, dtype)
    reader = _Reader()
    flat: dict[str, np.ndarray] = {}
    try:
        _check_tied(plan, reader)
        for target, i, arr in iter_target_chunks(plan, reader):
            if i < 0:
                flat[target.key] = arr
            else:
                if i == 0:
                    flat[target.key] = np.empty(target.shape, target.dtype)
                flat[target.key][i] = arr
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
    from tqdm.auto import tqdm

    # disable=None: a live bar on a terminal, silence in logs and CI.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=None)


def convert_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto",
                       force: bool = False) -> Path:
    """Converts an HF Qwen3-VL checkpoint directory into a qvl_jax directory; returns its path.

    Nothing is left at `out_dir` unless the whole conversion succeeds. An existing `out_dir` is only
    replaced with `force=True`.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_dir.exists() and not force:
        raise CheckpointError(f"output directory {out_dir} already exists (use --force to replace it)")
    plan = make_plan(hf_dir, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    reader = _Reader()
    try:
        _check_tied(plan, reader)
        dtypes = sorted({str(t.dtype) for t in plan.targets})
        metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
        sha = hashlib.sha256()
        written = 0
        with open(tmp / PARAMS_FILE, "wb") as f, _progress(plan.nbytes, f"converting {hf_dir.name}") as bar:
            head = _header(plan, metadata)
            f.write(head)
            sha.update(head)
            for _, _, arr in iter_target_chunks(plan, reader):
                # One tensor at a time, written from its own buffer (no bytes copy): host memory stays
                # at about two tensors (the one read and its converted layout) whatever the model size.
                data = arr.reshape(-1).view(np.uint8)
                f.write(data)
                sha.update(data)
                written += data.size
                bar.update(data.size)
            f.flush()
            os.fsync(f.fileno())
        if written != plan.nbytes:  # cannot happen unless the plan and the data disagree
            raise CheckpointError(f"internal error: wrote {written} bytes, planned {plan.nbytes}")
        for name in AUX_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp / name)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "params_file": PARAMS_FILE,
            "params_bytes": (tmp / PARAMS_FILE).stat().st_size,
            "params_sha256": sha.hexdigest(),
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "num_params": int(sum(np.prod(t.shape, dtype=np.int64) for t in plan.targets)),
            "tie_word_embeddings": plan.config.tie_word_embeddings,
            "source": str(hf_dir.resolve()),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if out_dir.exists():  # force: swap in the new one, then drop the old
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        reader.close()
    return out_dir
