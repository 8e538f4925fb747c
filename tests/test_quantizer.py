"""Tests of the vector quantizers (docs/ARCHITECTURE.md 3.6) against brute-force numpy references.

Tiny shapes and fixed seeds; the jitted apply functions are built once per module configuration and shared.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from abstractinator_jax import quantizer
from abstractinator_jax.codes import CodeCodec
from abstractinator_jax.quantizer import VQ_STATE, ResidualVQ, VectorQuantizer

# -- shared helpers ---------------------------------------------------------------------------------------------------


@functools.cache
def _fns(cls, **kw):
    """(module, init, eval, train) for one module configuration; jitted once and shared by all tests."""
    module = cls(**kw)

    def init(key, z, valid):
        return module.init({"params": key}, z, valid)

    def evaluate(v, z, valid):
        return module.apply(v, z, valid)

    def train(v, z, valid, key):
        return module.apply(_jnp(v), z, valid, True, rngs={"vq": key}, mutable=[VQ_STATE])

    return module, jax.jit(init), jax.jit(evaluate), jax.jit(train)


def _np(tree):
    """Unboxed, writable numpy copy of a variables tree (so tests can edit the state between steps)."""
    return jax.tree_util.tree_map(lambda a: np.array(a), nn.meta.unbox(tree))


def _jnp(tree):
    """jax-array copy of a (numpy) variables tree, for closures and eager applies."""
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _init(fns, z, valid, seed=0):
    return _np(fns[1](jax.random.key(seed), z, valid))


def _np_dist(z, cb):
    """(N, K) squared L2 distances by an explicit loop over codes, in float64."""
    z = np.asarray(z, np.float64)
    cb = np.asarray(cb, np.float64)
    return np.stack([np.sum((z - cb[k]) ** 2, axis=-1) for k in range(cb.shape[0])], axis=-1)


def _np_nearest(z, cb, forbidden=()):
    d = _np_dist(z, cb)
    d[:, list(forbidden)] = np.inf
    return np.argmin(d, axis=-1)


def _np_ema(state, z, valid, idx, *, decay, eps, protected):
    """One EMA step (cluster sizes, weight sums, Laplace-smoothed codebook) in float64; protected codes frozen."""
    cs0 = np.asarray(state["ema_cluster_size"], np.float64)
    ws0 = np.asarray(state["ema_weight_sum"], np.float64)
    cb0 = np.asarray(state["codebook"], np.float64)
    k = cs0.shape[0]
    prot = np.zeros(k, bool)
    prot[list(protected)] = True
    onehot = np.eye(k)[idx] * np.asarray(valid, np.float64)[:, None]
    counts = onehot.sum(0)
    cs = np.where(prot, cs0, decay * cs0 + (1 - decay) * counts)
    ws = np.where(prot[:, None], ws0, decay * ws0 + (1 - decay) * onehot.T @ np.asarray(z, np.float64))
    n = cs.sum()
    smoothed = (cs + eps) / (n + k * eps) * n
    cb = np.where(prot[:, None], cb0, ws / smoothed[:, None])
    return cs, ws, cb


def _rows_in(rows, table):
    """For each row of `rows`, whether it equals (exactly) some row of `table`."""
    return np.array([bool(np.any(np.all(table == r, axis=-1))) for r in rows])


def _key(i):
    return jax.random.key(1000 + i)


# -- 1. nearest-code search ------------------------------------------------------------------------------------------

K1, D1, N1 = 32, 8, 64


def _nearest_case():
    rs = np.random.RandomState(1)
    z = rs.randn(N1, D1).astype(np.float32)
    cb = rs.randn(K1, D1).astype(np.float32)
    valid = rs.rand(N1) < 0.8
    d = np.sort(_np_dist(z, cb), axis=-1)
    assert np.all(d[:, 2] - d[:, 1] > 1e-3) and np.all(d[:, 1] - d[:, 0] > 1e-3)  # no near ties
    return z, cb, valid


def test_nearest_matches_brute_force():
    z, cb, valid = _nearest_case()
    fns = _fns(VectorQuantizer, K=K1, dim=D1, buffer_size=8)
    v = _init(fns, z, valid)
    v[VQ_STATE]["codebook"] = cb
    e, idx, _, _ = fns[2](v, z, valid)
    want = _np_nearest(z, cb)
    np.testing.assert_array_equal(np.asarray(idx), want)
    np.testing.assert_array_equal(np.asarray(e), cb[want])
    assert len(np.unique(want)) > 10  # the case exercises many codes


def test_nearest_excludes_forbidden_codes():
    z, cb, valid = _nearest_case()
    nearest = _np_nearest(z, cb)
    forbidden = tuple(sorted({int(c) for c in nearest[:6]}))
    fns = _fns(VectorQuantizer, K=K1, dim=D1, buffer_size=8, forbidden=forbidden)
    v = _init(fns, z, valid)
    v[VQ_STATE]["codebook"] = cb
    e, idx, _, _ = fns[2](v, z, valid)
    idx = np.asarray(idx)
    assert not np.isin(idx, forbidden).any()
    np.testing.assert_array_equal(idx, _np_nearest(z, cb, forbidden))
    # rows whose true nearest code is forbidden get their next-nearest allowed code
    order = np.argsort(_np_dist(z, cb), axis=-1)
    for i in range(6):
        allowed = [c for c in order[i] if c not in forbidden]
        assert idx[i] == allowed[0] and idx[i] != nearest[i]
    np.testing.assert_array_equal(np.asarray(e), cb[idx])


@pytest.mark.parametrize("chunk", [8, 0, 5])
def test_nearest_code_by_chunks_is_argmin_with_its_ties_and_nans(chunk):
    """The chunked search (8 chunks of 8 codes; 0: one chunk of 64; 5 does not divide K: one chunk) equals the float64
    brute force, and jnp.argmin's answer on exact ties (duplicate codes in one chunk and across chunks: the first
    index), on forbidden codes in several chunks, on a row whose distances are all NaN (the first NaN) and on a row
    with every code forbidden."""
    rs = np.random.RandomState(3)
    k, d = 64, 8
    cb = rs.randn(k, d).astype(np.float32)
    cb[41] = cb[9]  # a tie across chunks
    cb[13] = cb[10]  # a tie within a chunk
    z = rs.randn(40, d).astype(np.float32)
    z[:4] = cb[[9, 41, 10, 13]]  # rows sitting exactly on tied codes
    z[4] = np.nan
    forbidden = np.zeros(k, bool)
    forbidden[[0, 1, 17, 50]] = True
    got = np.asarray(quantizer.nearest_code(jnp.asarray(z), jnp.asarray(cb), jnp.asarray(forbidden), chunk=chunk))
    want = _np_nearest(z, cb, np.flatnonzero(forbidden))
    want[4] = 2  # the NaN row: argmin's first NaN (codes 0 and 1 are forbidden, at +inf)
    np.testing.assert_array_equal(got, want)
    assert list(got[:4]) == [9, 9, 10, 10]
    d2 = jnp.where(jnp.asarray(forbidden)[None], jnp.inf, jnp.asarray(_np_dist(z, cb), jnp.float32))
    np.testing.assert_array_equal(got[5:], np.asarray(jnp.argmin(d2, axis=-1))[5:])
    everything = quantizer.nearest_code(jnp.asarray(z[5:6]), jnp.asarray(cb), jnp.ones(k, bool), chunk=chunk)
    assert int(everything[0]) == 0  # argmin of all +inf


# -- 2./3. straight-through estimator and loss ------------------------------------------------------------------------

RVQ_KW = dict(K=16, code_dim=3, buffer_size=32, vectors_per_step=8, reset_interval=2)
RB, RQ, RD = 2, 4, 4


def _rvq_case(seed=2):
    rs = np.random.RandomState(seed)
    z = rs.randn(RB, RQ, RD).astype(np.float32)
    valid = np.array([[1, 1, 0, 1], [0, 1, 1, 0]], bool)
    return z, valid


@pytest.mark.parametrize("depth", [1, 2])
def test_residual_vq_straight_through_jacobian(depth):
    z, valid = _rvq_case()
    fns = _fns(ResidualVQ, depth=depth, **RVQ_KW)
    module, v = fns[0], _init(fns, z, valid)
    down, up = v["params"]["down"], v["params"]["up"]
    np.testing.assert_array_equal(up, down.T)  # up initialised as down's transpose

    @jax.jit
    def forward_and_jacobian(v, z):
        return module.apply(v, z, valid), jax.jacobian(lambda z: module.apply(v, z, valid)[0])(z)

    (out, codes, _, _), jac = forward_and_jacobian(v, z)
    out, codes, jac = np.asarray(out), np.asarray(codes), np.asarray(jac)
    # d out[b, q, i] / d z[b', q', j] = [b = b'][q = q'] valid[b, q] (down @ up)[j, i]: the map z -> z @ down @ up
    m = (down.astype(np.float64) @ up).T
    want = np.einsum("bq,bc,qr,ij->bqicrj", valid, np.eye(RB), np.eye(RQ), m)
    np.testing.assert_allclose(jac, want, rtol=1e-5, atol=1e-6)
    assert np.abs(want).max() > 0.1
    # invalid slots: zero output, zero gradient (w.r.t. every input)
    assert np.all(out[~valid] == 0.0)
    assert np.all(jac[~valid] == 0.0)
    # the forward value is the hard code path, not the linear map: up(sum of the stages' code vectors)
    k = RVQ_KW["K"]
    digits = (codes[..., None] // k ** np.arange(depth)) % k
    hard = sum(v[VQ_STATE][f"stage_{s}"]["codebook"][digits[..., s]] for s in range(depth))
    np.testing.assert_allclose(out[valid], (hard @ up)[valid], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[valid], (z @ down @ up)[valid], atol=1e-3)


VQ_GRAD_N, VQ_GRAD_D, VQ_GRAD_K = 12, 4, 8


def _vq_grad_case():
    rs = np.random.RandomState(3)
    z = rs.randn(VQ_GRAD_N, VQ_GRAD_D).astype(np.float32)
    valid = np.ones(VQ_GRAD_N, bool)
    valid[[1, 4, 5, 10]] = False
    z[~valid] *= 100.0  # invalid rows are far away: they would dominate the loss if they counted
    return z, valid


@pytest.mark.parametrize("ema", [True, False])
def test_vq_straight_through_and_loss_gradient(ema):
    z, valid = _vq_grad_case()
    beta = 0.3
    fns = _fns(VectorQuantizer, K=VQ_GRAD_K, dim=VQ_GRAD_D, beta=beta, ema=ema, buffer_size=8)
    module, v = fns[0], _init(fns, z, valid)

    @jax.jit
    def grads(v, z):
        def st(z):
            e = module.apply(v, z, valid)[0]
            return z + jax.lax.stop_gradient(e - z)

        def hard(z):
            return module.apply(v, z, valid)[0]

        def loss(z):
            return module.apply(v, z, valid)[2]

        return hard(z), jax.jacobian(st)(z), jax.jacobian(hard)(z), jax.grad(loss)(z)

    e, jac_st, jac_hard, g = (np.asarray(a) for a in grads(v, z))
    eye = np.eye(VQ_GRAD_N * VQ_GRAD_D).reshape(VQ_GRAD_N, VQ_GRAD_D, VQ_GRAD_N, VQ_GRAD_D)
    np.testing.assert_array_equal(jac_st, eye)
    np.testing.assert_array_equal(jac_hard, 0.0)  # e carries no gradient to z
    n_valid = valid.sum()
    want = np.where(valid[:, None], 2 * beta * (z - e) / (n_valid * VQ_GRAD_D), 0.0)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    assert np.all(g[~valid] == 0.0)


def test_vq_loss_terms_match_numpy():
    z, valid = _vq_grad_case()
    beta = 0.3
    fns = _fns(VectorQuantizer, K=VQ_GRAD_K, dim=VQ_GRAD_D, beta=beta, ema=False, buffer_size=8)
    module, v = fns[0], _init(fns, z, valid)
    cb = v["params"]["codebook"]
    _, idx, loss, _ = fns[2](v, z, valid)
    idx = np.asarray(idx)
    np.testing.assert_array_equal(idx, _np_nearest(z, cb))
    e = cb[idx].astype(np.float64)
    w = valid[:, None].astype(np.float64)
    denom = valid.sum() * VQ_GRAD_D
    codebook_term = np.sum(w * (z - e) ** 2) / denom
    commitment = np.sum(w * (z - e) ** 2) / denom
    np.testing.assert_allclose(float(loss), codebook_term + beta * commitment, rtol=1e-5)

    # the codebook term alone reaches the codebook: d loss / d cb[k] = sum over valid rows of k of 2 (e - z) / denom
    def loss_of_params(params, v):
        return module.apply({**v, "params": params}, z, valid)[2]

    g = np.asarray(jax.jit(jax.grad(loss_of_params))(v["params"], v)["codebook"])
    onehot = np.eye(VQ_GRAD_K)[idx] * w
    want = onehot.T @ (2 * (e - z)) / denom
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    # all rows invalid: zero loss, no NaN
    _, _, loss0, _ = fns[2](v, z, np.zeros_like(valid))
    assert float(loss0) == 0.0


def test_residual_vq_loss_and_gradients_match_numpy():
    """RVQ loss = sum of the stages' losses on the successive residuals; the residual is taken with stop-gradient on
    the quantized part, so a later stage's loss sends no gradient into earlier codebooks (but does into `down`)."""
    depth, k, beta, dc = 2, RVQ_KW["K"], 0.25, RVQ_KW["code_dim"]
    z, valid = _rvq_case(seed=12)
    fns = _fns(ResidualVQ, depth=depth, ema=False, **RVQ_KW)
    module, v = fns[0], _init(fns, z, valid)

    @jax.jit
    def loss_and_grads(params, v):
        def f(params):
            _, _, loss, metrics = module.apply({**v, "params": params}, z, valid)
            return loss, metrics

        return jax.value_and_grad(f, has_aux=True)(params)

    (loss, metrics), g = loss_and_grads(v["params"], v)
    p = {name: np.asarray(a, np.float64) for name, a in v["params"].items() if name in ("down", "up")}
    cb = [np.asarray(v["params"][f"stage_{s}"]["codebook"], np.float64) for s in range(depth)]
    zf = z.reshape(-1, RD).astype(np.float64)
    w = valid.reshape(-1, 1).astype(np.float64)
    denom = valid.sum() * dc
    y = zf @ p["down"]
    d0 = _np_nearest(y, cb[0], forbidden=tuple(range(k - 4, k)))
    e0 = cb[0][d0]
    r1 = y - e0
    e1 = cb[1][_np_nearest(r1, cb[1])]
    r2 = r1 - e1
    sq0, sq1 = np.sum(w * (y - e0) ** 2) / denom, np.sum(w * r2**2) / denom
    np.testing.assert_allclose(float(loss), (1 + beta) * (sq0 + sq1), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["vq_residual_mse"]), sq1, rtol=1e-5)
    # codebook gradients: each stage's codebook term only (stage 1's commitment must not reach stage 0's codebook)
    want0 = (np.eye(k)[d0] * w).T @ (2 * (e0 - y)) / denom
    want1 = (np.eye(k)[_np_nearest(r1, cb[1])] * w).T @ (2 * (e1 - r1)) / denom
    np.testing.assert_allclose(np.asarray(g["stage_0"]["codebook"]), want0, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g["stage_1"]["codebook"]), want1, rtol=1e-4, atol=1e-6)
    # commitment terms reach the input projection through both residuals
    want_down = zf.T @ (w * 2 * beta * ((y - e0) + r2) / denom)
    np.testing.assert_allclose(np.asarray(g["down"]), want_down, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(g["up"]), 0.0)  # the loss does not use the output projection


