"""The model entry point (docs/ARCHITECTURE.md 4, 5, 7): `AbstractinatorPyramid` stacks the levels (each level reads
the quantized vectors and code ids of the one below), adds the optional top transformer, and runs stage 1 (train
the levels, and the top when `use_top_code_lm`), stage 2 (the levels as a frozen compressor, only the top
learns) or stage 0 (level 0's entropy model alone). Also the choice of attention implementation for the device at
hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from ml_collections import ConfigDict

from .abstractinator import AbstractinatorLevel
from .compressor import CompressorOutput, EntropyOut
from .scoring import LN2, LevelParts, ScoreParts, TopParts, entropy_byte_nats
from .segmentation import Segments
from .top import CodeSequenceTransformer


def resolve_attention_impl(requested: str, dtype: str) -> str:
    """'auto' -> 'cudnn' on a CUDA GPU with a 16-bit compute dtype, else 'xla'."""
    if requested != "auto":
        return requested
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and dtype in ("bfloat16", "float16") else "xla"


def code_dim(lv: ConfigDict) -> int:
    """Width of a level's codebooks (c_vq_d_c, or D when unset)."""
    return lv.c_vq_d_c or lv.D


class AbstractinatorPyramid(nn.Module):
    """ids (B, S) bytes -> total loss and metrics (`level{k}/<name>`, `top/<name>`).

    Level k+1 reads level k's quantized vectors with `~valid_mask` as its padding mask and reconstructs level k's
    code ids through level k's codebooks. Stage 1 trains the levels (and the top transformer too when
    `use_top_code_lm`); stage 2 runs the levels as fixed compressors and trains only the top transformer. Stage 0
    builds and runs only level 0's entropy model (its embedding, shared blocks and entropy branch): `entropy_loss`.
    """

    config: ConfigDict  # the full run config (levels, top_transformer_config, dtype, stage, ...)

    def setup(self):
        cfg = self.config
        impl = resolve_attention_impl(cfg.attention_impl, cfg.dtype)
        dtype = jnp.dtype(cfg.dtype)
        levels = []
        for i, lv in enumerate(cfg.levels):
            lo = cfg.levels[i - 1] if i else None
            levels.append(
                AbstractinatorLevel(
                    lv,
                    lo_K=lo.c_vq_K if lo else None,
                    lo_depth=lo.c_vq_depth if lo else 1,
                    lo_D=lo.D if lo else None,
                    lo_code_dim=code_dim(lo) if lo else None,
                    implementation=impl,
                    dtype=dtype,
                    remat=cfg.remat,
                    name=f"level_{i}",
                )
            )
        self.levels = levels
        if cfg.use_top_code_lm:
            self.top = CodeSequenceTransformer(
                cfg.top_transformer_config,
                impl,
                dtype,
                code_dim=code_dim(cfg.levels[-1]),
                remat=cfg.remat,
                row_buckets=cfg.top_row_buckets,
                batch_chunks=cfg.top_batch_chunks,
                name="top",
            )

    def __call__(self, ids, key_pad, train: bool = False) -> tuple[jax.Array, dict]:
        """`train=True` with mutable=['vq_state'] and an rng stream 'vq' updates quantizer state (EMA, resets)."""
        cfg = self.config
        if cfg.stage == 0:
            return self.entropy_loss(ids, key_pad)
        if cfg.stage == 2:
            if self.is_initializing():  # create every level parameter (expanders too): stage 1's exact tree
                self._levels(ids, key_pad, False)
            return self._stage2(ids, key_pad)
        total, metrics, comp = self._levels(ids, key_pad, train)
        if cfg.use_top_code_lm:
            top_loss, top_metrics = self._top(comp)
            total = total + cfg.top_lm_loss_weight * top_loss
            metrics.update({f"top/{k}": v for k, v in top_metrics.items()})
        metrics["loss"] = total
        return total, metrics

    def entropy_loss(self, ids, key_pad) -> tuple[jax.Array, dict]:
        """Stage 0: level 0's entropy loss weighted as in stage 1 (`w_byte_lm_ce * entropy loss`) and its metrics:
        `entropy/loss` (the unweighted loss: nats per real target t >= 1 for 'logit', bits per dimension for
        'gaussian') and, for 'logit', `entropy/bits_per_byte` (the mean -log2 p over the real byte targets only:
        scoring.entropy_byte_nats). Nothing but the embedding, the shared blocks and the entropy branch is computed
        (or created at init). The gaussian model's targets get no gradient here (see GaussianEntropyModel)."""
        ent = self.levels[0].entropy_model(ids, key_pad, stop_target_gradient=True)
        loss = self.config.levels[0].w_byte_lm_ce * ent.loss
        metrics = {"loss": loss, "entropy/loss": ent.loss}
        if ent.logits is not None:
            nats, n = entropy_byte_nats(ent.logits, ids, key_pad)
            metrics["entropy/bits_per_byte"] = nats / jnp.maximum(n, 1.0) / LN2
        return loss, metrics

    def level0_entropy(self, ids, key_pad) -> EntropyOut:
        """Level 0's entropy model on rows (B, S) (its bits, loss and, for 'logit', logits): stage 0's scoring."""
        return self.levels[0].entropy_model(ids, key_pad)

    def level0_segments(self, ids, key_pad) -> Segments:
        """Level 0's segmentation from its entropy model alone (what a stage-0 run would cut)."""
        level = self.levels[0]
        return level.compressor.segment(level.entropy_model(ids, key_pad), key_pad)

    def _levels(self, ids, key_pad, train):
        """All levels' losses (summed), metrics, and the top level's compressor output."""
        total = 0.0
        metrics = {}
        inputs, codebooks, cur_ids, cur_pad = None, None, ids, key_pad
        for k, level in enumerate(self.levels):
            out = level(cur_ids, cur_pad, train, inputs, codebooks)
            total = total + out.loss
            metrics.update({f"level{k}/{name}": v for name, v in out.metrics.items()})
            comp = out.compressor
            inputs, codebooks, cur_ids, cur_pad = comp.quantized, comp.codebooks, comp.codes, ~comp.valid_mask
        return total, metrics, comp

    def _top(self, comp: CompressorOutput):
        """The top loss, weighted by top_lm_mse_weight (continuous) or top_lm_ce_weight (codes), and its metrics."""
        cfg = self.config
        if cfg.top_transformer_config.continuous:
            loss, m = self.top(comp.quantized, comp.valid_mask)
            return cfg.top_lm_mse_weight * loss, m
        loss, m = self.top(comp.quantized, comp.valid_mask, comp.codes, comp.codebooks, cfg.levels[-1].c_vq_K)
        return cfg.top_lm_ce_weight * loss, m

    def _stage2(self, ids, key_pad):
        """The frozen pyramid compresses (no gradient, no state update); the top transformer learns its rows."""
        comps = jax.lax.stop_gradient(self.compress_all(ids, key_pad))
        top = comps[-1]
        top_loss, top_metrics = self._top(top)
        loss = self.config.top_lm_loss_weight * top_loss
        metrics = {f"top/{k}": v for k, v in top_metrics.items()}
        real = jnp.sum(~key_pad).astype(jnp.float32)
        metrics["level0/real_tokens"] = real
        for k, comp in enumerate(comps):
            n_seg = jnp.sum(comp.segments.num_segments).astype(jnp.float32)
            n_in = real if k == 0 else jnp.sum(comps[k - 1].valid_mask).astype(jnp.float32)
            metrics[f"level{k}/compression_ratio"] = n_in / jnp.maximum(n_seg, 1.0)
        metrics["loss"] = loss
        return loss, metrics

    def score(self, ids, key_pad) -> ScoreParts:
        """What the code length and the evaluation figures of rows ids (B, S) need (scoring.py), in eval mode (no
        state update): each level's expander scoring its ids given the level's codes, its segments and entropy
        model, and the top transformer's prediction of each top row from the earlier ones."""
        parts = []
        inputs, codebooks, cur_ids, cur_pad = None, None, ids, key_pad
        for level in self.levels:
            out = level(cur_ids, cur_pad, False, inputs, codebooks)
            comp = out.compressor
            parts.append(
                LevelParts(
                    ids=cur_ids,
                    pad=cur_pad,
                    logits=out.logits,
                    digits=out.digits,
                    segments=comp.segments,
                    entropy=comp.entropy,
                    codes=comp.codes,
                    valid=comp.valid_mask,
                )
            )
            inputs, codebooks, cur_ids, cur_pad = comp.quantized, comp.codebooks, comp.codes, ~comp.valid_mask
        if not self.config.use_top_code_lm:
            return ScoreParts(levels=parts)
        if self.config.top_transformer_config.continuous:
            *_, out = self.top(comp.quantized, comp.valid_mask, outputs=True)
            top = TopParts(valid=comp.valid_mask, pred=out["pred"], rows=comp.quantized)
        else:
            K = self.config.levels[-1].c_vq_K
            *_, out = self.top(comp.quantized, comp.valid_mask, comp.codes, comp.codebooks, K, outputs=True)
            top = TopParts(valid=comp.valid_mask, logits=out["logits"], digits=out["digits"])
        return ScoreParts(levels=parts, top=top)

    def compress_all(self, ids, key_pad) -> list[CompressorOutput]:
        """Per-level compressor outputs, bottom to top; never updates state."""
        outs = []
        inputs, cur_ids, cur_pad = None, ids, key_pad
        for level in self.levels:
            comp = level.compress(cur_ids, cur_pad, False, inputs)
            outs.append(comp)
            inputs, cur_ids, cur_pad = comp.quantized, comp.codes, ~comp.valid_mask
        return outs
