"""Weight-only quantization of the text decoder with qwix: int8 per output channel, int4 in groups.

A quantized weight is a `qwix.QArray` held in the same `nnx.Param` (same path, same logical axes):
`qvalue` [out, in] (int8, or int4) and `scale` [out, 1] (int8: one scale per output channel) or
[out, in / group] (int4: one scale per `group` consecutive inputs of an output channel), symmetric
(no zero point): scale = absmax / (qmax + 0.5) (qwix's symmetric bound: 127.5 for int8, 7.5 for
int4), values round(w / scale) clipped to [-qmax, qmax], scales in the weight's own dtype. This is qwix's PTQ format
(`qwix.quantize` with `channelwise_axes=[0]` and, for int4, `tiled_axes={1: group}`), and
`Linear` multiplies with `qwix.dot_general`, which dequantizes the weight into the dot in the
scale's dtype (`qvl_jax.modeling.layers.matmul_t`). The state keeps its tree shape apart from the
QArray's two leaves, so the jitted steps, which take the state's leaves, run unchanged.

Which weights: `QUANT_RULES`, regular expressions over a param's Hugging Face key. The decoder's
projections (q/k/v/o, gate/up/down) are quantized; the vision tower, every norm, every bias and the
embedding / lm_head stay in the working dtype.

Why not qwix's `quantize_model(model, PtqProvider(rules), *inputs)`: it intercepts `jax.lax.dot_general`
inside the module's `__call__` and recognises a weight only as the dot's right operand. On the CPU our
`matmul_t` puts the weight on the left for 2-128 rows, so a calibration call with a prompt quantizes
nothing; with one token it does replace the weights, but the result only runs inside the intercepted
`__call__`, while the jitted steps call `embed_inputs`, the decoder with a KV cache and `lm_logits`
separately (and `Linear`'s reshape of a `WithAux` weight fails). Quantizing the state by key with
qwix's own `quantize` and multiplying with its `dot_general` keeps qwix's format and numerics with
none of that.
"""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import qwix
from flax import nnx

from qvl_jax.errors import ConfigError

QUANT_MODES = ("int8", "int4")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
INT4_GROUP = 128  # inputs per int4 scale (fewer where the input width is not a multiple of it)

# Keys (HF names) of the weights that are quantized.
QUANT_RULES = (
    r"model\.language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight",
    r"model\.language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",
)


def check_mode(mode: str | None) -> str | None:
    """The mode, or a ConfigError naming the valid ones."""
    if mode is not None and mode not in QUANT_MODES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANT_MODES)} (or none), got {mode!r}")
    return mode


def is_quantized_key(key: str) -> bool:
    return any(re.fullmatch(rule, key) for rule in QUANT_RULES)


def group_size(mode: str, in_features: int) -> int | None:
    """Inputs per scale: None for int8 (one scale per output channel); for int4 the largest divisor
    of in_features up to INT4_GROUP, so that groups tile the input exactly."""
    if mode == "int8":
        return None
    return math.gcd(in_features, INT4_GROUP)


def scale_shape(mode: str, shape: tuple[int, int]) -> tuple[int, int]:
    out, inp = shape
    g = group_size(mode, inp)
    return (out, 1) if g is None else (out, inp // g)


def quantize_array(w, mode: str) -> qwix.QArray:
    """One [out, in] weight as a qwix QArray (scales in the weight's dtype)."""
    if w.ndim != 2:
        raise ConfigError(f"only [out, in] weights are quantized, got shape {tuple(w.shape)}")
    g = group_size(mode, w.shape[1])
    return qwix.quantize(w, QTYPES[mode], channelwise_axes=[0], tiled_axes={} if g is None else {1: g},
                         scale_dtype=w.dtype)


def from_stored(qvalue, scale, mode: str) -> qwix.QArray:
    """A QArray from stored arrays: qvalue as int8 (int4 values are stored one per byte), scale."""
    q = jnp.asarray(qvalue)
    return qwix.QArray(q.astype(QTYPES[mode]), jnp.asarray(scale), None, QTYPES[mode])


def mode_of(value) -> str | None:
    """"int8" / "int4" for a QArray of ours, None for a plain array."""
    if not isinstance(value, qwix.QArray):
        return None
    return {jnp.dtype(v): k for k, v in QTYPES.items()}.get(jnp.dtype(value.qtype))


def quantized_keys(flat: dict) -> list[str]:
    """The keys of a {key: Variable} map that QUANT_RULES select."""
    return [k for k in flat if is_quantized_key(k)]


def state_mode(flat: dict) -> str | None:
    """The quantization of a {key: Variable} map: None (float), or the one mode of its QArrays."""
    modes = {mode_of(var.get_value()) for var in flat.values()} - {None}
    if len(modes) > 1:
        raise ConfigError(f"the params mix quantizations {sorted(modes)}")
    return modes.pop() if modes else None


def quantize_flat(flat: dict, mode: str) -> int:
    """Quantizes, in place, every Variable of a {key: Variable} map that QUANT_RULES select;
    returns how many. Params already in this mode are left as they are."""
    check_mode(mode)
    n = 0
    for key in quantized_keys(flat):
        var = flat[key]
        value = var.get_value()
        if isinstance(value, qwix.QArray):
            if mode_of(value) != mode:
                raise ConfigError(f"{key} is already quantized as {mode_of(value)}; cannot quantize it as {mode}")
            continue
        var.set_value(quantize_array(value, mode))
        n += 1
    return n


def dequantize(value):
    """A plain array: a QArray dequantized (in its scale's dtype), anything else as it is."""
    return qwix.dequantize(value) if isinstance(value, qwix.QArray) else value


def flat_vars(state: nnx.State, key_of) -> dict:
    """{HF key: Variable} of a state (key_of: modeling.model.state_key)."""
    return {key_of(path): var for path, var in nnx.to_flat_state(state)}