# -- 4. EMA update ---------------------------------------------------------------------------------------------------

EMA_KW = dict(
    K=16,
    dim=4,
    decay=0.9,
    eps=1e-3,
    reset_interval=0,
    buffer_size=16,
    vectors_per_step=8,
    protected=(1, 2),
    forbidden=(3,),
)
EMA_N = 24


def test_ema_step_matches_numpy():
    rs = np.random.RandomState(4)
    fns = _fns(VectorQuantizer, **EMA_KW)
    z0 = rs.randn(EMA_N, 4).astype(np.float32)
    valid0 = np.ones(EMA_N, bool)
    v = _init(fns, z0, valid0)
    st = v[VQ_STATE]
    cb = rs.randn(16, 4).astype(np.float32)
    st["codebook"] = cb
    st["ema_cluster_size"] = rs.uniform(0.5, 5.0, 16).astype(np.float32)
    st["ema_weight_sum"] = rs.randn(16, 4).astype(np.float32)
    protected = (1, 2, 3)
    for step in range(2):
        # rows near the protected codes (they are chosen unless forbidden), plus far-away invalid rows
        z = rs.randn(EMA_N, 4).astype(np.float32)
        z[:3] = st["codebook"][[1, 2, 3]] + 0.01
        valid = rs.rand(EMA_N) < 0.75
        valid[:3] = True
        z[~valid] = 50.0
        idx = _np_nearest(z, st["codebook"], forbidden=(3,))
        assert idx[0] == 1 and idx[1] == 2 and idx[2] != 3  # protected codes do get assigned rows
        cs, ws, want_cb = _np_ema(st, z, valid, idx, decay=0.9, eps=1e-3, protected=protected)
        (_, got_idx, _, _), new = fns[3](v, z, valid, _key(step))
        new = _np(new)[VQ_STATE]
        np.testing.assert_array_equal(np.asarray(got_idx), idx)
        np.testing.assert_allclose(new["ema_cluster_size"], cs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new["ema_weight_sum"], ws, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new["codebook"], want_cb, rtol=1e-4, atol=1e-5)
        for k in protected:  # protected and forbidden codes: bit-identical
            for name in ("ema_cluster_size", "ema_weight_sum", "codebook"):
                np.testing.assert_array_equal(new[name][k], st[name][k])
        assert int(new["step"]) == step + 1
        assert not np.allclose(new["codebook"], st["codebook"])
        v = {VQ_STATE: new}
        st = new


