"""Pre-norm transformer blocks (ARCHITECTURE 3.1), and `run_stack`, which runs a list of them with or without
decoding caches.

Every block takes an optional `cache` (see attention.SelfAttention): None for the full forward pass, `Prefill(max_len)`
to also return the cache a prompt leaves, a `KVCache` to advance one token; with a cache the block returns
(output, cache)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from . import axes
from .attention import KVCache, Prefill, SegmentCrossAttention, SelfAttention
from .layers import SwiGLU, constrain, rms_norm


class TransformerBlock(nn.Module):
    """RMSNorm -> causal self-attention (sliding window when window > 0) -> residual; RMSNorm -> SwiGLU -> residual."""

    num_heads: int
    window: int
    ffn_mult: int = 4
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_pad, positions, cache=None):  # (B, S, D), (B, S), (S,) -> (B, S, D) [, cache]
        d = x.shape[-1]
        attn = SelfAttention(
            num_heads=self.num_heads,
            head_dim=d // self.num_heads,
            window=self.window,
            implementation=self.implementation,
            dtype=self.dtype,
            name="attn",
        )
        a = attn(rms_norm(dtype=self.dtype, name="attn_norm")(x), key_pad, positions, cache)
        a, cache = a if cache is not None else (a, None)
        x = x + a
        x = x + SwiGLU(self.ffn_mult * d, dtype=self.dtype, name="ffn")(rms_norm(dtype=self.dtype, name="ffn_norm")(x))
        x = constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
        return x if cache is None else (x, cache)


class DecoderBlock(nn.Module):
    """Expander block: causal self-attention, segment-causal cross-attention into memory rows, SwiGLU."""

    num_heads: int
    window: int
    cross_window: int
    rows_per_segment: int = 1
    ffn_mult: int = 4
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_pad, positions, memory, row_valid, seg_id, cache=None):
        """x (B, T, D), key_pad (B, T), memory (B, R, D), row_valid (B, R), seg_id (B, T) -> (B, T, D) [, cache]."""
        d = x.shape[-1]
        hd = d // self.num_heads
        self_attn = SelfAttention(
            num_heads=self.num_heads,
            head_dim=hd,
            window=self.window,
            implementation=self.implementation,
            dtype=self.dtype,
            name="self_attn",
        )
        a = self_attn(rms_norm(dtype=self.dtype, name="self_norm")(x), key_pad, positions, cache)
        a, cache = a if cache is not None else (a, None)
        x = x + a
        cross = SegmentCrossAttention(
            num_heads=self.num_heads,
            head_dim=hd,
            rows_per_segment=self.rows_per_segment,
            lookback=self.cross_window,
            dtype=self.dtype,
            name="cross_attn",
        )
        step = isinstance(cache, KVCache)
        x = x + cross(rms_norm(dtype=self.dtype, name="cross_norm")(x), memory, row_valid, seg_id, gather_rows=step)
        x = x + SwiGLU(self.ffn_mult * d, dtype=self.dtype, name="ffn")(rms_norm(dtype=self.dtype, name="ffn_norm")(x))
        x = constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
        return x if cache is None else (x, cache)


def run_stack(blocks, x, key_pad, positions, *extra, cache=None):
    """Apply `blocks` in order. cache: None -> x; Prefill -> (x, [KVCache per block]); [KVCache per block] (one
    decoding step) -> (x, [KVCache per block]). `extra` goes to every block after the positions (DecoderBlock's
    memory, row_valid, seg_id)."""
    if cache is None:
        for blk in blocks:
            x = blk(x, key_pad, positions, *extra)
        return x
    caches = [cache] * len(blocks) if isinstance(cache, Prefill) else list(cache)
    new = []
    for blk, c in zip(blocks, caches, strict=True):
        x, c = blk(x, key_pad, positions, *extra, c)
        new.append(c)
    return x, new
