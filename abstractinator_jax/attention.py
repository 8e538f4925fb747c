"""Attention forms of ARCHITECTURE 3.1, on `jax.nn.dot_product_attention`.

Kernels (pure functions, inputs (B, T, N, H), `key_pad` True at PAD):
  - `sliding_window_attention`: causal, position t sees keys [t-W+1, t], never PAD keys. Queries are blocked into
    chunks of C that each see the C + W keys ending with the chunk, so cost and memory grow linearly in S.
    With implementation 'cudnn' the plain call with `local_window_size` is used instead (cuDNN skips masked tiles).
  - `causal_attention`: full causal, never PAD keys (top transformer; expander with d_window = 0).
  - `segment_cross_attention`: each query sees a small per-query set of memory rows (the rows of its own segment and
    `lookback` segments before it), gathered so that cost is linear in S.
A query that may see no key at all (PAD queries, empty rows) gets a zero output, never NaN.

Decoding (generation) keeps each self-attention's keys and values in a fixed-size `KVCache`: position p lives in slot
p % C, so a sliding-window layer needs only C = window slots (a ring buffer) and a full causal layer C = the longest
sequence it will see. `SelfAttention` fills one from a prompt (`cache=Prefill(max_len)`, the ordinary linear-time
forward pass plus a gather) and advances it one token at a time (`cache=<KVCache>`); both give the same outputs as the
full forward pass at every position.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from . import axes
from .layers import apply_rope, constrain, kernel_init, token_matmul

# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------


def _xla_attention(q, k, v, mask):
    """dot_product_attention (XLA) with a boolean mask broadcastable to (B, N, T, S); zero output for empty rows."""
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    any_key = jnp.any(mask, axis=-1)  # (B|1, N|1, T)
    any_key = jnp.broadcast_to(any_key, (q.shape[0], any_key.shape[1], q.shape[1]))
    any_key = jnp.swapaxes(any_key, 1, 2)[..., None]  # (B, T, N|1, 1)
    return jnp.where(any_key, out, jnp.zeros((), out.dtype))


def banded_causal_mask(t: int, window: int) -> jax.Array:
    """(T, T) True where key j is visible from query i: i - window < j <= i (window <= 0: full causal)."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    allowed = j <= i
    if window > 0:
        allowed &= j > i - window
    return allowed


def causal_attention(q, k, v, key_pad, *, window: int = 0, implementation: str = "xla"):
    """Dense causal attention (optionally banded to `window`); O(T^2): use for short sequences."""
    t = q.shape[1]
    if implementation == "cudnn":
        return _cudnn_attention(q, k, v, key_pad, window)
    mask = banded_causal_mask(t, window)[None, None] & ~key_pad[:, None, None, :]
    return _xla_attention(q, k, v, mask)


def _cudnn_attention(q, k, v, key_pad, window):
    # cuDNN expresses padding as per-row lengths: PAD must be a suffix of the row (our rows are BOS..EOS then PAD).
    lengths = jnp.sum(~key_pad, axis=-1).astype(jnp.int32)
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        local_window_size=(window - 1, 0) if window > 0 else None,
        implementation="cudnn",
    )
    return jnp.where(key_pad[:, :, None, None], jnp.zeros((), out.dtype), out)


