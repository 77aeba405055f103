"""LoRA as PEFT defines it, on the NNX module tree: y = W x (+ b) + scaling * B (A x), A [r, in],
B [out, r], scaling = alpha / r (alpha / sqrt(r) with rslora), B zero at the start.

`apply_lora` swaps each targeted `Linear` for a `LoraLinear` holding the same base Params plus the
adapter's, matched by PEFT's rule (a module whose dotted path equals a target or ends with
"." + target; a string target is a regex over the whole path). Adapter Params are `LoraParam`, a
Param subtype, so `nnx.split(module, LoraParam, ...)` separates what LoRA trains.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qvl_jax.errors import ConfigError
from qvl_jax.modeling.layers import Linear


class LoraParam(nnx.Param):
    """A LoRA adapter weight (lora_A or lora_B): the trainable part under LoRA."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 8.0
    target_modules: Sequence[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError(f"LoRA alpha must be a finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must lie in [0, 1), got {self.dropout!r}")
        if self.dropout:
            raise ConfigError("LoRA dropout > 0 is not supported yet (train with dropout=0.0)")
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                raise ConfigError(f"LoRA target_modules regex {targets!r} is invalid ({e})") from None
        else:
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ConfigError(f"LoRA target_modules must be module names, got {targets!r}")
            object.__setattr__(self, "target_modules", tuple(targets))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches(self, path: str) -> bool:
        """PEFT's rule: the whole dotted path, or its tail after a dot, names a target."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, path) is not None
        return path in self.target_modules or any(path.endswith("." + t) for t in self.target_modules)


class LoraLinear(nnx.Module):
    """A Linear with a LoRA adapter. `base` keeps the original module (its weight and bias Params
    unchanged), so merging back or dropping the adapter is a swap."""

    def __init__(self, base: Linear, r: int, scaling: float, *, rngs: nnx.Rngs):
        out, *inp = base.weight[...].shape
        fan_in = int(math.prod(inp))
        self.base = base
        # As PEFT: A kaiming-uniform (a = sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); B zero.
        bound = 1.0 / math.sqrt(fan_in)
        dtype = base.weight[...].dtype
        self.lora_A = LoraParam(jax.random.uniform(rngs.params(), (r, fan_in), jnp.float32, -bound, bound).astype(dtype))
        self.lora_B = LoraParam(jnp.zeros((out, r), dtype))
        self.scaling = float(scaling)

    def __call__(self, x: jax.Array, out_shape: tuple[int, ...] | None = None) -> jax.Array:
        y = self.base(x)
        a = jax.lax.dot_general(x, self.lora_A[...], (((x.ndim - 1,), (1,)), ((), ())))
        y = y + jax.lax.dot_general(a, self.lora_B[...], (((a.ndim - 1,), (1,)), ((), ()))) * self.scaling
        return y if out_shape is None else y.reshape(*x.shape[:-1], *out_shape)

    def merged(self) -> Linear:
        """The base Linear with W + scaling * B A folded in (a new weight; the adapter is gone)."""
        w = self.base.weight.get_value()
        if not isinstance(w, jax.Array):
            raise ConfigError("a LoRA adapter cannot be folded into quantized weights; keep it separate")
        delta = (self.lora_B[...].astype(jnp.float32) @ self.lora_A[...].astype(jnp.float32)) * self.scaling
        self.base.weight.set_value((w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype))
        return self.base


def _linears(module: nnx.Module, prefix: str = ""):
    """(parent, attribute or index, dotted path, child) of every Linear / LoraLinear in the tree."""
    children = (enumerate(module) if isinstance(module, nnx.List)
                else ((k, v) for k, v in vars(module).items() if isinstance(v, nnx.Module)))
    for key, child in list(children):
        path = f"{prefix}{key}"
        if isinstance(child, (Linear, LoraLinear)):
            yield module, key, path, child
        elif isinstance(child, nnx.Module):
            yield from _linears(child, path + ".")


def _set(parent, key, value):
    if isinstance(parent, nnx.List):
        parent[key] = value
    else:
        setattr(parent, key, value)


def lora_paths(module: nnx.Module, cfg: LoraConfig) -> list[str]:
    return [path for _, _, path, _ in _linears(module) if cfg.matches(path)]


def apply_lora(module: nnx.Module, cfg: LoraConfig, seed: int = 0) -> list[str]:
    """Wraps every Linear that cfg targets in place; returns their paths. A target that matches no
    module, or that names a module LoRA cannot wrap, is a ConfigError."""
    rngs = nnx.Rngs(seed)
    done = []
    for parent, key, path, child in _linears(module):
        if not cfg.matches(path):
            continue
        if isinstance(child, LoraLinear):
            raise ConfigError(f"{path} already has a LoRA adapter")
        if path.endswith("patch_embed.proj"):
            raise ConfigError("LoRA on the Conv3d patch embedding (visual.patch_embed.proj) is not supported")
        _set(parent, key, LoraLinear(child, cfg.r, cfg.scaling, rngs=rngs))
        done.append(path)
    if not done:
        raise ConfigError(f"LoRA target_modules {cfg.target_modules!r} match no Linear module of this model "
                          "(names as in transformers: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, "
                          "qkv, proj, linear_fc1, linear_fc2, lm_head)")
    return done


def merge_lora(module: nnx.Module) -> int:
    """Folds every adapter into its base weight in place (W + scaling * B A); returns how many."""
    n = 0
    for parent, key, _, child in _linears(module):
        if isinstance(child, LoraLinear):
            _set(parent, key, child.merged())
            n += 1
    return n


def lora_modules(module: nnx.Module) -> dict[str, LoraLinear]:
    return {path: child for _, _, path, child in _linears(module) if isinstance(child, LoraLinear)}
