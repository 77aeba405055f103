"""Reading params: a converted qvl_jax directory (memory-mapped safetensors) or, converted in memory,
a Hugging Face checkpoint directory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qvl_jax.config import Qwen3VLConfig
from qvl_jax.errors import CheckpointError, ResourceError

from qvl_jax.convert.core import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def is_converted(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file()


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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


def load_converted(path: Path, dtype: jnp.dtype | None = None, mesh=None,
                   verify: bool = False) -> tuple[Qwen3VLConfig, dict]:
    from safetensors import safe_open

    manifest = read_manifest(path)
    config = Qwen3VLConfig.from_json_file(path / "config.json")
    params_file = path / manifest.get("params_file", "params.safetensors")
    if not params_file.is_file():
        raise CheckpointError(f"{params_file} is missing")
    size = params_file.stat().st_size
    if size != manifest.get("params_bytes"):
        raise CheckpointError(
            f"{params_file} is {size} bytes but was written as {manifest.get('params_bytes')}: "
            "the converted checkpoint was changed or truncated; convert it again")
    if verify:
        expected = manifest.get("params_sha256")
        if not isinstance(expected, str):
            raise CheckpointError(f"{path / MANIFEST_FILE} records no params_sha256 to verify against; "
                                  "convert the checkpoint again")
        if _sha256(params_file) != expected:
            raise CheckpointError(
                f"{params_file}: sha256 differs from the one recorded at conversion: the converted "
                "checkpoint was changed; convert it again")
    shardings = None if mesh is None else _shardings(config, mesh)
    flat = {}
    try:
        with safe_open(str(params_file), framework="numpy") as f:
            _check_fits(f, params_file, dtype, shardings)
            for key in f.keys():
                if shardings is None:
                    arr = f.get_tensor(key)  # read from the memory map, one tensor at a time
                    flat[key] = jax.device_put(arr if dtype is None else arr.astype(dtype))
                elif key not in shardings:
                    raise CheckpointError(f"{params_file}: unexpected param {key!r} for this config")
                else:
                    flat[key] = _load_sharded(f.get_slice(key), shardings[key], dtype)
    except (CheckpointError, ResourceError):
        raise
    except Exception as e:
        raise CheckpointError(f"{params_file}: cannot read params ({str(e).splitlines()[0]})") from None
    return config, unflatten(flat)


_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}


def _check_fits(f, params_file: Path, dtype, shardings) -> None:
    """Refuses, before placing anything, params that will not fit in the free memory of one device
    (each device's own block where a mesh splits them)."""
    from qvl_jax.errors import device_free_bytes

    free = device_free_bytes()
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


def _shardings(config: Qwen3VLConfig, mesh) -> dict:
    from qvl_jax.sharding import flat_param_shardings

    return flat_param_shardings(config, mesh)


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


def load_params(path: str | os.PathLike, dtype: str | np.dtype | None = None,
                mesh=None, verify: bool = False) -> tuple[Qwen3VLConfig, dict]:
    """(config, params) from a converted directory or a Hugging Face checkpoint directory.

    mesh: place each param straight into its NamedSharding (qvl_jax.sharding) instead of one device.
    verify: for a converted directory, also recompute the params file's sha256 and compare it with
    the manifest's (reads the whole file once); by default only its size is checked."""
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
        from qvl_jax.convert.core import load_hf_params

        config, flat = load_hf_params(path, "auto" if np_dtype is None else str(np_dtype))
        shardings = {} if mesh is None else _shardings(config, mesh)
        # device_put of a host array with a NamedSharding copies only each device's block.
        return config, unflatten({k: jax.device_put(v, shardings.get(k)) for k, v in flat.items()})
    raise CheckpointError(f"{path} is neither a converted qvl_jax directory ({MANIFEST_FILE}) "
                          "nor a Hugging Face checkpoint (config.json)")
