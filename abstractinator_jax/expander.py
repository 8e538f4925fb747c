"""Decoder-only expander with a factorized code embedding and head (ARCHITECTURE 3.5).

At level 0 the "codebook" is a learned byte table (vocab x d_lo_d_c), depth 1. Above level 0 the lower level's RVQ
stage codebooks take its place (depth stages, K entries each, never a K**depth table).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from ml_collections import ConfigDict

from .blocks import DecoderBlock
from .layers import kernel_init, rms_norm


def shift_right(targets: jax.Array, start_id: int) -> jax.Array:
    """(B, S) -> (B, S): [start, t_0, ..., t_{S-2}] (teacher forcing input)."""
    return jnp.concatenate([jnp.full_like(targets[:, :1], start_id), targets[:, :-1]], axis=1)


class FactorizedCodes(nn.Module):
    """Code tables of width d_c plus one up-projection d_c -> D shared with the head's down-projection."""

    num_codes: int
    code_dim: int
    model_dim: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.table = self.param(
            "code_table",
            kernel_init("vocab", "code", init=nn.initializers.normal(0.02)),
            (self.num_codes, self.code_dim),
        )
        scale = self.code_dim**-0.5
        self.up = self.param(
            "up",
            kernel_init("code", "embed", init=nn.initializers.normal(float(scale))),
            (self.code_dim, self.model_dim),
        )

    def embed(self, ids):  # (B, S) -> (B, S, D)
        return (self.table[ids] @ self.up).astype(self.dtype)

    def logits(self, h, sqdist: bool):  # (B, S, D) -> (B, S, K)
        z = (h.astype(jnp.float32) @ self.up.T).astype(jnp.float32)  # (B, S, d_c)
        table = self.table.astype(jnp.float32)
        dots = z @ table.T
        if not sqdist:
            return dots
        return 2.0 * dots - jnp.sum(z * z, -1, keepdims=True) - jnp.sum(table * table, -1)[None, None]


class Expander(nn.Module):
    """Reconstructs a level's input ids from its memory rows, teacher-forced; returns per-stage logits."""

    cfg: ConfigDict
    vocab_size: int
    start_id: int
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, memory, row_valid, targets, target_pad, seg_id):
        """memory: (B, R, D); row_valid: (B, R); targets, target_pad, seg_id: (B, S). Returns [(B, S, K)] per stage."""
        cfg = self.cfg
        b, s = targets.shape
        chex.assert_shape([target_pad, seg_id], (b, s))
        codes = FactorizedCodes(self.vocab_size, cfg.d_lo_d_c, cfg.D, dtype=self.dtype, name="codes")
        x = codes.embed(shift_right(targets, self.start_id))
        positions = jnp.arange(s)
        memory = memory.astype(self.dtype)
        for i in range(cfg.d_layers):
            x = DecoderBlock(
                num_heads=cfg.d_heads,
                window=cfg.d_window,
                cross_window=cfg.d_cross_window,
                rows_per_segment=cfg.c_num_queries,
                ffn_mult=cfg.ffn_mult,
                implementation=self.implementation,
                dtype=self.dtype,
                name=f"block_{i}",
            )(x, target_pad, positions, memory, row_valid, seg_id)
        h = rms_norm(dtype=self.dtype, name="final_norm")(x)
        return [codes.logits(h, cfg.d_use_sqdist_logits)]
