"""The segment compressor (docs/ARCHITECTURE.md 3.2-3.4): the shared stack, the entropy branch (logit or gaussian
entropy model), segmentation, the compression branch, learned-query pooling and the optional residual quantizer
(3.6), producing a level's `CompressorOutput`. The stacks and entropy models also run as decoders (prefill + one
token at a time, with caches: see blocks.run_stack) for generation (generation.py)."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from ml_collections import ConfigDict

from . import axes
from .blocks import TransformerBlock, compressor_attention, run_stack
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


def logit_bits(logits: jax.Array) -> jax.Array:
    """Shannon entropy in bits of each predicted distribution: (..., V) logits -> (...)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1) / LN2


def gaussian_bits(target: jax.Array, mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """Bits-per-dimension surprisal of `target` under the diagonal Gaussian (mu, logvar): (..., D) -> (...)."""
    diff = target.astype(jnp.float32) - mu
    nll = 0.5 * (diff**2 * jnp.exp(-logvar) + logvar + math.log(2 * math.pi))
    return jnp.mean(nll, axis=-1) / LN2


class LogitEntropyModel(nn.Module):
    """Causal token LM; bits[t] is the Shannon entropy (bits) of the distribution predicted at t-1."""

    cfg: ConfigDict
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # blocks.run_stack: rematerialization of the blocks in training

    def setup(self):
        cfg = self.cfg
        self.blocks = _stack(cfg, num_lm_layers(cfg), cfg.c_window, self.implementation, self.dtype, "block")
        self.norm = rms_norm(dtype=self.dtype, name="norm")
        # the head feeds the loss and the entropy bits: float32 in any compute dtype (docs/ARCHITECTURE.md 7)
        self.head = dense(cfg.vocab_size, (axes.EMBED, axes.VOCAB), dtype=jnp.float32, name="head")

    def predict(self, x, key_pad, positions, cache=None):
        """Next-token logits (B, T, V) float32 at every position (the prediction made at t is for token t+1); with a
        `cache` (blocks.run_stack) also the caches."""
        out = run_stack(self.blocks, x, key_pad, positions, cache=cache, remat=self.remat)
        h, caches = out if cache is not None else (out, None)
        logits = self.head(self.norm(h))
        return logits if cache is None else (logits, caches)

    def __call__(self, x, ids, key_pad, positions, stop_target_gradient: bool = False) -> EntropyOut:
        del stop_target_gradient  # the targets are ids
        logits = self.predict(x, key_pad, positions)
        bits = jnp.pad(logit_bits(logits[:, :-1]), ((0, 0), (1, 0)))  # predictions for tokens 1..S-1
        loss = masked_mean(token_nll(logits[:, :-1], ids[:, 1:]), ~key_pad[:, 1:])
        return EntropyOut(bits=bits, loss=loss, logits=logits)


class GaussianEntropyModel(nn.Module):
    """Diagonal-Gaussian next-vector model; bits[t] is the bits-per-dim surprisal of x_t under the prediction at t-1."""

    cfg: ConfigDict
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # blocks.run_stack: rematerialization of the blocks in training

    def setup(self):
        cfg = self.cfg
        self.blocks = _stack(cfg, num_lm_layers(cfg), cfg.c_window, self.implementation, self.dtype, "block")
        d = cfg.D
        # the heads feed the loss and the entropy bits: float32 in any compute dtype (docs/ARCHITECTURE.md 7)
        self.mu = dense(d, (axes.EMBED, axes.EMBED_OUT), dtype=jnp.float32, name="mu", use_bias=True)
        self.logvar = dense(d, (axes.EMBED, axes.EMBED_OUT), dtype=jnp.float32, name="logvar", use_bias=True)

    def predict(self, x, key_pad, positions, cache=None):
        """(mu, logvar) (B, T, D) float32 at every position: the Gaussian the model predicts at t for x_{t+1}; with a
        `cache` (blocks.run_stack) also the caches."""
        out = run_stack(self.blocks, x, key_pad, positions, cache=cache, remat=self.remat)
        h, caches = out if cache is not None else (out, None)
        mu = self.mu(h)
        logvar = jnp.clip(self.logvar(h), -8.0, 8.0)
        return (mu, logvar) if cache is None else ((mu, logvar), caches)

    def __call__(self, x, ids, key_pad, positions, stop_target_gradient: bool = False) -> EntropyOut:
        """`stop_target_gradient`: no gradient into the targets x (stage 0, where nothing else trains the vectors x:
        through its targets the loss could fall by shrinking them, a collapse; see docs/ARCHITECTURE.md 7)."""
        mu, logvar = self.predict(x, key_pad, positions)
        target = jax.lax.stop_gradient(x) if stop_target_gradient else x
        bpd = gaussian_bits(target[:, 1:], mu[:, :-1], logvar[:, :-1])  # (B, S-1)
        bits = jnp.pad(bpd, ((0, 0), (1, 0)))
        loss = masked_mean(bpd, ~key_pad[:, 1:])
        return EntropyOut(bits=bits, loss=loss)


class LearnedQueryPooling(nn.Module):
    """L learned queries per segment attend to the segment's own non-PAD tokens (docs/ARCHITECTURE.md 3.4); linear
    in S.

    `token_scores` and `finish` are the two halves around the per-segment softmax, so that decoding can pool a
    segment incrementally (an online softmax over its tokens) with the same parameters."""

    dim: int
    num_heads: int
    num_queries: int
    max_segments: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        d, n, lq = self.dim, self.num_heads, self.num_queries
        hd = d // n
        self.template = self.param(
            "query_template", kernel_init(axes.QUERIES, axes.EMBED, init=nn.initializers.normal(0.02)), (lq, d)
        )
        self.kv_norm = rms_norm(dtype=self.dtype, name="kv_norm")
        self.wk = self.param("k", kernel_init(axes.EMBED, axes.HEADS, axes.KV), (d, n, hd))
        self.wv = self.param("v", kernel_init(axes.EMBED, axes.HEADS, axes.KV), (d, n, hd))
        self.wq = self.param("q", kernel_init(axes.EMBED, axes.HEADS, axes.KV), (d, n, hd))
        self.out_norm = rms_norm(dtype=self.dtype, name="out_norm")
        self.out = dense(d, (axes.EMBED, axes.EMBED_OUT), dtype=self.dtype, name="out")

    def token_scores(self, x):
        """x (B, T, D) -> (scores (B, T, L, N) of each token for each template row and head, values (B, T, N, H))."""
        hd = self.dim // self.num_heads
        xn = self.kv_norm(x)
        k = token_matmul(xn.astype(self.dtype), self.wk.astype(self.dtype))  # (B, T, N, H)
        v = token_matmul(xn.astype(self.dtype), self.wv.astype(self.dtype))
        q = token_matmul(self.template.astype(self.dtype), self.wq.astype(self.dtype))  # (L, N, H)
        scores = jnp.einsum("bsnh,lnh->bsln", k, q, preferred_element_type=jnp.float32)  # softmax logits: float32
        return scores / math.sqrt(hd), v

    def finish(self, pooled):
        """(B, Q, L, N, H) per-segment attention contexts -> (B, Q * L, D) rows."""
        b, q = pooled.shape[:2]
        out = self.out_norm(pooled.reshape(b, q * self.num_queries, self.dim))
        return self.out(out)

    def __call__(self, x, seg: Segments, key_pad):  # (B, S, D) -> (B, max_segments * L, D), valid (B, Q)
        scores, v = self.token_scores(x)
        pooled = segment_softmax_pool(scores, v, seg.seg_id, ~key_pad, self.max_segments)  # (B, Qs, L, N, H)
        out = self.finish(pooled)
        valid = jnp.arange(self.max_segments)[None, :] < seg.num_segments[:, None]  # (B, Qs)
        valid = jnp.repeat(valid, self.num_queries, axis=1)  # (B, Q)
        return jnp.where(valid[..., None], out, jnp.zeros((), out.dtype)), valid


class SegmentCompressor(nn.Module):
    """Shared stack -> entropy branch -> segmentation -> compression stack -> pooling -> quantizer (ARCHITECTURE
    3.2). `__call__` runs it all; the pieces (`shared_stack`, `entropy`, `compression_stack`, `pooler`, `quantizer`)
    are also used one at a time by decoding (generation.py)."""

    cfg: ConfigDict
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # blocks.run_stack: rematerialization of the blocks in training

    @property
    def max_segments(self) -> int:
        return self.cfg.c_output_length // self.cfg.c_num_queries

    def setup(self):
        cfg, impl, dtype = self.cfg, self.implementation, self.dtype
        self.shared = _stack(cfg, cfg.c_num_shared_encoder_layers, cfg.c_window, impl, dtype, "shared")
        model_cls = GaussianEntropyModel if cfg.c_entropy_model == "gaussian" else LogitEntropyModel
        self.entropy = model_cls(cfg, impl, dtype, remat=self.remat, name="entropy")
        self.compression = _stack(cfg, num_compression_layers(cfg), cfg.c_window, impl, dtype, "compression")
        self.pooler = LearnedQueryPooling(
            dim=cfg.D,
            num_heads=cfg.c_heads,
            num_queries=cfg.c_num_queries,
            max_segments=self.max_segments,
            dtype=dtype,
            name="pooler",
        )
        if cfg.c_vq_K > 0:
            self.quantizer = make_quantizer(cfg)

    def shared_stack(self, x, key_pad, positions, cache=None):
        """The shared blocks (identity when there are none); cache as in blocks.run_stack."""
        return run_stack(self.shared, x, key_pad, positions, cache=cache, remat=self.remat)

    def compression_stack(self, x, key_pad, positions, cache=None):
        return run_stack(self.compression, x, key_pad, positions, cache=cache, remat=self.remat)

    def entropy_model(self, x, ids, key_pad, stop_target_gradient: bool = False) -> EntropyOut:
        """The shared stack and the entropy branch alone (stage 0): x (B, S, D) input embeddings -> EntropyOut."""
        positions = jnp.arange(x.shape[1])
        h = self.shared_stack(x, key_pad, positions)
        return self.entropy(h, ids, key_pad, positions, stop_target_gradient)

    def segment(self, ent: EntropyOut, key_pad) -> Segments:
        """Segmentation (ARCHITECTURE 3.2 step 3) of the entropy model's bits."""
        cfg = self.cfg
        return entropy_segments(
            ent.bits,
            key_pad,
            delta=cfg.c_entropy_delta,
            abs_threshold=cfg.c_entropy_abs_threshold,
            max_segments=self.max_segments,
        )

    def quantize(self, pooled, valid):
        """(quantized (B, Q, D), codes (B, Q)) without any state update; codes are -1 without a quantizer."""
        if self.cfg.c_vq_K > 0:
            quantized, codes, _, _ = self.quantizer(pooled, valid, False)
            return quantized, codes
        return pooled, jnp.full(valid.shape, -1, jnp.int32)

    def __call__(self, x, ids, key_pad, train: bool = False) -> CompressorOutput:
        """x: (B, S, D) input embeddings; ids: (B, S) int targets of the entropy LM (logit kind); key_pad: (B, S).
        `train` lets the quantizer update its state (when applied with mutable=['vq_state'])."""
        cfg = self.cfg
        b, s, d = x.shape
        chex.assert_shape(key_pad, (b, s))
        positions = jnp.arange(s)
        x = self.shared_stack(x, key_pad, positions)
        ent = self.entropy(x, ids, key_pad, positions)
        seg = self.segment(ent, key_pad)
        h = self.compression_stack(x, key_pad, positions)
        pooled, valid = self.pooler(h, seg, key_pad)
        pooled = constrain(pooled, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
        if cfg.c_vq_K > 0:
            quantized, codes, vq_loss, vq_metrics = self.quantizer(pooled, valid, train)
            codebooks = self.quantizer.stage_codebooks()
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
