"""Training step: a tiny model overfits, bfloat16 training tracks float32 (with float32 parameters, optimizer state,
statistics and losses), data parallelism matches one device, the optimizer schedule is right."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from abstractinator_jax import sharding, steps, train_state
from abstractinator_jax.model import AbstractinatorPyramid

from .helpers import sentence_batch, tiny_config, tiny_discrete_config, xla_flags

REPO = Path(__file__).resolve().parents[1]


BF16_STEPS = 100


@pytest.fixture(scope="module")
def tiny_init():
    """(cfg, mesh, optimizer, initial state, shardings) of tiny_config; runs copy the state (a step donates it)."""
    cfg = tiny_config(attention="mla")
    mesh = sharding.make_mesh(cfg.mesh)
    opt = train_state.make_optimizer(cfg)
    state, shardings = train_state.create_train_state(cfg, AbstractinatorPyramid(cfg), mesh, opt)
    return cfg, mesh, opt, state, shardings


def train_tiny(tiny_init, dtype: str, n_steps: int):
    """(final state, [metrics of every step]): n_steps of tiny_config in `dtype` on sentence_batch, from tiny_init."""
    cfg, mesh, opt, state, shardings = tiny_init
    cfg = cfg.copy_and_resolve_references()
    cfg.dtype = dtype
    step = steps.make_train_step(cfg, AbstractinatorPyramid(cfg), mesh, opt, shardings)
    state, batch, history = jax.tree.map(jnp.copy, state), sentence_batch(), []
    with jax.set_mesh(mesh):
        for _ in range(n_steps):
            state, m = step(state, batch)
            history.append(m)
    return state, jax.device_get(history)


@pytest.fixture(scope="module")
def float32_run(tiny_init):
    return train_tiny(tiny_init, "float32", tiny_init[0].max_steps)


def test_tiny_model_overfits_repeated_sentences(float32_run):
    state, history = float32_run
    first, m = history[0], history[-1]
    assert np.isfinite(m["loss"])
    assert m["level0/code_ce"] < 0.5 * first["level0/code_ce"]
    assert m["level0/entropy_loss"] < first["level0/entropy_loss"]
    assert m["level0/recon_accuracy"] > 0.95, m["level0/recon_accuracy"]
    assert m["level0/compression_ratio"] > 1.0
    assert int(state.step) == len(history)


def test_bfloat16_training_tracks_float32_in_float32_state(tiny_init, float32_run):
    """dtype='bfloat16' from the same init on the same batch: the losses track float32's first BF16_STEPS steps
    within a few percent, and parameters, Adam's moments, losses and metrics stay float32."""
    state, history = train_tiny(tiny_init, "bfloat16", BF16_STEPS)
    # measured (2 CPU cores, jax 0.10.2): the total loss within 0.7% on average, 5.4% at worst (where the two runs'
    # trajectories drift apart late in training); its parts within 1.5% on average
    for name, mean, worst in (("loss", 0.03, 0.1), ("level0/code_ce", 0.05, 0.2), ("level0/entropy_loss", 0.05, 0.2)):
        f32, bf16 = (np.array([m[name] for m in h[:BF16_STEPS]]) for h in (float32_run[1], history))
        rel = np.abs(bf16 - f32) / np.abs(f32)
        assert rel.mean() < mean and rel.max() < worst, (name, rel.mean(), rel.max())
    assert history[-1]["loss"] < 0.3 * history[0]["loss"]  # it learns
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
    floats = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and {x.dtype for x in floats} == {np.dtype(np.float32)}
    assert {v.dtype for v in history[-1].values()} == {np.dtype(np.float32)}


# Primitives that compute statistics (softmax, normalisation, segment sums, losses): never on bfloat16 values in the
# forward pass.
STATISTICS = {"exp", "log", "log1p", "reduce_sum", "reduce_max", "reduce_min", "scatter-add", "cumsum", "argmax"}


def _bf16_primitives(jaxpr, found):
    """Count, per primitive, the equations of a jaxpr (and the jaxprs nested in it) with a bfloat16 operand."""
    for e in jaxpr.eqns:
        if any(getattr(v.aval, "dtype", None) == jnp.bfloat16 for v in e.invars):
            found[e.primitive.name] = found.get(e.primitive.name, 0) + 1
        for sub in jax_core.jaxprs_in_params(e.params):
            _bf16_primitives(sub, found)
    return found


