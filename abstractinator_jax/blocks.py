"""Pre-norm transformer blocks (docs/ARCHITECTURE.md 3.1): `TransformerBlock` (causal self-attention, sliding-window
or full, then SwiGLU) for the compressor stacks and the top transformer, and `DecoderBlock` (self-attention,
segment-causal cross-attention into memory rows, SwiGLU) for the expander. Each adds its sublayers residually to
RMSNorm'ed inputs; the self-attention is standard or latent as an `AttentionSpec` says (built from the config by
`compressor_attention`, `expander_attention`, `top_attention`); the attention itself lives in attention.py."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn
from ml_collections import ConfigDict

from . import axes
from .attention import AttentionSpec, Prefill, SegmentCrossAttention, self_attention
from .config import compressor_mla_dims, expander_mla_dims, top_mla_dims
from .layers import SwiGLU, constrain, rms_norm


def compressor_attention(lv: ConfigDict) -> AttentionSpec:
    """A level's compressor blocks: latent attention without the output mix (the original never applies it)."""
    if lv.attention_type == "mla":
        return AttentionSpec("mla", **compressor_mla_dims(lv), mix=False)
    return AttentionSpec("mha")


def expander_attention(lv: ConfigDict) -> AttentionSpec:
    """A level's expander self-attention: latent attention with the output mix, sized from D and d_heads."""
    if lv.attention_type == "mla":
        return AttentionSpec("mla", **expander_mla_dims(lv), mix=True)
    return AttentionSpec("mha")


def top_attention(top: ConfigDict) -> AttentionSpec:
    """The top transformer's blocks: latent attention with the output mix."""
    if top.attention_type == "mla":
        return AttentionSpec("mla", **top_mla_dims(top), mix=True)
    return AttentionSpec("mha")


class TransformerBlock(nn.Module):
    """RMSNorm -> causal self-attention (sliding window when window > 0) -> residual; RMSNorm -> SwiGLU -> residual.

    With latent attention, `prefill` and `step` run the block over a prompt and then one token per row at a time
    (at per-row positions) through the attention's decode cache (attention.LatentCache)."""

    features: int  # D
    num_heads: int
    window: int
    attention: AttentionSpec = AttentionSpec()
    ffn_mult: int = 4
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.attn_norm = rms_norm(dtype=self.dtype)
        self.attn = self_attention(
            self.attention, self.features, self.num_heads, self.window, self.implementation, self.dtype, None
        )
        self.ffn_norm = rms_norm(dtype=self.dtype)
        self.ffn = SwiGLU(self.ffn_mult * self.features, dtype=self.dtype)

    def _ffn(self, x):
        x = x + self.ffn(self.ffn_norm(x))
        return constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))

    def __call__(self, x, key_pad, positions):  # (B, S, D), (B, S), (S,) -> (B, S, D)
        return self._ffn(x + self.attn(self.attn_norm(x), key_pad, positions))

    def _latent(self):
        if self.attention.kind != "mla":
            raise NotImplementedError("prefill/step caches are built for latent attention ('mla') here.")
        return self.attn

    def prefill(self, x, key_pad, max_len: int):  # (B, T, D), (B, T) -> (B, T, D), LatentCache
        out, cache = self._latent()(self.attn_norm(x), key_pad, jnp.arange(x.shape[1]), Prefill(max_len))
        return self._ffn(x + out), cache

    def step(self, x, key_pad, positions, cache):  # (B, 1, D), (B, 1), (B,) -> (B, 1, D), LatentCache
        out, cache = self._latent()(self.attn_norm(x), key_pad, positions, cache)
        return self._ffn(x + out), cache


class DecoderBlock(nn.Module):
    """Expander block: causal self-attention, segment-causal cross-attention into memory rows, SwiGLU."""

    num_heads: int
    window: int
    cross_window: int
    attention: AttentionSpec = AttentionSpec()
    rows_per_segment: int = 1
    ffn_mult: int = 4
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_pad, positions, memory, row_valid, seg_id):
        d = x.shape[-1]
        self_attn = self_attention(
            self.attention, d, self.num_heads, self.window, self.implementation, self.dtype, "self_attn"
        )
        x = x + self_attn(rms_norm(dtype=self.dtype, name="self_norm")(x), key_pad, positions)
        cross = SegmentCrossAttention(
            num_heads=self.num_heads,
            head_dim=d // self.num_heads,
            rows_per_segment=self.rows_per_segment,
            lookback=self.cross_window,
            dtype=self.dtype,
            name="cross_attn",
        )
        x = x + cross(rms_norm(dtype=self.dtype, name="cross_norm")(x), memory, row_valid, seg_id)
        x = x + SwiGLU(self.ffn_mult * d, dtype=self.dtype, name="ffn")(rms_norm(dtype=self.dtype, name="ffn_norm")(x))
        return constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
