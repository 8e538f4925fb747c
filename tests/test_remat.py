"""Rematerialization (config `remat`, blocks.run_stack): every setting gives the loss and gradients of no remat, on
the same parameter tree (checkpoints are interchangeable), and checkpoints every block of every stack."""

from __future__ import annotations

import jax
import jax.extend.core as jax_core
import numpy as np
import pytest
from flax import linen as nn

from abstractinator_jax.config import ConfigError, validate_config
from abstractinator_jax.model import AbstractinatorPyramid

from .helpers import sentence_batch, tiny_config

BATCH = sentence_batch()
IDS, PAD = BATCH["ids"][0], BATCH["mask"][0]
# a stack in every part that has one: entropy (1 block), compression (1), expander (1), top transformer (1 block,
# traced once in each branch of its row buckets: tiny_config's top_row_buckets = 2)
BLOCKS = 3 + 2


def remat_config(remat: str):
    """tiny_config with a small continuous top transformer, fp32."""
    cfg = tiny_config()
    cfg.use_top_code_lm = True
    cfg.top_transformer_config.update(
        embed_dim=32, dim=32, num_layers=1, num_heads=2, continuous=True, head_dim=16, kv_comp_dim=16, q_comp_dim=16
    )
    cfg.top_transformer_config.retr_dim = 8
    cfg.remat = remat
    assert cfg.top_row_buckets == 2
    return validate_config(cfg)


def param_shapes(model):
    return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), IDS, PAD))["params"])


def loss_and_grad(model):
    return jax.value_and_grad(lambda p: model.apply({"params": p}, IDS, PAD)[0])


@pytest.fixture(scope="module")
def reference():
    """(params, loss, grads) without remat. The parameters are random numbers of the model's shapes (norm scales
    1): any values test the equality, and compiling the model's init would cost more than the test."""
    model = AbstractinatorPyramid(remat_config("none"))
    shapes = param_shapes(model)
    rng = np.random.default_rng(0)

    def draw(path, s):
        if path[-1].key == "scale":
            return np.ones(s.shape, np.float32)
        return rng.normal(0.0, 0.1, s.shape).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    return (params, *jax.device_get(jax.jit(loss_and_grad(model))(params)))


def checkpointed_blocks(remat: str) -> int:
    """How many jax.checkpoint regions the forward pass has."""
    model = AbstractinatorPyramid(remat_config(remat))
    params = param_shapes(model)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, IDS, PAD)[0])(params)
    return _count_checkpoints(jaxpr.jaxpr)


def _count_checkpoints(jaxpr) -> int:
    """jax.checkpoint equations in a jaxpr and the jaxprs nested in it (jax 0.10 names the primitive 'remat2')."""
    n = 0
    for e in jaxpr.eqns:
        if e.primitive.name in ("remat2", "checkpoint"):
            n += 1
        else:
            n += sum(_count_checkpoints(sub) for sub in jax_core.jaxprs_in_params(e.params))
    return n


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_keeps_the_parameter_tree_and_checkpoints_every_block(reference, remat):
    params, _, _ = reference
    shapes = param_shapes(AbstractinatorPyramid(remat_config(remat)))
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, params)
    assert checkpointed_blocks(remat) == BLOCKS
    assert checkpointed_blocks("none") == 0


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_gives_the_same_loss_and_gradients(reference, remat):
    params, loss, grads = reference
    got_loss, got_grads = jax.device_get(jax.jit(loss_and_grad(AbstractinatorPyramid(remat_config(remat))))(params))
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_grads, grads)


def test_an_unknown_remat_value_names_the_choices():
    cfg = tiny_config()
    cfg.remat = "full"
    with pytest.raises(ConfigError, match=r"remat='full'; choose one of \('none', 'block', 'dots'\)"):
        validate_config(cfg)


def deep_config(remat: str):
    """remat_config with two blocks in every stack (shared, entropy, compression, expander, top transformer): stacks
    of two or more blocks run as one lax.scan over their stacked parameters when rematerialized."""
    cfg = remat_config(remat)
    lv = cfg.levels[0]
    lv.c_num_shared_encoder_layers = 2
    lv.c_num_lm_encoder_layers = 2
    lv.c_num_compression_encoder_layers = 2
    lv.d_layers = 2
    cfg.top_transformer_config.num_layers = 2
    return validate_config(cfg)


def _count_scans(jaxpr) -> int:
    n = 0
    for e in jaxpr.eqns:
        n += e.primitive.name == "scan"
        n += sum(_count_scans(sub) for sub in jax_core.jaxprs_in_params(e.params))
    return n


def test_scanned_stacks_give_the_same_loss_and_gradients():
    """Every stack of two blocks is one scan (with remat; none without), and the loss and every block's parameter
    gradient equal those without remat: the stacking and the scan's transpose route each block's gradient to its
    own parameters."""
    none = AbstractinatorPyramid(deep_config("none"))
    shapes = param_shapes(none)
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (
            np.ones(s.shape, np.float32)
            if path[-1].key == "scale"
            else rng.normal(0.0, 0.1, s.shape).astype(np.float32)
        ),
        shapes,
    )

    def scans(model):
        return _count_scans(jax.make_jaxpr(lambda p: model.apply({"params": p}, IDS, PAD)[0])(params).jaxpr)

    base = scans(none)  # scans the model has anyway
    # one more per stack: shared, entropy, compression, expander, and the top's in each of its 2 row-bucket branches
    assert scans(AbstractinatorPyramid(deep_config("dots"))) == base + 6
    block = AbstractinatorPyramid(deep_config("block"))
    assert scans(block) == base + 6
    want_loss, want = jax.device_get(jax.jit(loss_and_grad(none))(params))
    got_loss, got = jax.device_get(jax.jit(loss_and_grad(block))(params))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
    # the two blocks of a stack get different gradients (each its own, not a shared or swapped one)
    exp = got["level_0"]["expander"]
    assert not np.allclose(exp["block_0"]["ffn"]["w2"]["kernel"], exp["block_1"]["ffn"]["w2"]["kernel"])