# -- 5. dead-code reset ----------------------------------------------------------------------------------------------

RESET_KW = dict(
    K=32,
    dim=4,
    decay=0.9,
    reset_interval=3,
    reset_fraction=0.1,
    dead_threshold=1.0,
    buffer_size=16,
    vectors_per_step=8,
    protected=(0, 1),
    forbidden=(28, 29, 30, 31),
)
RESET_PROTECTED = (0, 1, 28, 29, 30, 31)
RESET_N = 16


def _engineer_usage(st, dead_usage):
    cs = np.full(32, 50.0, np.float32)
    for k, u in dead_usage.items():
        cs[k] = u
    cs[list(RESET_PROTECTED)] = 0.0  # protected / special codes are dead too: the reset must skip them
    st["ema_cluster_size"] = cs
    st["ema_weight_sum"] = st["codebook"] * np.maximum(cs, 0.05)[:, None]


def test_dead_code_reset():
    rs = np.random.RandomState(5)
    fns = _fns(VectorQuantizer, **RESET_KW)
    z0 = rs.randn(RESET_N, 4).astype(np.float32)
    v = _init(fns, z0, np.ones(RESET_N, bool))
    r = int(round(0.1 * 32))
    dead_many = {5: 0.3, 9: 0.05, 13: 0.5, 17: 0.2, 21: 0.4, 25: 0.1}
    dead_few = {7: 0.2, 11: 0.6}
    fired = []
    for step in range(1, 7):
        st = v[VQ_STATE]
        _engineer_usage(st, dead_many if step < 6 else dead_few)
        z = rs.randn(RESET_N, 4).astype(np.float32)
        valid = rs.rand(RESET_N) < 0.75
        z[~valid] = 77.0
        idx = _np_nearest(z, st["codebook"], forbidden=RESET_KW["forbidden"])
        cs, ws, cb = _np_ema(st, z, valid, idx, decay=0.9, eps=1e-5, protected=RESET_PROTECTED)
        _, new = fns[3](v, z, valid, _key(step))
        new = _np(new)[VQ_STATE]
        changed = ~np.all(np.isclose(new["codebook"], cb, rtol=1e-4, atol=1e-5), axis=-1)
        if step % 3:
            assert not changed.any(), f"step {step}: codes {np.flatnonzero(changed)} changed outside the EMA"
            np.testing.assert_allclose(new["ema_cluster_size"], cs, rtol=1e-5, atol=1e-6)
        else:
            fired.append(step)
            dead = np.flatnonzero((cs < 1.0) & ~np.isin(np.arange(32), RESET_PROTECTED))
            want = np.sort(dead[np.argsort(cs[dead])][:r])  # the r least-used dead codes
            assert len(dead) == (6 if step < 6 else 2)
            np.testing.assert_array_equal(np.flatnonzero(changed), want)
            assert len(want) <= r
            buf = new["buffer"][: int(new["buffer_count"])]
            assert _rows_in(new["codebook"][want], buf).all(), "reset vectors must be rows of the ring buffer"
            np.testing.assert_array_equal(new["ema_weight_sum"][want], new["codebook"][want])
            np.testing.assert_array_equal(new["ema_cluster_size"][want], 1.0)
            keep = np.setdiff1d(np.arange(32), want)
            np.testing.assert_allclose(new["ema_cluster_size"][keep], cs[keep], rtol=1e-5, atol=1e-6)
        for k in RESET_PROTECTED:
            np.testing.assert_array_equal(new["codebook"][k], st["codebook"][k])
            assert new["ema_cluster_size"][k] == 0.0
        v = {VQ_STATE: new}
    assert fired == [3, 6]


