"""Attention forms of docs/ARCHITECTURE.md 3.1: softmax attention in XLA (`_softmax_attention`), and on a CUDA GPU
jax.nn.dot_product_attention's cuDNN kernel.

Kernels (pure functions, inputs (B, T, N, H), `key_pad` True at PAD):
  - `sliding_window_attention`: causal, position t sees keys [t-W+1, t], never PAD keys. Queries are blocked into
    chunks of C that each see the C + W keys ending with the chunk, so cost and memory grow linearly in S; long
    rows run the chunks in groups (lax.map, rematerialized) so that one group's scores are alive at a time.
    With implementation 'cudnn' the plain call with `local_window_size` is used instead (cuDNN skips masked tiles).
  - `causal_attention`: full causal, never PAD keys (top transformer; expander with d_window = 0). Long rows run by
    query blocks, each against the keys up to its end: the causal half of the scores.
  - `segment_cross_attention`: each query sees a small per-query set of memory rows (the rows of its own segment and
    `lookback` segments before it), gathered so that cost is linear in S.
The two self-attention kernels also take one value head shared by every query head, of its own width
(v: (B, S, 1, C)): that is multi-head latent attention, whose values are the per-token latent.
A query that may see no key at all (PAD queries, empty rows) gets a zero output, never NaN.

Modules: `SelfAttention` (standard multi-head, 'mha') and `LatentSelfAttention` (multi-head latent attention,
'mla', docs/ARCHITECTURE.md 3.1), chosen per config by `self_attention(AttentionSpec)`; `SegmentCrossAttention`.

Decoding (generation) keeps each self-attention's past in a fixed-size cache: `KVCache` (keys and values) for 'mha',
`LatentCache` (the per-token latent and RoPE'd scoring keys, never full keys and values) for 'mla'. Position p lives
in slot p % C, so a sliding-window layer needs only C = window slots (a ring buffer) and a full causal layer C = the
longest sequence it will see. Both modules take the same `cache` argument: `cache=Prefill(max_len)` runs the ordinary
linear-time forward pass over a prompt and also returns the cache it leaves, and `cache=<the cache>` advances one
token per row; both give the same outputs as the full forward pass at every position. Callers never look inside a
cache (`is_decode_cache` tells a step from a prefill).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from . import axes
from .layers import apply_rope, constrain, kernel_init, token_matmul

# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------


def _shares_value(k, v) -> bool:
    """True when v is one value head shared by all key heads, or has a width of its own (latent attention)."""
    return v.shape[2] != k.shape[2] or v.shape[-1] != k.shape[-1]


def _softmax_attention(q, k, v, mask):
    """q, k: (B, T|S, N, R); v: (B, S, N, H) or one value head shared by every head (B, S, 1, C); mask broadcastable
    to (B, N, T, S) -> (B, T, N, H|C). Scores scaled by 1/sqrt(R), softmax statistics and sums in float32; a shared
    value is never copied per head.

    The softmax is normalized after the weighted sum: out = (exp(s - max) @ v) / sum(exp(s - max)), which divides
    (T, H) outputs instead of (T, S) probabilities, and whose backward pass has no (T, S) division either (the max
    is a constant to the gradient: the softmax does not depend on it). About half the time of the normalized form
    (jax.nn.dot_product_attention 'xla') in forward + backward on CPU, same values."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("btnr,bsnr->bnts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits - top)  # (B, N, T, S)
    total = jnp.swapaxes(jnp.sum(weights, axis=-1), 1, 2)[..., None]  # (B, T, N, 1)
    weights = weights.astype(v.dtype)  # the weighted sum in the values' dtype (XLA CPU has no bf16 x bf16 -> f32 dot)
    if _shares_value(k, v):
        out = jnp.einsum("bnts,bsc->btnc", weights, v[:, :, 0])
    else:
        out = jnp.einsum("bnts,bsnh->btnh", weights, v)
    return (out.astype(jnp.float32) / total).astype(v.dtype)


