"""Entropy alignment and causality of the compressor's entropy models (docs/ARCHITECTURE.md 3.2 step 2), and a
full-forward gradient sanity check of the pyramid on degenerate rows.

bits[t] measures the uncertainty about token t given tokens < t, bits[0] = 0:
  - `logit`: bits[t] is the entropy of the prediction made at t-1, so it depends only on tokens < t;
  - `gaussian`: bits[t] is the surprisal of x_t under the prediction made at t-1, so it depends on tokens <= t.
The tests perturb one token (its id, hence its embedding) and check which bits may move.

The parameters are scaled up from their tiny initialization (std 0.02) so that a leak would move the bits by far more
than float32 noise; each sanity check asserts that the bits that should move do move.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abstractinator_jax.abstractinator import AbstractinatorLevel
from abstractinator_jax.compressor import SegmentCompressor
from abstractinator_jax.config import BOS_ID, EOS_ID, PAD_ID, base_config
from abstractinator_jax.model import AbstractinatorPyramid

S = 24
LENGTHS = [S, 15, 1]  # full, ragged, length-1 (only token 0 real)
SAME = 1e-5  # "unchanged": float32 noise on bits of order 1..10
MOVED = 1e-4  # "changed": a perturbation that reaches a bit moves it by more than this


def tiny_config(kind: str, *, shared: int = 1, window: int = 8):
    cfg = base_config()
    lv = cfg.levels[0]
    lv.D = 32
    lv.c_heads = 2
    lv.d_heads = 2
    lv.c_window = window
    lv.d_window = 8
    lv.c_num_lm_encoder_layers = 1
    lv.c_num_compression_encoder_layers = 1
    lv.c_num_shared_encoder_layers = shared
    lv.d_layers = 1
    lv.c_output_length = 16
    lv.d_lo_d_c = 16
    lv.c_entropy_model = kind
    cfg.sequence_length = S
    return cfg


def make_batch(seed, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    key_pad = np.arange(S)[None, :] >= np.asarray(lengths)[:, None]
    ids = rng.integers(0, 256, (len(lengths), S))
    ids[:, 0] = BOS_ID
    ids = np.where(key_pad, PAD_ID, ids).astype(np.int32)
    return ids, key_pad


def perturb(ids, key_pad, t, seed=0):
    """Change token t (to another byte) in every row where t is real."""
    out = ids.copy()
    rng = np.random.default_rng(1000 + seed + t)
    for b in range(ids.shape[0]):
        if not key_pad[b, t]:
            out[b, t] = (ids[b, t] + rng.integers(1, 255)) % 256
    return out


def numpy_init(shapes, std, seed):
    """Parameters for the shapes of `init`, drawn with numpy (cheaper than compiling `init` on 2 CPU cores).

    Matrices ~ N(0, std^2) with std well above the model's own 0.02, so attention is far from uniform and the bits
    spread out; the byte embedding ~ N(0, 1), RMSNorm scales ones and biases zeros, as the model initializes them.
    Latent attention's per-head chains (q_down, q_retr, k_retr, v_up) get N(0, 1/fan_in), so that scores stay
    O(1) instead of saturating the softmax (a saturated key has exactly no influence).
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        if "embedding" in name:
            return jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype)
        if any(f"'{k}'" in name for k in ("q_down", "q_retr", "k_retr", "v_up")):
            return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[1]), leaf.dtype)
        return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


class Entropy:
    """A level of the given config, initialized, scaled, with one jitted `compress` -> (bits, loss)."""

    def __init__(self, kind, *, shared=1, window=8, scale=None):
        self.cfg = tiny_config(kind, shared=shared, window=window)
        level = AbstractinatorLevel(self.cfg.levels[0])
        ids, key_pad = make_batch(0)
        shapes = jax.eval_shape(
            lambda k: level.init(k, ids, key_pad, method=AbstractinatorLevel.compress), jax.random.key(0)
        )
        if scale is None:
            scale = 0.3 if kind == "logit" else 0.1
        self.variables = numpy_init(shapes, scale, seed=1)

        def run(v, ids_, pad_):
            out = level.apply(v, ids_, pad_, method=AbstractinatorLevel.compress).entropy
            return out.bits, out.loss

        self._run = jax.jit(run)

    def __call__(self, ids, key_pad):
        bits, loss = self._run(self.variables, jnp.asarray(ids), jnp.asarray(key_pad))
        return np.asarray(bits), float(loss)


