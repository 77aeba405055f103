"""Reading params into the model's NNX state: a converted qvl_jax directory (memory-mapped
safetensors) or, converted in memory, a Hugging Face checkpoint directory.

The abstract model (names, shapes; no memory) says what the state must hold; every tensor in the
file is checked against it from the header before anything is read, then read straight into its
Variable (into its NamedSharding under a mesh)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
from qvl_jax.convert.core import AUX_FILES, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE
from qvl_jax.convert.table import LAYOUT_METADATA, OUT_IN
from qvl_jax.errors import CheckpointError, ResourceError
from qvl_jax.files import temp_sibling
from qvl_jax.modeling.model import abstract_model, state_key
from qvl_jax.sharding import key_shardings


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
        if not isinstance(rec, dict) or _sha256(f) != rec.get("sha256"):
            raise CheckpointError(f"{f}: sha256 differs from the one recorded at conversion: the converted "
                                  "checkpoint was changed; convert it again")


def _check_header(f, params_file: Path, expected: dict[str, tuple], manifest: dict) -> None:
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
        dt = _ST_NAMES.get(t.get_dtype())
        if dt is None or (names and dt not in names):
            raise CheckpointError(f"{params_file}: param {key!r} has dtype {t.get_dtype()} but the manifest says "
                                  f"{dtypes}; convert the checkpoint again")


_ST_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _abstract(config: Qwen3VLConfig):
    graphdef, state = nnx.split(abstract_model(config))
    flat = {state_key(path): var for path, var in nnx.to_flat_state(state)}
    return graphdef, state, flat


def load_converted(path: Path, dtype: jnp.dtype | None = None, mesh=None, verify: bool = False):
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
    if verify:
        _verify_files(path, manifest, params_file)
    graphdef, state, flat = _abstract(config)
    shardings = None if mesh is None else _shardings(flat, mesh)
    try:
        with safetensors.safe_open(str(params_file), framework="numpy") as f:
            _check_header(f, params_file, {k: tuple(v.shape) for k, v in flat.items()}, manifest)
            _check_fits(f, params_file, dtype, shardings)
            for key, var in flat.items():
                if shardings is None:
                    arr = f.get_tensor(key)  # read from the memory map, one tensor at a time
                    var.set_value(jax.device_put(arr if dtype is None else arr.astype(dtype)))
                else:
                    var.set_value(_load_sharded(f.get_slice(key), shardings[key], dtype))
    except (CheckpointError, ResourceError):
        raise
    except Exception as e:
        raise CheckpointError(f"{params_file}: cannot read params ({str(e).splitlines()[0]})") from None
    return config, graphdef, state


_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}


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
        itemsize = jnp.dtype(dtype).itemsize if dtype is not None else _ITEMSIZE.get(tensor.get_dtype(), 4)
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
               mesh=None, verify: bool = False) -> tuple[Qwen3VLConfig, nnx.GraphDef, nnx.State]:
    """(config, graphdef, Param state) from a converted directory or a Hugging Face checkpoint
    directory: `nnx.merge(graphdef, state)` is the model.

    mesh: place each param straight into its NamedSharding (qvl_jax.sharding) instead of one device.
    verify: for a converted directory, also recompute the sha256 of the params file and of every
    file the manifest lists (reads them once); by default only the params file's size is checked."""
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
    refused unless it is empty."""
    if source_dir is None or not (Path(source_dir) / "config.json").is_file():
        raise CheckpointError("save_pretrained needs the config.json of the checkpoint the model was loaded "
                              "from; this model was not loaded from a directory")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(f"{directory} already exists and is not empty; choose another directory")
    tmp = temp_sibling(directory)
    try:
        tensors = {state_key(path): np.asarray(var[...]) for path, var in nnx.to_flat_state(state)}
        metadata = {"format": "pt"}
        if any(".mlp.experts." in key for key in tensors):
            # The experts are written in transformers 5's layout, whatever config.json's
            # transformers_version says: declared, so that reading them back never guesses.
            metadata[LAYOUT_METADATA] = OUT_IN
        save_file(tensors, str(tmp / HF_WEIGHTS_FILE), metadata=metadata)
        for name in AUX_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copyfile(Path(source_dir) / name, tmp / name)
        if directory.exists():
            directory.rmdir()  # empty, checked above
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
