"""Entropy segmentation and segment softmax pooling (docs/ARCHITECTURE.md 3.2 step 3, 3.4, 8) against loop references.

Rows follow the model's PAD convention: real tokens, then a PAD suffix (full, ragged, length-1 and all-PAD rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abstractinator_jax.segmentation import entropy_segments, segment_softmax_pool

segs_jit = jax.jit(entropy_segments, static_argnames=("delta", "abs_threshold", "max_segments"))
pool_jit = jax.jit(segment_softmax_pool, static_argnames=("num_segments",))


# ---------------------------------------------------------------------------------------------------------------------
# entropy_segments
# ---------------------------------------------------------------------------------------------------------------------


def ref_segments(bits, key_pad, delta, abs_threshold, max_segments):
    """Per-row loop: which tokens start a segment, then the merged ids, first indices and patch ends."""
    bits = np.asarray(bits, np.float32)
    b_, s_ = bits.shape
    seg_id = np.full((b_, s_), -1, np.int64)
    first_idx = np.full((b_, s_), -1, np.int64)
    patch_end = np.zeros((b_, s_), bool)
    num_segments = np.zeros(b_, np.int64)
    overflow = np.zeros(b_, bool)
    d32 = np.float32(delta)
    for b in range(b_):
        starts = []
        for t in range(s_):
            if key_pad[b, t]:
                continue
            if not starts:
                starts.append(t)  # the first real token starts segment 0
            elif bits[b, t] > bits[b, t - 1] + d32 or (abs_threshold is not None and bits[b, t] > abs_threshold):
                starts.append(t)
        raw = len(starts)
        overflow[b] = raw > max_segments
        num_segments[b] = min(raw, max_segments)
        kept = starts[:max_segments]  # segments past the last slot merge into it
        for t in range(s_):
            if key_pad[b, t]:
                continue
            sid = max(i for i, st in enumerate(kept) if st <= t)
            seg_id[b, t] = sid
            first_idx[b, t] = kept[sid]
        real = [t for t in range(s_) if not key_pad[b, t]]
        for t in real:
            later_same = [u for u in real if u > t and seg_id[b, u] == seg_id[b, t]]
            patch_end[b, t] = not later_same
    return seg_id, first_idx, patch_end, num_segments, overflow


def suffix_pad(lengths, s):
    return np.arange(s)[None, :] >= np.asarray(lengths)[:, None]


def check_segments(bits, key_pad, delta, abs_threshold, max_segments):
    out = segs_jit(
        jnp.asarray(bits), jnp.asarray(key_pad), delta=delta, abs_threshold=abs_threshold, max_segments=max_segments
    )
    seg_id, first_idx, patch_end = (np.asarray(a) for a in (out.seg_id, out.first_idx, out.patch_end_mask))
    num_segments, overflow = np.asarray(out.num_segments), np.asarray(out.overflow)
    r_seg, r_first, r_end, r_num, r_over = ref_segments(bits, key_pad, delta, abs_threshold, max_segments)
    real = ~key_pad
    assert seg_id.shape == bits.shape and patch_end.dtype == bool
    np.testing.assert_array_equal(num_segments, r_num)
    np.testing.assert_array_equal(overflow, r_over)
    np.testing.assert_array_equal(np.where(real, seg_id, -1), r_seg)
    np.testing.assert_array_equal(np.where(real, first_idx, -1), r_first)
    np.testing.assert_array_equal(patch_end, r_end)  # includes: never True on PAD, none in an all-PAD row
    # What PAD tokens get: seg_id non-decreasing from 0 across the whole row, never pointing past the row's last
    # segment (or 0 in an all-PAD row); first_idx a valid position at or before the token.
    assert np.all(seg_id[:, 0] == 0)
    assert np.all(np.diff(seg_id, axis=1) >= 0)
    assert np.all(seg_id <= np.maximum(num_segments - 1, 0)[:, None])
    assert np.all((first_idx >= 0) & (first_idx <= np.arange(bits.shape[1])[None, :]))
    # Consistency: one patch end per segment; a segment starts where first_idx points.
    np.testing.assert_array_equal(patch_end.sum(axis=1), num_segments)
    return out


def random_bits(seed, b, s, scale=4.0):
    return (scale * np.random.default_rng(seed).random((b, s))).astype(np.float32)


SEG_CASES = {
    # name: (lengths per row, delta, abs_threshold, max_segments)
    "ragged_full_allpad": ([13, 24, 0], 0.5, None, 24),
    "len1_rows": ([1, 1, 24], 0.5, None, 24),
    "overflow_small_max": ([24, 17, 1], 0.2, None, 3),
    "overflow_max1": ([24, 9, 0], 0.0, None, 1),
    "max_equals_count_boundary": ([24, 24, 5], 0.5, None, 6),
    "abs_threshold_only": ([24, 15, 1], 1e9, 3.0, 24),
    "abs_threshold_on_grid": ([24, 15, 1], 1e9, 1.5, 24),
    "abs_threshold_and_delta": ([24, 11, 0], 0.5, 2.5, 24),
    "abs_threshold_overflow": ([24, 20, 2], 1e9, 2.0, 4),
    "delta_zero": ([24, 7, 1], 0.0, None, 24),
    "delta_on_grid": ([24, 7, 1], 0.5, None, 24),
    "large_delta_single_segment": ([24, 13, 0], 100.0, None, 24),
    "negative_delta": ([24, 6, 0], -0.5, None, 24),
}


@pytest.mark.parametrize("name", list(SEG_CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("quantized", [False, True])
def test_entropy_segments_matches_loop_reference(name, seed, quantized):
    """quantized: bits on a 0.5 grid (exact in float32), so ties with delta and the threshold occur: '>' not '>='."""
    lengths, delta, thr, max_segments = SEG_CASES[name]
    s = 24
    bits = random_bits(seed * 100 + len(name), 3, s)
    if quantized:
        bits = np.floor(bits * 2.0) / 2.0
    bits[:, 0] = 0.0  # as the entropy models produce
    key_pad = suffix_pad(lengths, s)
    out = check_segments(bits, key_pad, delta, thr, max_segments)
    num = np.asarray(out.num_segments)
    if name == "large_delta_single_segment":
        np.testing.assert_array_equal(num, (np.asarray(lengths) > 0).astype(int))
        assert not np.any(np.asarray(out.overflow))
    if name.startswith("overflow"):
        assert np.asarray(out.overflow)[0], "the test must exercise the merge"


def test_entropy_segments_hand_worked_example():
    """A fixed row, worked by hand, so the reference itself is checked too."""
    bits = np.array([[0.0, 1.0, 0.5, 0.6, 2.0, 1.0, 1.1, 3.0, 0.0, 0.0]], np.float32)
    key_pad = np.array([[False] * 8 + [True] * 2])
    # delta 0.3: starts at 0, 1 (1.0 > 0.3), 4 (2.0 > 0.9); 3 (0.6 > 0.8)? no; 7 (3.0 > 1.4) -> starts 0, 1, 4, 7.
    out = check_segments(bits, key_pad, 0.3, None, 8)
    np.testing.assert_array_equal(np.asarray(out.seg_id)[0, :8], [0, 1, 1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(np.asarray(out.first_idx)[0, :8], [0, 1, 1, 1, 4, 4, 4, 7])
    np.testing.assert_array_equal(np.nonzero(np.asarray(out.patch_end_mask)[0])[0], [0, 3, 6, 7])
    assert int(out.num_segments[0]) == 4 and not bool(out.overflow[0])
    # max_segments = 2: segments 2 and 3 merge into segment 1.
    out = check_segments(bits, key_pad, 0.3, None, 2)
    np.testing.assert_array_equal(np.asarray(out.seg_id)[0, :8], [0, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(out.first_idx)[0, :8], [0, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.nonzero(np.asarray(out.patch_end_mask)[0])[0], [0, 7])
    assert int(out.num_segments[0]) == 2 and bool(out.overflow[0])
    # Exactly as many segments as slots: no merge, no overflow; one slot fewer: overflow.
    out = check_segments(bits, key_pad, 0.3, None, 4)
    assert int(out.num_segments[0]) == 4 and not bool(out.overflow[0])
    out = check_segments(bits, key_pad, 0.3, None, 3)
    assert int(out.num_segments[0]) == 3 and bool(out.overflow[0])
    np.testing.assert_array_equal(np.asarray(out.seg_id)[0, :8], [0, 1, 1, 1, 2, 2, 2, 2])
    # An absolute threshold of 2.5 adds nothing new at delta 0.3 but alone starts only token 7.
    out = check_segments(bits, key_pad, 100.0, 2.5, 8)
    np.testing.assert_array_equal(np.asarray(out.seg_id)[0, :8], [0, 0, 0, 0, 0, 0, 0, 1])


@pytest.mark.parametrize("seed", [0, 1])
def test_entropy_segments_overflow_boundary(seed):
    """max_segments equal to a row's raw count (no overflow) and one less (overflow), on random rows."""
    s = 24
    bits = random_bits(seed + 50, 3, s)
    key_pad = suffix_pad([24, 10, 1], s)
    raw = ref_segments(bits, key_pad, 0.5, None, s)[3]
    for b in range(2):
        for m, over in ((int(raw[b]), False), (int(raw[b]) - 1, True)):
            out = check_segments(bits, key_pad, 0.5, None, m)
            assert bool(out.overflow[b]) == over and int(out.num_segments[b]) == m


