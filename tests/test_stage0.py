"""Stage 0 (docs/ARCHITECTURE.md 7): level 0's entropy model trained alone, then loaded into stage 1 (frozen or
not), and the errors around it.

One tiny config throughout (a logit entropy model with one shared block, standard attention), so that few programs
are compiled: the
stage-0 run (train step, eval step, segmentation) is compiled once by the `stage0` fixture's train() call and found
in the session's compilation cache by the tests that build the same step; stage 1 compiles one train step per
value of freeze_entropy_model."""

from __future__ import annotations

import math
import shutil

import jax
import numpy as np
import pytest
from flax import linen as nn

from abstractinator_jax import steps
from abstractinator_jax.build import build, check_init_from, load_stage0, load_stage1
from abstractinator_jax.checkpointing import CheckpointError, CheckpointManager
from abstractinator_jax.compressor import GaussianEntropyModel
from abstractinator_jax.config import PAD_ID, ConfigError, model_config_differences, to_dict
from abstractinator_jax.config import validate_config as validate
from abstractinator_jax.evaluation import evaluate_run
from abstractinator_jax.generation import training_sampler
from abstractinator_jax.sharding import LOGICAL_AXIS_RULES
from abstractinator_jax.summaries import read_scalars, read_texts
from abstractinator_jax.train_loop import train
from abstractinator_jax.train_state import create_train_state, merge_params, split_entropy_model

from .helpers import SENTENCES, sentence_batch, tiny_config

STAGE0_STEPS = 3  # the stage-0 run: it evaluates and checkpoints at this step


def config(stage: int, corpus, init_from="", freeze=False):
    cfg = tiny_config()
    lv = cfg.levels[0]
    lv.c_entropy_model = "logit"
    lv.c_num_shared_encoder_layers = 1
    lv.attention_type = "mha"  # compiles in about half the time of latent attention; the stages do not depend on it
    cfg.stage = stage
    cfg.init_from = str(init_from)
    cfg.freeze_entropy_model = freeze
    cfg.data.path = str(corpus)
    cfg.warmup_steps = 0  # the first step already learns
    cfg.log_interval = 1
    cfg.eval_interval = STAGE0_STEPS  # stage 0 evaluates at its last step; stage 1 stops before any evaluation
    cfg.checkpoint_interval = 1000
    cfg.eval_batches = 1
    return cfg


def leaves(tree) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def assert_identical(a, b):
    la, lb = leaves(a), leaves(b)
    assert la and la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype and np.array_equal(la[k], lb[k]), k


def moved(a, b) -> list[str]:
    la, lb = leaves(a), leaves(b)
    return [k for k in la if not np.array_equal(la[k], lb[k])]


def restore(workdir, step):
    with CheckpointManager(workdir) as m:
        return m.restore(step)[0]


def host(tree):
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "sentences.txt"
    path.write_text("\n<|endoftext|>\n".join(SENTENCES * 10) + "\n")
    return path


@pytest.fixture(scope="module")
def stage0(corpus, tmp_path_factory):
    """A stage-0 run through the trainer: 3 steps, evaluated and checkpointed at step 3."""
    workdir = tmp_path_factory.mktemp("stage0")
    cfg = config(0, corpus)
    result = train(cfg, workdir, stop_at_step=STAGE0_STEPS)
    return dict(cfg=cfg, workdir=workdir, result=result, state=restore(workdir, STAGE0_STEPS))


# ---------------------------------------------------------------------------------------------------------------------
# (a) stage 0 alone
# ---------------------------------------------------------------------------------------------------------------------


def reference_bits(logits, ids):
    """Slow: per row, per position t >= 1, -log2 softmax(logits[t-1])[ids[t]]; (bits over byte targets, their count,
    nats over every real target, their count)."""
    byte_bits, n_bytes, nats, n_real = 0.0, 0, 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            target = int(ids[b, t])
            if target == PAD_ID:
                continue
            z = logits[b, t - 1].astype(np.float64)
            logp = z[target] - z.max() - math.log(np.sum(np.exp(z - z.max())))
            nats -= logp
            n_real += 1
            if target < 256:
                byte_bits -= logp / math.log(2)
                n_bytes += 1
    return byte_bits, n_bytes, nats, n_real