def test_no_reset_from_empty_buffer():
    rs = np.random.RandomState(6)
    fns = _fns(VectorQuantizer, **RESET_KW)
    z = rs.randn(RESET_N, 4).astype(np.float32)
    valid = np.zeros(RESET_N, bool)  # nothing valid: nothing enters the buffer
    v = _init(fns, z, np.ones(RESET_N, bool))
    st = v[VQ_STATE]
    st["step"] = np.int32(2)  # the next step is a reset step
    _engineer_usage(st, {5: 0.3, 9: 0.05, 13: 0.5})
    assert int(st["buffer_count"]) == 0
    idx = _np_nearest(z, st["codebook"], forbidden=RESET_KW["forbidden"])
    cs, _, cb = _np_ema(st, z, valid, idx, decay=0.9, eps=1e-5, protected=RESET_PROTECTED)
    _, new = fns[3](v, z, valid, _key(0))
    new = _np(new)[VQ_STATE]
    assert int(new["step"]) == 3 and int(new["buffer_count"]) == 0
    np.testing.assert_allclose(new["codebook"], cb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["ema_cluster_size"], cs, rtol=1e-5, atol=1e-6)


# -- 6. ring buffer --------------------------------------------------------------------------------------------------

BUF_KW = dict(K=8, dim=4, reset_interval=0, buffer_size=10, vectors_per_step=4)
BUF_N = 8