def _xla_attention(q, k, v, mask):
    """Softmax attention (XLA) with a boolean mask broadcastable to (B, N, T, S); zero output for empty rows.
    v may be one shared value head of its own width (B, S, 1, C) (latent attention): the output is then (B, T, N, C)."""
    out = _softmax_attention(q, k, v, mask)
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


# Full causal attention over more than one block of queries runs block by block, each block against the keys up to
# its last query: at least QUERY_BLOCK queries a block, and at most MAX_QUERY_BLOCKS blocks (bigger blocks for longer
# rows: every block is a separate piece of the compiled program).
QUERY_BLOCK = 64
MAX_QUERY_BLOCKS = 8
# When the blocks' scores (B x N x the causal half of T x T) exceed this many elements, they run in groups of
# rematerialized blocks (`_causal_blocks`).
CAUSAL_SCORE_ELEMENTS = 1 << 23


def causal_query_block(t: int) -> int:
    """The query-block size of full causal attention over t queries: QUERY_BLOCK, or the multiple of 16 that keeps
    the blocks to MAX_QUERY_BLOCKS."""
    return max(QUERY_BLOCK, -(-t // (16 * MAX_QUERY_BLOCKS)) * 16)


def causal_attention(
    q, k, v, key_pad, *, window: int = 0, implementation: str = "xla", query_block: int | None = None, budget=None
):
    """Causal attention (optionally banded to `window`). Full causal attention (window 0) over more than one query
    block (`query_block`, default `causal_query_block(T)`) computes only the causal half of the T x T scores
    (`_causal_blocks`); a band is dense (T x T), for rows of up to twice the window (see sliding_window_attention)."""
    t = q.shape[1]
    if implementation == "cudnn":
        return _cudnn_attention(q, k, v, key_pad, window)
    block = query_block or causal_query_block(t)
    if window <= 0 and t > block:
        return _causal_blocks(q, k, v, key_pad, block, budget or CAUSAL_SCORE_ELEMENTS)
    mask = banded_causal_mask(t, window)[None, None] & ~key_pad[:, None, None, :]
    return _xla_attention(q, k, v, mask)


# Over the budget, the query blocks run in this many groups, one after another within each (lax.map, rematerialized).
CAUSAL_GROUPS = 4


def _heads_first_attention(qt, kt, vt, mask, shared: bool):
    """Softmax attention on heads-first arrays, normalized after the weighted sum as `_softmax_attention`; zero
    output for rows with no visible key. qt: (B, N, T, R); kt: (B, N, S, R); vt: (B, N, S, H), or (B, S, C) when
    `shared` (one value head for every head); mask broadcastable to (B, N, T, S) -> (B, N, T, H|C)."""
    scale = 1.0 / math.sqrt(qt.shape[-1])
    logits = jnp.einsum("bntr,bnsr->bnts", qt, kt, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits - top)  # (B, N, T, S)
    total = jnp.sum(weights, axis=-1, keepdims=True)  # (B, N, T, 1)
    weights = weights.astype(vt.dtype)
    out = jnp.einsum("bnts,bsc->bntc" if shared else "bnts,bnsh->bnth", weights, vt)
    out = (out.astype(jnp.float32) / total).astype(vt.dtype)
    return jnp.where(jnp.any(mask, axis=-1, keepdims=True), out, jnp.zeros((), out.dtype))


def _causal_blocks(q, k, v, key_pad, block: int, budget: int):
    """Full causal attention by blocks of `block` queries, each scoring only the keys up to its last query: block i
    (queries [i*block, (i+1)*block)) sees keys [0, (i+1)*block), about half of the T x T scores.

    q, k and v are put heads-first (B, N, T, .) once, so that each block's keys are a prefix along T of the same
    array (no per-block transpose; 12% less kernel time than the (B, T, N, .) layout at 448 rows, BENCHMARKS.md).
    Within `budget` (the blocks' scores together, in elements) the blocks are unrolled, each with its own key length.
    Over it, only a few blocks' scores may be alive at once: the blocks are cut into CAUSAL_GROUPS consecutive groups,
    each run as a lax.map over its blocks against the keys up to the group's end, every block under jax.checkpoint
    (its scores recomputed in the backward pass). That computes 5/8 of the T x T scores (4 groups) instead of half.
    Same values either way.
    q, k: (B, T, N, R); v: (B, T, N, H) or one shared head (B, T, 1, C); key_pad: (B, T) True at PAD."""
    b, t, n, r = q.shape
    nb = -(-t // block)
    shared = _shares_value(k, v)
    qt, kt = jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2)  # (B, N, T, R)
    vt = v[:, :, 0] if shared else jnp.swapaxes(v, 1, 2)  # (B, T, C) | (B, N, T, H)

    def attend(qi, lo, hi):  # queries [lo, lo + block) (lo may be traced) against keys [0, hi) (static)
        causal = jnp.arange(hi)[None, :] <= (lo + jnp.arange(qi.shape[2]))[:, None]  # (block, hi)
        mask = causal[None, None] & ~key_pad[:, None, None, :hi]  # (B, 1, block, hi)
        vi = vt[:, :hi] if shared else vt[:, :, :hi]
        return _heads_first_attention(qi, kt[:, :, :hi], vi, mask, shared)  # (B, N, block, H|C)

    spans = [(lo, min(t, lo + block)) for lo in range(0, t, block)]
    if b * n * sum((hi - lo) * hi for lo, hi in spans) <= budget:
        out = jnp.concatenate([attend(qt[:, :, lo:hi], lo, hi) for lo, hi in spans], axis=2)
        return jnp.swapaxes(out, 1, 2)  # (B, T, N, H|C)
    qp = jnp.pad(qt, ((0, 0), (0, 0), (0, nb * block - t), (0, 0)))
    qb = jnp.moveaxis(qp.reshape(b, n, nb, block, r), 2, 0)  # (nb, B, N, block, R)
    bounds = [nb * g // CAUSAL_GROUPS for g in range(CAUSAL_GROUPS + 1)]
    outs = []
    for first, last in zip(bounds[:-1], bounds[1:]):
        if first == last:
            continue
        hi = min(t, last * block)
        one = jax.checkpoint(lambda a, hi=hi: attend(a[0], a[1], hi))
        outs.append(jax.lax.map(one, (qb[first:last], jnp.arange(first, last) * block)))  # (blocks, B, N, block, .)
    out = jnp.transpose(jnp.concatenate(outs, axis=0), (1, 0, 3, 2, 4))  # (nb, B, N, block, .) -> (B, nb, block, N, .)
    return out.reshape(b, nb * block, n, out.shape[-1])[:, :t]


def _cudnn_attention(q, k, v, key_pad, window):
    # cuDNN expresses padding as per-row lengths: PAD must be a suffix of the row (our rows are BOS..EOS then PAD).
    lengths = jnp.sum(~key_pad, axis=-1).astype(jnp.int32)
    scale, width = None, v.shape[-1]
    if _shares_value(k, v):
        # cuDNN needs one shape for k and v: copy the shared value to every head and zero-pad q, k, v to a common
        # width (a multiple of 8); zero columns leave the scores unchanged, the scale stays 1/sqrt(R).
        b, s, n, r = k.shape
        p = -(-max(r, width) // 8) * 8
        scale = 1.0 / math.sqrt(r)
        q, k = (jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, p - r))) for a in (q, k))
        v = jnp.pad(jnp.broadcast_to(v, (b, s, n, width)), ((0, 0), (0, 0), (0, 0), (0, p - width)))
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        local_window_size=(window - 1, 0) if window > 0 else None,
        implementation="cudnn",
    )[..., :width]
    return jnp.where(key_pad[:, :, None, None], jnp.zeros((), out.dtype), out)


