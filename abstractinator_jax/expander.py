"""Decoder-only expander with a factorized code embedding and head (docs/ARCHITECTURE.md 3.5).

At level 0 the "codebook" is a learned byte table (vocab x d_lo_d_c), depth 1. Above level 0 the lower level's RVQ
stage codebooks take its place (depth stages, K entries each, never a K**depth table). The decoder stack also runs
one token at a time with decoding caches (generation.py).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from ml_collections import ConfigDict

from . import axes
from .blocks import DecoderBlock, expander_attention, run_stack
from .codes import CodeCodec, residual_code_logits
from .layers import kernel_init, rms_norm


def shift_right(targets: jax.Array, start_id: int) -> jax.Array:
    """(B, S) -> (B, S): [start, t_0, ..., t_{S-2}] (teacher forcing input)."""
    return jnp.concatenate([jnp.full_like(targets[:, :1], start_id), targets[:, :-1]], axis=1)


class FactorizedCodes(nn.Module):
    """Code tables of width d_c (one per stage) plus one up-projection d_c -> D shared with the head's
    down-projection. At level 0 the module owns its single table (bytes); above, the lower level's RVQ stage
    codebooks are passed in (`tables`), so nothing of size K**depth ever exists."""

    num_codes: int | None  # own table size (level 0); None when the tables come from the level below
    code_dim: int
    model_dim: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        if self.num_codes is not None:
            self.table = self.param(
                "code_table",
                kernel_init(axes.VOCAB, axes.CODE, init=nn.initializers.normal(0.02)),
                (self.num_codes, self.code_dim),
            )
        scale = self.code_dim**-0.5
        self.up = self.param(
            "up",
            kernel_init(axes.CODE, axes.EMBED, init=nn.initializers.normal(float(scale))),
            (self.code_dim, self.model_dim),
        )

    def tables(self, external):
        return list(external) if external is not None else [self.table]

    def embed(self, digits, tables):  # (B, S, depth) -> (B, S, D): sum of the stage code vectors, projected up
        z = sum(t[digits[..., s]] for s, t in enumerate(tables))
        return (z @ self.up).astype(self.dtype)

    def down(self, h):
        """Hidden states (..., D) -> code space (..., d_c), through up.T."""
        return h.astype(jnp.float32) @ self.up.T.astype(jnp.float32)

    def logits(self, h, tables, teacher_digits, sqdist: bool, residual: bool):
        """Per-stage logits [(B, S, K)] of the hidden states h (B, S, D), projected down to d_c by up.T."""
        return residual_code_logits(self.down(h), tables, teacher_digits, sqdist=sqdist, residual=residual)


class Expander(nn.Module):
    """Reconstructs a level's input ids from its memory rows, teacher-forced; returns per-stage logits.

    Level 0: ids are bytes, `vocab_size` entries in an own table, depth 1. Above: ids are the lower level's composed
    codes (K**depth); they are decomposed into `depth` digits and embedded / predicted through the lower level's
    stage codebooks (width `code_dim`), passed to `__call__` as `codebooks`. `hidden` and `code_space` are the two
    halves generation uses (with a decoding cache in `hidden`).
    """

    cfg: ConfigDict
    vocab_size: int | None  # own table (level 0); None above level 0
    start_id: int
    code_K: int  # digit base of the ids (vocab_size at level 0, the lower level's K above)
    depth: int = 1
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    code_dim: int | None = None  # width of the lower level's codebooks (above level 0)
    remat: str = "none"  # blocks.run_stack: rematerialization of the blocks in training

    def setup(self):
        cfg = self.cfg
        code_dim = cfg.d_lo_d_c if self.vocab_size is not None else self.code_dim
        self.codes = FactorizedCodes(self.vocab_size, code_dim, cfg.D, dtype=self.dtype, name="codes")
        self.blocks = [
            DecoderBlock(
                num_heads=cfg.d_heads,
                window=cfg.d_window,
                cross_window=cfg.d_cross_window,
                attention=expander_attention(cfg),
                rows_per_segment=cfg.c_num_queries,
                ffn_mult=cfg.ffn_mult,
                implementation=self.implementation,
                dtype=self.dtype,
                name=f"block_{i}",
            )
            for i in range(cfg.d_layers)
        ]
        self.final_norm = rms_norm(dtype=self.dtype, name="final_norm")

    def digits(self, ids):  # (B, S) -> (B, S, depth)
        return CodeCodec(self.code_K, self.depth).decompose(ids)

    def tables(self, codebooks=None):
        """The per-stage code tables [(K, d_c)]: the own byte table at level 0, else the lower level's codebooks."""
        return self.codes.tables(codebooks)

    def hidden(self, inputs, key_pad, positions, memory, row_valid, seg_id, codebooks=None, cache=None):
        """Decoder input ids (B, T) (the targets shifted right) -> final hidden states (B, T, D); with a `cache`
        (blocks.run_stack: Prefill, or one step with positions (B,)) -> (hidden, caches)."""
        x = self.codes.embed(self.digits(inputs), self.tables(codebooks))
        memory = memory.astype(self.dtype)
        out = run_stack(self.blocks, x, key_pad, positions, memory, row_valid, seg_id, cache=cache, remat=self.remat)
        h, caches = out if cache is not None else (out, None)
        h = self.final_norm(h)
        return h if cache is None else (h, caches)

    def code_space(self, h):
        """Hidden states (B, T, D) -> (B, T, d_c), the vectors the factorized head scores against the tables."""
        return self.codes.down(h)

    def __call__(self, memory, row_valid, targets, target_pad, seg_id, codebooks=None):
        """memory: (B, R, D); row_valid: (B, R); targets, target_pad, seg_id: (B, S); codebooks: [(K, d_c)] per stage
        above level 0. Returns ([(B, S, K)] per stage, target digits (B, S, depth))."""
        cfg = self.cfg
        b, s = targets.shape
        chex.assert_shape([target_pad, seg_id], (b, s))
        h = self.hidden(
            shift_right(targets, self.start_id), target_pad, jnp.arange(s), memory, row_valid, seg_id, codebooks
        )
        target_digits = self.digits(targets)
        logits = self.codes.logits(
            h, self.tables(codebooks), target_digits, cfg.d_use_sqdist_logits, cfg.d_residual_conditioning
        )
        return logits, target_digits
