"""Segment kernels (docs/ARCHITECTURE.md 3.2 step 3, 3.4, 8), pure functions linear in S: `entropy_segments` cuts
rows where the entropy model's bits jump (with the overflow merge into the last slot), and `segment_softmax_pool`
takes a softmax-weighted sum of values within each segment by segment reductions. The learned-query pooling module
that uses the latter is in compressor.py."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Segments:
    seg_id: jax.Array  # (B, S) int32, non-decreasing from 0; segments past the last slot merged into it
    patch_end_mask: jax.Array  # (B, S) bool, True on the last real token of each segment
    first_idx: jax.Array  # (B, S) int32, index of the first token of each token's segment
    num_segments: jax.Array  # (B,) int32, segments that hold real tokens (after merging), <= max_segments
    overflow: jax.Array  # (B,) bool, the row had more segments than slots (the last slot absorbed the rest)


def entropy_segments(
    bits: jax.Array,
    key_pad: jax.Array,
    *,
    delta: float,
    abs_threshold: float | None,
    max_segments: int,
) -> Segments:
    """Cut rows where the entropy jumps.

    bits: (B, S) float; key_pad: (B, S) bool True at PAD. Token t >= 1 starts a segment when
    bits[t] > bits[t-1] + delta, or (abs_threshold set) bits[t] > abs_threshold. Token 0 starts segment 0. PAD tokens
    never start a segment. Segments beyond `max_segments` merge into the last one. No gradient flows.
    """
    chex.assert_rank(bits, 2)
    chex.assert_equal_shape([bits, key_pad])
    bits = jax.lax.stop_gradient(bits.astype(jnp.float32))
    b, s = bits.shape
    real = ~key_pad
    jump = bits[:, 1:] > bits[:, :-1] + delta
    if abs_threshold is not None:
        jump |= bits[:, 1:] > abs_threshold
    first_real = real & (jnp.cumsum(real.astype(jnp.int32), axis=1) == 1)  # token 0 unless the row starts with PAD
    start = (first_real | jnp.concatenate([jnp.zeros((b, 1), bool), jump], axis=1)) & real  # (B, S)
    raw = jnp.cumsum(start.astype(jnp.int32), axis=1) - 1  # -1 before the first start (all-PAD prefix)
    raw_count = raw[:, -1] + 1
    seg_id = jnp.clip(raw, 0, max_segments - 1)
    overflow = raw_count > max_segments
    num_segments = jnp.minimum(raw_count, max_segments)
    # A token starts a (merged) segment if it is real and its clipped id differs from the previous token's.
    new_seg = real & jnp.concatenate([jnp.ones((b, 1), bool), seg_id[:, 1:] != seg_id[:, :-1]], axis=1)
    new_seg = new_seg & start
    next_starts = jnp.concatenate([new_seg[:, 1:], jnp.ones((b, 1), bool)], axis=1)
    next_pad = jnp.concatenate([key_pad[:, 1:], jnp.ones((b, 1), bool)], axis=1)
    patch_end = real & (next_starts | next_pad)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    first_idx = jax.lax.cummax(jnp.where(new_seg, pos, 0), axis=1)
    return Segments(
        seg_id=seg_id.astype(jnp.int32),
        patch_end_mask=patch_end,
        first_idx=first_idx,
        num_segments=num_segments.astype(jnp.int32),
        overflow=overflow,
    )


def segment_softmax_pool(
    scores: jax.Array,
    values: jax.Array,
    seg_id: jax.Array,
    token_valid: jax.Array,
    num_segments: int,
) -> jax.Array:
    """Per-segment softmax attention pooling, linear in S (segment reductions, no (Q, S) score matrix).

    scores: (B, S, L, N) score of token s for template row l and head n; values: (B, S, N, H);
    seg_id: (B, S) in [0, num_segments); token_valid: (B, S) (PAD tokens are excluded).
    Returns (B, num_segments, L, N, H); a segment with no valid token pools to zero.
    """
    b, s, lq, n = scores.shape
    h = values.shape[-1]
    buckets = num_segments + 1  # the extra bucket collects PAD tokens and is dropped
    gid = (jnp.arange(b)[:, None] * buckets + jnp.where(token_valid, seg_id, num_segments)).reshape(-1)
    total = b * buckets
    sc = scores.reshape(b * s, lq, n).astype(jnp.float32)
    seg_max = jax.ops.segment_max(jax.lax.stop_gradient(sc), gid, num_segments=total)  # (G, L, N)
    valid = token_valid.reshape(-1, 1, 1)
    e = jnp.where(valid, jnp.exp(jnp.where(valid, sc - seg_max[gid], 0.0)), 0.0)
    denom = jax.ops.segment_sum(e, gid, num_segments=total)  # (G, L, N)
    denom_t = denom[gid]
    w = e / jnp.where(denom_t > 0, denom_t, 1.0)  # (B*S, L, N)
    # the weighted sum accumulates in float32 whatever the values' dtype (a bfloat16 scatter-add would round at every
    # token of the segment); the result comes back in the values' dtype
    # an einsum, not a broadcast product: its gradient with respect to w is then a dot, not a multiply-reduce over H
    # (which XLA CPU's fused reduction ran ~50x slower at 32k tokens)
    contrib = jnp.einsum("tln,tnh->tlnh", w, values.reshape(b * s, n, h).astype(jnp.float32))  # (B*S, L, N, H)
    pooled = jax.ops.segment_sum(contrib, gid, num_segments=total)  # (G, L, N, H)
    return pooled.reshape(b, buckets, lq, n, h)[:, :num_segments].astype(values.dtype)
