"""Pre-norm transformer blocks (docs/ARCHITECTURE.md 3.1): `TransformerBlock` (causal self-attention, sliding-window
or full, then SwiGLU) for the compressor stacks and the top transformer, and `DecoderBlock` (self-attention,
segment-causal cross-attention into memory rows, SwiGLU) for the expander. Each adds its sublayers residually to
RMSNorm'ed inputs; the attention itself lives in attention.py."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from . import axes
from .attention import SegmentCrossAttention, SelfAttention
from .layers import SwiGLU, constrain, rms_norm


class TransformerBlock(nn.Module):
    """RMSNorm -> causal self-attention (sliding window when window > 0) -> residual; RMSNorm -> SwiGLU -> residual."""

    num_heads: int
    window: int
    ffn_mult: int = 4
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_pad, positions):  # (B, S, D), (B, S), (S,) -> (B, S, D)
        d = x.shape[-1]
        attn = SelfAttention(
            num_heads=self.num_heads,
            head_dim=d // self.num_heads,
            window=self.window,
            implementation=self.implementation,
            dtype=self.dtype,
            name="attn",
        )
        x = x + attn(rms_norm(dtype=self.dtype, name="attn_norm")(x), key_pad, positions)
        x = x + SwiGLU(self.ffn_mult * d, dtype=self.dtype, name="ffn")(rms_norm(dtype=self.dtype, name="ffn_norm")(x))
        return constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))


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
    def __call__(self, x, key_pad, positions, memory, row_valid, seg_id):
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
        x = x + self_attn(rms_norm(dtype=self.dtype, name="self_norm")(x), key_pad, positions)
        cross = SegmentCrossAttention(
            num_heads=self.num_heads,
            head_dim=hd,
            rows_per_segment=self.rows_per_segment,
            lookback=self.cross_window,
            dtype=self.dtype,
            name="cross_attn",
        )
        x = x + cross(rms_norm(dtype=self.dtype, name="cross_norm")(x), memory, row_valid, seg_id)
        x = x + SwiGLU(self.ffn_mult * d, dtype=self.dtype, name="ffn")(rms_norm(dtype=self.dtype, name="ffn_norm")(x))
        return constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