# Blocked sliding-window attention keeps at most about this many scores (B x blocks x N x C x (C+W) elements) alive at
# once: longer rows run in groups of query blocks (lax.map), each rematerialized in the backward pass.
WINDOW_SCORE_ELEMENTS = 1 << 22


def window_groups(num_blocks: int, scores: int, budget: int = WINDOW_SCORE_ELEMENTS) -> int:
    """The fewest groups, a divisor of num_blocks, that keep each group's share of `scores` within `budget`."""
    for g in range(1, num_blocks + 1):
        if num_blocks % g == 0 and scores <= budget * g:
            return g
    return num_blocks


def sliding_window_attention(
    q, k, v, key_pad, *, window: int, implementation: str = "xla", block: int | None = None, budget: int | None = None
):
    """Causal sliding-window attention, linear in T.

    q, k: (B, T, N, H); v: (B, T, N, H) or one shared head (B, T, 1, C); key_pad: (B, T) True at PAD. Position t
    attends to keys [t-window+1, t] that are not PAD.
    Queries are cut into blocks of C (default window // 4, at least 16); each block attends to the C + window keys
    that end with it, so the work per query is (C + window) keys instead of the 2 * window of window-sized blocks.
    When the blocks' scores exceed `budget` elements (default WINDOW_SCORE_ELEMENTS), the blocks run in equal groups
    one after another (lax.map), each group under jax.checkpoint: one group's scores are alive at a time, in the
    forward and the backward pass, and its scores are recomputed in the backward pass. Same values.
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

    def blocks(qg, first, count: int):  # query blocks [first, first + count): qg (B, count * C, N, H)
        idx = (first + jnp.arange(count))[:, None] * c + jnp.arange(c + w)[None, :]  # block i sees [i*C - W, i*C + C)
        kb = kp[:, idx].reshape(b * count, c + w, n, h)
        vb = vp[:, idx].reshape(b * count, c + w, *v.shape[2:])
        # Query i of a block (absolute i0 + i) sees key j (absolute i0 - W + j) iff i < j <= i + W.
        i = jnp.arange(c)[:, None]
        j = jnp.arange(c + w)[None, :]
        band = (j > i) & (j <= i + w)  # (C, C+W)
        mask = band[None, None] & ~padp[:, idx][:, :, None, :]  # (B, count, C, C+W)
        out = _xla_attention(qg.reshape(b * count, c, n, h), kb, vb, mask.reshape(b * count, 1, c, c + w))
        return out.reshape(b, count * c, n, out.shape[-1])

    groups = window_groups(nb, b * nb * n * c * (c + w), budget or WINDOW_SCORE_ELEMENTS)
    if groups == 1:
        return blocks(q, 0, nb)[:, :t]
    per = nb // groups
    qg = jnp.moveaxis(q.reshape(b, groups, per * c, n, h), 1, 0)  # (G, B, per * C, N, H)
    out = jax.lax.map(jax.checkpoint(lambda a: blocks(a[0], a[1] * per, per)), (qg, jnp.arange(groups)))
    return jnp.moveaxis(out, 0, 1).reshape(b, nb * c, n, out.shape[-1])[:, :t]


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
    return gathered_attention(q, gather_rows(k, rows_c), gather_rows(v, rows_c), visible)


def gather_rows(x, idx):
    """Per batch row, x (B, R, ...) indexed by idx (B, T, C) -> (B, T, C, ...) in x's dtype. The gather runs in
    float32 so that its backward, a scatter-add of the many queries' gradients that read one memory row, accumulates
    in float32 and not in a 16-bit compute dtype."""
    return jax.vmap(lambda a, i: a[i])(x.astype(jnp.float32), idx).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding caches
# ---------------------------------------------------------------------------------------------------------------------


@struct.dataclass
class Prefill:
    """Asks a self-attention (or a block or stack of them) to return, with its full forward pass over a prompt, the
    cache the prompt leaves. `max_len` is the capacity of full causal layers (sliding-window layers keep `window`
    slots)."""

    max_len: int = struct.field(pytree_node=False)


@struct.dataclass
class KVCache:
    """Decode cache of one standard self-attention ('mha'): keys and values; position p lives in slot p % C."""

    k: jax.Array  # (B, C, N, H), RoPE applied at each key's own position
    v: jax.Array  # (B, C, N, H)
    valid: jax.Array  # (B, C) bool: the slot holds a real (non-PAD) key


@struct.dataclass
class LatentCache:
    """Decode cache of one latent self-attention ('mla'): per token the latent (C) and the RoPE'd per-head keys
    (N x R), never full keys and values. Position p lives in slot p % capacity (a ring of `window` slots for a
    sliding window, `max_len` for full causal)."""

    kv_c: jax.Array  # (B, slots, C)
    k_r: jax.Array  # (B, slots, N, R), RoPE applied at each key's own position
    valid: jax.Array  # (B, slots) bool: the slot holds a real (non-PAD) key


def is_decode_cache(cache) -> bool:
    """True for a cache to advance one token (either kind), False for None (no cache) or a `Prefill` request."""
    return isinstance(cache, (KVCache, LatentCache))


def prefix_lengths(key_pad: jax.Array) -> jax.Array:
    """(B, T) -> (B,) one past each row's last non-PAD position: where decoding continues (0 for all-PAD rows)."""
    t = key_pad.shape[1]
    return jnp.max(jnp.where(~key_pad, jnp.arange(1, t + 1)[None], 0), axis=1).astype(jnp.int32)


