"""Scoring: the code length of rows under the whole model (`row_bits`) and every evaluation figure as totals
(`batch_totals`, in the metric protocol of metrics.py). The README's "Scoring" section states the definition.

Each row is coded on its own, as a decoder would rebuild it: the top level's codes (a discrete top transformer
predicts each from the earlier ones; a row's first code is uniform over the non-special codes), then each level's
ids given its codes (bytes and EOS at level 0, the level below's codes above; BOS is given, never coded), plus, for
a level whose segment boundaries a decoder cannot work out itself (the gaussian entropy model's boundary at t depends
on token t), the boundary flags as side information under an adaptive (Krichevsky-Trofimov) binary code. Every
quantity is causal in what a decoder already has, so the sum is a lossless code length; divided by the real UTF-8
bytes (BOS, EOS and PAD are not bytes) it is `bits_per_byte`. A continuous top transformer is a density, not a code:
then there is no total, and the level figures are reported as what they are, conditional on the codes.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
from flax import struct
from ml_collections import ConfigDict

from .codes import SPECIALS, CodeCodec
from .compressor import EntropyOut
from .config import BOS_ID, EOS_ID
from .losses import token_nll
from .metrics import CodeUsage, Count, Metric, Ratio
from .segmentation import Segments
from .top import next_row_pairs

LN2 = math.log(2.0)
# A row's first token when it is not BOS (a later row of a long document) is a byte or EOS.
FIRST_TOKEN_SYMBOLS = 257


@struct.dataclass
class LevelParts:
    """What level k's figures need, for a batch of B rows (the same rows at every level)."""

    ids: jax.Array  # (B, S_k) int32 the level's input ids: bytes at level 0, level k-1's composed codes above
    pad: jax.Array  # (B, S_k) bool, True where there is no input token
    logits: list  # [(B, S_k, K)] per digit stage: the expander's prediction of each id given the codes and earlier ids
    digits: jax.Array  # (B, S_k, depth) int32, the digits of the ids (what the logits score)
    segments: Segments
    entropy: EntropyOut
    codes: jax.Array  # (B, Q_k) int32, the level's own code ids (-1 without a quantizer)
    valid: jax.Array  # (B, Q_k) bool, the slot holds a segment


@struct.dataclass
class TopParts:
    """The top transformer's predictions at every top row t of row t+1."""

    valid: jax.Array  # (B, Q) bool, the top level's valid rows
    logits: list | None = None  # discrete: [(B, Q, K)] per digit stage
    digits: jax.Array | None = None  # discrete: (B, Q, depth) digits of each row's code
    pred: jax.Array | None = None  # continuous: (B, Q, E)
    rows: jax.Array | None = None  # continuous: (B, Q, E) the top level's vectors


@struct.dataclass
class ScoreParts:
    levels: list  # [LevelParts], bottom to top
    top: TopParts | None = None  # None without a top transformer


@struct.dataclass
class RowBits:
    """Per-row code lengths in bits, (B,) each (an all-PAD row costs 0)."""

    recon: list  # per level: the level's ids given its codes (level 0: bytes and EOS)
    boundary: list  # per level: boundary side information (0 where a decoder decides the boundaries itself)
    top: jax.Array | None  # the top code sequence (discrete top); None otherwise
    total: jax.Array | None  # top + recon + boundary: the row's lossless code length; None without a discrete top
    entropy_model: jax.Array | None  # level 0's logit entropy model as a byte LM (BOS given); None for gaussian


# ---------------------------------------------------------------------------------------------------------------------
# What a configuration can be scored with
# ---------------------------------------------------------------------------------------------------------------------


def has_code_length(cfg: ConfigDict) -> bool:
    """A total code length exists: the top level's codes are modelled by a discrete top transformer."""
    return bool(cfg.use_top_code_lm) and not cfg.top_transformer_config.continuous


