"""The attention kernels (docs/ARCHITECTURE.md 3.1, 8) against slow, obvious loop references written here.

Every case mixes the row kinds the model meets: full rows, ragged rows (PAD suffix), all-PAD rows and length-1 rows
(only token 0 real); the plain kernels also get arbitrary (non-suffix) PAD patterns, which their masks must honour.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abstractinator_jax.attention import (
    MAX_QUERY_BLOCKS,
    QUERY_BLOCK,
    causal_attention,
    causal_query_block,
    segment_cross_attention,
    sliding_window_attention,
    window_groups,
)

N_HEADS, HEAD_DIM = 2, 8
ATOL = 2e-5

swa = jax.jit(sliding_window_attention, static_argnames=("window", "implementation", "budget"))
causal = jax.jit(causal_attention, static_argnames=("window", "implementation", "query_block", "budget"))
cross = jax.jit(segment_cross_attention, static_argnames=("num_rows_visible",))


# ---------------------------------------------------------------------------------------------------------------------
# Loop references
# ---------------------------------------------------------------------------------------------------------------------


def _attend(qv, ks, vs):
    """Softmax over the given keys of q.k / sqrt(H), weighted sum of the values (float64); no key -> zeros."""
    if len(ks) == 0:
        return np.zeros(qv.shape[-1])
    ks, vs = np.asarray(ks, np.float64), np.asarray(vs, np.float64)
    logits = ks @ qv.astype(np.float64) / np.sqrt(qv.shape[-1])
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return p @ vs


def ref_window_attention(q, k, v, key_pad, window):
    """Position t sees keys j with t - window < j <= t that are not PAD (window <= 0: every j <= t)."""
    q, k, v, key_pad = (np.asarray(a) for a in (q, k, v, key_pad))
    b_, t_, n_, h_ = q.shape
    out = np.zeros((b_, t_, n_, h_))
    for b in range(b_):
        for n in range(n_):
            for t in range(t_):
                lo = t - window + 1 if window > 0 else 0
                js = [j for j in range(max(lo, 0), t + 1) if not key_pad[b, j]]
                out[b, t, n] = _attend(q[b, t, n], [k[b, j, n] for j in js], [v[b, j, n] for j in js])
    return out


def ref_cross_attention(q, k, v, q_row, row_valid, c):
    """Query t sees rows r with q_row - c < r <= q_row, 0 <= r < R, row_valid[r]."""
    q, k, v, q_row, row_valid = (np.asarray(a) for a in (q, k, v, q_row, row_valid))
    b_, t_, n_, h_ = q.shape
    r_ = k.shape[1]
    out = np.zeros((b_, t_, n_, h_))
    for b in range(b_):
        for n in range(n_):
            for t in range(t_):
                rs = [r for r in range(r_) if q_row[b, t] - c < r <= q_row[b, t] and row_valid[b, r]]
                out[b, t, n] = _attend(q[b, t, n], [k[b, r, n] for r in rs], [v[b, r, n] for r in rs])
    return out


def dense_window_attention(q, k, v, key_pad, window):
    """A differentiable dense (T x T) jnp form of the same rule, for comparing gradients."""
    t = q.shape[1]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    allowed = (j <= i) & ((j > i - window) if window > 0 else True)
    mask = allowed[None, None] & ~key_pad[:, None, None, :]  # (B, 1, T, T)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
    out = jnp.einsum("bnts,bsnh->btnh", p, v)
    any_key = jnp.swapaxes(jnp.any(mask, -1), 1, 2)[..., None]  # (B, T, 1, 1)
    return jnp.where(any_key, out, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def qkv(seed, b, t, scale=1.5):
    rng = np.random.default_rng(seed)
    shape = (b, t, N_HEADS, HEAD_DIM)
    return tuple((scale * rng.standard_normal(shape)).astype(np.float32) for _ in range(3))


def suffix_pad(lengths, t):
    """(B, T) key_pad with `lengths[b]` real tokens then PAD."""
    return np.arange(t)[None, :] >= np.asarray(lengths)[:, None]


def pad_cases(t, seed):
    """Batches of three rows covering full, ragged, all-PAD, length-1 and arbitrary (non-suffix) PAD patterns."""
    rng = np.random.default_rng(seed)
    scattered = rng.random((3, t)) < 0.4
    scattered[1] = True  # an all-PAD row among scattered ones
    scattered[2, :3] = True  # a row whose first queries see no key at all
    return {
        "full_ragged_allpad": suffix_pad([t, max(t // 2 + 1, 1), 0], t),
        "len1_ragged_full": suffix_pad([1, max(t - 3, 1), t], t),
        "scattered": scattered,
    }


# (T, window): dense path (T <= 2W), blocked path with T not a multiple of W, W = 1, W >= T, W = T exactly.
WINDOW_SHAPES = [(10, 5), (16, 8), (23, 4), (40, 6), (17, 3), (9, 1), (12, 12), (7, 20), (33, 16)]


@pytest.mark.parametrize("t,window", WINDOW_SHAPES)
@pytest.mark.parametrize("case", ["full_ragged_allpad", "len1_ragged_full", "scattered"])
def test_sliding_window_matches_loop_reference(t, window, case):
    key_pad = pad_cases(t, seed=t * 31 + window)[case]
    q, k, v = qkv(t * 7 + window, 3, t)
    out = np.asarray(swa(q, k, v, jnp.asarray(key_pad), window=window))
    ref = ref_window_attention(q, k, v, key_pad, window)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=1e-5)
    # Queries with no visible key are exactly zero (an all-PAD row in particular), not merely small.
    if case == "full_ragged_allpad":
        assert np.all(out[2] == 0.0)


# (T, window): blocks of C = max(16, W // 4) capped at W; budgets that split them into 2, 3 or one group per block.
GROUPED_SHAPES = [(40, 6, 2 * 3 * N_HEADS * 6 * 12), (70, 16, 1), (49, 16, 3 * 2 * N_HEADS * 16 * 32)]


@pytest.mark.parametrize("t,window,budget", GROUPED_SHAPES)
@pytest.mark.parametrize("case", ["full_ragged_allpad", "len1_ragged_full", "scattered"])
def test_grouped_sliding_window_matches_loop_reference(t, window, budget, case):
    """Blocks whose scores exceed the budget run in groups (lax.map, rematerialized): the loop reference's values."""
    key_pad = pad_cases(t, seed=t * 11 + window)[case]
    q, k, v = qkv(t * 3 + window, 3, t)
    out = np.asarray(swa(q, k, v, jnp.asarray(key_pad), window=window, budget=budget))
    np.testing.assert_allclose(out, ref_window_attention(q, k, v, key_pad, window), atol=ATOL, rtol=1e-5)
    if case == "full_ragged_allpad":
        assert np.all(out[2] == 0.0)


