"""One level of the pyramid: embedding, compressor, expander, the level loss and metrics (ARCHITECTURE 3, 3.7)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from ml_collections import ConfigDict

from .compressor import CompressorOutput, SegmentCompressor
from .expander import Expander
from .layers import constrain, kernel_init


@struct.dataclass
class LevelOutput:
    loss: jax.Array  # () weighted level loss
    metrics: dict  # name -> () float32
    compressor: CompressorOutput
    logits: list  # per stage (B, S, K)


def _cross_entropy(logits, targets, mask):
    """Mean over mask of -log softmax(logits)[target]; logits (B, S, K) float32, targets (B, S), mask (B, S)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


class AbstractinatorLevel(nn.Module):
    """Level k: ids (B, S) in the level's vocabulary -> compressed memory rows, reconstruction loss and metrics."""

    cfg: ConfigDict
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.cfg
        self.embedding = self.param(
            "embedding", kernel_init("vocab", "embed", init=nn.initializers.normal(1.0)), (cfg.vocab_size, cfg.D)
        )
        self.compressor = SegmentCompressor(cfg, self.implementation, self.dtype)
        self.expander = Expander(cfg, cfg.vocab_size, cfg.eos_id, self.implementation, self.dtype)

    def embed(self, ids):
        return constrain(self.embedding[ids].astype(self.dtype), ("batch", "length", "act_embed"))

    def compress(self, ids, key_pad, train: bool = False) -> CompressorOutput:
        return self.compressor(self.embed(ids), ids, key_pad, train)

    def __call__(self, ids, key_pad, train: bool = False) -> LevelOutput:
        """ids: (B, S) int32; key_pad: (B, S) bool, True at PAD. `train` updates the quantizer's state."""
        cfg = self.cfg
        chex.assert_rank([ids, key_pad], 2)
        chex.assert_type(key_pad, bool)
        comp = self.compress(ids, key_pad, train)
        memory = comp.quantized  # straight-through quantized vectors, or the continuous pooled ones
        logits = self.expander(memory, comp.valid_mask, ids, key_pad, comp.segments.seg_id)
        real = ~key_pad
        code_ce = sum(_cross_entropy(lg, ids, real) for lg in logits)
        loss = cfg.w_code_ce * code_ce + cfg.w_byte_lm_ce * comp.entropy.loss + cfg.w_vq * comp.vq_loss
        metrics = level_metrics(comp, logits, ids, key_pad)
        metrics.update(loss=loss, code_ce=code_ce, entropy_loss=comp.entropy.loss, vq_loss=comp.vq_loss)
        metrics.update(comp.vq_metrics)
        return LevelOutput(loss=loss, metrics=metrics, compressor=comp, logits=logits)


def level_metrics(comp: CompressorOutput, logits, ids, key_pad) -> dict:
    """Compression and reconstruction metrics of a level (ARCHITECTURE 3.7), as float32 scalars."""
    real = ~key_pad
    n_real = jnp.sum(real).astype(jnp.float32)
    n_seg = jnp.sum(comp.segments.num_segments).astype(jnp.float32)
    rows_with_data = jnp.sum(jnp.any(real, axis=1)).astype(jnp.float32)
    pred = jnp.argmax(logits[0], axis=-1)
    correct = jnp.sum((pred == ids) & real).astype(jnp.float32)
    bits = comp.entropy.bits
    return {
        "compression_ratio": n_real / jnp.maximum(n_seg, 1.0),
        "segments_per_row": n_seg / jnp.maximum(rows_with_data, 1.0),
        "overflow_rows": jnp.sum(comp.segments.overflow).astype(jnp.float32),
        "recon_accuracy": correct / jnp.maximum(n_real, 1.0),
        "entropy_bits_mean": jnp.sum(jnp.where(real, bits, 0.0)) / jnp.maximum(n_real, 1.0),
        "real_tokens": n_real,
    }
