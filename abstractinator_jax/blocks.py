"""Pre-norm transformer blocks (docs/ARCHITECTURE.md 3.1): `TransformerBlock` (causal self-attention, sliding-window
or full, then SwiGLU) for the compressor stacks and the top transformer, and `DecoderBlock` (self-attention,
segment-causal cross-attention into memory rows, SwiGLU) for the expander. Each adds its sublayers residually to
RMSNorm'ed inputs; the self-attention is standard or latent as an `AttentionSpec` says (built from the config by
`compressor_attention`, `expander_attention`, `top_attention`); the attention itself lives in attention.py.

Decoding: every block takes an optional `cache`, passed to its self-attention whichever kind it is (attention.py):
None for the full forward pass, `Prefill(max_len)` to also return the cache a prompt leaves, a decode cache
(`KVCache` for 'mha', `LatentCache` for 'mla') to advance one token per row; with a cache the block returns
(output, cache). `run_stack` runs a list of blocks the same way.

Rematerialization (config `remat`, docs/ARCHITECTURE.md 7): `run_stack` runs the blocks of the full forward pass
(no cache) under `jax.checkpoint`, so that the backward pass recomputes what the block's policy does not save; a
stack of two or more blocks runs as one `lax.scan` over their stacked parameters, so that the backward pass
recomputes one block at a time. The parameters, their names and the values computed are the same with every
setting; the decoding paths (with a cache) never use it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from ml_collections import ConfigDict

from . import axes
from .attention import AttentionSpec, Prefill, SegmentCrossAttention, is_decode_cache, self_attention
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
    """RMSNorm -> causal self-attention (sliding window when window > 0) -> residual; RMSNorm -> SwiGLU -> residual."""

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

    def __call__(self, x, key_pad, positions, cache=None):
        """(B, S, D), (B, S), positions (S,) | (B, S) -> (B, S, D); with a `cache` (module docstring) -> (x, cache)."""
        a = self.attn(self.attn_norm(x), key_pad, positions, cache)
        a, cache = a if cache is not None else (a, None)
        x = x + a
        x = x + self.ffn(self.ffn_norm(x))
        x = constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
        return x if cache is None else (x, cache)


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
    def __call__(self, x, key_pad, positions, memory, row_valid, seg_id, cache=None):
        """x (B, T, D), key_pad (B, T), memory (B, R, D), row_valid (B, R), seg_id (B, T) -> (B, T, D) [, cache]."""
        d = x.shape[-1]
        self_attn = self_attention(
            self.attention, d, self.num_heads, self.window, self.implementation, self.dtype, "self_attn"
        )
        a = self_attn(rms_norm(dtype=self.dtype, name="self_norm")(x), key_pad, positions, cache)
        a, cache = a if cache is not None else (a, None)
        x = x + a
        cross = SegmentCrossAttention(
            num_heads=self.num_heads,
            head_dim=d // self.num_heads,
            rows_per_segment=self.rows_per_segment,
            lookback=self.cross_window,
            dtype=self.dtype,
            name="cross_attn",
        )
        step = is_decode_cache(cache)
        x = x + cross(rms_norm(dtype=self.dtype, name="cross_norm")(x), memory, row_valid, seg_id, gather_rows=step)
        x = x + SwiGLU(self.ffn_mult * d, dtype=self.dtype, name="ffn")(rms_norm(dtype=self.dtype, name="ffn_norm")(x))
        x = constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
        return x if cache is None else (x, cache)


# What a rematerialized block keeps for the backward pass, per config `remat` value ('none' = no jax.checkpoint).
REMAT_POLICIES = {
    "block": None,  # only the block's inputs: everything inside the block is recomputed
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # also the projections' (token matmuls') outputs
}


def _call_block(blk, *args):
    return blk(*args)


def _same_shapes(a, b) -> bool:
    """Two parameter trees of the same structure, shapes and dtypes."""
    sa, sb = jax.tree.structure(a), jax.tree.structure(b)
    return sa == sb and all(
        x.shape == y.shape and x.dtype == y.dtype for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _scanned_stack(blocks, params, x, *rest, policy):
    """Rematerialized blocks of one structure (`params`: each block's) as one lax.scan over their stacked
    parameters, each step under jax.checkpoint with `policy`: the backward pass is a loop that recomputes one block
    at a time. Unrolled checkpointed blocks let XLA schedule several blocks' recomputation ahead of their backward
    passes, all of their intermediates alive at once (BENCHMARKS.md, "Memory"). Same values and gradients; the
    parameters keep their per-block names."""
    unbound = blocks[0].clone(parent=None)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)

    @functools.partial(jax.checkpoint, policy=policy)
    def step(h, p):
        return unbound.apply({"params": p}, h, *rest), None

    return jax.lax.scan(step, x, stacked)[0]


def run_stack(blocks, x, key_pad, positions, *extra, cache=None, remat: str = "none"):
    """Apply `blocks` in order. cache: None -> x; Prefill -> (x, [cache per block]); [cache per block] (one decoding
    step) -> (x, [cache per block]), each a KVCache or a LatentCache as the block's attention is. `extra` goes to
    every block after the positions (DecoderBlock's memory, row_valid, seg_id). `remat` ('none', 'block', 'dots':
    REMAT_POLICIES) checkpoints each block of the full forward pass (cache None; two or more blocks: `_scanned_stack`);
    the cached paths ignore it."""
    if cache is None:
        if remat != "none" and len(blocks) > 1 and not blocks[0].is_initializing():
            params = [nn.meta.unbox(b.variables["params"]) for b in blocks]
            if all(_same_shapes(params[0], p) for p in params[1:]):
                return _scanned_stack(blocks, params, x, key_pad, positions, *extra, policy=REMAT_POLICIES[remat])
        call = _call_block if remat == "none" else nn.remat(_call_block, policy=REMAT_POLICIES[remat])
        for blk in blocks:
            x = call(blk, x, key_pad, positions, *extra)
        return x
    caches = [cache] * len(blocks) if isinstance(cache, Prefill) else list(cache)
    new = []
    for blk, c in zip(blocks, caches, strict=True):
        x, c = blk(x, key_pad, positions, *extra, c)
        new.append(c)
    return x, new
