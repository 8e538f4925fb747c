"""Multi-head latent attention (docs/ARCHITECTURE.md 3.1) against a slow reference written here: explicit loops
over batch rows, heads and positions through the compressed projections, in float64 numpy. Sliding-window and full
causal, with PAD; both the fused and the chained projection paths; and the decode cache (prefill + steps) against
the full forward."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from abstractinator_jax.attention import AttentionSpec, LatentSelfAttention, Prefill
from abstractinator_jax.blocks import TransformerBlock


def rope_ref(v: np.ndarray, pos: int, base: float = 10000.0) -> np.ndarray:
    """Rotate-half RoPE of one vector at position pos."""
    half = v.shape[0] // 2
    out = np.empty_like(v)
    for i in range(half):
        ang = pos * base ** (-i / half)
        out[i] = v[i] * math.cos(ang) - v[i + half] * math.sin(ang)
        out[i + half] = v[i + half] * math.cos(ang) + v[i] * math.sin(ang)
    return out


def mla_ref(p: dict, x: np.ndarray, pad: np.ndarray, window: int) -> np.ndarray:
    """The original's MLA math, one (row, head, query) at a time. x: (B, T, D); pad: (B, T)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(x, np.float64)
    b_, t_, d = x.shape
    n, k, _ = p["q_down"].shape
    r = p["q_retr"].shape[-1]
    out = np.zeros((b_, t_, d))
    for b in range(b_):
        kv_c = np.stack([np.zeros(p["kv_down"].shape[1]) if pad[b, s] else x[b, s] @ p["kv_down"] for s in range(t_)])
        heads = np.zeros((t_, n, k))
        for h in range(n):
            k_r = np.stack([rope_ref(kv_c[s] @ p["k_retr"][h], s) for s in range(t_)])
            for t in range(t_):
                q_r = rope_ref(((x[b, t] @ p["q"][:, h, :]) @ p["q_down"][h]) @ p["q_retr"][h], t)
                keys = [s for s in range(t + 1) if not pad[b, s] and (window <= 0 or s > t - window)]
                if not keys:
                    continue
                scores = np.array([q_r @ k_r[s] for s in keys]) / math.sqrt(r)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                ctx_c = sum(wi * kv_c[s] for wi, s in zip(w, keys))  # (C,) shared latent values
                heads[t, h] = ctx_c @ p["v_up"][h]  # (K,)
        y = heads.reshape(t_, n * k) @ p["o"].reshape(n * k, d)
        out[b] = y @ p["mix"] if "mix" in p else y
    return out


def random_params(module, x, pad, seed):
    """Parameters of unit-scale outputs: each tensor N(0, 1/fan_in) over its input axes."""
    shapes = jax.eval_shape(module.init, jax.random.key(seed), x, pad, jnp.arange(x.shape[1]))["params"]
    params = nn.unbox(shapes)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(params)))
    fan_in = {"q": (0,), "q_down": (1,), "q_retr": (1,), "kv_down": (0,), "k_retr": (1,), "v_up": (1,), "o": (0, 1)}
    fan_in["mix"] = (0,)
    out = {}
    for name, v in params.items():
        f = math.prod(v.shape[a] for a in fan_in[name])
        out[name] = jax.random.normal(next(keys), v.shape) / math.sqrt(f)
    return out


# (D, heads, head_dim, kv_comp_dim, q_comp_dim, retr_dim, mix, window, T)
CASES = {
    "window_fused": (32, 4, 8, 8, 8, 8, False, 8, 40),  # T > 2W: the blocked sliding-window kernel
    "causal_mix": (32, 2, 16, 8, 4, 8, True, 0, 12),
    "window_chained": (32, 2, 4, 16, 4, 16, False, 6, 12),  # query and output paths as per-head chains
}


def _pad_mask(t):
    pad = np.zeros((2, t), bool)
    pad[0, t - 5 :] = True  # a PAD suffix
    pad[1, 3] = True  # a PAD inside the row
    return pad