def test_stage0_trains_only_the_entropy_model_and_its_loss_falls(stage0):
    cfg = stage0["cfg"]
    run = build(cfg)
    state, _ = create_train_state(cfg, run.model, run.mesh, run.optimizer)
    params = host(state.params)
    assert state.frozen_params == {} and state.model_state == {}
    # exactly level 0's embedding, its shared block and the entropy branch (blocks, norm, head) ...
    assert set(params) == {"level_0"} and set(params["level_0"]) == {"embedding", "compressor"}
    assert set(params["level_0"]["compressor"]) == {"shared_0", "entropy"}
    assert set(params["level_0"]["compressor"]["entropy"]) == {"block_0", "norm", "head"}
    # ... which is, path for path and shape for shape, the entropy-model part of a stage-1 model
    stage1 = build(config(1, cfg.data.path))
    want, rest = split_entropy_model(stage1.abstract_state.params)
    assert jax.tree.map(lambda x: x.shape, want) == jax.tree.map(np.shape, params)
    assert "expander" in rest["level_0"] and "compression_0" in rest["level_0"]["compressor"]

    batch = sentence_batch()
    ids = batch["ids"][0]
    logits = jax.jit(lambda p, i, m: run.model.apply({"params": p}, i, m, method=run.model.level0_entropy).logits)(
        state.params, ids, batch["mask"][0]
    )
    byte_bits, n_bytes, nats, n_real = reference_bits(np.asarray(logits), ids)
    assert n_real == n_bytes + len(SENTENCES)  # every row's EOS is a real target, not a byte

    step = steps.make_train_step(cfg, run.model, run.mesh, run.optimizer, run.shardings)
    metrics = []
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        for _ in range(6):
            state, m = step(state, batch)
            metrics.append(host(m))
    first = metrics[0]  # computed with the parameters before the first update
    assert first["entropy/bits_per_byte"] == pytest.approx(byte_bits / n_bytes, rel=1e-5)
    assert first["entropy/loss"] == pytest.approx(nats / n_real, rel=1e-5)
    assert first["loss"] == pytest.approx(cfg.levels[0].w_byte_lm_ce * first["entropy/loss"], rel=1e-6)
    assert set(first) == {"loss", "entropy/loss", "entropy/bits_per_byte", "grad_norm", "learning_rate", "real_bytes"}
    losses = [float(m["loss"]) for m in metrics]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.1, losses
    assert len(moved(host(state.params), params)) == len(leaves(params)), "every parameter trains"


def test_stage0_run_logs_evaluates_and_checkpoints(stage0):
    result, workdir = stage0["result"], stage0["workdir"]
    assert result["step"] == STAGE0_STEPS
    ev = result["eval"]
    assert {"entropy/loss", "entropy/bits_per_byte", "level0/entropy_model_bits_per_byte", "data/bytes"} <= set(ev)
    assert "bits_per_byte" not in ev and not any(k.startswith("level0/recon") for k in ev)
    scalars = read_scalars(workdir / "tensorboard")
    for name in ("entropy/loss", "entropy/bits_per_byte"):
        assert [s for s, _ in scalars[f"train/{name}"]] == [1, 2, 3]
        assert [s for s, _ in scalars[f"eval/{name}"]] == [STAGE0_STEPS]
    assert read_texts(workdir / "tensorboard")["samples/segmented"][0][1].startswith("Fish swim")  # cut by level 0
    # evaluate.py's figures for the saved run: the same eval figures, and no code length (a note says why)
    out, samples = evaluate_run(str(workdir), show_segments=1)
    assert out["bits_per_byte"] is None and "stage-0" in out["bits_per_byte_note"]
    assert out["bits_per_byte_parts"] == {}
    for k in ("entropy/loss", "entropy/bits_per_byte", "level0/entropy_model_bits_per_byte"):
        assert out[k] == pytest.approx(ev[k], rel=1e-6)
    assert len(samples) == 1
    with pytest.raises(ConfigError, match="stage-0 run"):  # the report needs segments and codes
        evaluate_run(str(workdir), report=str(workdir / "report.html"))
    # the training sample comes from the logit entropy model; a gaussian one has nothing to sample
    cfg = stage0["cfg"].copy_and_resolve_references()
    cfg.sample_max_bytes = 8
    run = build(cfg)
    assert training_sampler(cfg, run.model, run.mesh) is not None
    cfg.levels[0].c_entropy_model = "gaussian"
    assert training_sampler(cfg, build(cfg).model, run.mesh) is None