def test_ring_buffer_holds_valid_rows_and_wraps():
    rs = np.random.RandomState(7)
    fns = _fns(VectorQuantizer, **BUF_KW)
    v = _init(fns, rs.randn(BUF_N, 4).astype(np.float32), np.ones(BUF_N, bool))
    pos, count = 0, 0
    for step, n_valid in enumerate([3, 6, 0, 8, 5, 1]):
        z = rs.randn(BUF_N, 4).astype(np.float32)
        valid = np.zeros(BUF_N, bool)
        valid[rs.permutation(BUF_N)[:n_valid]] = True
        z[~valid] = 1000.0 + np.arange(BUF_N)[~valid, None]  # sentinels that must never enter the buffer
        old = v[VQ_STATE]
        _, new = fns[3](v, z, valid, _key(step))
        new = _np(new)[VQ_STATE]
        take = min(4, n_valid)
        written = (pos + np.arange(take)) % 10
        pos, count = (pos + take) % 10, min(count + take, 10)
        assert int(new["buffer_pos"]) == pos and int(new["buffer_count"]) == count, step
        assert _rows_in(new["buffer"][written], z[valid]).all(), step
        untouched = np.setdiff1d(np.arange(10), written)
        np.testing.assert_array_equal(new["buffer"][untouched], old["buffer"][untouched])
        assert np.all(np.abs(new["buffer"]) < 100.0)
        v = {VQ_STATE: new}
    assert count == 10 and pos == 16 % 10  # 16 rows written into 10 slots: wrapped around