def test_window_groups_divide_the_blocks_within_the_budget():
    assert window_groups(64, 21_000_000, 1 << 22) == 8  # 5 would do by size, but must divide 64
    assert window_groups(16, 100, 1 << 22) == 1
    assert window_groups(7, 10**9, 1) == 7  # one block per group at most
    for blocks, scores, budget in [(12, 1000, 90), (30, 7, 1), (9, 90, 30)]:
        g = window_groups(blocks, scores, budget)
        assert blocks % g == 0 and (scores <= budget * g or g == blocks)
        assert all(blocks % h or scores > budget * h for h in range(1, g))


def _shared_value_case(seed: int, t: int, c: int = 5):
    """Latent attention's inputs: q, k (3, T, N, H), one value head of its own width v (3, T, 1, c), a cotangent of
    the output, and ragged / all-PAD / length-1 rows."""
    q, k, _ = qkv(seed, 3, t)
    v = np.random.default_rng(seed + 1).standard_normal((3, t, 1, c)).astype(np.float32)
    cot = np.random.default_rng(seed + 2).standard_normal((3, t, N_HEADS, c)).astype(np.float32)
    return q, k, v, cot, jnp.asarray(suffix_pad([t, 0, 1], t))


def _assert_same_values_and_gradients(fn, q, k, v, cot, variant, reference):
    """fn(q, k, v, setting) computed with setting=variant equals it with setting=reference: values and the q/k/v
    gradients of <out, cot> (finite, the value gradient not all zero). Returns the variant's gradients."""

    @functools.partial(jax.jit, static_argnums=3)
    def run(q, k, v, setting):
        out, vjp = jax.vjp(lambda a, b, c: fn(a, b, c, setting), q, k, v)
        return out, vjp(cot)

    want, want_grads = run(q, k, v, reference)
    got, grads = run(q, k, v, variant)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)
    assert np.any(np.asarray(grads[2]) != 0)
    return [np.asarray(g) for g in grads]