_MODELS: dict = {}


def model(kind, **kw):
    key = (kind, tuple(sorted(kw.items())))
    if key not in _MODELS:
        _MODELS[key] = Entropy(kind, **kw)
    return _MODELS[key]


PERTURB_T = [0, 1, 7, 8, 14, 15, 22, S - 1]


@pytest.mark.parametrize("t", PERTURB_T)
def test_logit_bits_depend_only_on_earlier_tokens(t):
    ent = model("logit")
    ids, key_pad = make_batch(3)
    bits, _ = ent(ids, key_pad)
    bits2, _ = ent(perturb(ids, key_pad, t), key_pad)
    assert np.all(np.isfinite(bits))
    assert np.all(bits[:, 0] == 0.0) and np.all(bits2[:, 0] == 0.0)
    np.testing.assert_allclose(bits2[:, : t + 1], bits[:, : t + 1], atol=SAME, rtol=0)
    # Rows where t is PAD were not touched at all: none of their bits move.
    untouched = key_pad[:, t]
    np.testing.assert_allclose(bits2[untouched], bits[untouched], atol=SAME, rtol=0)
    if t + 1 < S:  # the perturbation is visible: the prediction made at t (bits[t + 1]) moves in the full row
        assert abs(bits2[0, t + 1] - bits[0, t + 1]) > MOVED


@pytest.mark.parametrize("t", PERTURB_T)
def test_gaussian_bits_depend_on_tokens_up_to_t(t):
    ent = model("gaussian")
    ids, key_pad = make_batch(4)
    bits, _ = ent(ids, key_pad)
    bits2, _ = ent(perturb(ids, key_pad, t), key_pad)
    assert np.all(np.isfinite(bits))
    assert np.all(bits[:, 0] == 0.0) and np.all(bits2[:, 0] == 0.0)
    np.testing.assert_allclose(bits2[:, :t], bits[:, :t], atol=SAME, rtol=0)
    untouched = key_pad[:, t]
    np.testing.assert_allclose(bits2[untouched], bits[untouched], atol=SAME, rtol=0)
    if t >= 1:  # bits[t] is the surprisal of x_t itself, so it moves
        assert abs(bits2[0, t] - bits[0, t]) > MOVED


@pytest.mark.parametrize("window,t", [(8, 0), (8, 3), (8, 10), (8, 15), (5, 0), (5, 4), (5, 11), (5, 18)])
def test_logit_bits_respect_the_sliding_window(window, t):
    """One LM layer, no shared layer: bits[t'] is predicted at t'-1 from tokens t'-W..t'-1, so token t reaches
    bits[t+1..t+W] and nothing beyond. S = 24 > 2W takes the blocked attention path (W = 5: S not a multiple of W)."""
    ent = model("logit", shared=0, window=window)
    ids, key_pad = make_batch(5)
    bits, _ = ent(ids, key_pad)
    bits2, _ = ent(perturb(ids, key_pad, t), key_pad)
    np.testing.assert_allclose(bits2[:, t + window + 1 :], bits[:, t + window + 1 :], atol=SAME, rtol=0)
    np.testing.assert_allclose(bits2[:, : t + 1], bits[:, : t + 1], atol=SAME, rtol=0)
    # The far edge of the window is still reached (the window is not narrower than W).
    assert abs(bits2[0, t + window] - bits[0, t + window]) > MOVED


@pytest.mark.parametrize("t", [0, 3, 10, 15])
def test_gaussian_bits_respect_the_sliding_window(t):
    """One LM layer, no shared layer: bits[t'] compares x_t' (token t' itself) with the prediction made at t'-1 from
    tokens t'-W..t'-1, so token t reaches bits[t..t+W] and nothing else."""
    window = 8
    ent = model("gaussian", shared=0, window=window)
    ids, key_pad = make_batch(9)
    bits, _ = ent(ids, key_pad)
    bits2, _ = ent(perturb(ids, key_pad, t), key_pad)
    np.testing.assert_allclose(bits2[:, t + window + 1 :], bits[:, t + window + 1 :], atol=SAME, rtol=0)
    np.testing.assert_allclose(bits2[:, :t], bits[:, :t], atol=SAME, rtol=0)
    assert abs(bits2[0, t + window] - bits[0, t + window]) > MOVED