def ring_from_prefix(cls, key_pad, capacity: int, **arrays):
    """The cache `cls` after a prompt: every array (B, T, ...) of `arrays` gathered so that slot s holds the latest
    position p < length with p % capacity == s (length = `prefix_lengths(key_pad)`); older positions and PAD keys
    are invalid."""
    b, t = key_pad.shape
    length = prefix_lengths(key_pad)[:, None]  # (B, 1)
    s = jnp.arange(capacity)[None, :]
    p = length - 1 - jnp.mod(length - 1 - s, capacity)  # (B, C)
    pc = jnp.clip(p, 0, t - 1)
    take = jax.vmap(lambda x, i: x[i])
    valid = (p >= 0) & (p < t) & ~jnp.take_along_axis(key_pad, pc, axis=1)
    return cls(valid=valid, **{name: take(x, pc) for name, x in arrays.items()})


def ring_write(cache, key_pad, positions, **new):
    """`cache` with each new token's arrays `new` (B, 1, ...) written at slot positions % C (positions (B,)) and the
    slot marked valid unless the token is PAD (key_pad (B, 1)). Rewriting a position that was written before (a
    rejected candidate) simply replaces it; a ring of C = window slots holds exactly the keys a sliding-window query
    may see."""
    rows = jnp.arange(cache.valid.shape[0])
    slot = jnp.mod(positions, cache.valid.shape[1])
    writes = {}
    for name, x in new.items():
        buf = getattr(cache, name)
        writes[name] = buf.at[rows, slot].set(x[:, 0].astype(buf.dtype))
    return cache.replace(valid=cache.valid.at[rows, slot].set(~key_pad[:, 0]), **writes)


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
            k = apply_rope(self.proj(x, "k"), pos)
            cache = ring_write(cache, key_pad, positions, k=k, v=self.proj(x, "v"))
            q = apply_rope(self.proj(x, "q"), pos)
            o = _xla_attention(q, cache.k, cache.v, cache.valid[:, None, None, :])
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
            return out, ring_from_prefix(KVCache, key_pad, self.window or cache.max_len, k=k, v=v)
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