def test_grouped_sliding_window_with_a_shared_value_head_and_its_gradients():
    """Latent attention's form (one shared value head of its own width): grouped (one block per group) == one
    group, values and gradients of q, k and v, with ragged, all-PAD and length-1 rows; PAD keys get no gradient."""
    q, k, v, cot, key_pad = _shared_value_case(17, 45)

    def fn(q, k, v, budget):
        return sliding_window_attention(q, k, v, key_pad, window=8, budget=budget)

    _, gk, gv = _assert_same_values_and_gradients(fn, q, k, v, cot, 1, 1 << 30)
    pad = np.asarray(key_pad)
    assert np.all(gk[pad] == 0.0) and np.all(gv[pad] == 0.0)


def test_sliding_window_is_not_full_causal():
    """A guard that the reference itself discriminates: with W < T the windowed result differs from full causal."""
    t, window = 20, 4
    q, k, v = qkv(5, 2, t)
    key_pad = suffix_pad([t, t], t)
    out = np.asarray(swa(q, k, v, jnp.asarray(key_pad), window=window))
    full = ref_window_attention(q, k, v, key_pad, 0)
    assert np.max(np.abs(out - full)) > 1e-2
    # window = 1: every real query copies its own value.
    out1 = np.asarray(swa(q, k, v, jnp.asarray(key_pad), window=1))
    np.testing.assert_allclose(out1, v, atol=1e-6)


@pytest.mark.parametrize("t,window", [(12, 0), (30, 0), (12, 5), (30, 7), (9, 1), (8, 30)])
@pytest.mark.parametrize("case", ["full_ragged_allpad", "len1_ragged_full", "scattered"])
def test_causal_attention_matches_loop_reference(t, window, case):
    key_pad = pad_cases(t, seed=t * 13 + window)[case]
    q, k, v = qkv(t * 3 + window + 100, 3, t)
    out = np.asarray(causal(q, k, v, jnp.asarray(key_pad), window=window))
    ref = ref_window_attention(q, k, v, key_pad, window)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize(
    "t,block,budget", [(30, 4, None), (9, 4, None), (33, 16, 1), (17, 1, None), (32, 8, 1), (35, 4, 1)]
)
@pytest.mark.parametrize("case", ["full_ragged_allpad", "len1_ragged_full", "scattered"])
def test_causal_blocks_match_loop_reference(t, block, budget, case):
    """Full causal attention over more than one query block scores each block against the keys up to its end (T a
    multiple of the block or not; budget=1: the blocks in groups, lax.map over each, rematerialized)."""
    key_pad = pad_cases(t, seed=t * 7 + block)[case]
    q, k, v = qkv(t * 5 + block, 3, t)
    out = np.asarray(causal(q, k, v, jnp.asarray(key_pad), query_block=block, budget=budget))
    np.testing.assert_allclose(out, ref_window_attention(q, k, v, key_pad, 0), atol=ATOL, rtol=1e-5)
    if case == "full_ragged_allpad":
        assert np.all(out[2] == 0.0)