def boundaries_decidable(cfg: ConfigDict, k: int) -> bool:
    """A decoder can work out level k's boundaries itself: the logit entropy model's boundary before token t depends
    only on tokens < t. (The gaussian model's depends on token t's own embedding; above level 0 it is always
    gaussian.)"""
    return k == 0 and cfg.levels[0].c_entropy_model == "logit"


def first_code_bits(K: int, depth: int) -> float:
    """Bits of a code drawn uniformly from the non-special composed codes: (K - 4) stage-0 codes, K for the rest."""
    return math.log2(K - len(SPECIALS)) + (depth - 1) * math.log2(K)


def kt_bits(zeros: jax.Array, ones: jax.Array) -> jax.Array:
    """Code length in bits of a binary sequence with these counts under the Krichevsky-Trofimov adaptive code
    (p(next = 1) = (ones so far + 1/2) / (flags so far + 1)); it does not depend on the order of the flags:
    -log2 [Gamma(zeros + 1/2) Gamma(ones + 1/2) / (pi Gamma(zeros + ones + 1))]. 0 for an empty sequence."""
    z = zeros.astype(jnp.float32)
    o = ones.astype(jnp.float32)
    nats = jax.lax.lgamma(z + o + 1.0) + math.log(math.pi) - jax.lax.lgamma(z + 0.5) - jax.lax.lgamma(o + 0.5)
    return nats / LN2


def code_nats(logits: list, digits: jax.Array) -> jax.Array:
    """-ln p of each composed id: the sum over digit stages of each stage's cross-entropy. (...,) float32."""
    return sum(token_nll(lg, digits[..., s]) for s, lg in enumerate(logits))


def all_digits_match(logits: list, digits: jax.Array) -> jax.Array:
    """True where the argmax of every stage is the target digit (teacher-forced residuals)."""
    match = jnp.ones(digits.shape[:-1], bool)
    for s, lg in enumerate(logits):
        match &= jnp.argmax(lg, axis=-1) == digits[..., s]
    return match


def coded(k: int, lp: LevelParts) -> jax.Array:
    """(B, S_k) the ids a decoder must be told: every real id, except BOS at level 0 (a document's first row starts
    with it; the decoder knows which rows those are)."""
    real = ~lp.pad
    return real & (lp.ids != BOS_ID) if k == 0 else real


# ---------------------------------------------------------------------------------------------------------------------
# Code lengths per row
# ---------------------------------------------------------------------------------------------------------------------


def row_bits(cfg: ConfigDict, parts: ScoreParts) -> RowBits:
    """The code length of each row, by part (see the module docstring)."""
    recon, boundary = [], []
    for k, lp in enumerate(parts.levels):
        chex.assert_equal_shape([lp.ids, lp.pad, lp.digits[..., 0]])
        nats = code_nats(lp.logits, lp.digits)  # (B, S_k)
        recon.append(jnp.sum(jnp.where(coded(k, lp), nats, 0.0), axis=1) / LN2)
        if boundaries_decidable(cfg, k):
            boundary.append(jnp.zeros(lp.ids.shape[:1], jnp.float32))
        else:
            # One segment-end flag per real token (the overflow-merged segments: what the expander conditions on).
            # The decoder knows how many segments the row has (one per code above), so it knows where the level ends.
            n = jnp.sum(~lp.pad, axis=1)
            m = lp.segments.num_segments
            boundary.append(kt_bits(n - m, m))
    top = None
    if has_code_length(cfg):
        tp, lv = parts.top, cfg.levels[-1]
        pairs = next_row_pairs(tp.valid)  # (B, Q-1) row t+1 is predicted at row t
        nats = code_nats([lg[:, :-1] for lg in tp.logits], tp.digits[:, 1:])
        first = jnp.any(tp.valid, axis=1).astype(jnp.float32) * first_code_bits(lv.c_vq_K, lv.c_vq_depth)
        top = first + jnp.sum(jnp.where(pairs, nats, 0.0), axis=1) / LN2
    total = None if top is None else top + sum(recon) + sum(boundary)
    lm = entropy_model_bits(parts.levels[0].ids, parts.levels[0].pad, parts.levels[0].entropy)
    return RowBits(recon=recon, boundary=boundary, top=top, total=total, entropy_model=lm)


