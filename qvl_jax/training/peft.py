"""LoRA adapters in PEFT's format, both ways: `adapter_config.json` and `adapter_model.safetensors`
with keys `base_model.model.<module path>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r], the
module paths being transformers' (which are ours)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from qvl_jax.errors import CheckpointError, ConfigError
from qvl_jax.files import temp_sibling
from qvl_jax.sharding import to_host
from qvl_jax.training.lora import LoraConfig, apply_lora, lora_modules, lora_paths

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def save_adapter(module, cfg: LoraConfig, directory, base_model: str | None = None) -> Path:
    """Writes the adapters of `module` (written whole into a temporary sibling, then renamed). Under
    a mesh over several hosts every process must call it; the first process writes."""
    directory = Path(directory)
    tensors = {}
    for path, mod in lora_modules(module).items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = mod.lora_A[...]
        tensors[f"{PREFIX}{path}.lora_B.weight"] = mod.lora_B[...]
    tensors = {k: np.asarray(v) for k, v in to_host(tensors).items()}  # gathered on every host of a mesh
    if not tensors:
        raise ConfigError("the model has no LoRA adapters to save")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora, "bias": "none", "fan_in_fan_out": False,
        "target_modules": (cfg.target_modules if isinstance(cfg.target_modules, str)
                           else sorted(cfg.target_modules)),
        "base_model_name_or_path": base_model, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None,
    }
    if jax.process_index() != 0:  # under a mesh over several hosts, the first one writes
        return directory
    tmp = temp_sibling(directory)
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if directory.exists():  # replace an earlier adapter only
            if not (directory / CONFIG_FILE).is_file():
                raise CheckpointError(f"{directory} exists and is not a PEFT adapter directory; choose another")
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                os.replace(tmp / name, directory / name)
            tmp.rmdir()
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_adapter(directory) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """(config, {module path: (A, B)}) of a PEFT LoRA adapter directory, checked."""
    directory = Path(directory)
    cfg_file, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{directory} is not a PEFT adapter directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file}: not a JSON object")
    if raw.get("peft_type") != "LORA":
        raise ConfigError(f"{cfg_file}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise ConfigError(f"{cfg_file}: per-module {key} is not supported")
    if raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
        raise ConfigError(f"{cfg_file}: adapters that train biases or whole modules are not supported")
    if raw.get("fan_in_fan_out"):
        raise ConfigError(f"{cfg_file}: fan_in_fan_out adapters are not supported")
    try:
        # Dropout only acts while training: an adapter trained with it applies as any other.
        cfg = LoraConfig(r=raw.get("r"), alpha=raw.get("lora_alpha", raw.get("r")),
                         target_modules=raw.get("target_modules"), use_rslora=bool(raw.get("use_rslora", False)))
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # a truncated or foreign file: one line
        raise CheckpointError(f"{weights}: cannot read ({str(e).splitlines()[0]})") from None
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        name = key.replace(".default.", ".")
        if not name.startswith(PREFIX) or not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise CheckpointError(f"{weights}: unexpected tensor {key!r} (not a LoRA A/B weight)")
        path, which = name[len(PREFIX):].rsplit(".", 2)[0], name.rsplit(".", 2)[1]
        pairs.setdefault(path, {})[which] = arr
    for path, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{weights}: {path} has {sorted(ab)} but needs lora_A and lora_B")
    return cfg, {p: (ab["lora_A"], ab["lora_B"]) for p, ab in pairs.items()}


def load_adapter_into(module, directory) -> LoraConfig:
    """Adds the adapter of `directory` to `module` in place; returns its config. Every module the
    adapter holds weights for must exist with matching shapes, and every module its target list
    names must have weights."""
    cfg, weights = read_adapter(directory)
    ours = set(lora_paths(module, cfg))
    foreign = sorted(set(weights) - ours)
    if foreign:
        raise CheckpointError(f"{directory}: the adapter has weights for {foreign[0]!r}"
                              f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, which this model "
                              "does not have (an adapter for another model type?)")
    missing = sorted(ours - set(weights))
    if missing:
        raise CheckpointError(f"{directory}: its target_modules name {missing[0]!r} but it has no weights for it")
    apply_lora(module, cfg)
    for path, mod in lora_modules(module).items():
        a, b = weights[path]
        out, fan_in = mod.lora_B[...].shape[0], mod.lora_A[...].shape[1]
        if a.shape != (cfg.r, fan_in) or b.shape != (out, cfg.r):
            raise CheckpointError(f"{directory}: {path} has lora_A {list(a.shape)} / lora_B {list(b.shape)} but this "
                                  f"model needs {[cfg.r, fan_in]} / {[out, cfg.r]} (an adapter for other base shapes?)")
        dtype = mod.lora_A[...].dtype
        mod.lora_A.set_value(jnp.asarray(a, dtype))
        mod.lora_B.set_value(jnp.asarray(b, dtype))
    return cfg