def test_entropy_segments_pad_bits_never_start_segments():
    """Huge bits on PAD tokens (and right after the last real token) change nothing."""
    s = 16
    bits = random_bits(7, 3, s)
    key_pad = suffix_pad([9, 1, 0], s)
    base = check_segments(bits, key_pad, 0.5, 3.0, 16)
    noisy = np.where(key_pad, 1e6, bits).astype(np.float32)
    out = check_segments(noisy, key_pad, 0.5, 3.0, 16)
    for f in ("seg_id", "first_idx", "patch_end_mask", "num_segments", "overflow"):
        a, b = np.asarray(getattr(base, f)), np.asarray(getattr(out, f))
        if a.ndim == 2:  # per-token fields: compare on real tokens
            a, b = np.where(key_pad, 0, a), np.where(key_pad, 0, b)
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------------------------
# segment_softmax_pool
# ---------------------------------------------------------------------------------------------------------------------


def ref_pool(scores, values, seg_id, token_valid, num_segments):
    """For each row, segment, template row l and head n: softmax over the segment's valid tokens; empty -> 0."""
    scores, values = np.asarray(scores, np.float64), np.asarray(values, np.float64)
    b_, s_, l_, n_ = scores.shape
    h_ = values.shape[-1]
    out = np.zeros((b_, num_segments, l_, n_, h_))
    for b in range(b_):
        for q in range(num_segments):
            toks = [t for t in range(s_) if token_valid[b, t] and seg_id[b, t] == q]
            if not toks:
                continue
            for l in range(l_):  # noqa: E741
                for n in range(n_):
                    sc = np.array([scores[b, t, l, n] for t in toks])
                    p = np.exp(sc - sc.max())
                    p /= p.sum()
                    out[b, q, l, n] = sum(p[i] * values[b, t, n] for i, t in enumerate(toks))
    return out