def entropy_model_bits(ids: jax.Array, pad: jax.Array, ent: EntropyOut) -> jax.Array | None:
    """Level 0's logit entropy model as a causal byte LM, per row (B,): -log2 p(x_t | x_<t) of every real token
    after BOS; a later row of a long document has no prediction for its first token, which costs log2(257) (a byte or
    EOS). None for the gaussian model."""
    if ent.logits is None:
        return None
    real = ~pad
    nll = token_nll(ent.logits[:, :-1], ids[:, 1:])  # (B, S-1) nats of tokens 1..S-1
    first = (real[:, 0] & (ids[:, 0] != BOS_ID)).astype(jnp.float32) * math.log2(FIRST_TOKEN_SYMBOLS)
    return first + jnp.sum(jnp.where(real[:, 1:], nll, 0.0), axis=1) / LN2


def entropy_byte_nats(logits: jax.Array, ids: jax.Array, pad: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the summed -ln p of the real byte targets, their count) under a logit entropy model: the targets are the
    tokens t >= 1 (each predicted at t-1) that are bytes (id < 256); EOS, BOS and PAD targets are not bytes and are
    left out, as is a row's first token (nothing predicts it). Their ratio / ln 2 is stage 0's
    `entropy/bits_per_byte`."""
    targets = ids[:, 1:]
    is_byte = ~pad[:, 1:] & (targets < 256)
    nll = token_nll(logits[:, :-1], targets)
    return _sum(jnp.where(is_byte, nll, 0.0)), _sum(is_byte)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation figures as totals
# ---------------------------------------------------------------------------------------------------------------------


def _sum(x) -> jax.Array:
    return jnp.sum(jnp.asarray(x, jnp.float32))


def batch_totals(cfg: ConfigDict, parts: ScoreParts) -> tuple[dict[str, Metric], RowBits]:
    """The batch's totals of every evaluation figure (metrics.py), and its rows' code lengths."""
    rb = row_bits(cfg, parts)
    lp0 = parts.levels[0]
    out = _data_totals(lp0.ids, lp0.pad)
    n_bytes, n_rows = out["data/bytes"].total, out["data/rows"].total
    if rb.total is not None:
        out["bits_per_byte"] = Ratio(_sum(rb.total), n_bytes)
    if rb.top is not None:
        out["top/code_bits_per_byte"] = Ratio(_sum(rb.top), n_bytes)
    for k, lp in enumerate(parts.levels):
        out.update(_level_totals(cfg, k, lp, rb, n_bytes, n_rows))
    if parts.top is not None:
        out.update(_top_totals(parts.top))
    if rb.entropy_model is not None:
        out["level0/entropy_model_bits_per_byte"] = Ratio(_sum(rb.entropy_model), n_bytes)
    return out, rb


def _level_totals(cfg, k, lp: LevelParts, rb: RowBits, n_bytes, n_rows) -> dict[str, Metric]:
    p = f"level{k}/"
    real = ~lp.pad
    target = coded(k, lp)
    nats = code_nats(lp.logits, lp.digits)
    n_seg = _sum(lp.segments.num_segments)
    out: dict[str, Metric] = {}
    if k == 0:
        is_byte, is_eos = real & (lp.ids < 256), real & (lp.ids == EOS_ID)
        out[p + "recon_bits_per_token_given_codes"] = Ratio(_sum(jnp.where(is_byte, nats, 0.0)) / LN2, n_bytes)
        out[p + "eos_bits_given_codes"] = Ratio(_sum(jnp.where(is_eos, nats, 0.0)) / LN2, _sum(is_eos))
        out[p + "bytes_per_segment"] = Ratio(n_bytes, n_seg)
    else:
        out[p + "recon_bits_per_token_given_codes"] = Ratio(_sum(jnp.where(target, nats, 0.0)) / LN2, _sum(target))
    out[p + "recon_bits_per_byte"] = Ratio(_sum(rb.recon[k]), n_bytes)
    if not boundaries_decidable(cfg, k):
        out[p + "boundary_bits_per_byte"] = Ratio(_sum(rb.boundary[k]), n_bytes)
    out[p + "recon_accuracy"] = Ratio(_sum(all_digits_match(lp.logits, lp.digits) & target), _sum(target))
    out[p + "input_tokens_per_segment"] = Ratio(_sum(real), n_seg)
    out[p + "segments_per_row"] = Ratio(n_seg, n_rows)
    out[p + "overflow_rows"] = Count(_sum(lp.segments.overflow))
    if lp.entropy.logits is None:  # gaussian: a density of the next embedding, in bits per dimension
        targets = real[:, 1:]
        surprisal = _sum(jnp.where(targets, lp.entropy.bits[:, 1:], 0.0))
        out[p + "entropy_model_bits_per_dim"] = Ratio(surprisal, _sum(targets))
    lv = cfg.levels[k]
    if lv.c_vq_K > 0:
        out[p + "vq"] = CodeUsage(_code_usage(lp.codes, lp.valid, lv.c_vq_K, lv.c_vq_depth), reserved=len(SPECIALS))
    return out


def _code_usage(codes, valid, K: int, depth: int) -> jax.Array:
    """(depth, K) how often each stage's code was chosen by the valid slots."""
    digits = CodeCodec(K, depth).decompose(codes).reshape(-1, depth)
    w = valid.reshape(-1).astype(jnp.float32)
    return jnp.stack([jax.ops.segment_sum(w, digits[:, s], num_segments=K) for s in range(depth)])