def test_ring_buffer_draws_every_valid_row_about_equally():
    """The rows written are drawn uniformly, with replacement, from the valid rows only: over many steps each of the
    5 valid rows (of 8, not a prefix) fills about a fifth of the writes; no invalid row is ever written."""
    fns = _fns(VectorQuantizer, **BUF_KW)
    z = np.zeros((BUF_N, 4), np.float32)
    z[:, 0] = np.arange(BUF_N)  # row i is recognisable by its first component
    valid = np.array([0, 1, 1, 0, 1, 1, 0, 1], bool)
    v = _init(fns, z, valid)
    counts = np.zeros(BUF_N)
    for step in range(100):
        _, new = fns[3](v, z, valid, _key(step))
        new = _np(new)[VQ_STATE]
        written = (int(v[VQ_STATE]["buffer_pos"]) + np.arange(4)) % 10
        counts += np.bincount(new["buffer"][written, 0].astype(int), minlength=BUF_N)
        v = {VQ_STATE: new}
    assert counts[~valid].sum() == 0
    share = counts[valid] / counts.sum()  # 400 draws: each share ~0.2 (binomial sd 0.02)
    assert np.all(np.abs(share - 0.2) < 0.08), share


# -- 7. codec --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_codec_round_trip_and_specials(depth):
    k = 8
    codec = CodeCodec(k, depth)
    rs = np.random.RandomState(depth)
    digits = rs.randint(0, k, size=(5, 7, depth))
    ids = np.asarray(codec.compose(digits))
    np.testing.assert_array_equal(ids, np.sum(digits * k ** np.arange(depth), axis=-1))
    np.testing.assert_array_equal(np.asarray(codec.decompose(ids)), digits)
    all_ids = np.arange(k**depth)
    np.testing.assert_array_equal(np.asarray(codec.compose(codec.decompose(all_ids))), all_ids)
    specials = [codec.pad_id, codec.bos_id, codec.eos_id, codec.eop_id]
    assert specials == [k - 1, k - 2, k - 3, k - 4]
    np.testing.assert_array_equal(np.asarray(codec.is_special(all_ids)), np.isin(all_ids, specials))
    spec_digits = np.asarray(codec.decompose(np.array(specials)))
    np.testing.assert_array_equal(spec_digits[:, 0], specials)
    np.testing.assert_array_equal(spec_digits[:, 1:], 0)
    np.testing.assert_array_equal(np.asarray(codec.compose(spec_digits)), specials)


