"""Generation (ARCHITECTURE 6): sampling text from a trained pyramid with cached, jitted decoding.

This module owns the decoding algorithm, its sampling rules and its state; the layers it steps through own their
caches (attention.KVCache, prefill + one-token steps). One call of `generate_ids` is one `jax.jit` program, compiled
once per (batch, prompt bucket, byte budget) shape: a prefill of every cache from the prompt, then a
`lax.while_loop` that emits one byte per live sample per iteration, with no host round trip.

The algorithm, with N levels (level 0 reads bytes; level k+1 reads level k's rows) and a top transformer:

1. Prefill. The prompt is `[BOS] + bytes`. Each level runs its ordinary forward pass over its input (bytes, or the
   rows of the level below) and fills its caches: the shared, entropy and compression stacks (sliding windows kept as
   ring buffers of `c_window` slots) and the expander's self-attention (`d_window` slots, or the whole budget when
   0). The prompt is cut into segments by the training rule, and its end is a segment boundary at every level: every
   prompt row is final (pooled, quantized) and becomes the next level's input and, at the top, the top transformer's
   context. The top transformer's prediction after the last prompt row is the first new top-level row.
2. A new row at level k (k >= 1) is expanded into level k-1 ids by level k's expander, one id at a time; each id is
   a level k-1 code, whose vector (the quantizer's `decode`) is the memory row under which level k-1 generates its
   segment. Level 0's expander emits bytes. An id is sampled stage by stage from the factorized head (residual
   conditioning on the chosen digit), with temperature, top-k and top-p applied to each stage. Bytes are limited to
   0..255 and EOS; codes never take the four reserved special values.
3. A segment ends where its level's entropy model marks a boundary, by the training rule `bits[t] > bits[t-1] +
   c_entropy_delta` (or `> c_entropy_abs_threshold`), or when it holds `gen_max_segment_len` ids (the level's cap).
   - logit entropy model (level 0 only): bits[t] is the entropy of the prediction made at t-1, so the boundary
     before id t is known before t is sampled: the segment closes first and id t is sampled under the next row.
   - gaussian entropy model: bits[t] is the surprisal of x_t itself, so it is known only for a candidate. The
     candidate id is sampled under the current row and scored by the entropy model (at level k >= 1 through its
     code's vector); if its surprisal marks a boundary it is discarded, the segment closes, and id t is sampled
     again under the next row. That regenerated id starts the new segment whatever its own surprisal (it is not
     tested again), so the generated text's segmentation can differ from what the entropy rule would give on it
     afterwards, exactly at those ids. The first id of every segment is never tested.
   - the cap is known in advance: the segment closes before the id that would exceed it.
4. Closing a segment at level k re-compresses it as training does: its pooled vector (an online softmax over the
   segment's compression-stack outputs, the same pooling as training) is quantized; that actual row replaces the
   predicted one as level k's memory row (later ids of level k-1 look back at it), and it is level k+1's next input
   (its entropy and compression stacks advance by one row, and its code is the next input of level k+1's expander),
   or at the top the top transformer's next input. Then the level above provides the next row: level k+1's expander
   samples the next id (which may itself close a level k+1 segment first), or the top transformer predicts it (a
   vector for a continuous top, a code sampled from its factorized head for a discrete one).
5. A sample stops at EOS (level 0's expander emitted it) or when it has its byte budget; the others continue.

The while loop is batch-synchronous. Everything per sample is selected by masks; cache writes need no masks: every
step writes at each sample's next unwritten position (a later real step rewrites it before reading), so a sample
that does not take part in a step is unaffected by it. Segment-closing work runs under `lax.cond` only when some
sample needs it. Generation supports `c_num_queries == 1` (one row per segment), the only setting the configs use.
"""

from __future__ import annotations

import dataclasses
import math
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from ml_collections import ConfigDict

from . import tokenizer
from .attention import Prefill, prefix_lengths
from .codes import CodeCodec, residual_code_logits
from .compressor import gaussian_bits, logit_bits
from .config import BOS_ID, EOS_ID, PAD_ID
from .expander import shift_right
from .segmentation import entropy_segments, segment_softmax_pool
from .sharding import batch_divisor, batch_sharding, replicated
from .train_state import merge_params

STOP_RUNNING, STOP_EOS, STOP_MAX_BYTES = 0, 1, 2
STOP_REASONS = {STOP_RUNNING: "running", STOP_EOS: "eos", STOP_MAX_BYTES: "max_bytes"}
PROMPT_BUCKET = 64  # prompts are padded to a multiple of this many tokens (fewer compiled shapes)
BUDGET_BUCKET = 64  # and byte budgets are rounded up to a multiple of this for the buffers' size


class GenerationError(ValueError):
    """A run that cannot generate as asked (no top transformer, unsupported settings). The message says what to do."""


# ---------------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------------


@struct.dataclass
class Sampling:
    """Sampling settings, as arrays: changing them does not recompile."""

    temperature: jax.Array  # () float32; <= 0 means greedy
    top_k: jax.Array  # () int32; 0 = no top-k
    top_p: jax.Array  # () float32; 1.0 = no nucleus cut
    greedy: jax.Array  # () bool: argmax