@pytest.mark.parametrize("case", list(CASES))
def test_mla_matches_reference(case):
    d, n, k, c, cq, r, mix, window, t = CASES[case]
    module = LatentSelfAttention(
        features=d, num_heads=n, head_dim=k, kv_comp_dim=c, q_comp_dim=cq, retr_dim=r, mix=mix, window=window
    )
    x = jax.random.normal(jax.random.key(0), (2, t, d))
    pad = _pad_mask(t)
    params = random_params(module, x, jnp.asarray(pad), seed=1)
    got = jax.jit(lambda p, x, m: module.apply({"params": p}, x, m, jnp.arange(t)))(params, x, jnp.asarray(pad))
    want = mla_ref(params, np.asarray(x), pad, window)
    assert float(np.abs(want).mean()) > 0.1  # unit-scale outputs: 1e-5 is a real tolerance
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_mla_parameters_are_the_originals():
    """Shapes of the original's MultiheadLatentAttention (q_proj, w_kc_q, W_qr, kv_proj, W_kr, w_kc_kv, out_proj)
    plus CausalMLA's o_proj when mixed; W_qr's init is scaled down by sqrt(retr_dim) as there."""
    d, n, k, c, cq, r = 32, 2, 16, 8, 4, 8
    module = LatentSelfAttention(
        features=d, num_heads=n, head_dim=k, kv_comp_dim=c, q_comp_dim=cq, retr_dim=r, mix=True
    )
    x = jnp.zeros((1, 4, d))
    init = jax.jit(module.init)
    params = nn.unbox(init(jax.random.key(0), x, jnp.zeros((1, 4), bool), jnp.arange(4))["params"])
    shapes = {name: tuple(jnp.asarray(v).shape) for name, v in params.items()}
    assert shapes == {
        "q": (d, n, k),
        "q_down": (n, k, cq),
        "q_retr": (n, cq, r),
        "kv_down": (d, c),
        "k_retr": (n, c, r),
        "v_up": (n, c, k),
        "o": (n, k, d),
        "mix": (d, d),
    }
    bound = 1.0 / math.sqrt(cq * r) / math.sqrt(r)
    assert float(jnp.max(jnp.abs(jnp.asarray(params["q_retr"])))) <= bound


@pytest.mark.parametrize("window", [0, 4])
def test_cache_prefill_and_steps_match_the_forward(window):
    """A block over a prompt, then one token per row at a time through the latent cache (a ring of `window` slots,
    or 12 for full causal), equals the block over all 12 tokens at once. Row 0's prompt has 5 tokens, row 1's 3
    (then PAD, so it continues from position 3) with a PAD token inside it."""
    d, t, t0 = 32, 12, 5
    spec = AttentionSpec("mla", head_dim=8, kv_comp_dim=8, q_comp_dim=8, retr_dim=8, mix=window == 0)
    block = TransformerBlock(features=d, num_heads=4, window=window, attention=spec)
    x = jax.random.normal(jax.random.key(2), (2, t, d))
    pad = np.zeros((2, t), bool)
    pad[1, 1] = True
    variables = jax.jit(block.init)(jax.random.key(3), x, jnp.asarray(pad), jnp.arange(t))
    full = np.asarray(jax.jit(block.apply)(variables, x, jnp.asarray(pad), jnp.arange(t)))

    prompt_pad = pad[:, :t0].copy()
    prompt_pad[1, 3:] = True  # row 1's prompt ends at 3
    prefill = jax.jit(lambda v, x, m: block.apply(v, x, m, jnp.arange(x.shape[1]), Prefill(t)))
    step = jax.jit(lambda v, x, m, p, c: block.apply(v, x, m, p, c))
    out, cache = prefill(variables, x[:, :t0], jnp.asarray(prompt_pad))
    np.testing.assert_allclose(np.asarray(out)[0], full[0, :t0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out)[1, :3], full[1, :3], rtol=1e-5, atol=1e-5)
    slots = window or t
    assert cache.kv_c.shape == (2, slots, 8) and cache.k_r.shape == (2, slots, 4, 8)  # the latent, not k and v
    pos = np.array([t0, 3])
    got = {0: [], 1: []}
    while pos.min() < t:
        p = np.minimum(pos, t - 1)
        xs = x[jnp.arange(2), p][:, None]
        o, cache = step(variables, xs, jnp.asarray(pad[np.arange(2), p][:, None]), jnp.asarray(p, jnp.int32), cache)
        for r in range(2):
            if pos[r] < t:
                got[r].append(np.asarray(o)[r, 0])
        pos = pos + 1
    np.testing.assert_allclose(np.stack(got[0]), full[0, t0:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.stack(got[1]), full[1, 3:], rtol=1e-5, atol=1e-5)
