"""Masked losses, the one place that turns logits and a validity mask into a cross-entropy: per-token negative
log-likelihoods (nats, float32) and their mean over the tokens a mask keeps (0, never NaN, when it keeps none)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] in nats, float32. logits (..., K), targets (...) int -> (...)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over the positions where mask is True; 0 when there are none."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x.astype(jnp.float32) * m) / jnp.maximum(jnp.sum(m), 1.0)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats) over the positions where mask is True. logits (..., K), targets and mask (...)."""
    return masked_mean(token_nll(logits, targets), mask)