@pytest.mark.parametrize("budget", [None, 1])
def test_causal_blocks_with_a_shared_value_head_and_its_gradients(budget):
    """Latent attention's form (one value head of its own width shared by every head): blocked == dense, values
    and gradients of q, k and v, with ragged, all-PAD and length-1 rows, with and without rematerialized blocks."""
    t = 21
    q, k, v, cot, key_pad = _shared_value_case(91, t)

    def fn(q, k, v, block):
        return causal_attention(q, k, v, key_pad, query_block=block, budget=budget)

    _, gk, gv = _assert_same_values_and_gradients(fn, q, k, v, cot, 4, t)  # against one block: the dense form
    pad = np.asarray(key_pad)
    assert np.all(gk[pad] == 0.0) and np.all(gv[pad] == 0.0)


@pytest.mark.parametrize("budget", [None, 1])
def test_causal_blocks_gradients_match_the_normalized_softmax(budget):
    """Standard attention by query blocks (the softmax normalized after the weighted sum) against a dense form with
    jax.nn.softmax: q, k and v gradients, ragged / all-PAD / length-1 rows."""
    t = 19
    key_pad = jnp.asarray(suffix_pad([t - 4, 0, 1], t))
    q, k, v = qkv(5, 3, t)
    cot = np.random.default_rng(3).standard_normal(q.shape).astype(np.float32)
    blocked = jax.jit(
        lambda a, b, c: _grads(
            lambda x, y, z: causal_attention(x, y, z, key_pad, query_block=5, budget=budget), a, b, c, cot
        )
    )(q, k, v)
    dense = jax.jit(lambda a, b, c: _grads(lambda x, y, z: dense_window_attention(x, y, z, key_pad, 0), a, b, c, cot))(
        q, k, v
    )
    for g, r in zip(blocked, dense):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(blocked[0])[1] == 0.0)


def test_causal_query_block_sizes():
    """At least QUERY_BLOCK queries a block, a multiple of 16, and at most MAX_QUERY_BLOCKS blocks."""
    assert causal_query_block(100) == QUERY_BLOCK
    for t in (1, 65, 448, 512, 513, 1024, 3000, 8192):
        c = causal_query_block(t)
        assert c >= QUERY_BLOCK and c % 16 == 0 and -(-t // c) <= MAX_QUERY_BLOCKS


def cross_inputs(seed, t, r, c):
    """Queries pointing at rows -1..R (some out of range), row_valid with a valid prefix, an all-invalid row, holes."""
    rng = np.random.default_rng(seed)
    q, _, _ = qkv(seed, 3, t)
    k = (1.5 * rng.standard_normal((3, r, N_HEADS, HEAD_DIM))).astype(np.float32)
    v = (1.5 * rng.standard_normal((3, r, N_HEADS, HEAD_DIM))).astype(np.float32)
    # Non-decreasing segment-like rows for batch 0 and 1, arbitrary (incl. -1 and >= R) for batch 2.
    q_row = np.stack(
        [
            np.sort(rng.integers(0, r, t)),
            np.sort(rng.integers(0, r, t)),
            rng.integers(-1, r + c + 1, t),
        ]
    ).astype(np.int32)
    row_valid = np.stack(
        [
            np.arange(r) < max(r - 2, 1),  # valid prefix (the usual pattern)
            np.zeros(r, bool),  # no valid row: every query outputs zero
            rng.random(r) < 0.6,  # holes
        ]
    )
    return q, k, v, q_row, row_valid


@pytest.mark.parametrize("t,r,c", [(11, 5, 1), (11, 5, 2), (20, 9, 3), (6, 4, 6), (15, 7, 4)])
def test_segment_cross_attention_matches_loop_reference(t, r, c):
    q, k, v, q_row, row_valid = cross_inputs(t * 11 + r * 3 + c, t, r, c)
    out = np.asarray(cross(q, k, v, jnp.asarray(q_row), jnp.asarray(row_valid), num_rows_visible=c))
    ref = ref_cross_attention(q, k, v, q_row, row_valid, c)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=1e-5)
    assert np.all(out[1] == 0.0)


