"""Reading params into the model's NNX state: a converted qvl_jax directory (memory-mapped
safetensors) or, converted in memory, a Hugging Face checkpoint directory.

A converted directory may hold quantized weights (`save_quantized`; its manifest's "quantization"
names the mode): each quantized param KEY is stored as KEY.qvalue (int8; int4 values one per byte)
and KEY.scale, and is read back into a `qwix.QArray` as `qvl_jax.modeling.quant` defines it.

The abstract model (names, shapes; no memory) says what the state must hold; every tensor in the
file is checked against it from the header before anything is read, then read straight into its
Variable (into its NamedSharding under a mesh)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from flax import nnx
from safetensors.numpy import save_file

# safetensors.safe_open, errors.device_free_bytes and convert_core.load_hf_params are looked up on
# their modules at call time, where tests stub them.
from qvl_jax import errors
from qvl_jax.config import Qwen3VLConfig
from qvl_jax.convert import core as convert_core
from qvl_jax.convert.core import AUX_FILES, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, STAMP_FILE
from qvl_jax.convert.table import LAYOUT_METADATA, OUT_IN
from qvl_jax.errors import CheckpointError, ConfigError, ResourceError
from qvl_jax.files import new_directory, write_atomic
from qvl_jax.modeling import quant
from qvl_jax.modeling.model import abstract_model, state_key
from qvl_jax.sharding import key_shardings, to_host


def is_converted(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file()


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, absurdly nested
        raise CheckpointError(f"{path / MANIFEST_FILE}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path / MANIFEST_FILE}: {e.strerror or e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path / MANIFEST_FILE}: not a qvl_jax params manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in params format version {version}; this qvl_jax reads version "
            f"{FORMAT_VERSION}: convert the checkpoint again")
    return manifest


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def _verify_files(path: Path, manifest: dict, params_file: Path) -> None:
    """Recomputes the sha256 of the params file and of every other file the manifest lists."""
    expected = manifest.get("params_sha256")
    if not isinstance(expected, str):
        raise CheckpointError(f"{path / MANIFEST_FILE} records no params_sha256 to verify against; "
                              "convert the checkpoint again")
    if _sha256(params_file) != expected:
        raise CheckpointError(
            f"{params_file}: sha256 differs from the one recorded at conversion: the converted "
            "checkpoint was changed; convert it again")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise CheckpointError(f"{path / MANIFEST_FILE}: 'files' is not a mapping; convert the checkpoint again")
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (listed in {MANIFEST_FILE}); convert the checkpoint again")
        if not isinstance(rec, dict) or (expected if f == params_file else _sha256(f)) != rec.get("sha256"):
            raise CheckpointError(f"{f}: sha256 differs from the one recorded at conversion: the converted "
                                  "checkpoint was changed; convert it again")


# The verification stamp: what the files looked like (size, mtime, ctime, inode, device) when their
# hashes were last found equal to the manifest's (STAMP_FILE). A load whose files still look so skips the hashes;
# a conversion, a copy (new inodes and ctimes, even with mtimes preserved) or any write makes it
# stale, and the next load verifies again. The stamp only ever skips work for files that were
# verified: it is written after a verify that passed, from the stat taken before hashing, only if
# the files did not change while they were hashed, and not while a file's ctime is so recent that a
# write in the same clock tick (file systems stamp times coarsely) could leave it unchanged.
_STAMP_FORMAT = "qvl_jax-verified-1"
_RACY_NS = 1_000_000_000


def _file_states(path: Path, manifest: dict, params_file: Path) -> dict | None:
    """name -> [size, mtime_ns, ctime_ns, inode, device] of the manifest, the params file and every
    file the manifest lists (None if one cannot be stat'ed: verification will say what is wrong)."""
    files = manifest.get("files", {})
    names = [MANIFEST_FILE, params_file.name, *(sorted(files) if isinstance(files, dict) else [])]
    out = {}
    for name in names:
        try:
            st = os.stat(path / name)
        except (OSError, ValueError):
            return None
        out[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    return out


def _stamp_is_fresh(path: Path, states: dict | None) -> bool:
    if states is None:
        return False
    try:
        stamp = json.loads((path / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(stamp, dict) and stamp.get("format") == _STAMP_FORMAT and stamp.get("files") == states


def _write_stamp(path: Path, states: dict | None) -> None:
    if states is None:
        return
    try:
        write_atomic(path / STAMP_FILE, json.dumps({"format": _STAMP_FORMAT, "files": states}).encode())
    except OSError:
        pass  # a read-only directory: every load verifies, as it would have without the stamp


def verify_checkpoint(path: Path, manifest: dict, params_file: Path, force: bool = False) -> bool:
    """Recomputes every hash the manifest records (CheckpointError if one differs), unless the
    stamp says these very files passed before and force is false. Returns whether it hashed."""
    now = time.time_ns()
    before = _file_states(path, manifest, params_file)
    if not force and _stamp_is_fresh(path, before):
        return False
    _verify_files(path, manifest, params_file)
    settled = before is not None and all(st[2] < now - _RACY_NS for st in before.values())
    if settled and _file_states(path, manifest, params_file) == before:  # unchanged while being hashed
        _write_stamp(path, before)
    return True


def verify_converted(path: str | os.PathLike) -> None:
    """Checks every file of a converted directory against the sha256 its manifest records
    (CheckpointError if one differs), whatever the stamp says, and refreshes the stamp."""
    path = Path(path)
    manifest = read_manifest(path)
    params_file = path / manifest.get("params_file", "params.safetensors")
    if not params_file.is_file():
        raise CheckpointError(f"{params_file} is missing")
    verify_checkpoint(path, manifest, params_file, force=True)


def _check_header(f, params_file: Path, expected: dict[str, tuple], manifest: dict,
                  int_keys: frozenset = frozenset()) -> None:
    """The file's tensors against the state the config implies (names, shapes) and the manifest
    (dtypes, tie flag), from the header alone: an edited config.json or header is an error, not
    a model that loads and answers wrongly."""
    keys = set(f.keys())
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
        parts = ([f"missing {len(missing)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"]
                 if missing else []) + (
            [f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"]
            if unexpected else [])
        raise CheckpointError(f"{params_file} does not match its config.json: params {'; '.join(parts)}; "
                              "was config.json edited after conversion? convert the checkpoint again")
    dtypes = manifest.get("dtype")
    dtypes = [dtypes] if isinstance(dtypes, str) else list(dtypes or [])
    names = {np.dtype(jnp.dtype(d)).name: d for d in dtypes if isinstance(d, str)}
    for key in sorted(keys):
        t = f.get_slice(key)
        shape = tuple(t.get_shape())
        if shape != expected[key]:
            raise CheckpointError(f"{params_file}: param {key!r} has shape {list(shape)} but config.json implies "
                                  f"{list(expected[key])}; convert the checkpoint again")
        if key in int_keys:
            if t.get_dtype() != "I8":
                raise CheckpointError(f"{params_file}: quantized values {key!r} have dtype {t.get_dtype()}, not "
                                      "int8; save the quantized checkpoint again")
            continue
        dt = _ST_NAMES.get(t.get_dtype())
        if dt is None or (names and dt not in names):
            raise CheckpointError(f"{params_file}: param {key!r} has dtype {t.get_dtype()} but the manifest says "
                                  f"{dtypes}; convert the checkpoint again")


_ST_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _abstract(config: Qwen3VLConfig):
    graphdef, state = nnx.split(abstract_model(config))
    flat = {state_key(path): var for path, var in nnx.to_flat_state(state)}
    return graphdef, state, flat


def load_converted(path: Path, dtype: jnp.dtype | None = None, mesh=None, verify: bool | None = None):
    """(config, graphdef, state) of a converted directory."""
    manifest = read_manifest(path)
    config = Qwen3VLConfig.from_json_file(path / "config.json")
    if manifest.get("tie_word_embeddings", config.tie_word_embeddings) != config.tie_word_embeddings:
        raise CheckpointError(f"{path / 'config.json'} says tie_word_embeddings={config.tie_word_embeddings} but "
                              f"the params were converted with {manifest.get('tie_word_embeddings')}; "
                              "convert the checkpoint again")
    params_file = path / manifest.get("params_file", "params.safetensors")
    if not params_file.is_file():
        raise CheckpointError(f"{params_file} is missing")
    size = params_file.stat().st_size
    if size != manifest.get("params_bytes"):
        raise CheckpointError(
            f"{params_file} is {size} bytes but was written as {manifest.get('params_bytes')}: "
            "the converted checkpoint was changed or truncated; convert it again")
    if verify is not False:
        verify_checkpoint(path, manifest, params_file, force=bool(verify))
    graphdef, state, flat = _abstract(config)
    mode, qkeys = _quantization(manifest, path, flat, mesh)
    shardings = None if mesh is None else _shardings(flat, mesh)
    expected = {k: tuple(v.shape) for k, v in flat.items() if k not in qkeys}
    for k in qkeys:
        expected[k + ".qvalue"] = tuple(flat[k].shape)
        expected[k + ".scale"] = quant.scale_shape(mode, tuple(flat[k].shape))
    try:
        with safetensors.safe_open(str(params_file), framework="numpy") as f:
            _check_header(f, params_file, expected, manifest, frozenset(k + ".qvalue" for k in qkeys))
            _check_fits(f, params_file, dtype, shardings)
            for key, var in flat.items():
                if key in qkeys:
                    scale = f.get_tensor(key + ".scale")
                    var.set_value(quant.from_stored(f.get_tensor(key + ".qvalue"),
                                                    scale if dtype is None else scale.astype(dtype), mode))
                elif shardings is None:
                    arr = f.get_tensor(key)  # read from the memory map, one tensor at a time
                    var.set_value(jax.device_put(arr if dtype is None else arr.astype(dtype)))
                else:
                    var.set_value(_load_sharded(f.get_slice(key), shardings[key], dtype))
    except (CheckpointError, ResourceError):
        raise
    except Exception as e:
        raise CheckpointError(f"{params_file}: cannot read params ({str(e).splitlines()[0]})") from None
    return config, graphdef, state


def _quantization(manifest: dict, path: Path, flat: dict, mesh) -> tuple[str | None, frozenset]:
    """(mode, the keys stored quantized) from a manifest's "quantization" record; (None, {}) without one."""
    rec = manifest.get("quantization")
    if rec is None:
        return None, frozenset()
    mode = rec.get("mode") if isinstance(rec, dict) else None
    if mode not in quant.QUANT_MODES:
        raise CheckpointError(f"{path / MANIFEST_FILE}: unknown quantization {rec!r}; save the checkpoint again")
    if mesh is not None:
        raise ConfigError(f"{path} holds {mode} weights: a mesh is not supported with them yet")
    return mode, frozenset(quant.quantized_keys(flat))


_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I8": 1}


def _check_fits(f, params_file: Path, dtype, shardings) -> None:
    """Refuses, before placing anything, params that will not fit in the free memory of one device
    (each device's own block where a mesh splits them)."""
    free = errors.device_free_bytes()
    if free is None:
        return
    need = 0
    for key in f.keys():
        tensor = f.get_slice(key)
        shape = tuple(tensor.get_shape())
        if shardings is not None and key in shardings:
            shape = shardings[key].shard_shape(shape)
        itemsize = (jnp.dtype(dtype).itemsize if dtype is not None and tensor.get_dtype() != "I8"
                    else _ITEMSIZE.get(tensor.get_dtype(), 4))
        need += int(np.prod(shape)) * itemsize
    if need > free:
        per = "each device" if shardings is not None else "the device"
        raise ResourceError(f"{params_file}: the params need {need / 2**30:.2f} GiB on {per} but "
                            f"{free / 2**30:.2f} GiB are free: split them over more devices (--tp) or "
                            "load them in bfloat16")


def _shardings(flat: dict, mesh) -> dict:
    return key_shardings(flat, mesh)


def _load_sharded(tensor, sharding, dtype) -> jax.Array:
    """A param placed straight into its sharding: each device's block is read from the memory-mapped
    file on its own (a block shared by several devices once), so no device, and no host buffer,
    ever holds more than one tensor, and a split param is never whole on one device."""
    shape = tuple(tensor.get_shape())
    blocks: dict = {}

    def read(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            block = tensor[tuple(index)] if shape else tensor[...]
            blocks[key] = np.asarray(block if dtype is None else block.astype(dtype))
        return blocks[key]

    return jax.make_array_from_callback(shape, sharding, read)


def load_state(path: str | os.PathLike, dtype: str | np.dtype | None = None,
               mesh=None, verify: bool | None = None) -> tuple[Qwen3VLConfig, nnx.GraphDef, nnx.State]:
    """(config, graphdef, Param state) from a converted directory or a Hugging Face checkpoint
    directory: `nnx.merge(graphdef, state)` is the model.

    mesh: place each param straight into its NamedSharding (qvl_jax.sharding) instead of one device.
    verify: for a converted directory, recompute the sha256 of the params file and of every file
    the manifest lists and compare them with the manifest's. None (default): once, on the first
    load after the files were written, copied or changed (a stamp, STAMP_FILE, records what the
    files looked like when they passed); True: on every load; False: never (the params file's
    size and header are checked either way)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    np_dtype = None if dtype is None else jnp.dtype(dtype)
    if is_converted(path):
        return load_converted(path, np_dtype, mesh, verify)
    if (path / "params.safetensors").is_file():
        raise CheckpointError(f"{path} holds params.safetensors but no {MANIFEST_FILE} manifest: "
                              "the converted checkpoint is incomplete; convert it again")
    if (path / "config.json").is_file():
        config, arrays = convert_core.load_hf_params(path, "auto" if np_dtype is None else str(np_dtype))
        graphdef, state, flat = _abstract(config)
        shardings = {} if mesh is None else _shardings(flat, mesh)
        for key, var in flat.items():  # the converter checked names and shapes against the same config
            # device_put of a host array with a NamedSharding copies only each device's block.
            var.set_value(jax.device_put(arrays.pop(key), shardings.get(key)))
        return config, graphdef, state
    raise CheckpointError(f"{path} is neither a converted qvl_jax directory ({MANIFEST_FILE}) "
                          "nor a Hugging Face checkpoint (config.json)")


HF_WEIGHTS_FILE = "model.safetensors"


def save_hf(state: nnx.State, source_dir, directory) -> Path:
    """Writes `state` as a Hugging Face checkpoint: model.safetensors under the state paths (which are
    HF's keys), and config.json plus the tokenizer and processor files copied from `source_dir`.
    Written whole into a temporary sibling and renamed into place; an existing `directory` is
    refused unless it is empty. Under a mesh over several hosts every process must call it; the
    first process writes."""
    if source_dir is None or not (Path(source_dir) / "config.json").is_file():
        raise CheckpointError("save_pretrained needs the config.json of the checkpoint the model was loaded "
                              "from; this model was not loaded from a directory")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(f"{directory} already exists and is not empty; choose another directory")
    # Gathered on every host of a mesh over several (a collective); the first process writes.
    tensors = {k: np.asarray(v) for k, v in to_host({state_key(path): var[...]
                                                     for path, var in nnx.to_flat_state(state)}).items()}
    if jax.process_index() != 0:
        return directory
    with new_directory(directory) as tmp:
        metadata = {"format": "pt"}
        if any(".mlp.experts." in key for key in tensors):
            # The experts are written in transformers 5's layout, whatever config.json's
            # transformers_version says: declared, so that reading them back never guesses.
            metadata[LAYOUT_METADATA] = OUT_IN
        save_file(tensors, str(tmp / HF_WEIGHTS_FILE), metadata=metadata)
        for name in AUX_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copyfile(Path(source_dir) / name, tmp / name)
    return directory


def save_quantized(state: nnx.State, mode: str, source_dir, directory) -> Path:
    """Writes a quantized `state` as a converted qvl_jax directory: params.safetensors (each quantized
    KEY as KEY.qvalue int8 and KEY.scale, every other param as it is), the manifest with its
    "quantization" record, and config.json plus the tokenizer and processor files copied from
    `source_dir`. Written whole into a temporary sibling and renamed into place; an existing
    `directory` is refused unless it is empty."""
    if source_dir is None or not (Path(source_dir) / "config.json").is_file():
        raise CheckpointError("save_quantized needs the config.json of the checkpoint the model was loaded "
                              "from; this model was not loaded from a directory")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(f"{directory} already exists and is not empty; choose another directory")
    with new_directory(directory) as tmp:
        tensors, dtypes, n = {}, set(), 0
        for key, var in quant.flat_vars(state, state_key).items():
            value = var.get_value()
            if quant.mode_of(value) is not None:
                tensors[key + ".qvalue"] = np.asarray(value.qvalue).astype(np.int8)
                tensors[key + ".scale"] = np.asarray(value.scale)
                dtypes.add(tensors[key + ".scale"].dtype.name)
            else:
                tensors[key] = np.asarray(value)
                dtypes.add(tensors[key].dtype.name)
            n += int(np.prod(value.shape))
        params_file = tmp / convert_core.PARAMS_FILE
        save_file(tensors, str(params_file), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
        del tensors
        files = {convert_core.PARAMS_FILE: {"bytes": params_file.stat().st_size, "sha256": _sha256(params_file)}}
        for name in AUX_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copyfile(Path(source_dir) / name, tmp / name)
                files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        config = Qwen3VLConfig.from_json_file(tmp / "config.json")
        dtypes = sorted(dtypes)
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "params_file": convert_core.PARAMS_FILE,
            "params_bytes": files[convert_core.PARAMS_FILE]["bytes"],
            "params_sha256": files[convert_core.PARAMS_FILE]["sha256"],
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "num_params": n,
            "tie_word_embeddings": config.tie_word_embeddings,
            "quantization": {"mode": mode, "int4_group": quant.INT4_GROUP, "rules": list(quant.QUANT_RULES)},
            "source": str(Path(source_dir).resolve()), "files": files,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return directory