def _top_totals(tp: TopParts) -> dict[str, Metric]:
    pairs = next_row_pairs(tp.valid)
    n_pairs = _sum(pairs)
    if tp.pred is not None:
        err = jnp.sum((tp.pred[:, :-1].astype(jnp.float32) - tp.rows[:, 1:].astype(jnp.float32)) ** 2, axis=-1)
        return {"top/mse": Ratio(_sum(jnp.where(pairs, err, 0.0)), n_pairs * tp.pred.shape[-1])}
    logits = [lg[:, :-1] for lg in tp.logits]
    nats = code_nats(logits, tp.digits[:, 1:])
    return {
        "top/code_bits_per_code": Ratio(_sum(jnp.where(pairs, nats, 0.0)) / LN2, n_pairs),
        "top/accuracy": Ratio(_sum(all_digits_match(logits, tp.digits[:, 1:]) & pairs), n_pairs),
    }


def _data_totals(ids: jax.Array, pad: jax.Array) -> dict[str, Metric]:
    real = ~pad
    return {
        "data/rows": Count(_sum(jnp.any(real, axis=1))),
        "data/bytes": Count(_sum(real & (ids < 256))),
        "data/documents": Count(_sum(real & (ids == EOS_ID))),
    }


def entropy_totals(ids: jax.Array, pad: jax.Array, ent: EntropyOut) -> tuple[dict[str, Metric], RowBits]:
    """A stage-0 run's figures (level 0's entropy model alone): `entropy/loss` (the training loss, unweighted: nats
    per real target t >= 1 for 'logit', bits per dimension for 'gaussian'), for 'logit' `entropy/bits_per_byte`
    (`entropy_byte_nats`) and `level0/entropy_model_bits_per_byte` (the byte-LM code length per byte, as a stage-1
    run reports it), for 'gaussian' `level0/entropy_model_bits_per_dim` (as stage 1); the rows' byte-LM bits."""
    out = _data_totals(ids, pad)
    targets = ~pad[:, 1:]
    lm_bits = entropy_model_bits(ids, pad, ent)
    if ent.logits is not None:
        nll = token_nll(ent.logits[:, :-1], ids[:, 1:])
        out["entropy/loss"] = Ratio(_sum(jnp.where(targets, nll, 0.0)), _sum(targets))
        nats, n = entropy_byte_nats(ent.logits, ids, pad)
        out["entropy/bits_per_byte"] = Ratio(nats / LN2, n)
        out["level0/entropy_model_bits_per_byte"] = Ratio(_sum(lm_bits), out["data/bytes"].total)
    else:
        surprisal = _sum(jnp.where(targets, ent.bits[:, 1:], 0.0))
        out["entropy/loss"] = Ratio(surprisal, _sum(targets))
        out["level0/entropy_model_bits_per_dim"] = Ratio(surprisal, _sum(targets))
    return out, RowBits(recon=[], boundary=[], top=None, total=None, entropy_model=lm_bits)