def test_segment_cross_attention_single_row_copies_value():
    """num_rows_visible = 1: each query sees exactly its own row, so the output is that row's value (or zero)."""
    t, r = 9, 4
    q, k, v, q_row, row_valid = cross_inputs(3, t, r, 1)
    out = np.asarray(cross(q, k, v, jnp.asarray(q_row), jnp.asarray(row_valid), num_rows_visible=1))
    for b in range(3):
        for i in range(t):
            row = q_row[b, i]
            want = v[b, row] if 0 <= row < r and row_valid[b, row] else np.zeros_like(v[b, 0])
            np.testing.assert_allclose(out[b, i], want, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------------------


def _grads(fn, q, k, v, cot):
    return jax.grad(lambda q_, k_, v_: jnp.sum(fn(q_, k_, v_) * cot), argnums=(0, 1, 2))(q, k, v)


@functools.partial(jax.jit, static_argnames=("window", "dense"))
def _window_grads(q, k, v, key_pad, cot, *, window, dense):
    if dense:
        return _grads(lambda a, b, c: dense_window_attention(a, b, c, key_pad, window), q, k, v, cot)
    return _grads(lambda a, b, c: sliding_window_attention(a, b, c, key_pad, window=window), q, k, v, cot)


@pytest.mark.parametrize("t,window", [(10, 5), (23, 4), (9, 1), (7, 20)])
def test_sliding_window_gradients_finite_and_correct(t, window):
    key_pad = suffix_pad([t // 2, 0, 1], t)  # ragged, all-PAD, length-1
    q, k, v = qkv(t + window + 7, 3, t)
    cot = np.random.default_rng(0).standard_normal(q.shape).astype(np.float32)
    kp = jnp.asarray(key_pad)
    gq, gk, gv = (np.asarray(g) for g in _window_grads(q, k, v, kp, cot, window=window, dense=False))
    rq, rk, rv = (np.asarray(g) for g in _window_grads(q, k, v, kp, cot, window=window, dense=True))
    for g in (gq, gk, gv):
        assert np.all(np.isfinite(g))
    np.testing.assert_allclose(gq, rq, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(gk, rk, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(gv, rv, atol=1e-4, rtol=1e-4)
    # The all-PAD row has a constant (zero) output; PAD keys and values never receive gradient.
    assert np.all(gq[1] == 0.0)
    assert np.all(gk[key_pad] == 0.0) and np.all(gv[key_pad] == 0.0)


def test_causal_attention_gradients_finite():
    t = 12
    key_pad = suffix_pad([t, 0, 1], t)
    q, k, v = qkv(77, 3, t)
    cot = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    for window in (0, 3):
        gq, gk, gv = jax.jit(
            lambda a, b, c, w=window: _grads(
                lambda x, y, z: causal_attention(x, y, z, jnp.asarray(key_pad), window=w), a, b, c, cot
            )
        )(q, k, v)
        for g in (gq, gk, gv):
            assert np.all(np.isfinite(np.asarray(g)))
        assert np.all(np.asarray(gq)[1] == 0.0)
        assert np.all(np.asarray(gk)[key_pad] == 0.0) and np.all(np.asarray(gv)[key_pad] == 0.0)


def test_segment_cross_attention_gradients_finite():
    t, r, c = 11, 5, 2
    q, k, v, q_row, row_valid = cross_inputs(21, t, r, c)
    cot = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
    gq, gk, gv = (
        np.asarray(g)
        for g in jax.jit(
            lambda a, b, d: _grads(
                lambda x, y, z: segment_cross_attention(
                    x, y, z, jnp.asarray(q_row), jnp.asarray(row_valid), num_rows_visible=c
                ),
                a,
                b,
                d,
                cot,
            )
        )(q, k, v)
    )
    for g in (gq, gk, gv):
        assert np.all(np.isfinite(g))
    # Batch row 1 has no valid memory row: no gradient anywhere in it; invalid rows never receive gradient.
    assert np.all(gq[1] == 0.0) and np.all(gk[1] == 0.0) and np.all(gv[1] == 0.0)
    assert np.all(gk[~row_valid] == 0.0) and np.all(gv[~row_valid] == 0.0)
    assert np.any(gq[0] != 0.0) and np.any(gk[0] != 0.0)
