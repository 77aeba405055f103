"""The causal-LM loss exactly as transformers computes it: logits shifted by one, cross-entropy in
float32 over the labels that are not -100, mean over those tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100


def loss_sum_and_count(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of counted tokens) of logits [b, t, V] for labels [b, t]: the
    logits at position i predict labels[i + 1]. Summed rather than averaged so that gradient
    accumulation over micro-batches can divide by the total count once."""
    logits = logits[:, :-1].astype(jnp.float32)
    target = labels[:, 1:]
    keep = target != IGNORE
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(keep, target, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(keep, picked, 0.0)), jnp.sum(keep)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    total, count = loss_sum_and_count(logits, labels)
    return total / jnp.maximum(count, 1)