def score_batch(model, variables: dict, ids: jax.Array, key_pad: jax.Array) -> tuple[dict[str, Metric], RowBits]:
    """Run the model's scoring forward (`AbstractinatorPyramid.score`, no state update) on rows (B, S) and return
    the batch's totals and its rows' code lengths. Under jit with a sharded batch the sums cover the global batch.
    A stage-0 model has only level 0's entropy model: its figures are `entropy_totals`."""
    chex.assert_rank([ids, key_pad], 2)
    if model.config.stage == 0:
        ent = model.apply(variables, ids, key_pad, method=type(model).level0_entropy)
        return entropy_totals(ids, key_pad, ent)
    parts = model.apply(variables, ids, key_pad, method=type(model).score)
    return batch_totals(model.config, parts)


# ---------------------------------------------------------------------------------------------------------------------
# The definition in words (evaluate.py's JSON)
# ---------------------------------------------------------------------------------------------------------------------


def describe(cfg: ConfigDict) -> dict:
    """`bits_per_byte_note` (one line: what the total is, or why there is none) and `bits_per_byte_parts` (each
    reported part of the code length and whether a decoder can follow it)."""
    if cfg.stage == 0:
        figures = "entropy/loss and level0/entropy_model_bits_per_dim (bits per dimension of the next embedding)"
        if cfg.levels[0].c_entropy_model == "logit":
            figures = (
                "entropy/loss (nats per real target), entropy/bits_per_byte (-log2 p of the real byte targets, EOS "
                "and a row's first token left out) and level0/entropy_model_bits_per_byte (the byte LM's code length "
                "per byte, EOS coded, as stage 1 reports it)"
            )
        note = f"null: a stage-0 run trains only level 0's entropy model; its figures are {figures}"
        return {"bits_per_byte_note": note, "bits_per_byte_parts": {}}
    parts = {}
    if cfg.use_top_code_lm and not cfg.top_transformer_config.continuous:
        parts["top/code_bits_per_byte"] = (
            "top codes, -log2 p of each given the earlier ones (causal); a row's first code uniform over the "
            "non-special codes"
        )
    for k in range(len(cfg.levels)):
        ids = "bytes and EOS" if k == 0 else f"level{k - 1}'s codes"
        if boundaries_decidable(cfg, k):
            how = "boundaries decided by the decoder (the logit entropy model's boundary before t uses tokens < t)"
        else:
            how = "boundaries sent as side information"
            parts[f"level{k}/boundary_bits_per_byte"] = (
                f"level{k}'s segment-end flags, an adaptive (Krichevsky-Trofimov) code per row: the gaussian entropy "
                "model's boundary at t depends on token t itself, so a decoder cannot decide it"
            )
        parts[f"level{k}/recon_bits_per_byte"] = f"level{k}'s {ids} given level{k}'s codes and the earlier ids; {how}"
    if has_code_length(cfg):
        note = (
            "lossless code length per real UTF-8 byte: the sum of bits_per_byte_parts (each row coded on its own, "
            "BOS given, EOS coded); every part is causal in what a decoder already has"
        )
    elif cfg.use_top_code_lm:
        note = (
            "null: the continuous top transformer is a density over vectors, not a code; the level parts are "
            "conditional on the top level's vectors"
        )
    else:
        note = (
            "null: nothing models the top level's codes (use_top_code_lm=False), so there is no code length; the "
            "level parts are conditional on the codes"
        )
    return {"bits_per_byte_note": note, "bits_per_byte_parts": parts}
