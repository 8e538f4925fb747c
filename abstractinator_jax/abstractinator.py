"""One level of the pyramid (docs/ARCHITECTURE.md 3): the level's input embedding (a byte table at level 0, the lower
level's quantized vectors above), its compressor and expander wired together, and the level loss and metrics
(3.7). It owns nothing of the levels above or below: the pyramid (model.py) passes each level its inputs, its
targets and, above level 0, the lower level's codebooks."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from ml_collections import ConfigDict

from . import axes
from .codes import CodeCodec
from .compressor import CompressorOutput, EntropyOut, SegmentCompressor
from .config import EOS_ID
from .expander import Expander
from .layers import constrain, dense, kernel_init
from .losses import masked_cross_entropy


@struct.dataclass
class LevelOutput:
    loss: jax.Array  # () weighted level loss
    metrics: dict  # name -> () float32
    compressor: CompressorOutput
    logits: list  # per stage (B, S, K)
    digits: jax.Array  # (B, S, depth) int32 target digits of the ids (what the logits score)


class AbstractinatorLevel(nn.Module):
    """Level k: ids (B, S) in the level's vocabulary -> compressed memory rows, reconstruction loss and metrics.

    Level 0 reads bytes through its own embedding table. Level k > 0 reads the level below's quantized vectors
    (projected when the widths differ) and reconstructs its composed code ids (digit base `lo_K`, `lo_depth` digits)
    through the lower level's stage codebooks.
    """

    cfg: ConfigDict
    lo_K: int | None = None  # None at level 0
    lo_depth: int = 1
    lo_D: int | None = None
    lo_code_dim: int | None = None  # width of the lower level's codebooks (its c_vq_d_c, or D)
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"  # blocks.run_stack: rematerialization of every block stack in training

    def setup(self):
        cfg = self.cfg
        if self.lo_K is None:
            self.embedding = self.param(
                "embedding",
                kernel_init(axes.VOCAB, axes.EMBED, init=nn.initializers.normal(1.0)),
                (cfg.vocab_size, cfg.D),
            )
            vocab, start, code_K = cfg.vocab_size, EOS_ID, cfg.vocab_size
        else:
            if self.lo_D != cfg.D:
                self.in_proj = dense(cfg.D, (axes.EMBED, axes.EMBED_OUT), dtype=self.dtype, name="in_proj")
            vocab, start, code_K = None, CodeCodec(self.lo_K, self.lo_depth).eos_id, self.lo_K
        self.compressor = SegmentCompressor(cfg, self.implementation, self.dtype, remat=self.remat)
        self.expander = Expander(
            cfg,
            vocab,
            start,
            code_K,
            self.lo_depth,
            self.implementation,
            self.dtype,
            code_dim=self.lo_code_dim,
            remat=self.remat,
        )

    def embed(self, ids, inputs=None):
        if self.lo_K is None:
            x = self.embedding[ids].astype(self.dtype)
        else:
            x = inputs.astype(self.dtype)
            if self.lo_D != self.cfg.D:
                x = self.in_proj(x)
        return constrain(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))

    def entropy_model(self, ids, key_pad, stop_target_gradient: bool = False) -> EntropyOut:
        """Level 0's entropy model alone (stage 0): the embedding, the shared stack and the entropy branch."""
        return self.compressor.entropy_model(self.embed(ids), ids, key_pad, stop_target_gradient)

    def compress(self, ids, key_pad, train: bool = False, inputs=None) -> CompressorOutput:
        return self.compressor(self.embed(ids, inputs), ids, key_pad, train)

    def __call__(self, ids, key_pad, train: bool = False, inputs=None, lo_codebooks=None) -> LevelOutput:
        """ids: (B, S) int32; key_pad: (B, S) bool, True at PAD; above level 0 also the level below's quantized
        vectors `inputs` (B, S, D_lo) and stage codebooks. `train` updates the quantizer's state."""
        cfg = self.cfg
        chex.assert_rank([ids, key_pad], 2)
        chex.assert_type(key_pad, bool)
        comp = self.compress(ids, key_pad, train, inputs)
        memory = comp.quantized  # straight-through quantized vectors, or the continuous pooled ones
        logits, digits = self.expander(memory, comp.valid_mask, ids, key_pad, comp.segments.seg_id, lo_codebooks)
        real = ~key_pad
        code_ce = sum(masked_cross_entropy(lg, digits[..., s], real) for s, lg in enumerate(logits))
        loss = cfg.w_code_ce * code_ce + cfg.w_byte_lm_ce * comp.entropy.loss + cfg.w_vq * comp.vq_loss
        metrics = level_metrics(comp, logits, digits, key_pad)
        metrics.update(loss=loss, code_ce=code_ce, entropy_loss=comp.entropy.loss, vq_loss=comp.vq_loss)
        metrics.update(comp.vq_metrics)
        return LevelOutput(loss=loss, metrics=metrics, compressor=comp, logits=logits, digits=digits)


def level_metrics(comp: CompressorOutput, logits, digits, key_pad) -> dict:
    """Compression and reconstruction metrics of a level (docs/ARCHITECTURE.md 3.7), as float32 scalars. A token
    counts as reconstructed when every stage's argmax digit (teacher-forced residuals) matches."""
    real = ~key_pad
    n_real = jnp.sum(real).astype(jnp.float32)
    n_seg = jnp.sum(comp.segments.num_segments).astype(jnp.float32)
    rows_with_data = jnp.sum(jnp.any(real, axis=1)).astype(jnp.float32)
    match = jnp.ones(key_pad.shape, bool)
    for s, lg in enumerate(logits):
        match &= jnp.argmax(lg, axis=-1) == digits[..., s]
    correct = jnp.sum(match & real).astype(jnp.float32)
    bits = comp.entropy.bits
    return {
        "compression_ratio": n_real / jnp.maximum(n_seg, 1.0),
        "segments_per_row": n_seg / jnp.maximum(rows_with_data, 1.0),
        "overflow_rows": jnp.sum(comp.segments.overflow).astype(jnp.float32),
        "recon_accuracy": correct / jnp.maximum(n_real, 1.0),
        "entropy_bits_mean": jnp.sum(jnp.where(real, bits, 0.0)) / jnp.maximum(n_real, 1.0),
        "real_tokens": n_real,
    }
