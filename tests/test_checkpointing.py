"""CheckpointManager: bit-identical round trips, retention, iterator state, init_from paths and clear errors."""

import json
import os
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from abstractinator_jax.checkpointing import CheckpointError, CheckpointManager, resolve_init_from
from abstractinator_jax.config import base_config, from_dict, to_dict

from .helpers import xla_flags


def _params(d_in=128):
    k1, k2 = jax.random.split(jax.random.PRNGKey(42))
    return {
        "level_0": {
            "encoder": {
                "dense": {
                    "kernel": jax.random.normal(k1, (d_in, 512), jnp.float32),
                    "bias": jnp.zeros((512,), jnp.float32),
                }
            },
            "embed": jax.random.normal(k2, (260, 16), jnp.bfloat16),
        }
    }


def _state(d_in=128):
    params = _params(d_in)
    opt_state = optax.adamw(1e-3).init(params)
    # One real update so mu/nu/count are not trivially zero.
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, opt_state = optax.adamw(1e-3).update(grads, opt_state, params)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(7, jnp.int32),
        "np_step": np.int64(7),
        "rng": jax.random.PRNGKey(3),  # raw uint32 key
        "typed_rng": jax.random.key(5),  # typed key
        "batch_stats": {"mean": np.arange(4, dtype=np.float32)},
    }


def _abstract(state, sharding_of):
    """ShapeDtypeStructs for the jax arrays (sharding from `sharding_of`), zeroed copies of the NumPy leaves."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x))
        return np.zeros_like(x)[()] if isinstance(x, np.generic) else np.zeros_like(x)

    return jax.tree.map(leaf, state)


def _assert_bit_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert type(x) is type(y), (type(x), type(y))
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert x.dtype == y.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _iterator():
    return iter(grain.MapDataset.source(list(range(100))).shuffle(seed=1).batch(4).to_iter_dataset())


def test_round_trip_is_bit_identical(tmp_path):
    state = _state()
    cfg = base_config()
    with CheckpointManager(tmp_path) as mngr:
        assert mngr.save(7, state, config=cfg)
        mngr.wait()
        assert (tmp_path / "checkpoints" / "7" / "state").is_dir()
        abstract = _abstract(state, lambda x: x.sharding)
        restored, config = mngr.restore(abstract_state=abstract)
    _assert_bit_identical(restored, state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert isinstance(restored["np_step"], np.int64)
    assert json.loads(json.dumps(config)) == config  # plain JSON
    assert to_dict(from_dict(config)) == to_dict(cfg)

    # Concrete arrays work as a template too; a fresh manager sees the finished checkpoint.
    with CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [7] and mngr.latest_step() == 7
        restored, _ = mngr.restore(7, abstract_state=_state())
    _assert_bit_identical(restored, state)


def test_restored_arrays_carry_template_shardings(tmp_path):
    state = _state()
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    replicated = NamedSharding(mesh, P())
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, state)
        abstract = _abstract(state, lambda x: replicated)
        restored, _ = mngr.restore(1, abstract_state=abstract)
    for got in jax.tree.leaves(restored["params"]) + jax.tree.leaves(restored["opt_state"]):
        assert got.sharding == replicated
    assert restored["typed_rng"].sharding == replicated


def test_restore_onto_another_mesh_layout(tmp_path):
    """Save sharded over 4 CPU devices one way, restore another way (needs its own process for the device count)."""
    script = textwrap.dedent(
        f"""
        import os
        os.environ["XLA_FLAGS"] = {xla_flags(devices=4)!r}
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from abstractinator_jax.checkpointing import CheckpointManager
        mesh = jax.make_mesh((2, 2), ("data", "fsdp"))
        w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("data", "fsdp")))
        with CheckpointManager({str(tmp_path)!r}) as m:
            m.save(3, {{"w": w}})
            want = NamedSharding(mesh, P(None, ("data", "fsdp")))
            got, _ = m.restore(abstract_state={{"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=want)}})
        assert got["w"].sharding == want, got["w"].sharding
        assert np.array_equal(np.asarray(got["w"]), np.arange(64.0).reshape(8, 8))
        print("OK")
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_max_to_keep_latest_step_and_save_interval(tmp_path):
    state = {"w": jnp.ones((3,))}
    with CheckpointManager(tmp_path, max_to_keep=2, save_interval_steps=2) as mngr:
        assert mngr.latest_step() is None and mngr.all_steps() == []
        assert mngr.save(2, state)
        assert not mngr.save(3, state)  # not a multiple of save_interval_steps
        assert mngr.save(5, state, force=True)
        assert mngr.save(6, state)
        assert not mngr.save(6, state)  # already saved: nothing to do
        mngr.wait()
        assert mngr.all_steps() == [5, 6]
        assert mngr.latest_step() == 6
        with pytest.raises(CheckpointError, match="newer step 6"):
            mngr.save(4, state, force=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["5", "6"]


def test_restore_config_round_trip(tmp_path):
    cfg = base_config()
    cfg.learning_rate = 3e-4
    cfg.levels[0].D = 256
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, {"w": jnp.ones(2)}, config=cfg)
        mngr.save(2, {"w": jnp.ones(2)})  # no config
        restored = mngr.restore_config(1)
        assert mngr.restore_config(2) is None
        assert mngr.restore_config() is None  # latest
    assert restored["learning_rate"] == 3e-4 and restored["levels"][0]["D"] == 256
    assert to_dict(from_dict(restored)) == to_dict(cfg)


def test_grain_iterator_resumes_at_next_batch(tmp_path):
    it = _iterator()
    for _ in range(3):
        next(it)
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(3, {"w": jnp.ones(2)}, data_iterator=it)
        fourth = next(it)
        fresh = _iterator()
        mngr.restore(abstract_state={"w": jax.ShapeDtypeStruct((2,), jnp.float32)}, data_iterator=fresh)
    np.testing.assert_array_equal(next(fresh), fourth)
    np.testing.assert_array_equal(next(fresh), next(it))


def test_error_no_checkpoint(tmp_path):
    mngr = CheckpointManager(tmp_path / "run")
    for call in (lambda: mngr.restore(abstract_state={"w": jnp.ones(2)}), mngr.restore_config):
        with pytest.raises(CheckpointError, match=r"no checkpoint under .*run/checkpoints; check --workdir"):
            call()
    mngr.close()
    assert not (tmp_path / "run").exists()  # reading creates nothing


def test_error_missing_step(tmp_path):
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(10, {"w": jnp.ones(2)})
        mngr.save(20, {"w": jnp.ones(2)})
        with pytest.raises(CheckpointError, match=r"step 15 .*available steps: \[10, 20\]"):
            mngr.restore(15, abstract_state={"w": jnp.ones(2)})


def test_error_mismatched_tree_names_paths_and_shapes(tmp_path):
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, _state(d_in=128))
        wrong = _state(d_in=256)
        wrong["extra"] = jnp.zeros(3)
        with pytest.raises(CheckpointError) as info:
            mngr.restore(abstract_state=wrong)
    msg = str(info.value)
    assert "params/level_0/encoder/dense/kernel: checkpoint (128, 512) vs model (256, 512)" in msg
    assert "opt_state/0/mu/level_0/encoder/dense/kernel: checkpoint (128, 512) vs model (256, 512)" in msg
    assert "extra: in the model but not in the checkpoint" in msg
    assert "Traceback" not in msg and info.value.__cause__ is None


def test_error_missing_key_and_dtype(tmp_path):
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, {"a": jnp.ones(2), "b": jnp.ones(2)})
        with pytest.raises(CheckpointError, match="b: in the checkpoint but not in the model"):
            mngr.restore(abstract_state={"a": jnp.ones(2)})
        with pytest.raises(CheckpointError, match="a: checkpoint dtype float32 vs model dtype bfloat16"):
            mngr.restore(abstract_state={"a": jnp.ones(2, jnp.bfloat16), "b": jnp.ones(2)})


def test_error_iterator_state_missing(tmp_path):
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(1, {"w": jnp.ones(2)})
        with pytest.raises(CheckpointError, match="no data-iterator state"):
            mngr.restore(abstract_state={"w": jnp.ones(2)}, data_iterator=_iterator())


def test_error_unsaveable_leaf(tmp_path):
    with CheckpointManager(tmp_path) as mngr, pytest.raises(CheckpointError, match="opt/name: str"):
        mngr.save(1, {"w": jnp.ones(2), "opt": {"name": "adamw"}})
    assert not (tmp_path / "checkpoints" / "1").exists()


def test_partial_restore_of_params(tmp_path):
    state = _state()
    with CheckpointManager(tmp_path) as mngr:
        mngr.save(4, state)
        template = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state["params"])}
        restored, _ = mngr.restore(abstract_state=template, partial=True)
        with pytest.raises(CheckpointError, match="kernel: checkpoint \\(128, 512\\) vs model \\(64, 512\\)"):
            mngr.restore(abstract_state={"params": _params(d_in=64)}, partial=True)
    assert set(restored) == {"params"}
    _assert_bit_identical(restored["params"], state["params"])