def test_residual_vq_codes_are_stage_digits():
    depth, k = 2, RVQ_KW["K"]
    z, valid = _rvq_case(seed=8)
    fns = _fns(ResidualVQ, depth=depth, **RVQ_KW)
    module, v = fns[0], _init(fns, z, valid)
    assert module.codec == CodeCodec(k, depth)
    y = z.reshape(-1, RD) @ v["params"]["down"]
    cb0 = v[VQ_STATE]["stage_0"]["codebook"]
    cb0[k - 4 :] = y[:4] + 1e-3  # the specials would be the nearest codes of the first rows if they were allowed
    cb1 = v[VQ_STATE]["stage_1"]["codebook"]
    _, codes, _, _ = fns[2](v, z, valid)
    codes = np.asarray(codes).reshape(-1)
    flat_valid = valid.reshape(-1)
    specials = tuple(range(k - 4, k))
    d0 = _np_nearest(y, cb0, forbidden=specials)
    d1 = _np_nearest(y - cb0[d0], cb1)
    assert np.isin(_np_nearest(y[:4], cb0), specials).all()  # the guard is exercised
    digits = np.asarray(module.codec.decompose(codes))
    np.testing.assert_array_equal(digits[flat_valid, 0], d0[flat_valid])
    np.testing.assert_array_equal(digits[flat_valid, 1], d1[flat_valid])
    np.testing.assert_array_equal(codes[flat_valid], (d0 + k * d1)[flat_valid])
    np.testing.assert_array_equal(codes[~flat_valid], module.codec.pad_id)
    assert not np.asarray(module.codec.is_special(codes[flat_valid])).any()


# -- 8. residual error vs depth --------------------------------------------------------------------------------------


def test_residual_error_shrinks_with_depth():
    rs = np.random.RandomState(9)
    z = rs.randn(4, 16, 6).astype(np.float32)
    valid = rs.rand(4, 16) < 0.8
    z[~valid] = 30.0
    kw = dict(K=16, code_dim=4, ema=False, buffer_size=8)
    v3 = _init(_fns(ResidualVQ, depth=3, **kw), z, valid, seed=3)
    down = v3["params"]["down"]
    mses = []
    for depth in (1, 2, 3):
        fns = _fns(ResidualVQ, depth=depth, **kw)
        stages = [f"stage_{s}" for s in range(depth)]  # the stages are a prefix of depth 3's
        v = {
            "params": {name: v3["params"][name] for name in ["down", "up", *stages]},
            VQ_STATE: {name: v3[VQ_STATE][name] for name in stages},
        }
        _, _, _, metrics = fns[2](v, z, valid)
        mses.append(float(metrics["vq_residual_mse"]))
        # numpy reference of the residual after all stages (valid rows only)
        r = z.reshape(-1, 6)[valid.reshape(-1)].astype(np.float64) @ down
        for s in range(depth):
            cb = v["params"][f"stage_{s}"]["codebook"]
            r = r - cb[_np_nearest(r, cb, forbidden=tuple(range(12, 16)) if s == 0 else ())]
        np.testing.assert_allclose(mses[-1], np.mean(r**2), rtol=1e-4)
    assert mses[0] >= mses[1] >= mses[2], mses
    assert mses[0] > mses[1] * 1.1, mses


# -- 9. jit vs eager -------------------------------------------------------------------------------------------------