def sampling(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> Sampling:
    """Checked sampling settings (ValueError names the bad one)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy).")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off).")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off).")
    # host scalars: the same argument types wherever they are made (a jax scalar made under a mesh carries its axes,
    # and the compiled program would not be reused outside it)
    return Sampling(
        temperature=np.float32(temperature),
        top_k=np.int32(top_k),
        top_p=np.float32(top_p),
        greedy=np.bool_(greedy or temperature == 0),
    )


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """(..., V) logits -> logits / temperature with -inf outside the kept set: the top_k largest (0 = all), then the
    smallest set of most likely ids whose probability mass reaches top_p (the most likely id is always kept)."""
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    v = scaled.shape[-1]
    order = jnp.argsort(-scaled, axis=-1)  # most likely first
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    rank = jnp.arange(v)
    keep = (mass_before < top_p) & ((top_k <= 0) | (rank < top_k)) & jnp.isfinite(ranked)
    keep = keep.at[..., 0].set(True)
    keep = jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)  # back to id order
    return jnp.where(keep, scaled, -jnp.inf)


def sample_ids(keys: jax.Array, logits: jax.Array, sp: Sampling, allowed: jax.Array | None = None) -> jax.Array:
    """One id per row: keys (B,) PRNG keys, logits (B, V) -> (B,) int32. `allowed` (V,) bool masks ids out."""
    chex.assert_rank(logits, 2)
    logits = logits.astype(jnp.float32)
    if allowed is not None:
        logits = jnp.where(allowed, logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, sp.temperature, sp.top_k, sp.top_p)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    return jnp.where(sp.greedy, greedy, drawn)


def sample_code(keys, z, tables, sp: Sampling, *, allowed0=None, sqdist: bool = False, residual: bool = True):
    """A composed code per row from code-space vectors z (B, d_c) and stage tables [(K, d_c)]: stage s is sampled,
    then (with `residual`) its code vector is subtracted before stage s+1 is scored, as the factorized head is
    trained. `allowed0` (K,) restricts stage 0. Returns (B,) int32 ids sum_s digit_s * K**s."""
    digits = []
    for s, table in enumerate(tables):
        logits = residual_code_logits(z, [table], None, sqdist=sqdist)[0]
        d = sample_ids(_fold(keys, 100 + s), logits, sp, allowed0 if s == 0 else None)
        digits.append(d)
        if residual and s + 1 < len(tables):
            z = z - table.astype(jnp.float32)[d]
    return CodeCodec(tables[0].shape[0], len(tables)).compose(jnp.stack(digits, -1))


def _fold(keys, data):
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding state
# ---------------------------------------------------------------------------------------------------------------------


@struct.dataclass
class LevelState:
    """One level while decoding. Positions: the level's inputs (bytes at level 0, rows of level k-1 above)."""

    shared: list  # KVCache per shared block
    entropy: list  # KVCache per entropy-model block
    compression: list  # KVCache per compression block
    expander: list  # KVCache per expander block
    rows: jax.Array  # (B, R, D) memory rows of the level's expander: actual rows of closed segments, then the open one
    row_valid: jax.Array  # (B, R) bool
    seg: jax.Array  # (B,) int32 index of the open segment (its row is rows[seg])
    seg_len: jax.Array  # (B,) int32 ids committed to the open segment
    bits_prev: jax.Array  # (B,) float32 bits of the last committed input
    bits_next: jax.Array  # (B,) float32 logit model: bits of the next input (entropy of the last prediction)
    mu: jax.Array  # (B, D) gaussian model: predicted mean of the next input's shared-stack output
    logvar: jax.Array  # (B, D)
    pool_max: jax.Array  # (B, L, N) online softmax of the open segment's pooling: running max score
    pool_sum: jax.Array  # (B, L, N) running sum of exp(score - max)
    pool_acc: jax.Array  # (B, L, N, H) running exp-weighted sum of values
    last_id: jax.Array  # (B,) int32 the last committed input id: the expander's next decoder input


@struct.dataclass
class DecodeState:
    levels: list  # LevelState per level
    top: list  # KVCache per top-transformer block
    ids: jax.Array  # (B, P + M) int32 the byte sequence: prompt, then generated bytes, PAD after
    n: jax.Array  # (B,) int32 next byte position
    generated: jax.Array  # (B,) int32 bytes generated so far
    active: jax.Array  # (B,) bool still generating
    stop: jax.Array  # (B,) int32 STOP_* reason
    keys: jax.Array  # (B,) PRNG keys, one stream per sample
    step: jax.Array  # () int32 loop iteration


def _where(mask, new, old):
    """Per-sample select: mask (B,), new/old (B, ...)."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)


def _set_row(buf, idx, value, mask):
    """buf (B, R, ...) with buf[b, idx[b]] = value[b] where mask[b]."""
    b = jnp.arange(buf.shape[0])
    idx = jnp.clip(idx, 0, buf.shape[1] - 1)
    return buf.at[b, idx].set(_where(mask, value.astype(buf.dtype), buf[b, idx]))


def _take(x, idx):
    """x (B, T, ...) -> x[b, idx[b]] (B, ...)."""
    return x[jnp.arange(x.shape[0]), jnp.clip(idx, 0, x.shape[1] - 1)]


@dataclasses.dataclass(frozen=True)
class _Level:
    """What decoding needs to know about a level (static)."""

    k: int
    kind: str  # 'logit' | 'gaussian'
    delta: float
    abs_threshold: float | None
    cap: int
    D: int
    heads: int
    queries: int
    sqdist: bool
    residual: bool
    start_id: int
    code_K: int  # digit base of the level's input ids (its expander's vocabulary)

    def boundary(self, bits, bits_prev):
        jump = bits > bits_prev + self.delta
        if self.abs_threshold is not None:
            jump |= bits > self.abs_threshold
        return jump


def check_can_generate(cfg: ConfigDict, from_entropy_model: bool = False) -> None:
    """Raise GenerationError (one line that says what exists instead) when `cfg`'s model cannot generate."""
    lv0 = cfg.levels[0]
    if from_entropy_model:
        if lv0.c_entropy_model != "logit":
            raise GenerationError(
                "--from_entropy_model samples from level 0's entropy model, which must be a byte LM "
                "(c_entropy_model='logit'); this run's is 'gaussian' (it predicts vectors, not bytes)."
            )
        return
    if not cfg.use_top_code_lm:
        hint = (
            " Use --from_entropy_model to sample from level 0's entropy model (a small causal byte LM)."
            if lv0.c_entropy_model == "logit"
            else " Train a top transformer on it first (stage 2, see README)."
        )
        raise GenerationError(
            "this run has no top transformer (use_top_code_lm=False), so it cannot propose new segments." + hint
        )
    for i, lv in enumerate(cfg.levels):
        if lv.c_num_queries != 1:
            raise GenerationError(f"generation supports c_num_queries=1 only; levels[{i}] has {lv.c_num_queries}.")


class Generator:
    """Cached decoding for one model: `generate_ids` (one jitted program per shape); `generate_text` below is the
    host side (text prompts in, text out)."""

    def __init__(self, model, cfg: ConfigDict, from_entropy_model: bool = False):
        check_can_generate(cfg, from_entropy_model)
        self.model = model
        self.cfg = cfg
        self.from_entropy_model = from_entropy_model
        self.levels = []
        for k, lv in enumerate(cfg.levels):
            lo = cfg.levels[k - 1] if k else None
            self.levels.append(
                _Level(
                    k=k,
                    kind=lv.c_entropy_model,
                    delta=float(lv.c_entropy_delta),
                    abs_threshold=None if lv.c_entropy_abs_threshold is None else float(lv.c_entropy_abs_threshold),
                    cap=int(lv.gen_max_segment_len),
                    D=lv.D,
                    heads=lv.c_heads,
                    queries=lv.c_num_queries,
                    sqdist=bool(lv.d_use_sqdist_logits),
                    residual=bool(lv.d_residual_conditioning),
                    start_id=EOS_ID if k == 0 else CodeCodec(lo.c_vq_K, lo.c_vq_depth).eos_id,
                    code_K=lv.vocab_size if k == 0 else lo.c_vq_K,
                )
            )
        self.top_cfg = cfg.top_transformer_config
        self._jitted = jax.jit(self._generate, static_argnums=(4,))
        self._jitted_lm = jax.jit(self._generate_from_entropy_model, static_argnums=(4,))

    # -- model pieces (each one `model.apply`) ------------------------------------------------------------------------

    def _apply(self, v, fn, *args):
        return self.model.apply(v, *args, method=fn)

    def _codebooks(self, m, k):
        """Stage codebooks of level k's quantizer (the tables of level k+1's expander)."""
        return m.levels[k].compressor.quantizer.stage_codebooks()

    def _comp_step(self, v, k, inp, pos, lv: LevelState, with_compression: bool) -> dict:
        """Level k's compressor on one new input at positions pos (B,): ids (B,) at level 0, row vectors (B, D_lo)
        above. Returns the shared-stack output 'h' (B, D) (the gaussian model's target), the entropy model's
        prediction 'preds' (logits (B, V) or (mu, logvar)), the new caches, and with `with_compression` the pooling
        scores (B, L, N) and values (B, N, H) of the compression output."""

        def fn(m, inp, pos, shared, entropy, compression):
            lvl = m.levels[k]
            comp = lvl.compressor
            x = lvl.embed(inp[:, None]) if k == 0 else lvl.embed(None, inp[:, None])  # (B, 1, D)
            pad = jnp.zeros(x.shape[:2], bool)
            h, shared = comp.shared_stack(x, pad, pos, shared)
            preds, entropy = comp.entropy.predict(h, pad, pos, entropy)
            out = {
                "h": h[:, 0],
                "preds": jax.tree.map(lambda a: a[:, 0], preds),
                "shared": shared,
                "entropy": entropy,
                "compression": compression,
            }
            if with_compression:
                hc, out["compression"] = comp.compression_stack(h, pad, pos, compression)
                scores, values = comp.pooler.token_scores(hc)
                out["scores"], out["values"] = scores[:, 0], values[:, 0]
            return out

        return self._apply(v, fn, inp, pos, lv.shared, lv.entropy, lv.compression)

    def _expander_step(self, v, k, lv: LevelState, pos):
        """Level k's expander at positions pos (B,) with decoder input lv.last_id under row lv.seg.
        Returns (code-space vector (B, d_c), stage tables [(K, d_c)], caches)."""

        def fn(m, prev, pos, seg, rows, row_valid, caches):
            e = m.levels[k].expander
            books = self._codebooks(m, k - 1) if k else None
            pad = jnp.zeros((prev.shape[0], 1), bool)
            h, caches = e.hidden(prev[:, None], pad, pos, rows, row_valid, seg[:, None], books, cache=caches)
            tables = [t.astype(jnp.float32) for t in e.tables(books)]
            return e.code_space(h)[:, 0], tables, caches

        return self._apply(v, fn, lv.last_id, pos, lv.seg, lv.rows, lv.row_valid, lv.expander)

    def _decode_codes(self, v, k, codes):
        """Level k codes (B,) -> their vectors (B, D_k)."""
        return self._apply(v, lambda m, c: m.levels[k].compressor.quantizer.decode(c), codes)

    def _finish_row(self, v, k, lv: LevelState):
        """The open segment's actual row: (vector (B, D) as training's next level / top sees it, code (B,))."""
        pooled = lv.pool_acc / jnp.where(lv.pool_sum > 0, lv.pool_sum, 1.0)[..., None]  # (B, L, N, H)

        def fn(m, pooled):
            comp = m.levels[k].compressor
            rows = comp.pooler.finish(pooled[:, None])  # (B, L, D)
            q, codes = comp.quantize(rows, jnp.ones(rows.shape[:2], bool))
            return q[:, 0], codes[:, 0]

        return self._apply(v, fn, pooled)

    def _allowed(self, k):
        """Ids level k's expander may emit: bytes and EOS at level 0; codes without the reserved specials above."""
        if k == 0:
            ids = np.arange(self.levels[0].code_K)
            return jnp.asarray((ids < 256) | (ids == EOS_ID))
        return jnp.arange(self.levels[k].code_K) < self.levels[k].code_K - 4

    def _sample_expander(self, keys, k, z, tables, sp):
        lv = self.levels[k]
        return sample_code(keys, z, tables, sp, allowed0=self._allowed(k), sqdist=lv.sqdist, residual=lv.residual)

    def _top_row(self, v, keys, pred, sp):
        """The top's prediction (B, E) -> the new top-level row vector (B, D)."""
        if self.top_cfg.continuous:
            return pred
        top = len(self.levels) - 1

        def fn(m, pred):
            return m.top.code_space(pred), [t.astype(jnp.float32) for t in self._codebooks(m, top)]

        z, tables = self._apply(v, fn, pred)
        K = tables[0].shape[0]
        code = sample_code(keys, z, tables, sp, allowed0=jnp.arange(K) < K - 4)
        return self._decode_codes(v, top, code)

    # -- segment bookkeeping -------------------------------------------------------------------------------------------

    @staticmethod
    def _pool_add(lv: LevelState, scores, values, mask) -> LevelState:
        """Add one token (scores (B, L, N), values (B, N, H)) to the open segment's online softmax."""
        new_max = jnp.maximum(lv.pool_max, scores)
        scale = jnp.exp(lv.pool_max - new_max)
        w = jnp.exp(scores - new_max)
        acc = lv.pool_acc * scale[..., None] + w[..., None] * values[:, None].astype(jnp.float32)
        return lv.replace(
            pool_max=_where(mask, new_max, lv.pool_max),
            pool_sum=_where(mask, lv.pool_sum * scale + w, lv.pool_sum),
            pool_acc=_where(mask, acc, lv.pool_acc),
        )

    @staticmethod
    def _pool_reset(lv: LevelState, mask) -> LevelState:
        return lv.replace(
            pool_max=_where(mask, jnp.full_like(lv.pool_max, -jnp.inf), lv.pool_max),
            pool_sum=_where(mask, jnp.zeros_like(lv.pool_sum), lv.pool_sum),
            pool_acc=_where(mask, jnp.zeros_like(lv.pool_acc), lv.pool_acc),
        )

    def _commit(self, k, lv: LevelState, out: dict, inp_id, mask) -> LevelState:
        """Level k's compressor has taken one more input (`out` of _comp_step with compression): advance its
        entropy state, the open segment's pooling, its length and the expander's next decoder input."""
        info = self.levels[k]
        if info.kind == "gaussian":
            bits = gaussian_bits(out["h"], lv.mu, lv.logvar)
            mu, logvar = out["preds"]
            lv = lv.replace(mu=_where(mask, mu, lv.mu), logvar=_where(mask, logvar, lv.logvar))
        else:
            bits = lv.bits_next
            lv = lv.replace(bits_next=_where(mask, logit_bits(out["preds"]), lv.bits_next))
        lv = lv.replace(
            shared=out["shared"],
            entropy=out["entropy"],
            compression=out["compression"],
            bits_prev=_where(mask, bits, lv.bits_prev),
            seg_len=lv.seg_len + mask.astype(jnp.int32),
            last_id=_where(mask, inp_id, lv.last_id),
        )
        return self._pool_add(lv, out["scores"], out["values"], mask)

    def _close(self, v, st: DecodeState, k: int, mask, sp) -> DecodeState:
        """Close level k's open segment where `mask`: its actual row replaces the predicted one, goes up (next
        level's input, or the top's), and the level above provides the row of level k's next segment."""
        levels = list(st.levels)
        lv = levels[k]
        vec, code = self._finish_row(v, k, lv)
        closed_seg = lv.seg
        lv = lv.replace(rows=_set_row(lv.rows, closed_seg, vec, mask), seg=lv.seg + mask.astype(jnp.int32))
        lv = self._pool_reset(lv.replace(seg_len=_where(mask, jnp.zeros_like(lv.seg_len), lv.seg_len)), mask)
        levels[k] = lv
        keys = _fold(_fold(st.keys, st.step), 10 * k + 5)
        if k + 1 < len(self.levels):
            up = levels[k + 1]
            out = self._comp_step(v, k + 1, vec, closed_seg, up, with_compression=True)
            levels[k + 1] = self._commit(k + 1, up, out, code, mask)
            st = st.replace(levels=levels)
            st, new_code = self._produce(v, st, k + 1, mask, sp)
            new_vec = self._decode_codes(v, k, new_code)
        else:

            def fn(m, row, pos, caches):
                valid = jnp.ones((row.shape[0], 1), bool)
                return m.top.predict(row[:, None], valid, pos, cache=caches)

            pred, top = self._apply(v, fn, vec, closed_seg, st.top)
            st = st.replace(levels=levels, top=top)
            new_vec = self._top_row(v, keys, pred[:, 0], sp)
        levels = list(st.levels)
        lv = levels[k]
        levels[k] = lv.replace(
            rows=_set_row(lv.rows, lv.seg, new_vec, mask), row_valid=_set_row(lv.row_valid, lv.seg, mask, mask)
        )
        return st.replace(levels=levels)

    def _decide(self, v, st: DecodeState, k: int, mask, pos_comp, pos_exp, sp):
        """Level k's next id where `mask`: close the segment first when the cap (or, logit model, the entropy rule)
        says so; otherwise sample a candidate, which a gaussian entropy model may reject (then the segment closes and
        the id is sampled again under the next row). Returns (state, id (B,), the compressor's step on a level-0
        candidate or None)."""
        info = self.levels[k]
        lv = st.levels[k]
        need = mask & (lv.seg_len >= info.cap)
        if info.kind == "logit":
            need |= mask & (lv.seg_len > 0) & info.boundary(lv.bits_next, lv.bits_prev)
        keys = _fold(st.keys, st.step)
        z, tables, caches = self._expander_step(v, k, lv, pos_exp)
        cand = self._sample_expander(_fold(keys, 10 * k), k, z, tables, sp)
        lv = lv.replace(expander=caches)
        out = None
        reject = jnp.zeros_like(mask)
        if k == 0:
            out = self._comp_step(v, 0, cand, pos_comp, lv, with_compression=True)
            check = out
        elif info.kind == "gaussian":
            check = self._comp_step(v, k, self._decode_codes(v, k - 1, cand), pos_comp, lv, with_compression=False)
            # the candidate's keys sit at the next position; the commit of the actual row rewrites them
            lv = lv.replace(shared=check["shared"], entropy=check["entropy"])
        if info.kind == "gaussian":
            bits = gaussian_bits(check["h"], lv.mu, lv.logvar)
            reject = mask & ~need & (lv.seg_len > 0) & info.boundary(bits, lv.bits_prev)
        close = need | reject
        levels = list(st.levels)
        levels[k] = lv
        st = st.replace(levels=levels)

        def closed(carry):
            st, _, out = carry
            st = self._close(v, st, k, close, sp)
            lv = st.levels[k]
            z, tables, caches = self._expander_step(v, k, lv, pos_exp)
            again = self._sample_expander(_fold(keys, 10 * k + 1), k, z, tables, sp)
            levels = list(st.levels)
            levels[k] = lv.replace(expander=caches)
            st = st.replace(levels=levels)
            chosen = jnp.where(close, again, cand)
            if k == 0:  # the compressor step of the id actually kept
                out = self._comp_step(v, 0, chosen, pos_comp, levels[0], with_compression=True)
            return st, chosen, out

        return jax.lax.cond(jnp.any(close), closed, lambda c: c, (st, cand, out))

    def _produce(self, v, st: DecodeState, k: int, mask, sp):
        """Level k (>= 1) samples the id of level k-1's next row where `mask` (level k-1 just opened a segment)."""
        seg_lo = st.levels[k - 1].seg
        # the expander writes at each sample's next position: the new row for `mask`, one past the open row otherwise
        pos_exp = jnp.where(mask, seg_lo, seg_lo + 1)
        st, code, _ = self._decide(v, st, k, mask, seg_lo, pos_exp, sp)
        return st, code

    # -- prefill -------------------------------------------------------------------------------------------------------

    def _level_prefill(self, v, k, ids, inputs, pad, capacity: int):
        """Level k's forward pass over its prompt input with caches; returns its rows, segmentation and state."""
        info = self.levels[k]
        b, p = ids.shape

        def fn(m, ids, inputs, pad):
            lvl = m.levels[k]
            comp = lvl.compressor
            x = lvl.embed(ids, inputs)
            pos = jnp.arange(p)
            h, shared = comp.shared_stack(x, pad, pos, Prefill(capacity))
            preds, entropy = comp.entropy.predict(h, pad, pos, Prefill(capacity))
            hc, compression = comp.compression_stack(h, pad, pos, Prefill(capacity))
            scores, values = comp.pooler.token_scores(hc)
            return h, preds, shared, entropy, compression, scores, values

        h, preds, shared, entropy, compression, scores, values = self._apply(v, fn, ids, inputs, pad)
        last = prefix_lengths(pad) - 1  # (B,)
        if info.kind == "logit":
            bits = jnp.pad(logit_bits(preds[:, :-1]), ((0, 0), (1, 0)))
            bits_next = logit_bits(_take(preds, last))
            mu = logvar = jnp.zeros((b, info.D), jnp.float32)
        else:
            mu_all, logvar_all = preds
            bits = jnp.pad(gaussian_bits(h[:, 1:], mu_all[:, :-1], logvar_all[:, :-1]), ((0, 0), (1, 0)))
            bits_next = jnp.zeros((b,), jnp.float32)
            mu, logvar = _take(mu_all, last), _take(logvar_all, last)
        cfg = self.cfg.levels[k]
        seg = entropy_segments(bits, pad, delta=info.delta, abs_threshold=info.abs_threshold, max_segments=p)
        pooled = segment_softmax_pool(scores, values, seg.seg_id, ~pad, p)  # (B, P, L, N, H)
        valid = jnp.arange(p)[None, :] < seg.num_segments[:, None]  # (B, P)

        def finish(m, pooled, valid):
            comp = m.levels[k].compressor
            rows = comp.pooler.finish(pooled)
            rows = jnp.where(valid[..., None], rows, 0.0)
            return comp.quantize(rows, valid)

        rows, codes = self._apply(v, finish, pooled, valid)  # (B, P, D), (B, P)
        n_heads = info.heads
        hd = info.D // n_heads
        lv = LevelState(
            shared=shared,
            entropy=entropy,
            compression=compression,
            expander=[],
            rows=jnp.zeros((b, capacity, info.D), jnp.float32).at[:, :p].set(rows.astype(jnp.float32)),
            row_valid=jnp.zeros((b, capacity), bool).at[:, :p].set(valid),
            seg=seg.num_segments,
            seg_len=jnp.zeros((b,), jnp.int32),
            bits_prev=_take(bits, last),
            bits_next=bits_next,
            mu=mu,
            logvar=logvar,
            pool_max=jnp.full((b, cfg.c_num_queries, n_heads), -jnp.inf, jnp.float32),
            pool_sum=jnp.zeros((b, cfg.c_num_queries, n_heads), jnp.float32),
            pool_acc=jnp.zeros((b, cfg.c_num_queries, n_heads, hd), jnp.float32),
            last_id=_take(ids, last),
        )
        return lv, seg.seg_id, rows, codes, valid

    def _expander_prefill(self, v, k, targets, pad, rows, row_valid, seg_id, capacity):
        info = self.levels[k]

        def fn(m, targets, pad, rows, row_valid, seg_id):
            e = m.levels[k].expander
            books = self._codebooks(m, k - 1) if k else None
            inputs = shift_right(targets, info.start_id)
            pos = jnp.arange(targets.shape[1])
            return e.hidden(inputs, pad, pos, rows, row_valid, seg_id, books, cache=Prefill(capacity))[1]

        return self._apply(v, fn, targets, pad, rows, row_valid, seg_id)

    def prefill(self, v, prompt, keys, max_new: int, sp: Sampling) -> DecodeState:
        """Compress the prompt (B, P) upward through every level (filling every cache), then open a new segment at
        every level: the top's prediction, expanded downward to level 0's first row."""
        chex.assert_rank(prompt, 2)
        chex.assert_type(prompt, jnp.int32)
        b, p = prompt.shape
        capacity = p + max_new + 1  # rows / positions any level can reach
        pad = prompt == PAD_ID
        ids, inputs, lvl_pad = prompt, None, pad
        levels = []
        for k in range(len(self.levels)):
            lv, seg_id, rows, codes, valid = self._level_prefill(v, k, ids, inputs, lvl_pad, capacity)
            caches = self._expander_prefill(v, k, ids, lvl_pad, rows, valid, seg_id, capacity)
            levels.append(lv.replace(expander=caches))
            ids, inputs, lvl_pad = codes, rows, ~valid

        def top_fn(m, rows, valid):
            return m.top.predict(rows, valid, cache=Prefill(capacity))

        pred, top = self._apply(v, top_fn, inputs, ~lvl_pad)
        st = DecodeState(
            levels=levels,
            top=top,
            ids=jnp.concatenate([prompt, jnp.full((b, max_new), PAD_ID, jnp.int32)], axis=1),
            n=prefix_lengths(pad),
            generated=jnp.zeros((b,), jnp.int32),
            active=jnp.ones((b,), bool),
            stop=jnp.zeros((b,), jnp.int32),
            keys=keys,
            step=jnp.int32(max_new),
        )
        # the first new top-level row, then each level's first id of its new segment, top down
        top_k = len(self.levels) - 1
        last_row = levels[top_k].seg - 1
        prefill_keys = _fold(keys, max_new)  # the loop's iterations use 0 .. max_new - 1
        new_vec = self._top_row(v, _fold(prefill_keys, 10 * top_k + 5), _take(pred, last_row), sp)
        lv = levels[top_k]
        everyone = jnp.ones((b,), bool)
        levels[top_k] = lv.replace(
            rows=_set_row(lv.rows, lv.seg, new_vec, everyone),
            row_valid=_set_row(lv.row_valid, lv.seg, everyone, everyone),
        )
        st = st.replace(levels=levels)
        for k in range(top_k, 0, -1):
            st, code = self._produce(v, st, k, everyone, sp)
            vec = self._decode_codes(v, k - 1, code)
            levels = list(st.levels)
            lo = levels[k - 1]
            levels[k - 1] = lo.replace(
                rows=_set_row(lo.rows, lo.seg, vec, everyone),
                row_valid=_set_row(lo.row_valid, lo.seg, everyone, everyone),
            )
            st = st.replace(levels=levels)
        return st.replace(step=jnp.int32(0))

    # -- the decode loop -----------------------------------------------------------------------------------------------

    def _byte_step(self, v, st: DecodeState, sp: Sampling, budget) -> DecodeState:
        """One byte for every live sample."""
        mask = st.active
        pos = st.n
        st, byte, out = self._decide(v, st, 0, mask, pos, pos, sp)
        levels = list(st.levels)
        levels[0] = self._commit(0, levels[0], out, byte, mask)
        cols = jnp.clip(pos, 0, st.ids.shape[1] - 1)
        ids = _set_row(st.ids, cols, byte, mask)
        generated = st.generated + mask.astype(jnp.int32)
        eos = mask & (byte == EOS_ID)
        full = mask & ~eos & (generated >= budget)
        return st.replace(
            levels=levels,
            ids=ids,
            n=st.n + mask.astype(jnp.int32),
            generated=generated,
            active=mask & ~eos & ~full,
            stop=jnp.where(eos, STOP_EOS, jnp.where(full, STOP_MAX_BYTES, st.stop)),
            step=st.step + 1,
        )

    def _generate(self, v, prompt, keys, sp: Sampling, max_new: int, budget):
        st = self.prefill(v, prompt, keys, max_new, sp)
        st = jax.lax.while_loop(
            lambda s: jnp.any(s.active) & (s.step < max_new),
            lambda s: self._byte_step(v, s, sp, budget),
            st,
        )
        segments = jnp.stack([lv.seg + 1 for lv in st.levels], axis=1)  # (B, N) closed segments + the open one
        return st.ids, prefix_lengths(prompt == PAD_ID), st.generated, st.stop, segments

    def generate_ids(self, variables, prompt, keys, sp: Sampling, max_new: int, budget=None):
        """prompt (B, P) int32 (`[BOS] + bytes`, PAD after) -> (ids (B, P + max_new), prompt lengths (B,),
        generated counts (B,), stop reasons (B,), segments (B, N) per level: the prompt's, the generated ones, and the
        open one; (B, 0) from the entropy model). The new bytes of row b are ids[b, len_b : len_b + generated_b].
        `max_new` sizes the buffers (one compilation per value); `budget` (an int or (B,), <= max_new, default
        max_new) is how many bytes each sample may have, without recompiling."""
        fn = self._jitted_lm if self.from_entropy_model else self._jitted
        budget = jnp.broadcast_to(
            jnp.minimum(jnp.asarray(max_new if budget is None else budget, jnp.int32), max_new), (prompt.shape[0],)
        )
        return fn(variables, prompt, keys, sp, max_new, budget)

    # -- level 0's entropy model alone (a causal byte LM) --------------------------------------------------------------

    def _generate_from_entropy_model(self, v, prompt, keys, sp: Sampling, max_new: int, budget):
        b, p = prompt.shape
        capacity = p + max_new + 1
        pad = prompt == PAD_ID

        def prefill(m, ids, pad):
            comp = m.levels[0].compressor
            h, shared = comp.shared_stack(m.levels[0].embed(ids), pad, jnp.arange(p), Prefill(capacity))
            logits, entropy = comp.entropy.predict(h, pad, jnp.arange(p), Prefill(capacity))
            return logits, shared, entropy

        def step(m, ids, pos, shared, entropy):
            comp = m.levels[0].compressor
            x = m.levels[0].embed(ids[:, None])
            zero = jnp.zeros((b, 1), bool)
            h, shared = comp.shared_stack(x, zero, pos, shared)
            logits, entropy = comp.entropy.predict(h, zero, pos, entropy)
            return logits[:, 0], shared, entropy

        logits, shared, entropy = self._apply(v, prefill, prompt, pad)
        n = prefix_lengths(pad)
        allowed = self._allowed(0)
        init = (
            _take(logits, n - 1),
            shared,
            entropy,
            jnp.concatenate([prompt, jnp.full((b, max_new), PAD_ID, jnp.int32)], axis=1),
            n,
            jnp.zeros((b,), jnp.int32),
            jnp.ones((b,), bool),
            jnp.zeros((b,), jnp.int32),
            jnp.int32(0),
        )

        def body(c):
            last, shared, entropy, ids, n, generated, active, stop, i = c
            byte = sample_ids(_fold(_fold(keys, i), 0), last, sp, allowed)
            ids = _set_row(ids, jnp.clip(n, 0, ids.shape[1] - 1), byte, active)
            new_last, shared, entropy = self._apply(v, step, byte, n, shared, entropy)
            generated = generated + active.astype(jnp.int32)
            eos = active & (byte == EOS_ID)
            full = active & ~eos & (generated >= budget)
            stop = jnp.where(eos, STOP_EOS, jnp.where(full, STOP_MAX_BYTES, stop))
            last = _where(active, new_last, last)
            return (
                last,
                shared,
                entropy,
                ids,
                n + active.astype(jnp.int32),
                generated,
                active & ~eos & ~full,
                stop,
                i + 1,
            )

        out = jax.lax.while_loop(lambda c: jnp.any(c[6]) & (c[8] < max_new), body, init)
        return out[3], n, out[5], out[7], jnp.zeros((b, 0), jnp.int32)


# ---------------------------------------------------------------------------------------------------------------------
# Host side: text in, text out
# ---------------------------------------------------------------------------------------------------------------------


def encode_prompts(prompts: list[bytes], bucket: int = PROMPT_BUCKET) -> np.ndarray:
    """`[BOS] + bytes` per prompt, right-padded with PAD to a common length rounded up to `bucket`: (B, P) int32."""
    longest = max(len(p) for p in prompts) + 1
    p = -(-longest // bucket) * bucket
    out = np.full((len(prompts), p), PAD_ID, np.int32)
    for i, data in enumerate(prompts):
        out[i, 0] = BOS_ID
        out[i, 1 : len(data) + 1] = np.frombuffer(bytes(data), np.uint8)
    return out


def sample_keys(seed: int, batch: int) -> jax.Array:
    """One PRNG stream per sample: sample b's stream depends on (seed, b) only, not on the batch size."""
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(batch))


def generate_text(
    gen: Generator,
    variables,
    prompts: list[bytes],
    max_bytes: int,
    sp: Sampling,
    seed: int,
    mesh=None,
    budgets: list[int] | None = None,
) -> list[dict]:
    """Continue each prompt (raw bytes) by up to `max_bytes` bytes. Returns one dict per prompt: prompt, continuation
    (text; invalid UTF-8 shown as U+FFFD), bytes (new bytes, EOS not counted), stop ('eos' | 'max_bytes') and seconds
    (wall time of the whole batch, compilation included on a first call). With a `mesh`, the batch of prompts is
    split over its data axes when it divides evenly (else replicated). `budgets` (one per prompt, each <= max_bytes)
    gives samples budgets of their own in the same compiled program (the buffers are sized by max_bytes)."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes={max_bytes} must be >= 1.")
    if budgets is not None and (len(budgets) != len(prompts) or not all(1 <= m <= max_bytes for m in budgets)):
        raise ValueError(f"budgets={budgets} must hold one value in [1, {max_bytes}] per prompt.")
    if not prompts:
        raise ValueError("no prompt to continue.")
    ids = encode_prompts(prompts)
    keys = sample_keys(seed, len(prompts))
    if mesh is not None:
        sh = batch_sharding(mesh, 2, 0) if len(prompts) % batch_divisor(mesh) == 0 else replicated(mesh)
        ids = jax.device_put(ids, sh)
    max_new = -(-max_bytes // BUDGET_BUCKET) * BUDGET_BUCKET  # buffers for a bucket of budgets: fewer compilations
    t0 = time.perf_counter()
    out, lengths, generated, stop, _ = jax.device_get(
        gen.generate_ids(
            variables, jnp.asarray(ids), keys, sp, max_new, budget=max_bytes if budgets is None else budgets
        )
    )
    seconds = time.perf_counter() - t0
    results = []
    for b, prompt in enumerate(prompts):
        new = np.asarray(out[b, lengths[b] : lengths[b] + generated[b]])
        data = tokenizer.decode_bytes(new, stop_at_eos=True)
        results.append(
            {
                "prompt": bytes(prompt).decode("utf-8", errors="replace"),
                "continuation": data.decode("utf-8", errors="replace"),
                "bytes": len(data),
                "stop": STOP_REASONS[int(stop[b])],
                "seconds": round(seconds, 4),
            }
        )
    return results


def model_variables(state) -> dict:
    """The variables a TrainState's model is applied with: every parameter (trained and frozen) and its state."""
    return {"params": merge_params(state.frozen_params, state.params), **state.model_state}


TRAINING_SAMPLING = dict(temperature=0.8, top_p=0.95)  # the settings of training's samples/generated text


def training_sampler(cfg: ConfigDict, model, mesh):
    """Training's `samples/generated` text: `sample_max_bytes` bytes continuing `sample_text`, from the top
    transformer when the run has one, else from level 0's entropy model when it is a byte LM ('logit'); None when
    neither (or sample_max_bytes == 0). Returns fn(state) -> text; the same seed every time, so that evaluations can be
    compared."""
    if cfg.sample_max_bytes <= 0:
        return None
    from_lm = not cfg.use_top_code_lm
    try:
        gen = Generator(model, cfg, from_entropy_model=from_lm)
    except GenerationError:
        return None
    sp = sampling(**TRAINING_SAMPLING)
    prompt = cfg.sample_text.encode("utf-8")

    def sample(state) -> str:
        r = generate_text(gen, model_variables(state), [prompt], cfg.sample_max_bytes, sp, cfg.seed, mesh)[0]
        source = "level 0's entropy model" if from_lm else "the top transformer"
        return f"{r['prompt']}{r['continuation']}\n\n({r['bytes']} bytes from {source}, stop: {r['stop']})"

    return sample