@pytest.mark.parametrize("kind", ["gaussian entropy, continuous top", "logit entropy, quantizer, discrete top"])
def test_bfloat16_computes_matmuls_in_bfloat16_and_statistics_in_float32(kind):
    cfg = tiny_discrete_config(attention="mla") if kind.startswith("logit") else tiny_config(attention="mla")
    cfg.use_top_code_lm = True
    cfg.top_transformer_config.update(embed_dim=32, dim=32, num_layers=1, num_heads=2, head_dim=16, kv_comp_dim=16)
    cfg.top_transformer_config.update(q_comp_dim=16, retr_dim=8, continuous=kind.endswith("continuous top"))
    cfg.dtype = "bfloat16"
    batch = sentence_batch(cfg.sequence_length)
    ids, pad = batch["ids"][0], batch["mask"][0]
    model = AbstractinatorPyramid(cfg)
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "vq": jax.random.key(1)}, ids, pad))
    variables = nn.unbox(variables)
    found = _bf16_primitives(jax.make_jaxpr(lambda v: model.apply(v, ids, pad))(variables).jaxpr, {})
    assert found.get("dot_general", 0) >= 20, found  # the blocks' projections run in bfloat16
    assert not STATISTICS & set(found), found
    loss, metrics = jax.eval_shape(lambda v: model.apply(v, ids, pad), variables)
    assert {loss.dtype} | {m.dtype for m in metrics.values()} == {np.dtype(np.float32)}


def test_a_bad_step_changes_nothing_but_the_step_and_the_guard():
    """The train step's guard (guard.py; the update runs under a lax.cond): a step whose loss is NaN leaves the
    parameters, the Adam moments and the quantizer state exactly as they were, moves the step counter and counts the
    skip; the next good step is applied."""
    cfg = tiny_discrete_config(attention="mla")  # with a quantizer, whose EMA state must be kept on a skip too
    mesh = sharding.make_mesh(cfg.mesh)
    opt = train_state.make_optimizer(cfg)
    state, shardings = train_state.create_train_state(cfg, AbstractinatorPyramid(cfg), mesh, opt)
    assert state.model_state
    step = steps.make_train_step(cfg, AbstractinatorPyramid(cfg), mesh, opt, shardings)
    leaves = lambda tree: jax.tree.leaves(jax.device_get(tree))  # noqa: E731
    poisoned = jax.tree.map(jnp.copy, state)
    poisoned = poisoned.replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), poisoned.params))
    before = [leaves(poisoned.params), leaves(poisoned.opt_state), leaves(poisoned.model_state)]
    with jax.set_mesh(mesh):
        skipped, m = step(poisoned, sentence_batch())
        assert not np.isfinite(float(m["loss"]))
        after = [leaves(skipped.params), leaves(skipped.opt_state), leaves(skipped.model_state)]
        for part, (a, b) in zip(("params", "opt_state", "model_state"), zip(before, after)):
            assert len(a) == len(b), part
            for x, y in zip(a, b):
                np.testing.assert_array_equal(y, x, err_msg=part)  # NaN where it was NaN, bit for bit elsewhere
        guard = jax.device_get(skipped.guard)
        assert int(skipped.step) == 1 and (int(guard["skipped"]), int(guard["consecutive"])) == (1, 1)

        good, _ = step(jax.tree.map(jnp.copy, state).replace(step=skipped.step, guard=skipped.guard), sentence_batch())
        guard = jax.device_get(good.guard)
        assert (int(guard["skipped"]), int(guard["consecutive"]), int(guard["accepted"])) == (1, 0, 1)
        changed = lambda a, b: [not np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b))]  # noqa: E731
        assert any(changed(state.opt_state, good.opt_state)) and any(changed(state.model_state, good.model_state))
        # the skipped step did not advance the optimizer's count: this step's learning rate was warmup's first, 0;
        # the next one moves the parameters (those with a gradient)
        params_1 = jax.device_get(good.params)  # a host copy: the step donates `good`
        good, _ = step(good, sentence_batch())
        moved = changed(params_1, good.params)
        assert sum(moved) > len(moved) // 2, f"{sum(moved)} of {len(moved)} parameters moved"


def test_learning_rate_schedule_warmup_and_floor():
    cfg = tiny_config()
    cfg.warmup_steps, cfg.max_steps, cfg.learning_rate, cfg.min_lr = 10, 100, 1e-3, 1e-5
    sched = train_state.learning_rate_schedule(cfg)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(55)) < 1e-3
    assert float(sched(100)) == pytest.approx(1e-5)
    assert float(sched(1000)) == pytest.approx(1e-5)