# ---------------------------------------------------------------------------------------------------------------------
# Multi-head latent attention
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Which self-attention a block builds (docs/ARCHITECTURE.md 3.1).

    kind 'mha': standard multi-head attention, head width D // num_heads. kind 'mla': multi-head latent attention
    with per-head width `head_dim`, the shared key/value latent `kv_comp_dim`, the per-head query compression
    `q_comp_dim` and the per-head RoPE'd scoring width `retr_dim`; `mix` adds the D x D output mix that the
    original's causal MLA (top transformer, expander) applies after the output projection.
    """

    kind: str = "mha"
    head_dim: int = 0
    kv_comp_dim: int = 0
    q_comp_dim: int = 0
    retr_dim: int = 0
    mix: bool = False


def fan_in_uniform(scale: float = 1.0):
    """U(-b, b), b = scale / sqrt(shape[1] * shape[2]): the original's init of its per-head (H, a, b) latent tensors
    (torch's kaiming_uniform(a=sqrt(5)) takes shape[1] * shape[2] as a 3-D tensor's fan-in)."""

    def init(key, shape, dtype=jnp.float32):
        bound = scale / math.sqrt(shape[1] * shape[2])
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class LatentSelfAttention(nn.Module):
    """Multi-head latent attention (docs/ARCHITECTURE.md 3.1), causal; `window` > 0 = sliding window.

    Per token x (D): the latent kv_c = x W_kv (C = kv_comp_dim, zero at PAD) is every head's value; head h scores
    with q_r = ((x W_q)_h A_h) B_h (D -> head_dim -> q_comp_dim -> retr_dim) against k_r = kv_c K_h (C -> retr_dim),
    both RoPE'd, scaled by 1/sqrt(retr_dim); the head's context (C) goes up to head_dim through U_h, the heads are
    concatenated and projected to D (then mixed by a D x D matrix when `mix`). The chains of per-head matrices are
    multiplied together first whenever that is cheaper per token (same function, same parameters).
    """

    features: int  # D
    num_heads: int
    head_dim: int
    kv_comp_dim: int
    q_comp_dim: int
    retr_dim: int
    mix: bool = False
    window: int = 0
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        d, n, k = self.features, self.num_heads, self.head_dim
        c, cq, r = self.kv_comp_dim, self.q_comp_dim, self.retr_dim
        latent = fan_in_uniform()
        self.w_q = self.param("q", kernel_init(axes.EMBED, axes.HEADS, axes.KV), (d, n, k))
        self.w_q_down = self.param("q_down", kernel_init(axes.HEADS, axes.KV, axes.LATENT, init=latent), (n, k, cq))
        self.w_q_retr = self.param(
            "q_retr",
            kernel_init(axes.HEADS, axes.LATENT, axes.RETRIEVAL, init=fan_in_uniform(1.0 / math.sqrt(r))),
            (n, cq, r),
        )
        self.w_kv = self.param("kv_down", kernel_init(axes.EMBED, axes.LATENT), (d, c))
        retr_axes = (axes.HEADS, axes.LATENT, axes.RETRIEVAL)
        self.w_k_retr = self.param("k_retr", kernel_init(*retr_axes, init=latent), (n, c, r))
        self.w_v_up = self.param("v_up", kernel_init(axes.HEADS, axes.LATENT, axes.KV, init=latent), (n, c, k))
        self.w_o = self.param("o", kernel_init(axes.HEADS, axes.KV, axes.EMBED), (n, k, d))
        if self.mix:
            self.w_mix = self.param("mix", kernel_init(axes.EMBED, axes.EMBED_OUT), (d, d))

    # -- projections ---------------------------------------------------------------------------------------------

    def _queries(self, x):  # (B, T, D) -> (B, T, N, R)
        d, k, cq, r = self.features, self.head_dim, self.q_comp_dim, self.retr_dim
        x = x.astype(self.dtype)
        if d * r <= d * k + k * cq + cq * r:  # fused (D, N, R) matrix: fewer multiply-adds per token
            a = jnp.einsum("nkc,ncr->nkr", self.w_q_down, self.w_q_retr)
            w = jnp.einsum("dnk,nkr->dnr", self.w_q, a)
            return token_matmul(x, w.astype(self.dtype))
        q = token_matmul(x, self.w_q.astype(self.dtype))  # (B, T, N, K)
        q = jnp.einsum("btnk,nkc->btnc", q, self.w_q_down.astype(self.dtype))
        return jnp.einsum("btnc,ncr->btnr", q, self.w_q_retr.astype(self.dtype))

    def _latent(self, x, key_pad, positions):  # -> kv_c (B, T, C), k_r (B, T, N, R) RoPE'd
        kv_c = token_matmul(x.astype(self.dtype), self.w_kv.astype(self.dtype))
        kv_c = jnp.where(key_pad[..., None], jnp.zeros((), kv_c.dtype), kv_c)
        k_r = token_matmul(kv_c, jnp.swapaxes(self.w_k_retr, 0, 1).astype(self.dtype))  # (C, N, R)
        return kv_c, apply_rope(k_r, positions)

    def _output(self, ctx):  # (B, T, N, C) -> (B, T, D)
        d, n, k, c = self.features, self.num_heads, self.head_dim, self.kv_comp_dim
        chain = n * c * k + n * k * d + (d * d if self.mix else 0)
        if n * c * d <= chain:  # fused (N, C, D) matrix
            u = jnp.einsum("nck,nkd->ncd", self.w_v_up, self.w_o)
            if self.mix:
                u = jnp.einsum("ncd,de->nce", u, self.w_mix)
            return token_matmul(ctx, u.astype(self.dtype), n_in=2)
        h = jnp.einsum("btnc,nck->btnk", ctx, self.w_v_up.astype(self.dtype))
        out = token_matmul(h, self.w_o.astype(self.dtype), n_in=2)
        return token_matmul(out, self.w_mix.astype(self.dtype)) if self.mix else out

    # -- training / full-sequence forward -----------------------------------------------------------------------

    def __call__(self, x, key_pad, positions, cache=None):
        """cache=None: the full forward pass, x (B, T, D), positions (T,) | (B, T) -> (B, T, D).
        cache=Prefill(max_len): the same, plus the LatentCache the prompt leaves -> ((B, T, D), LatentCache).
        cache=<LatentCache>: one decoding step, x (B, 1, D), key_pad (B, 1), positions (B,) -> ((B, 1, D), cache)."""
        if isinstance(cache, LatentCache):
            return self._step(x, key_pad, positions, cache)
        out, kv_c, k_r = self._forward(x, key_pad, positions)
        if isinstance(cache, Prefill):
            return out, ring_from_prefix(LatentCache, key_pad, self.window or cache.max_len, kv_c=kv_c, k_r=k_r)
        return out

    def _forward(self, x, key_pad, positions):  # -> out (B, T, D), kv_c (B, T, C), k_r (B, T, N, R)
        q_r = apply_rope(self._queries(x), positions)
        kv_c, k_r = self._latent(x, key_pad, positions)
        q_r, k_r = (constrain(a, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None)) for a in (q_r, k_r))
        v = kv_c[:, :, None, :]  # (B, T, 1, C): one value head shared by all heads
        if self.window > 0:
            ctx = sliding_window_attention(q_r, k_r, v, key_pad, window=self.window, implementation=self.implementation)
        else:
            ctx = causal_attention(q_r, k_r, v, key_pad, implementation=self.implementation)
        return self._output(ctx), kv_c, k_r

    # -- decoding with a cache ----------------------------------------------------------------------------------

    def _step(self, x, key_pad, positions, cache: LatentCache):
        """Write the new token's latent and keys at slot positions % slots (`ring_write`), then attend over the
        valid slots."""
        pos = positions[:, None]  # (B, 1)
        q_r = apply_rope(self._queries(x), pos)
        kv_c, k_r = self._latent(x, key_pad, pos)
        cache = ring_write(cache, key_pad, positions, kv_c=kv_c, k_r=k_r)
        ctx = _xla_attention(q_r, cache.k_r, cache.kv_c[:, :, None, :], cache.valid[:, None, None, :])
        return self._output(ctx), cache


def self_attention(spec: AttentionSpec, features: int, num_heads: int, window: int, implementation, dtype, name):
    """The self-attention module that `spec` describes (standard or latent)."""
    if spec.kind == "mla":
        return LatentSelfAttention(
            features=features,
            num_heads=num_heads,
            head_dim=spec.head_dim,
            kv_comp_dim=spec.kv_comp_dim,
            q_comp_dim=spec.q_comp_dim,
            retr_dim=spec.retr_dim,
            mix=spec.mix,
            window=window,
            implementation=implementation,
            dtype=dtype,
            name=name,
        )
    return SelfAttention(
        num_heads=num_heads,
        head_dim=features // num_heads,
        window=window,
        implementation=implementation,
        dtype=dtype,
        name=name,
    )