def sliding_window_attention(q, k, v, key_pad, *, window: int, implementation: str = "xla", block: int | None = None):
    """Causal sliding-window attention, linear in T.

    q, k, v: (B, T, N, H); key_pad: (B, T) True at PAD. Position t attends to keys [t-window+1, t] that are not PAD.
    Queries are cut into blocks of C (default window // 4, at least 16); each block attends to the C + window keys
    that end with it, so the work per query is (C + window) keys instead of the 2 * window of window-sized blocks.
    """
    b, t, n, h = q.shape
    if implementation == "cudnn":
        return _cudnn_attention(q, k, v, key_pad, window)
    w = window
    if t <= 2 * w:  # short rows: the dense banded form is cheaper than blocking.
        return causal_attention(q, k, v, key_pad, window=w)
    c = block or min(w, max(16, w // 4))
    nb = -(-t // c)
    pad_t = nb * c - t
    if pad_t:
        q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
    # Keys/values with `window` leading slots (left context of block 0) and the tail padding.
    kv_pad = ((0, 0), (w, pad_t), (0, 0), (0, 0))
    kp, vp = jnp.pad(k, kv_pad), jnp.pad(v, kv_pad)
    padp = jnp.pad(key_pad, ((0, 0), (w, pad_t)), constant_values=True)
    idx = jnp.arange(nb)[:, None] * c + jnp.arange(c + w)[None, :]  # (nb, C+W): block i sees [i*C - W, i*C + C)
    kb = kp[:, idx].reshape(b * nb, c + w, n, h)
    vb = vp[:, idx].reshape(b * nb, c + w, n, h)
    # Query i of a block (absolute i0 + i) sees key j (absolute i0 - W + j) iff i < j <= i + W.
    i = jnp.arange(c)[:, None]
    j = jnp.arange(c + w)[None, :]
    band = (j > i) & (j <= i + w)  # (C, C+W)
    mask = band[None, None] & ~padp[:, idx][:, :, None, :]  # (B, nb, C, C+W)
    out = _xla_attention(q.reshape(b * nb, c, n, h), kb, vb, mask.reshape(b * nb, 1, c, c + w))
    return out.reshape(b, nb * c, n, h)[:, :t]


def visible_rows(q_row, row_valid, num_rows_visible: int):
    """The memory rows each query may see: (rows (B, T, C) clipped indices, oldest first; visible (B, T, C) bool).
    Query t sees rows q_row[t] - C + 1 .. q_row[t] that exist and are valid."""
    rows = q_row[:, :, None] - jnp.arange(num_rows_visible)[None, None, ::-1]  # (B, T, C)
    in_range = (rows >= 0) & (rows < row_valid.shape[1])
    rows_c = jnp.clip(rows, 0, row_valid.shape[1] - 1)
    visible = in_range & jnp.take_along_axis(row_valid[:, None, :], rows_c, axis=2)  # (B, T, C)
    return rows_c, visible


def gathered_attention(q, kg, vg, visible):
    """Each query attends to its own small set of keys. q: (B, T, N, H); kg, vg: (B, T, C, N, H); visible (B, T, C)."""
    b, t, n, h = q.shape
    c = kg.shape[2]
    out = _xla_attention(
        q.reshape(b * t, 1, n, h),
        kg.reshape(b * t, c, n, h),
        vg.reshape(b * t, c, n, h),
        visible.reshape(b * t, 1, 1, c),
    )
    return out.reshape(b, t, n, h)


def segment_cross_attention(q, k, v, q_row, row_valid, *, num_rows_visible: int):
    """Each query attends to memory rows q_row - num_rows_visible + 1 .. q_row that are valid.

    q: (B, T, N, H); k, v: (B, R, N, H) (RoPE already applied); q_row: (B, T) int, the last row query t may see;
    row_valid: (B, R) bool. Cost O(T * num_rows_visible): the visible rows are gathered per query.
    """
    rows_c, visible = visible_rows(q_row, row_valid, num_rows_visible)
    gather = jax.vmap(lambda x, idx: x[idx])  # (R, N, H), (T, C) -> (T, C, N, H)
    return gathered_attention(q, gather(k, rows_c), gather(v, rows_c), visible)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding caches
# ---------------------------------------------------------------------------------------------------------------------


@struct.dataclass
class KVCache:
    """Keys and values of one self-attention layer while decoding; position p lives in slot p % C."""

    k: jax.Array  # (B, C, N, H), RoPE applied at each key's own position
    v: jax.Array  # (B, C, N, H)
    valid: jax.Array  # (B, C) bool: the slot holds a real (non-PAD) key


@struct.dataclass
class Prefill:
    """Asks a self-attention (or a block or stack of them) to return its cache along with the full forward pass.
    `max_len` is the capacity of full causal layers (sliding-window layers keep `window` slots)."""

    max_len: int = struct.field(pytree_node=False)


def prefix_lengths(key_pad: jax.Array) -> jax.Array:
    """(B, T) -> (B,) one past each row's last non-PAD position: where decoding continues (0 for all-PAD rows)."""
    t = key_pad.shape[1]
    return jnp.max(jnp.where(~key_pad, jnp.arange(1, t + 1)[None], 0), axis=1).astype(jnp.int32)


def kv_cache_from_prefix(k, v, key_pad, capacity: int) -> KVCache:
    """The cache after the prefix k, v: (B, T, N, H), key_pad (B, T): slot s holds the latest position p < length
    with p % capacity == s (length = `prefix_lengths(key_pad)`); older positions and PAD keys are invalid."""
    b, t = key_pad.shape
    length = prefix_lengths(key_pad)[:, None]  # (B, 1)
    s = jnp.arange(capacity)[None, :]
    p = length - 1 - jnp.mod(length - 1 - s, capacity)  # (B, C)
    in_range = (p >= 0) & (p < t)
    pc = jnp.clip(p, 0, t - 1)
    take = jax.vmap(lambda x, i: x[i])
    valid = in_range & ~jnp.take_along_axis(key_pad, pc, axis=1)
    return KVCache(k=take(k, pc), v=take(v, pc), valid=valid)


def cached_attention_step(q, k_new, v_new, key_pad, positions, cache: KVCache):
    """One decoding step: write the new key/value at slot positions % C, then attend over the valid slots.

    q, k_new, v_new: (B, 1, N, H) (RoPE applied); key_pad: (B, 1) True when the new token is PAD; positions: (B,).
    Returns ((B, 1, N, H), new cache). Rewriting a position that was written before (a rejected candidate) simply
    replaces it; a ring buffer of C = window slots holds exactly the keys a sliding-window query may see.
    """
    chex.assert_rank([q, k_new, v_new], 4)
    b, c = cache.valid.shape
    rows = jnp.arange(b)
    slot = jnp.mod(positions, c)
    cache = KVCache(
        k=cache.k.at[rows, slot].set(k_new[:, 0].astype(cache.k.dtype)),
        v=cache.v.at[rows, slot].set(v_new[:, 0].astype(cache.v.dtype)),
        valid=cache.valid.at[rows, slot].set(~key_pad[:, 0]),
    )
    out = _xla_attention(q, cache.k, cache.v, cache.valid[:, None, None, :])
    return out, cache


# ---------------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------------


class _Projections(nn.Module):
    num_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32

    def proj(self, x, name):  # (..., D) -> (..., N, H)
        w = self.param(name, kernel_init(axes.EMBED, axes.HEADS, axes.KV), (x.shape[-1], self.num_heads, self.head_dim))
        return token_matmul(x.astype(self.dtype), w.astype(self.dtype))

    def out(self, x, features):  # (..., N, H) -> (..., D)
        w = self.param("o", kernel_init(axes.HEADS, axes.KV, axes.EMBED), (self.num_heads, self.head_dim, features))
        return token_matmul(x.astype(self.dtype), w.astype(self.dtype), n_in=2)


class SelfAttention(_Projections):
    """Multi-head causal self-attention with RoPE; `window` > 0 = sliding window, 0 = full causal.

    cache=None: the full forward pass, x (B, T, D), positions (T,) | (B, T) -> (B, T, D).
    cache=Prefill(max_len): the same, plus the KVCache the prompt leaves behind -> ((B, T, D), KVCache).
    cache=<KVCache>: one decoding step, x (B, 1, D), key_pad (B, 1), positions (B,) -> ((B, 1, D), KVCache).
    """

    window: int = 0
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, key_pad, positions, cache=None):
        if isinstance(cache, KVCache):
            pos = positions[:, None]  # (B, 1)
            q = apply_rope(self.proj(x, "q"), pos)
            k = apply_rope(self.proj(x, "k"), pos)
            o, cache = cached_attention_step(q, k, self.proj(x, "v"), key_pad, positions, cache)
            return self.out(o, x.shape[-1]), cache
        q = apply_rope(self.proj(x, "q"), positions)
        k = apply_rope(self.proj(x, "k"), positions)
        v = self.proj(x, "v")
        q, k, v = (constrain(a, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None)) for a in (q, k, v))
        if self.window > 0:
            o = sliding_window_attention(q, k, v, key_pad, window=self.window, implementation=self.implementation)
        else:
            o = causal_attention(q, k, v, key_pad, implementation=self.implementation)
        out = self.out(o, x.shape[-1])
        if isinstance(cache, Prefill):
            return out, kv_cache_from_prefix(k, v, key_pad, self.window if self.window > 0 else cache.max_len)
        return out


class SegmentCrossAttention(_Projections):
    """Target token t attends to memory rows of its segment and `lookback` segments before it (RoPE on row index).

    With `gather_rows` (decoding) the visible rows are gathered before they are projected, so one token costs
    O(lookback) whatever the number of memory rows; the full forward pass projects every row once instead.
    """

    rows_per_segment: int = 1
    lookback: int = 1

    @nn.compact
    def __call__(self, x, memory, row_valid, seg_id, gather_rows: bool = False):
        """x (B, T, D), memory (B, R, D), row_valid (B, R), seg_id (B, T) -> (B, T, D)."""
        lq = self.rows_per_segment
        c = (self.lookback + 1) * lq
        q_row = seg_id * lq + (lq - 1)  # (B, T) last memory row of the token's own segment
        q = apply_rope(self.proj(x, "q"), q_row)
        if gather_rows:
            b, t = seg_id.shape
            rows_c, visible = visible_rows(q_row, row_valid, c)  # (B, T, C)
            mem = jax.vmap(lambda m, idx: m[idx])(memory, rows_c)  # (B, T, C, D)
            k = apply_rope(self.proj(mem, "k").reshape(b, t * c, self.num_heads, -1), rows_c.reshape(b, t * c))
            k = k.reshape(b, t, c, self.num_heads, -1)
            o = gathered_attention(q, k, self.proj(mem, "v"), visible)
            return self.out(o, x.shape[-1])
        rows = jnp.arange(memory.shape[1])
        k = apply_rope(self.proj(memory, "k"), rows)
        v = self.proj(memory, "v")
        o = segment_cross_attention(q, k, v, q_row, row_valid, num_rows_visible=c)
        return self.out(o, x.shape[-1])