def test_gaussian_stage0_targets_get_no_gradient():
    """Stage 0's gaussian loss takes no gradient through its target vectors (else shrinking them lowers it): the last
    position's vector is only a target, so its gradient is zero in stage 0's form and not in stage 1's."""
    lv = tiny_config().levels[0]
    lv.c_entropy_model, lv.attention_type = "gaussian", "mha"
    model = GaussianEntropyModel(lv)
    x = jax.random.normal(jax.random.key(0), (1, 8, lv.D))
    pad, pos = np.zeros((1, 8), bool), np.arange(8)
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(1), x, None, pad, pos)))
    rng = np.random.default_rng(0)  # any generic values: no initialisation to compile
    variables = jax.tree.map(lambda a: rng.normal(0.0, 0.1, a.shape).astype(a.dtype), shapes)

    def loss(x, stop_target_gradient):
        return model.apply(variables, x, None, pad, pos, stop_target_gradient).loss

    stage0_grad, stage1_grad = jax.jit(lambda x: (jax.grad(loss)(x, True), jax.grad(loss)(x, False)))(x)
    assert np.all(np.asarray(stage0_grad[:, -1]) == 0) and np.any(np.asarray(stage0_grad[:, :-1]) != 0)
    assert np.any(np.asarray(stage1_grad[:, -1]) != 0)


# ---------------------------------------------------------------------------------------------------------------------
# (b) stage 0 -> stage 1
# ---------------------------------------------------------------------------------------------------------------------


def test_stage1_from_stage0_frozen_loads_bit_exact_and_stays_frozen(stage0, corpus, tmp_path):
    s0 = stage0["state"]["params"]
    cfg = config(1, corpus, init_from=stage0["workdir"], freeze=True)
    workdir = tmp_path / "s1"
    assert train(cfg, workdir, stop_at_step=1)["step"] == 1
    a = restore(workdir, 1)
    assert_identical(a["frozen_params"], s0)  # exactly the stage-0 parameters, bit for bit
    assert not split_entropy_model(a["params"])[0], "no entropy-model parameter is trainable"
    moments = [p for p, x in leaves(a["opt_state"]).items() if np.ndim(x) > 0]  # the optimizer holds no frozen one
    assert moments and not any(f"'{k}'" in p for p in moments for k in ("embedding", "entropy", "shared_0"))

    # a resume reads its own checkpoint (the stage-0 run may be gone), and keeps the entropy model frozen
    gone = shutil.move(str(stage0["workdir"]), str(tmp_path / "s0_moved"))
    try:
        assert train(cfg, workdir, stop_at_step=2)["step"] == 2
    finally:
        shutil.move(gone, str(stage0["workdir"]))
    b = restore(workdir, 2)
    assert_identical(b["frozen_params"], s0)
    assert len(moved(b["params"], a["params"])) == len(leaves(a["params"])), "every trainable parameter moves"

    # freeze_entropy_model is part of the model: a resume with the other value is refused
    other = config(1, corpus, init_from=stage0["workdir"], freeze=False)
    with pytest.raises(CheckpointError, match="freeze_entropy_model: checkpoint True vs config False"):
        train(other, workdir)

    # stage 2 from this stage-1 run: the whole pyramid (entropy model from frozen_params) arrives frozen
    s2 = config(2, corpus, init_from=workdir)
    s2.use_top_code_lm = True
    top = s2.top_transformer_config
    top.embed_dim, top.dim, top.num_layers, top.num_heads, top.continuous = 32, 32, 1, 2, True
    run2 = build(s2)
    loaded = load_stage1(check_init_from(s2), run2, run2.abstract_state)
    assert set(loaded.frozen_params) == {"level_0"}
    assert_identical(loaded.frozen_params, merge_params(b["frozen_params"], b["params"]))