def test_resolve_init_from_three_forms(tmp_path):
    run = tmp_path / "stage1"
    with CheckpointManager(run) as mngr:
        mngr.save(100, {"w": jnp.ones(2)})
        mngr.save(200, {"w": jnp.ones(2)})
    assert resolve_init_from(run) == (str(run), 200)
    assert resolve_init_from(run / "checkpoints") == (str(run), 200)
    assert resolve_init_from(f"{run}/checkpoints/") == (str(run), 200)
    assert resolve_init_from(run / "checkpoints" / "100") == (str(run), 100)

    workdir, step = resolve_init_from(run / "checkpoints" / "100")
    with CheckpointManager(workdir) as mngr:
        restored, _ = mngr.restore(step, abstract_state={"w": jnp.zeros(2)})
    np.testing.assert_array_equal(restored["w"], np.ones(2))

    with pytest.raises(CheckpointError, match="is not a directory"):
        resolve_init_from(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoints/ directory"):
        resolve_init_from(tmp_path / "empty")
    (tmp_path / "empty" / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        resolve_init_from(tmp_path / "empty")


def test_relative_workdir_checkpoints_are_completed(tmp_path, monkeypatch):
    """Orbax rejects relative paths only in its background commit thread; the manager must make them absolute."""
    monkeypatch.chdir(tmp_path)
    with CheckpointManager("relative_run") as mngr:
        mngr.save(1, {"a": np.ones(3, np.float32)})
        mngr.save(2, {"a": np.zeros(3, np.float32)})
    with CheckpointManager("relative_run") as mngr:
        assert mngr.all_steps() == [1, 2]
        state, _ = mngr.restore(2, abstract_state={"a": np.ones(3, np.float32)})
    np.testing.assert_array_equal(np.asarray(state["a"]), np.zeros(3, np.float32))
    assert not list((tmp_path / "relative_run" / "checkpoints").glob("*tmp*"))