def test_gradient_accumulation_averages_micro_batches():
    """Two micro-batches of 2 rows give the same update as their gradients averaged by hand."""
    cfg = tiny_config(batch_size=2)
    cfg.gradient_accumulation_steps = 2
    mesh = sharding.make_mesh(cfg.mesh)
    model = AbstractinatorPyramid(cfg)
    opt = train_state.make_optimizer(cfg)
    state, shardings = train_state.create_train_state(cfg, model, mesh, opt)
    full = sentence_batch()
    batch = {k: v.reshape(2, 2, -1) for k, v in full.items()}
    params0 = jax.device_get(state.params)

    def loss(p, ids, pad):
        return model.apply({"params": p}, ids, pad)[0]

    grad = jax.jit(jax.grad(loss))
    g = [grad(params0, batch["ids"][i], batch["mask"][i]) for i in range(2)]
    g_mean = jax.tree.map(lambda a, b: (a + b) / 2, *g)
    updates, _ = jax.jit(opt.update)(g_mean, opt.init(params0), params0)
    expected = jax.tree.map(lambda p, u: p + u, params0, updates)
    step = steps.make_train_step(cfg, model, mesh, opt, shardings)
    with jax.set_mesh(mesh):
        state, m = step(state, batch)
    got = jax.device_get(state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), got, expected)
    np.testing.assert_allclose(m["grad_norm"], np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g_mean))), rtol=1e-4)


_MESH_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from abstractinator_jax import sharding, steps, train_state
    from abstractinator_jax.model import AbstractinatorPyramid
    from tests.helpers import sentence_batch, tiny_config

    assert jax.device_count() == 4, jax.devices()
    cfg = tiny_config(attention="mla")  # the configs' attention: its per-head weights are sharded too
    # code tables and projections are parameters too; 256 codes = 2 chunks of the nearest-code search's scan
    cfg.levels[0].c_vq_K, cfg.levels[0].c_vq_d_c = 256, 16
    cfg.use_top_code_lm = True
    cfg.top_batch_chunks = 2  # the top runs the sharded batch in chunks (top._split) on every mesh
    top = cfg.top_transformer_config
    top.embed_dim, top.dim, top.num_layers, top.num_heads, top.continuous = 32, 32, 1, 2, False
    batch = sentence_batch()
    results = []
    # one device; then fsdp over 4 (parameters and optimizer state sharded, and the batch split over the 4 devices:
    # the fsdp axis is a data-parallel axis too). Data parallelism across processes: tests/test_multihost.py.
    for data, fsdp, devices in ((1, 1, jax.devices()[:1]), (1, 4, jax.devices())):
        cfg.mesh.data, cfg.mesh.fsdp = data, fsdp
        mesh = sharding.make_mesh(cfg.mesh, devices=devices)
        model = AbstractinatorPyramid(cfg)
        opt = train_state.make_optimizer(cfg)
        state, sh = train_state.create_train_state(cfg, model, mesh, opt)
        step = steps.make_train_step(cfg, model, mesh, opt, sh)
        with jax.set_mesh(mesh):
            for _ in range(2):
                state, m = step(state, batch)
        assert len(state.params["level_0"]["embedding"].sharding.device_set) == len(devices)
        # every parameter of 256 values or more, and its Adam moments, is split into `fsdp` equal shards
        big = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path((state.params, state.opt_state))[0]
               if x.size >= 256]
        assert len(big) > 20
        for path, x in big:
            shard = x.addressable_shards[0].data.size
            assert shard * fsdp == x.size, (jax.tree_util.keystr(path), x.shape, x.sharding)
        results.append((jax.device_get(state.params), jax.device_get(state.opt_state), jax.device_get(m)))
    p1, o1, m1 = results[0]
    for p, o, m in results[1:]:
        for k in ("loss", "level0/code_ce", "level0/entropy_loss", "top/top_ce", "grad_norm"):
            np.testing.assert_allclose(m[k], m1[k], rtol=1e-5, err_msg=k)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), p, p1)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), o, o1)
    print("MESH_OK", float(m1["loss"]))
    """
)


def test_data_parallel_and_fsdp_steps_match_single_device():
    """4 forced host devices: an fsdp step (each device holding a quarter of every large parameter and of its
    optimizer moments, and a quarter of the batch) equals the 1-device step."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices=4), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "MESH_OK" in proc.stdout