def test_gaussian_bits_are_a_surprisal_of_x_t_under_a_prediction_from_earlier_tokens():
    """With no shared layer the target is the input x itself. Moving x_t along a line x_t + s u changes bits[t] as an
    exact quadratic in s (the Gaussian log-density of x_t under a mean and variance that do not see x_t): third
    differences vanish and the curvature is positive. A prediction that peeks at x_t is not quadratic."""
    ent = model("gaussian", shared=0, window=8)
    params = ent.variables["params"]
    comp = SegmentCompressor(ent.cfg.levels[0])
    ids, key_pad = make_batch(10)
    x0 = np.asarray(params["embedding"].value)[ids]
    run = jax.jit(lambda x: comp.apply({"params": params["compressor"]}, x, jnp.asarray(ids), jnp.asarray(key_pad)))
    u = np.random.default_rng(11).standard_normal(x0.shape[-1]).astype(np.float32)
    for t in (1, 7, 12, S - 1):
        f = []
        for step in (-1.0, 0.0, 1.0, 2.0):
            x = x0.copy()
            x[0, t] += step * u
            f.append(float(run(jnp.asarray(x)).entropy.bits[0, t]))
        third = f[3] - 3 * f[2] + 3 * f[1] - f[0]
        second = f[2] - 2 * f[1] + f[0]
        assert second > 1e-3, (t, f)
        assert abs(third) < 1e-4 * max(1.0, max(abs(v) for v in f)), (t, f)


@pytest.mark.parametrize("kind", ["logit", "gaussian"])
def test_pad_tokens_never_influence_real_bits_or_the_loss(kind):
    """Whatever ids sit under PAD, real tokens' bits and the entropy loss are the same; all-PAD rows are finite."""
    ent = model(kind)
    ids, key_pad = make_batch(6, lengths=[17, 0, 1])  # ragged, all-PAD, length-1
    bits, loss = ent(ids, key_pad)
    noisy = np.where(key_pad, np.random.default_rng(7).integers(0, 260, ids.shape), ids).astype(np.int32)
    bits2, loss2 = ent(noisy, key_pad)
    assert np.all(np.isfinite(bits)) and np.isfinite(loss) and np.all(np.isfinite(bits2))
    real = ~key_pad
    np.testing.assert_allclose(bits2[real], bits[real], atol=SAME, rtol=0)
    assert abs(loss2 - loss) <= 1e-5 * max(1.0, abs(loss))
    # A batch with no real token at all: finite bits, zero loss (nothing to average).
    all_pad = np.ones_like(key_pad)
    bits3, loss3 = ent(np.full_like(ids, PAD_ID), all_pad)
    assert np.all(np.isfinite(bits3)) and loss3 == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Full forward: gradients on degenerate rows
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "logit"])
def test_pyramid_gradients_finite_with_degenerate_rows(kind):
    cfg = tiny_config(kind)
    rng = np.random.default_rng(8)
    full = np.concatenate([[BOS_ID], rng.integers(0, 256, S - 2), [EOS_ID]])
    ids = np.stack([np.full(S, PAD_ID), np.r_[[BOS_ID], np.full(S - 1, PAD_ID)], full]).astype(np.int32)
    key_pad = ids == PAD_ID  # all-PAD row, length-1 row ([BOS] then PAD), full row
    assert key_pad[0].all() and key_pad[1].sum() == S - 1 and not key_pad[2].any()
    ids, key_pad = jnp.asarray(ids), jnp.asarray(key_pad)
    net = AbstractinatorPyramid(cfg)
    # The model's own scales (std 0.02 matrices, N(0, 1) byte embedding) without compiling `init`.
    params = numpy_init(jax.eval_shape(lambda k: net.init(k, ids, key_pad), jax.random.key(0)), 0.02, seed=2)["params"]

    @jax.jit
    def loss_and_grad(p):
        return jax.value_and_grad(lambda p_: net.apply({"params": p_}, ids, key_pad), has_aux=True)(p)

    (loss, metrics), grads = loss_and_grad(params)
    assert np.isfinite(float(loss))
    for name, value in metrics.items():
        assert np.all(np.isfinite(np.asarray(value))), name
    assert float(metrics["level0/compression_ratio"]) >= 1.0
    assert float(metrics["level0/real_tokens"]) == S + 1
    flat = jax.tree_util.tree_leaves_with_path(grads)
    for path, g in flat:
        assert np.all(np.isfinite(np.asarray(g))), jax.tree_util.keystr(path)
    # Every parameter takes part in the loss: a silent disconnection would show up as an all-zero gradient.
    dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g) != 0.0)]
    assert not dead, dead
