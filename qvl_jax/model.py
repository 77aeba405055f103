"""The whole model: embed -> splice vision features at pad tokens -> decoder -> lm_head.

`load(path)` gives a `Model` holding the config and the param pytree. `Model.logits` is the full
forward pass over a prompt; everything shape-dependent and data-dependent (3-D positions, where the
vision features go, padding to length buckets) is worked out on the host with numpy, so the jitted
functions see only arrays of bucketed shapes and the params as arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from qvl_jax import text
from qvl_jax.checkpoint import load_params
from qvl_jax.config import Qwen3VLConfig
from qvl_jax.errors import InputError


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= minimum): prompt lengths compile once per bucket."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def embed(params: dict, ids: jax.Array) -> jax.Array:
    return jnp.take(params["model"]["language_model"]["embed_tokens"]["embedding"], ids, axis=0)


def lm_head(params: dict, cfg: Qwen3VLConfig, h: jax.Array) -> jax.Array:
    if cfg.tie_word_embeddings:
        return jnp.einsum("btd,vd->btv", h, params["model"]["language_model"]["embed_tokens"]["embedding"])
    return jnp.einsum("btd,dv->btv", h, params["lm_head"]["kernel"])


def causal_mask(valid: jax.Array) -> jax.Array:
    """valid [b, t] -> [b, t, t]: query i sees key j when j <= i and j is a real token."""
    t = valid.shape[1]
    return jnp.tril(jnp.ones((t, t), dtype=bool))[None] & valid[:, None, :]


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward_logits(params: dict, cfg: Qwen3VLConfig, input_ids: jax.Array, positions: jax.Array,
                   valid: jax.Array) -> jax.Array:
    """Full-prompt forward: logits [b, t, vocab] in float32."""
    x = embed(params, input_ids)
    h, _ = text.decoder(params["model"]["language_model"], cfg.text, x, positions, causal_mask(valid))
    return lm_head(params, cfg, h).astype(jnp.float32)


def text_positions(attention_mask: np.ndarray) -> np.ndarray:
    """[b, t] mask -> [3, b, t] positions counting real tokens only (pads get 0), t = h = w."""
    pos = np.cumsum(attention_mask, axis=-1) - 1
    pos = np.where(attention_mask > 0, pos, 0)
    return np.broadcast_to(pos[None], (3, *pos.shape)).astype(np.int32)


def _as_batch(name: str, value, dtype_kind: str = "iu") -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as e:  # ragged lists and the like
        raise InputError(f"{name} must be an array of shape [batch, length] ({e})") from None
    if arr.dtype.kind not in dtype_kind:
        raise InputError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InputError(f"{name} must have shape [batch, length] with length > 0, got {list(arr.shape)}")
    return arr


@dataclasses.dataclass
class Model:
    """A loaded Qwen3-VL model: `config`, `params` (the param pytree) and the inference entry points."""

    config: Qwen3VLConfig
    params: dict

    def _prepare(self, input_ids, attention_mask):
        ids = _as_batch("input_ids", input_ids)
        vocab = self.config.text.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise InputError(f"input_ids must lie in [0, {vocab}), got values in [{ids.min()}, {ids.max()}]")
        if attention_mask is None:
            mask = np.ones_like(ids, dtype=np.int32)
        else:
            mask = _as_batch("attention_mask", attention_mask, "iub")
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask shape {list(mask.shape)} != input_ids shape {list(ids.shape)}")
            if not np.isin(mask, (0, 1)).all():
                raise InputError("attention_mask must hold only 0 and 1")
            if not mask.any(axis=1).all():
                raise InputError("attention_mask has a row with no real tokens")
            mask = mask.astype(np.int32)
        return ids.astype(np.int32), mask

    def logits(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None, mm_token_type_ids=None) -> np.ndarray:
        """Logits of every prompt position: np.float32 [batch, length, vocab]."""
        if pixel_values is not None or pixel_values_videos is not None:
            raise InputError("image and video inputs are not supported yet")
        ids, mask = self._prepare(input_ids, attention_mask)
        positions = text_positions(mask)
        b, t = ids.shape
        tb = bucket_length(t)
        pad = ((0, 0), (0, tb - t))
        out = forward_logits(self.params, self.config, jnp.asarray(np.pad(ids, pad)),
                             jnp.asarray(np.pad(positions, ((0, 0), *pad))), jnp.asarray(np.pad(mask, pad) > 0))
        return np.asarray(out[:, :t])


def load(path: str | os.PathLike, dtype=None, mesh=None) -> Model:
    """Loads a converted qvl_jax directory, or a Hugging Face checkpoint directory (converted in memory).

    dtype: cast every param to this dtype on load (default: as stored).
    """
    if mesh is not None:
        raise NotImplementedError("loading under a mesh is not implemented yet")
    config, params = load_params(path, dtype)
    return Model(config, params)