def test_train_step_same_under_jit_and_eager():
    z, valid = _rvq_case(seed=10)
    kw = dict(RVQ_KW, reset_interval=1)
    fns = _fns(ResidualVQ, depth=2, **kw)
    module, v = fns[0], _init(fns, z, valid)
    k = kw["K"]
    st0 = v[VQ_STATE]["stage_0"]
    st0["ema_cluster_size"][k - 4 :] = 0.0  # dead specials: must still be left alone by the reset
    for s in range(2):  # prime the buffers so that the reset has sources and fires on dead codes
        v[VQ_STATE][f"stage_{s}"]["buffer"][:4] = np.random.RandomState(s).randn(4, 3)
        v[VQ_STATE][f"stage_{s}"]["buffer_count"] = np.int32(4)
        v[VQ_STATE][f"stage_{s}"]["buffer_pos"] = np.int32(4)
    key = _key(0)
    out_j, new_j = fns[3](v, z, valid, key)
    out_e, new_e = module.apply(_jnp(v), z, valid, True, rngs={"vq": key}, mutable=[VQ_STATE])
    for a, b in zip(jax.tree_util.tree_leaves(out_j), jax.tree_util.tree_leaves(out_e)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert jax.tree_util.tree_structure(new_j) == jax.tree_util.tree_structure(new_e)
    for a, b in zip(jax.tree_util.tree_leaves(new_j), jax.tree_util.tree_leaves(new_e)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    new = _np(new_j)[VQ_STATE]
    # the step did update and reset codes, but never the stage-0 specials
    for s in range(2):
        cs = new[f"stage_{s}"]["ema_cluster_size"]
        assert np.any(cs == 1.0) and int(new[f"stage_{s}"]["step"]) == 1
    np.testing.assert_array_equal(new["stage_0"]["codebook"][k - 4 :], st0["codebook"][k - 4 :])
    np.testing.assert_array_equal(new["stage_0"]["ema_cluster_size"][k - 4 :], 0.0)


# -- 10. eval mode and perplexity ------------------------------------------------------------------------------------

PPL_KW = dict(K=8, dim=4, reset_interval=1, buffer_size=8, vectors_per_step=4)
PPL_N = 16


def _ppl_setup():
    fns = _fns(VectorQuantizer, **PPL_KW)
    rs = np.random.RandomState(11)
    z = rs.randn(PPL_N, 4).astype(np.float32)
    v = _init(fns, z, np.ones(PPL_N, bool))
    cb = 10.0 * rs.randn(8, 4).astype(np.float32)
    v[VQ_STATE]["codebook"] = cb
    return fns, v, cb, rs


def test_no_state_update_in_eval():
    fns, v, cb, rs = _ppl_setup()
    module = fns[0]
    z = rs.randn(PPL_N, 4).astype(np.float32)
    valid = rs.rand(PPL_N) < 0.7
    v[VQ_STATE]["ema_cluster_size"][:] = 0.1  # everything is dead: a training step would reset codes
    e_ref, idx_ref, loss_ref, _ = fns[2](v, z, valid)

    @jax.jit
    def eval_mutable_and_train_immutable(v, z, valid):
        eval_mutable = module.apply(v, z, valid, False, mutable=[VQ_STATE])
        train_immutable = module.apply(v, z, valid, True)  # state not mutable: plain forward, no rng needed
        return eval_mutable, train_immutable

    (out, new), out2 = eval_mutable_and_train_immutable(v, z, valid)
    jax.tree_util.tree_map(np.testing.assert_array_equal, _np(new), {VQ_STATE: v[VQ_STATE]})
    for a, b, c in zip(out[:3], out2[:3], (e_ref, idx_ref, loss_ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
    # whereas a training step does change the state
    _, new = fns[3](v, z, valid, _key(0))
    assert not np.array_equal(_np(new)[VQ_STATE]["codebook"], cb)


def test_perplexity_excludes_invalid_rows():
    fns, v, cb, rs = _ppl_setup()
    valid = np.zeros(PPL_N, bool)
    valid[:6] = True
    z = cb[np.arange(PPL_N) % 8] + 0.01 * rs.randn(PPL_N, 4).astype(np.float32)  # invalid rows spread over codes
    z[:6] = cb[5] + 0.01 * rs.randn(6, 4)  # every valid row maps to code 5
    _, idx, _, metrics = fns[2](v, z, valid)
    assert np.all(np.asarray(idx)[:6] == 5) and len(np.unique(np.asarray(idx))) == 8
    np.testing.assert_allclose(float(metrics["perplexity"]), 1.0, rtol=1e-6)
    z[3:6] = cb[2] + 0.01 * rs.randn(3, 4)  # two codes, equally used
    _, _, _, metrics = fns[2](v, z, valid)
    np.testing.assert_allclose(float(metrics["perplexity"]), 2.0, rtol=1e-5)
    # dead-code count follows the EMA usage against the threshold
    v[VQ_STATE]["ema_cluster_size"] = np.array([0.5, 2, 2, 0.9, 2, 2, 2, 1.0], np.float32)
    _, _, _, metrics = fns[2](v, z, valid)
    assert float(metrics["dead_codes"]) == 2.0
