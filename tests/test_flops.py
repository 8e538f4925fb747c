"""The analytic FLOP count behind the benchmarks' MFU (flops.py) against XLA's own count of the compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from abstractinator_jax.flops import top_macs_per_row
from abstractinator_jax.top import CodeSequenceTransformer

from .helpers import tiny_config


@pytest.mark.parametrize("continuous", [True, False])
def test_top_flops_match_xla_cost_analysis(continuous):
    """Standard attention (whose projections are the same per token whatever the batch; latent attention multiplies
    weight chains once per call, which is not model FLOPs): XLA counts every (query, key) score where the analytic
    count takes the causal half, and the softmax and norms, so the two agree to within a few percent."""
    cfg = tiny_config()
    cfg.levels[0].c_vq_K = 64
    cfg.levels[0].c_vq_d_c = 16
    t = cfg.top_transformer_config
    t.embed_dim, t.dim, t.num_layers, t.num_heads, t.continuous = cfg.levels[0].D, 64, 2, 4, continuous
    t.attention_type = "mha"
    model = CodeSequenceTransformer(t, code_dim=16)
    b, q = 2, 32
    rows, valid = jnp.zeros((b, q, t.embed_dim)), jnp.ones((b, q), bool)
    args = () if continuous else (jnp.zeros((b, q), jnp.int32), [jnp.zeros((64, 16))], 64)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), rows, valid, *args))
    cost = jax.jit(lambda p: model.apply(p, rows, valid, *args)[0]).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla = cost["flops"] / (b * q)
    ours = 2 * top_macs_per_row(cfg, q)
    assert 0.95 < xla / ours < 1.15, (xla, ours)