def pool_inputs(seed, s=20, lq=2, n=2, h=4, num_segments=6, score_scale=3.0):
    """Three rows: ragged with an empty segment in the middle and unused trailing slots; all-PAD; length-1.

    PAD tokens carry seg ids of real segments (as entropy_segments gives them), so pooling must drop them by
    token_valid, not by seg_id.
    """
    rng = np.random.default_rng(seed)
    scores = (score_scale * rng.standard_normal((3, s, lq, n))).astype(np.float32)
    values = rng.standard_normal((3, s, n, h)).astype(np.float32)
    lengths = [s - 4, 0, 1]
    token_valid = ~suffix_pad(lengths, s)
    row0 = np.sort(rng.choice([0, 1, 3, 4], size=s))  # segment 2 empty, segment 5 unused
    row0[0] = 0
    seg_id = np.stack([row0, np.zeros(s, int), np.zeros(s, int)]).astype(np.int32)
    return scores, values, seg_id, token_valid, num_segments


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lq", [1, 2])
def test_segment_softmax_pool_matches_loop_reference(seed, lq):
    scores, values, seg_id, token_valid, q = pool_inputs(seed, lq=lq)
    out = np.asarray(pool_jit(scores, values, jnp.asarray(seg_id), jnp.asarray(token_valid), num_segments=q))
    assert out.shape == (3, q, lq, 2, 4)
    np.testing.assert_allclose(out, ref_pool(scores, values, seg_id, token_valid, q), atol=1e-5, rtol=1e-5)
    assert np.all(out[0, 2] == 0.0) and np.all(out[0, 5] == 0.0)  # empty / unused segments are exactly zero
    assert np.all(out[1] == 0.0)  # all-PAD row
    np.testing.assert_allclose(out[2, 0], np.broadcast_to(values[2, 0], out[2, 0].shape), atol=1e-6)  # one token
    assert np.all(out[2, 1:] == 0.0)