def test_stage1_from_stage0_trainable_starts_from_it_and_trains_it(stage0, corpus):
    s0 = stage0["state"]["params"]
    cfg = config(1, corpus, init_from=stage0["workdir"], freeze=False)
    run = build(cfg)
    state, _ = create_train_state(cfg, run.model, run.mesh, run.optimizer)
    fresh = host(state.params)
    state = load_stage0(check_init_from(cfg), cfg, run, state)
    assert state.frozen_params == {}
    loaded = host(state.params)
    picked, rest = split_entropy_model(loaded)
    assert_identical(picked, s0)
    assert_identical(rest, split_entropy_model(fresh)[1])  # everything else freshly initialised
    # trainable: the optimizer holds moments for every entropy-model parameter (the frozen test above shows that
    # the train step moves every parameter it holds; a second stage-1 step program here would double this file's time)
    moments = [p for p, x in leaves(host(state.opt_state)).items() if np.ndim(x) > 0]
    for path in leaves(picked):
        assert sum(m.endswith(".mu" + path) or m.endswith(".nu" + path) for m in moments) == 2, path


# ---------------------------------------------------------------------------------------------------------------------
# (c) errors
# ---------------------------------------------------------------------------------------------------------------------


def test_stage1_refuses_an_init_from_that_is_not_this_stage0_model(stage0, corpus, tmp_path):
    # a stage-1 run is not a stage-0 run; the trainer stops before compiling or writing anything
    wd = tmp_path / "s1"
    s1 = config(1, corpus)
    with CheckpointManager(wd) as m:
        m.save(0, {"params": {"x": np.zeros(2, np.float32)}}, config=to_dict(s1), force=True)
    with pytest.raises(CheckpointError, match="holds a stage-1 run; stage 1 starts from a stage-0 run"):
        train(config(1, corpus, init_from=wd), tmp_path / "new")
    assert not any((tmp_path / "new" / "checkpoints").iterdir())
    # a stage-0 run of another entropy model: every difference named
    cfg = config(1, corpus, init_from=stage0["workdir"])
    cfg.levels[0].c_window = 8
    cfg.levels[0].c_num_lm_encoder_layers = 2
    cfg.levels[0].c_entropy_delta = 0.5  # segmentation only: may differ
    with pytest.raises(CheckpointError) as err:
        check_init_from(cfg)
    msg = str(err.value)
    assert "levels[0].c_window: checkpoint 16 vs config 8" in msg
    assert "levels[0].c_num_lm_encoder_layers: checkpoint 1 vs config 2" in msg
    assert "c_entropy_delta" not in msg
    # stage 2 from a stage-0 run
    s2 = config(2, corpus, init_from=stage0["workdir"])
    s2.use_top_code_lm = True
    s2.top_transformer_config.embed_dim = 32
    with pytest.raises(CheckpointError, match="holds a stage-0 run; stage 2 starts from a stage-1 run"):
        check_init_from(s2)


def test_stage0_config_errors(corpus):
    cfg = config(1, corpus, freeze=True)
    with pytest.raises(ConfigError, match="freeze_entropy_model=True .*no init_from"):
        validate(cfg)
    cfg = config(0, corpus, freeze=True)
    cfg.use_top_code_lm = True
    cfg.init_from = "runs/x"
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = str(err.value)
    assert "set use_top_code_lm=False" in msg and "init_from='runs/x'" in msg and "freeze_entropy_model" in msg
    cfg = config(0, corpus)
    cfg.levels[0].w_byte_lm_ce = 0.0
    with pytest.raises(ConfigError, match="w_byte_lm_ce=0.0 must be > 0"):
        validate(cfg)
    cfg.stage = 3
    with pytest.raises(ConfigError, match=r"choose 0 \(entropy model\), 1 \(pyramid\) or 2"):
        validate(cfg)


def test_checkpoints_saved_before_freeze_entropy_model_still_resume():
    cfg = to_dict(tiny_config())
    old = {k: v for k, v in cfg.items() if k != "freeze_entropy_model"}
    assert model_config_differences(old, cfg) == []
    assert model_config_differences(old, {**cfg, "freeze_entropy_model": True}) == [
        "freeze_entropy_model: checkpoint False vs config True"
    ]
