"""The segment compressor (docs/ARCHITECTURE.md 3.2-3.4): the shared stack, the entropy branch (logit or gaussian
entropy model), segmentation, the compression branch, learned-query pooling and the optional residual quantizer
(3.6), producing a level's `CompressorOutput`."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from ml_collections import ConfigDict

from . import axes
from .blocks import TransformerBlock, compressor_attention
from .config import num_compression_layers, num_lm_layers
from .layers import constrain, dense, kernel_init, rms_norm, token_matmul
from .losses import masked_mean, token_nll
from .quantizer import ResidualVQ
from .segmentation import Segments, entropy_segments, segment_softmax_pool

LN2 = math.log(2.0)


@struct.dataclass
class EntropyOut:
    bits: jax.Array  # (B, S) float32; bits[t] = uncertainty about token t given tokens < t; bits[:, 0] = 0
    loss: jax.Array  # () float32, mean over real targets t >= 1
    logits: jax.Array | None = None  # (B, S, V) float32 logit model: logits[:, t] predicts token t+1; None (gaussian)


@struct.dataclass
class CompressorOutput:
    pooled: jax.Array  # (B, Q, D) pooled vectors before quantization (Q = segment slots * c_num_queries)
    quantized: jax.Array  # (B, Q, D) after quantization (== pooled without a quantizer)
    codes: jax.Array  # (B, Q) int32 code ids, -1 without a quantizer
    valid_mask: jax.Array  # (B, Q) bool, slot holds a real segment
    segments: Segments
    entropy: EntropyOut
    vq_loss: jax.Array  # () float32
    vq_metrics: dict  # quantizer metrics (perplexity, dead codes, ...); empty without a quantizer
    codebooks: list  # [(K, d_c)] per RVQ stage (the level above embeds / predicts codes with them); [] without


def _stack(cfg, n_layers, window, impl, dtype, name):
    return [
        TransformerBlock(
            features=cfg.D,
            num_heads=cfg.c_heads,
            window=window,
            attention=compressor_attention(cfg),
            ffn_mult=cfg.ffn_mult,
            implementation=impl,
            dtype=dtype,
            name=f"{name}_{i}",
        )
        for i in range(n_layers)
    ]


class LogitEntropyModel(nn.Module):
    """Causal token LM; bits[t] is the Shannon entropy (bits) of the distribution predicted at t-1."""

    cfg: ConfigDict
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, ids, key_pad, positions) -> EntropyOut:
        cfg = self.cfg
        for blk in _stack(cfg, num_lm_layers(cfg), cfg.c_window, self.implementation, self.dtype, "block"):
            x = blk(x, key_pad, positions)
        h = rms_norm(dtype=self.dtype, name="norm")(x)
        logits = dense(cfg.vocab_size, (axes.EMBED, axes.VOCAB), dtype=self.dtype, name="head")(h).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # predictions for tokens 1..S-1
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1) / LN2  # (B, S-1)
        bits = jnp.pad(ent, ((0, 0), (1, 0)))
        loss = masked_mean(token_nll(logits[:, :-1], ids[:, 1:]), ~key_pad[:, 1:])
        return EntropyOut(bits=bits, loss=loss, logits=logits)


class GaussianEntropyModel(nn.Module):
    """Diagonal-Gaussian next-vector model; bits[t] is the bits-per-dim surprisal of x_t under the prediction at t-1."""

    cfg: ConfigDict
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, ids, key_pad, positions) -> EntropyOut:
        cfg = self.cfg
        target = x
        for blk in _stack(cfg, num_lm_layers(cfg), cfg.c_window, self.implementation, self.dtype, "block"):
            x = blk(x, key_pad, positions)
        d = x.shape[-1]
        mu = dense(d, (axes.EMBED, axes.EMBED_OUT), dtype=self.dtype, name="mu", use_bias=True)(x).astype(jnp.float32)
        logvar = dense(d, (axes.EMBED, axes.EMBED_OUT), dtype=self.dtype, name="logvar", use_bias=True)(x)
        logvar = jnp.clip(logvar.astype(jnp.float32), -8.0, 8.0)
        diff = target[:, 1:].astype(jnp.float32) - mu[:, :-1]
        nll = 0.5 * (diff**2 * jnp.exp(-logvar[:, :-1]) + logvar[:, :-1] + math.log(2 * math.pi))
        bpd = jnp.mean(nll, axis=-1) / LN2  # (B, S-1)
        bits = jnp.pad(bpd, ((0, 0), (1, 0)))
        loss = masked_mean(bpd, ~key_pad[:, 1:])
        return EntropyOut(bits=bits, loss=loss)


class LearnedQueryPooling(nn.Module):
    """L learned queries per segment attend to the segment's own non-PAD tokens (docs/ARCHITECTURE.md 3.4); linear
    in S."""

    num_heads: int
    num_queries: int
    max_segments: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, seg: Segments, key_pad):  # (B, S, D) -> (B, max_segments * L, D)
        b, s, d = x.shape
        n, hd, lq = self.num_heads, d // self.num_heads, self.num_queries
        template = self.param(
            "query_template", kernel_init(axes.QUERIES, axes.EMBED, init=nn.initializers.normal(0.02)), (lq, d)
        )

        def proj(name):
            def f(inp):  # (..., D) -> (..., N, H)
                w = self.param(name, kernel_init(axes.EMBED, axes.HEADS, axes.KV), (d, n, hd))
                return token_matmul(inp.astype(self.dtype), w.astype(self.dtype))

            return f

        xn = rms_norm(dtype=self.dtype, name="kv_norm")(x)
        k = proj("k")(xn)  # (B, S, N, H)
        v = proj("v")(xn)
        q = proj("q")(template.astype(self.dtype))  # (L, N, H)
        scores = jnp.einsum("bsnh,lnh->bsln", k, q) / math.sqrt(hd)  # (B, S, L, N)
        pooled = segment_softmax_pool(scores, v, seg.seg_id, ~key_pad, self.max_segments)  # (B, Qs, L, N, H)
        pooled = pooled.reshape(b, self.max_segments * lq, d)
        out = rms_norm(dtype=self.dtype, name="out_norm")(pooled)
        out = dense(d, (axes.EMBED, axes.EMBED_OUT), dtype=self.dtype, name="out")(out)
        valid = jnp.arange(self.max_segments)[None, :] < seg.num_segments[:, None]  # (B, Qs)
        valid = jnp.repeat(valid, lq, axis=1)  # (B, Q)
        return jnp.where(valid[..., None], out, jnp.zeros((), out.dtype)), valid


class SegmentCompressor(nn.Module):
    cfg: ConfigDict
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    @property
    def max_segments(self) -> int:
        return self.cfg.c_output_length // self.cfg.c_num_queries

    @nn.compact
    def __call__(self, x, ids, key_pad, train: bool = False) -> CompressorOutput:
        """x: (B, S, D) input embeddings; ids: (B, S) int targets of the entropy LM (logit kind); key_pad: (B, S).
        `train` lets the quantizer update its state (when applied with mutable=['vq_state'])."""
        cfg = self.cfg
        b, s, d = x.shape
        chex.assert_shape(key_pad, (b, s))
        positions = jnp.arange(s)
        for blk in _stack(
            cfg, cfg.c_num_shared_encoder_layers, cfg.c_window, self.implementation, self.dtype, "shared"
        ):
            x = blk(x, key_pad, positions)
        model_cls = GaussianEntropyModel if cfg.c_entropy_model == "gaussian" else LogitEntropyModel
        ent = model_cls(cfg, self.implementation, self.dtype, name="entropy")(x, ids, key_pad, positions)
        seg = entropy_segments(
            ent.bits,
            key_pad,
            delta=cfg.c_entropy_delta,
            abs_threshold=cfg.c_entropy_abs_threshold,
            max_segments=self.max_segments,
        )
        h = x
        for blk in _stack(
            cfg, num_compression_layers(cfg), cfg.c_window, self.implementation, self.dtype, "compression"
        ):
            h = blk(h, key_pad, positions)
        pooled, valid = LearnedQueryPooling(
            num_heads=cfg.c_heads,
            num_queries=cfg.c_num_queries,
            max_segments=self.max_segments,
            dtype=self.dtype,
            name="pooler",
        )(h, seg, key_pad)
        pooled = constrain(pooled, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
        if cfg.c_vq_K > 0:
            quantizer = make_quantizer(cfg)
            quantized, codes, vq_loss, vq_metrics = quantizer(pooled, valid, train)
            codebooks = quantizer.stage_codebooks()
        else:
            quantized, codes = pooled, jnp.full(valid.shape, -1, jnp.int32)
            vq_loss, vq_metrics, codebooks = jnp.zeros((), jnp.float32), {}, []
        return CompressorOutput(
            pooled=pooled,
            quantized=quantized,
            codes=codes,
            valid_mask=valid,
            segments=seg,
            entropy=ent,
            vq_loss=vq_loss,
            vq_metrics=vq_metrics,
            codebooks=codebooks,
        )


def make_quantizer(cfg: ConfigDict) -> ResidualVQ:
    """The level's residual VQ from its config (c_vq_*)."""
    return ResidualVQ(
        K=cfg.c_vq_K,
        depth=cfg.c_vq_depth,
        code_dim=cfg.c_vq_d_c or cfg.D,
        beta=cfg.c_vq_beta,
        ema=cfg.c_vq_ema,
        decay=cfg.c_vq_decay,
        reset_interval=cfg.c_vq_reset_interval,
        reset_fraction=cfg.c_vq_reset_fraction,
        dead_threshold=cfg.c_vq_dead_threshold,
        buffer_size=cfg.c_vq_buffer_size,
        vectors_per_step=cfg.c_vq_vectors_per_step,
        name="quantizer",
    )