def test_segment_softmax_pool_single_segment_and_large_scores():
    """One segment over a full row with scores around +-200 (exp overflows float32 without the max shift)."""
    s, q = 18, 3
    rng = np.random.default_rng(5)
    scores = (60.0 * rng.standard_normal((2, s, 2, 2)) + 150.0).astype(np.float32)
    values = rng.standard_normal((2, s, 2, 4)).astype(np.float32)
    seg_id = np.zeros((2, s), np.int32)
    token_valid = ~suffix_pad([s, 7], s)
    out = np.asarray(pool_jit(scores, values, jnp.asarray(seg_id), jnp.asarray(token_valid), num_segments=q))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref_pool(scores, values, seg_id, token_valid, q), atol=1e-5, rtol=1e-5)


def test_segment_softmax_pool_segments_do_not_mix():
    """Moving one token's score never changes another segment's output (softmax is per segment, not per row)."""
    scores, values, seg_id, token_valid, q = pool_inputs(11)
    args = (jnp.asarray(seg_id), jnp.asarray(token_valid))
    base = np.asarray(pool_jit(scores, values, *args, num_segments=q))
    t = 3
    bumped = scores.copy()
    bumped[0, t] += 5.0
    out = np.asarray(pool_jit(bumped, values, *args, num_segments=q))
    own = seg_id[0, t]
    others = [i for i in range(q) if i != own]
    np.testing.assert_array_equal(out[0, others], base[0, others])
    assert np.max(np.abs(out[0, own] - base[0, own])) > 1e-3


def dense_pool(scores, values, seg_id, token_valid, num_segments):
    """Differentiable dense (Q x S) jnp form, for comparing gradients."""
    member = (seg_id[:, None, :] == jnp.arange(num_segments)[None, :, None]) & token_valid[:, None, :]  # (B, Q, S)
    logits = jnp.where(member[..., None, None], scores[:, None], -1e9)  # (B, Q, S, L, N)
    p = jax.nn.softmax(logits, axis=2)
    out = jnp.einsum("bqsln,bsnh->bqlnh", p, values)
    return jnp.where(jnp.any(member, -1)[..., None, None, None], out, 0.0)


@functools.partial(jax.jit, static_argnames=("num_segments", "dense"))
def _pool_grads(scores, values, seg_id, token_valid, cot, *, num_segments, dense):
    fn = dense_pool if dense else segment_softmax_pool
    return jax.grad(lambda s_, v_: jnp.sum(fn(s_, v_, seg_id, token_valid, num_segments) * cot), argnums=(0, 1))(
        scores, values
    )


def test_segment_softmax_pool_gradients_finite_and_correct():
    scores, values, seg_id, token_valid, q = pool_inputs(3, lq=2)
    cot = np.random.default_rng(9).standard_normal((3, q, 2, 2, 4)).astype(np.float32)
    args = (jnp.asarray(seg_id), jnp.asarray(token_valid), cot)
    gs, gv = (np.asarray(g) for g in _pool_grads(scores, values, *args, num_segments=q, dense=False))
    rs, rv = (np.asarray(g) for g in _pool_grads(scores, values, *args, num_segments=q, dense=True))
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gv))
    np.testing.assert_allclose(gs, rs, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(gv, rv, atol=1e-5, rtol=1e-4)
    # PAD tokens receive no gradient; real tokens of non-empty segments do.
    assert np.all(gs[~token_valid] == 0.0) and np.all(gv[~token_valid] == 0.0)
    assert np.all(np.any(gv[token_valid] != 0.0, axis=(-1, -2)))


def test_entropy_segments_has_no_gradient():
    bits = random_bits(4, 2, 10)
    key_pad = suffix_pad([10, 4], 10)

    def f(x):
        seg = entropy_segments(x, jnp.asarray(key_pad), delta=0.1, abs_threshold=None, max_segments=10)
        return jnp.sum(seg.seg_id.astype(jnp.float32))

    np.testing.assert_array_equal(np.asarray(jax.grad(f)(jnp.asarray(bits))), 0.0)
