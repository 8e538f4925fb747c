"""The pyramid (docs/ARCHITECTURE.md 4), the top transformer's losses (5) and stage-2 training (7) on a tiny 2-level
model.

Compilation dominates the cost on CPU, so the tests share a few jitted programs through module-scoped fixtures:
one stage-2 initialisation and train step (the trainer's stage-2 runs below build the same programs and find them
in the session's compilation cache), and one stage-1 "probe" (the pyramid's forward with each level's output
captured, compress_all, and level 1's compressor on perturbed level-0 outputs).
"""

from __future__ import annotations

import copy
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from abstractinator_jax import steps, top, train_state
from abstractinator_jax.build import check_init_from
from abstractinator_jax.checkpointing import CheckpointError, CheckpointManager
from abstractinator_jax.codes import residual_code_logits
from abstractinator_jax.config import ConfigError, to_dict, top_batch_chunks, validate_config
from abstractinator_jax.model import AbstractinatorPyramid
from abstractinator_jax.sharding import LOGICAL_AXIS_RULES, make_mesh
from abstractinator_jax.summaries import read_scalars
from abstractinator_jax.train_loop import train

from .helpers import SENTENCES, sentence_batch, tiny_config

K = 32  # both levels' codebook size; the codec's PAD id is K - 1
STAGE2_STEPS = 30  # max_steps of every stage-2 config here (one learning-rate schedule -> one compiled train step)


def two_level_config(stage: int = 1, init_from: str = ""):
    cfg = tiny_config(seq_len=64, batch_size=4)
    lv0 = cfg.levels[0]
    lv0.c_vq_K = K
    lv0.c_vq_d_c = 8
    lv0.c_vq_depth = 2
    lv0.c_vq_reset_interval = 5
    lv0.c_vq_buffer_size = 64
    lv0.c_vq_vectors_per_step = 16
    lv1 = copy.deepcopy(lv0)
    lv1.D = 48
    lv1.c_heads = 2
    lv1.d_heads = 2
    lv1.c_window = 8
    lv1.d_window = 8
    lv1.c_output_length = 8
    lv1.c_vq_depth = 1
    cfg.levels = [lv0, lv1]
    cfg.num_levels = 2
    t = cfg.top_transformer_config
    t.embed_dim = 48
    t.dim = 32
    t.num_layers = 1
    t.num_heads = 2
    if stage == 2:
        cfg.stage = 2
        cfg.use_top_code_lm = True
        cfg.init_from = init_from or "unused"
        cfg.max_steps = STAGE2_STEPS
        cfg.warmup_steps = 2
        cfg.learning_rate = 3e-3
        cfg.top_batch_chunks = 2  # the stage-2 steps train the top in chunks of the batch (2 rows each)
    return cfg


def host(tree):
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def leaves_by_path(tree) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def assert_trees_identical(a, b):
    la, lb = leaves_by_path(a), leaves_by_path(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype and np.array_equal(la[k], lb[k]), k


def assert_subtree_identical(sub, full):
    """Every leaf of `sub` equals the leaf at the same path in `full` (bit for bit)."""
    ls, lf = leaves_by_path(sub), leaves_by_path(full)
    assert ls, "empty subtree"
    for k, v in ls.items():
        assert k in lf, k
        assert np.array_equal(v, lf[k]), k


def init_expanders(mod, ids, pad):
    """Creates only the two expanders' parameters (their values do not depend on the inputs, only shapes do)."""
    b, s = ids.shape
    zeros_i = jnp.zeros((b, 32), jnp.int32)
    mod.levels[0].expander(jnp.zeros((b, 32, 32)), jnp.ones((b, 32), bool), ids, pad, jnp.zeros((b, s), jnp.int32))
    books = [jnp.zeros((K, 8))] * 2
    mod.levels[1].expander(jnp.zeros((b, 8, 48)), jnp.ones((b, 8), bool), zeros_i, zeros_i == 0, zeros_i, books)


def probe_method(mod, ids, pad, noise, noise_codes):
    """The pyramid's loss and metrics, compress_all, and level 1's compressor applied directly to level 0's outputs
    with garbage written into level 0's invalid slots (vectors and code ids)."""
    loss, metrics = mod(ids, pad)
    comps = mod.compress_all(ids, pad)
    c0 = comps[0]
    invalid = ~c0.valid_mask
    codes = jnp.where(invalid, noise_codes, c0.codes)
    inputs = c0.quantized + jnp.where(invalid[..., None], noise, 0.0)
    perturbed = mod.levels[1].compress(codes, invalid, False, inputs)
    return loss, metrics, comps, perturbed


def merge(a, b):
    """Nested dicts: b's leaves override a's."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def nudged(tree, seed):
    """A copy of `tree` that differs from it in every leaf (floats: noise; integers: +3), like a trained state."""
    rng = np.random.default_rng(seed)

    def f(x):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            return (x + rng.normal(0.0, 0.05, x.shape)).astype(x.dtype)
        return x + 3

    return jax.tree.map(f, tree)


@pytest.fixture(scope="module")
def fresh_stage2():
    """The trainer's initial stage-2 state for the 2-level config (seed 0), built once: parameter initialisation is
    the costliest compilation here, and the trainer's own call below finds it in the compilation cache."""
    cfg = two_level_config(stage=2)
    mesh = make_mesh(cfg.mesh)
    model = AbstractinatorPyramid(cfg)
    opt = train_state.make_optimizer(cfg)
    state, shardings = train_state.create_train_state(cfg, model, mesh, opt)
    return dict(cfg=cfg, state=host(state), mesh=mesh, model=model, opt=opt, shardings=shardings)


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1: one compiled probe of the 2-level pyramid
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe(fresh_stage2):
    """A stage-1 pyramid's variables, its loss and metrics (with each level's output captured), compress_all, and
    level 1's compressor on perturbed level-0 outputs.

    The pyramid is the fresh stage-2 state's compressors and quantizer state, nudged (so that it differs from any
    fresh initialisation: the stage-2 run below must really load it), plus expanders initialised here."""
    cfg = two_level_config()
    validate_config(cfg)
    model = AbstractinatorPyramid(cfg)
    batch = sentence_batch()
    ids, pad = jnp.asarray(batch["ids"][0]), jnp.asarray(batch["mask"][0])
    key = jax.random.key(1, impl="unsafe_rbg")
    expanders = jax.jit(lambda k, i, p: nn.unbox(model.init(k, i, p, method=init_expanders)))(key, ids, pad)
    s2 = fresh_stage2["state"]
    variables = {
        "params": merge(host(expanders["params"]), nudged(s2.frozen_params, 1)),
        "vq_state": nudged(s2.model_state["vq_state"], 2),
    }
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.normal(0.0, 3.0, (4, 32, 32)), jnp.float32)
    noise_codes = jnp.asarray(rng.integers(0, K * K, (4, 32)), jnp.int32)
    captured = lambda mdl, name: name == "__call__" and mdl.name in ("level_0", "level_1")  # noqa: E731

    def run(variables, ids, pad, noise, noise_codes):
        out, inter = model.apply(
            variables,
            ids,
            pad,
            noise,
            noise_codes,
            method=probe_method,
            capture_intermediates=captured,
            mutable=["intermediates"],
        )
        levels = [inter["intermediates"][f"level_{k}"]["__call__"][0] for k in range(2)]
        return (*out, levels)

    loss, metrics, comps, perturbed, levels = host(jax.jit(run)(variables, ids, pad, noise, noise_codes))
    return dict(
        cfg=cfg, ids=np.asarray(ids), pad=np.asarray(pad), variables=variables, loss=loss, metrics=metrics,
        comps=comps, perturbed=perturbed, levels=levels,
    )  # fmt: skip


def test_compress_all_shapes_masks_and_pad_codes(probe):
    c0, c1 = probe["comps"]
    b, s = probe["ids"].shape
    q0, q1 = 32, 8  # c_output_length of each level (one query per segment)
    assert c0.pooled.shape == c0.quantized.shape == (b, q0, 32)
    assert c1.pooled.shape == c1.quantized.shape == (b, q1, 48)
    for c, q, inp in ((c0, q0, s), (c1, q1, q0)):
        assert c.codes.shape == c.valid_mask.shape == (b, q) and c.codes.dtype == np.int32
        assert c.segments.seg_id.shape == c.segments.patch_end_mask.shape == c.entropy.bits.shape == (b, inp)
        assert c.segments.num_segments.shape == (b,)
        # slots hold the row's segments, in order, then nothing
        np.testing.assert_array_equal(c.valid_mask, np.arange(q)[None] < c.segments.num_segments[:, None])
        assert np.all(c.quantized[~c.valid_mask] == 0)
        # the codec's PAD id (K - 1) exactly on invalid slots (stage 0 never picks a special code for a real one)
        np.testing.assert_array_equal(c.codes == K - 1, ~c.valid_mask)
    assert [cb.shape for cb in c0.codebooks] == [(K, 8), (K, 8)]
    assert [cb.shape for cb in c1.codebooks] == [(K, 8)]
    assert np.all(c0.codes[c0.valid_mask] < K**2) and np.all(c1.codes[c1.valid_mask] < K)
    # level 1 cuts level 0's valid slots into 1..(their number) segments; a level-1 segment never ends on a PAD slot
    assert np.all(c1.segments.num_segments >= 1) and np.all(c1.segments.num_segments <= c0.segments.num_segments)
    assert np.all(c1.segments.patch_end_mask <= c0.valid_mask)


def test_level1_sees_only_valid_rows_of_level0(probe):
    c0, c1 = probe["comps"]
    m, valid0 = probe["metrics"], c0.valid_mask
    assert 0 < valid0.sum() < valid0.size  # the test needs invalid slots to perturb
    assert m["level0/real_tokens"] == (~probe["pad"]).sum()
    assert m["level1/real_tokens"] == valid0.sum()
    # the training forward and compress_all wire the levels the same way
    for k, c in enumerate(probe["comps"]):
        called = probe["levels"][k].compressor
        for name in ("pooled", "quantized", "codes", "valid_mask"):
            np.testing.assert_allclose(getattr(called, name), getattr(c, name), rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(called.entropy.bits, c.entropy.bits, rtol=1e-5, atol=1e-6)
    # garbage in level 0's invalid slots (vectors and code ids) changes nothing level 1 computes on valid positions
    pc = probe["perturbed"]
    np.testing.assert_array_equal(pc.valid_mask, c1.valid_mask)
    v1 = c1.valid_mask
    assert np.any(pc.pooled[v1] != 0)
    np.testing.assert_allclose(pc.pooled[v1], c1.pooled[v1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pc.quantized[v1], c1.quantized[v1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pc.codes, c1.codes)
    np.testing.assert_allclose(pc.entropy.bits[valid0], c1.entropy.bits[valid0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pc.entropy.loss, c1.entropy.loss, rtol=1e-5)
    np.testing.assert_allclose(pc.vq_loss, c1.vq_loss, rtol=1e-5)
    np.testing.assert_array_equal(pc.segments.seg_id[valid0], c1.segments.seg_id[valid0])


def test_level1_expander_predicts_level0_digits_per_stage(probe):
    c0 = probe["comps"][0]
    logits = probe["levels"][1].logits
    # one (B, S, K) array per stage of level 0's RVQ (depth 2): never a K**depth softmax
    assert isinstance(logits, list) and [lg.shape for lg in logits] == [(4, 32, K), (4, 32, K)]
    expander = leaves_by_path(probe["variables"]["params"]["level_1"]["expander"])
    assert all(K**2 not in v.shape for v in expander.values()), {k: v.shape for k, v in expander.items()}
    # the level-1 code CE of the pyramid is the CE of level 0's code digits, over level 0's valid slots
    digits = np.stack([c0.codes % K, c0.codes // K], axis=-1)
    valid = c0.valid_mask
    want = 0.0
    for s, lg in enumerate(logits):
        lg = lg.astype(np.float64)
        logp = lg - lg.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, digits[..., s : s + 1], axis=-1)[..., 0]
        want += nll[valid].mean()
    np.testing.assert_allclose(probe["metrics"]["level1/code_ce"], want, rtol=1e-5)
    assert np.isfinite(probe["loss"]) and probe["metrics"]["loss"] == probe["loss"]


# ---------------------------------------------------------------------------------------------------------------------
# Top transformer losses (docs/ARCHITECTURE.md 5), against loops
# ---------------------------------------------------------------------------------------------------------------------

# row 0: two separate pairs (0,1) and (3,4); row 1: a single valid slot (no pair); row 2: nothing valid
TOP_VALID = np.array(
    [[1, 1, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]],
    bool,
)


def test_next_row_pairs_and_continuous_loss_match_loops():
    rng = np.random.default_rng(1)
    b, q, e = 4, 5, 6
    pred = rng.normal(size=(b, q, e)).astype(np.float32)
    rows = rng.normal(size=(b, q, e)).astype(np.float32)
    pairs = np.asarray(jax.jit(top.next_row_pairs)(TOP_VALID))
    want_pairs = np.array([[TOP_VALID[i, t] and TOP_VALID[i, t + 1] for t in range(q - 1)] for i in range(b)])
    np.testing.assert_array_equal(pairs, want_pairs)
    errs = [
        np.mean((pred[i, t].astype(np.float64) - rows[i, t + 1]) ** 2)
        for i in range(b)
        for t in range(q - 1)
        if TOP_VALID[i, t] and TOP_VALID[i, t + 1]
    ]
    assert len(errs) == 5
    loss = jax.jit(top.continuous_loss)
    np.testing.assert_allclose(loss(pred, rows, TOP_VALID), np.mean(errs), rtol=1e-5)
    # no pair at all (single valid slot, or none): zero, not NaN
    assert float(loss(pred[1:3], rows[1:3], TOP_VALID[1:3])) == 0.0


def test_discrete_loss_matches_loop():
    rng = np.random.default_rng(2)
    b, q, k, depth = 4, 5, 7, 2
    logits = [rng.normal(size=(b, q, k)).astype(np.float32) * 2 for _ in range(depth)]
    digits = rng.integers(0, k, (b, q, depth)).astype(np.int32)
    want = 0.0
    for s in range(depth):
        nll = []
        for i in range(b):
            for t in range(q - 1):
                if TOP_VALID[i, t] and TOP_VALID[i, t + 1]:
                    lg = logits[s][i, t].astype(np.float64)
                    nll.append(np.log(np.exp(lg).sum()) - lg[digits[i, t + 1, s]])
        want += np.mean(nll)
    loss = jax.jit(top.discrete_loss)
    np.testing.assert_allclose(loss(logits, digits, TOP_VALID), want, rtol=1e-5)
    assert float(loss([lg[1:3] for lg in logits], digits[1:3], TOP_VALID[1:3])) == 0.0


def test_factorized_code_logits_residual_conditioning_matches_loop():
    rng = np.random.default_rng(3)
    b, t, d, k, depth = 2, 3, 4, 6, 3
    z = rng.normal(size=(b, t, d)).astype(np.float32)
    books = [rng.normal(size=(k, d)).astype(np.float32) for _ in range(depth)]
    teacher = rng.integers(0, k, (b, t, depth)).astype(np.int32)
    got = jax.jit(residual_code_logits)(z, books, teacher)
    assert len(got) == depth
    for i in range(b):
        for j in range(t):
            r = z[i, j].astype(np.float64)
            for s in range(depth):
                np.testing.assert_allclose(got[s][i, j], books[s] @ r, rtol=1e-5, atol=1e-5)
                r = r - books[s][teacher[i, j, s]]

    # the subtracted teacher vectors carry no gradient: stage 1's logits depend on stage 0's codebook only through
    # that subtraction, so their gradient w.r.t. it is zero (while w.r.t. z it is not)
    def stage1(z_, cb0):
        books_ = [cb0] + [jnp.asarray(c) for c in books[1:]]
        return jnp.sum(residual_code_logits(z_, books_, jnp.asarray(teacher))[1])

    gz, gcb0 = jax.jit(jax.grad(stage1, argnums=(0, 1)))(z, books[0])
    assert np.all(np.asarray(gcb0) == 0) and np.any(np.asarray(gz) != 0)


def test_top_transformer_is_causal_and_ignores_invalid_rows():
    """Continuous top: the prediction at row t sees rows <= t that are valid, and its loss is continuous_loss of its
    own predictions against the next rows."""
    tcfg = copy.deepcopy(two_level_config(stage=2).top_transformer_config)
    tcfg.continuous = True
    model = top.CodeSequenceTransformer(tcfg)
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(2, 6, 48)).astype(np.float32)
    valid = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], bool)  # row 1: an invalid slot between valid ones
    later = rows.copy()
    later[:, 3:] += 5.0  # rows >= 3 changed
    garbage = np.where(valid[..., None], rows, 7.0).astype(np.float32)  # invalid slots changed
    captured = lambda mdl, name: name == "__call__" and mdl.name == "out_proj"  # noqa: E731

    @jax.jit
    def run(rows, later, garbage):
        params = model.init(jax.random.key(0, impl="unsafe_rbg"), rows, valid)
        out = []
        for x in (rows, later, garbage):
            (loss, _), inter = model.apply(params, x, valid, capture_intermediates=captured, mutable=["intermediates"])
            out.append((loss, inter["intermediates"]["out_proj"]["__call__"][0]))
        return out, top.continuous_loss(out[0][1], rows, valid)

    ((loss, pred), (_, pred_later), (loss_g, pred_g)), want = host(run(rows, later, garbage))
    assert pred.shape == rows.shape
    np.testing.assert_allclose(pred_later[:, :3], pred[:, :3], rtol=1e-5, atol=1e-6)
    assert np.abs(pred_later[:, 3:] - pred[:, 3:]).max() > 1e-3
    np.testing.assert_allclose(pred_g[valid], pred[valid], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_g, loss, rtol=1e-6)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_top_batch_chunks_is_the_largest_divisor_of_the_batch_within_the_setting():
    assert [top_batch_chunks(8, c) for c in (1, 2, 3, 4, 5, 8, 16)] == [1, 2, 2, 4, 4, 8, 8]
    assert [top_batch_chunks(6, 4), top_batch_chunks(7, 4), top_batch_chunks(1, 4)] == [3, 1, 1]
    x = jnp.arange(8 * 3).reshape(8, 3)
    chunks = top._split(x, 4)
    assert chunks.shape == (4, 2, 3)
    np.testing.assert_array_equal(chunks[1], x[jnp.array([1, 5])])  # chunk c holds rows c, c + 4
    np.testing.assert_array_equal(top._merge(chunks), x)


def test_row_buckets_pick_the_smallest_prefix_holding_every_valid_row():
    assert top.row_bucket_sizes(8, 4) == (2, 4, 6, 8)
    assert top.row_bucket_sizes(7, 3) == (3, 5, 7)
    assert top.row_bucket_sizes(3, 8) == (1, 2, 3)
    assert top.row_bucket_sizes(5, 1) == (5,)
    rng = np.random.default_rng(7)
    sizes = (3, 5, 7)
    index = jax.jit(top.row_bucket_index, static_argnums=1)
    for _ in range(20):
        valid = rng.random((3, 7)) < rng.random()
        last = max([t + 1 for i in range(3) for t in range(7) if valid[i, t]], default=0)
        want = next(i for i, n in enumerate(sizes) if n >= last)
        assert int(index(valid, sizes)) == want, valid


@pytest.mark.parametrize("continuous", [True, False])
def test_top_over_row_buckets_equals_top_over_every_row(continuous):
    """The bucketed top (lax.switch over prefixes, its gradient computed in the branch), alone and run in chunks of
    the batch (each over its own bucket, weighted by its share of the next-row pairs), gives the loss, metrics,
    gradients (parameters and input rows) and (at valid rows) outputs of the top over every slot: for batches whose
    valid rows end early, in the middle, at the last slot, or nowhere, with chunks of one row that hold no pair."""
    tcfg = copy.deepcopy(two_level_config(stage=2).top_transformer_config)
    tcfg.continuous = continuous
    q, k, d_c = 8, 16, 8
    full = top.CodeSequenceTransformer(tcfg, code_dim=d_c)
    bucketed = top.CodeSequenceTransformer(tcfg, code_dim=d_c, row_buckets=4)  # buckets of 2, 4, 6, 8 rows
    chunked = top.CodeSequenceTransformer(tcfg, code_dim=d_c, row_buckets=4, batch_chunks=3)  # a chunk per row
    rng = np.random.default_rng(5)
    rows = jnp.asarray(rng.normal(size=(3, q, 48)), jnp.float32)
    codes = jnp.asarray(rng.integers(0, k - 4, (3, q)), jnp.int32)
    books = [jnp.asarray(rng.normal(size=(k, d_c)), jnp.float32)]
    args = (codes, books, k) if not continuous else ()
    params = jax.jit(lambda: full.init(jax.random.key(0), rows, jnp.ones((3, q), bool), *args))()

    @jax.jit
    def run(params, valid):
        def loss(p, r, m):
            out = m.apply(p, r, valid, *args, outputs=True)
            return out[0], out

        grad = functools.partial(jax.value_and_grad, argnums=(0, 1), has_aux=True)  # parameters and rows
        outs = [grad(functools.partial(loss, m=m))(params, rows) for m in (full, bucketed, chunked)]
        return outs, top.row_bucket_index(valid, top.row_bucket_sizes(q, 4))

    patterns = {
        "end early": [[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]],
        "middle": [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]],
        "last slot": [[1, 1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0, 1], [1, 1, 0, 0, 0, 0, 0, 0]],
        "nowhere": [[0] * q] * 3,
    }
    chosen = {}
    for name, pattern in patterns.items():
        valid = jnp.asarray(pattern, bool)
        (((lf, (_, mf, of)), gf), *others), index = host(run(params, valid))
        chosen[name] = int(index)
        # outputs agree at rows with a next-row target (row t predicts t+1; the last row of a bucket has none)
        pairs = np.zeros((3, q), bool)
        pairs[:, :-1] = np.asarray(top.next_row_pairs(valid))
        for variant, ((lb, (_, mb, ob)), gb) in zip(("bucketed", "chunked"), others):
            what = f"{name}, {variant}"
            np.testing.assert_allclose(lb, lf, rtol=1e-5, atol=1e-7, err_msg=what)
            assert mb.keys() == mf.keys(), what
            for key in mf:
                np.testing.assert_allclose(mb[key], mf[key], rtol=1e-5, atol=1e-7, err_msg=f"{what} {key}")
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gf), jax.tree.leaves(gb), strict=True):
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=f"{what} {jax.tree_util.keystr(path)}")
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(of), jax.tree.leaves(ob), strict=True):
                assert a.shape == b.shape, (what, path)
                if a.ndim >= 2 and a.shape[:2] == (3, q):
                    np.testing.assert_allclose(b[pairs], a[pairs], rtol=1e-5, atol=1e-5, err_msg=f"{what} {path}")
        if continuous and name == "nowhere":
            assert float(lf) == 0.0
    # each pattern ran the branch its last valid row asks for (2, 6, 8 and 2 rows)
    assert chosen == {"end early": 1, "middle": 2, "last slot": 3, "nowhere": 0}


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2: the frozen pyramid under the top transformer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage2(fresh_stage2):
    """The stage-2 train step, as the trainer builds it, and a runner."""
    f = fresh_stage2
    cfg, mesh = f["cfg"], f["mesh"]
    step = steps.make_train_step(cfg, f["model"], mesh, f["opt"], f["shardings"])

    def run(state, batch, n):
        """n steps (the step donates its input state); returns (state, [host metrics of every step])."""
        out = []
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            for _ in range(n):
                state, m = step(state, batch)
                out.append(m)
        return state, host(out)

    return dict(cfg=cfg, state0=f["state"], run=run)


def fresh(state_host):
    return jax.tree.map(jnp.asarray, state_host)


def test_stage2_trains_only_the_top_and_freezes_the_pyramid(stage2):
    before = stage2["state0"]
    assert set(before.params) == {"top"}
    assert set(before.frozen_params) == {"level_0", "level_1"}
    # the optimizer's state (moments) covers the top's parameters and nothing else
    flat, _ = jax.tree_util.tree_flatten_with_path(before.opt_state)
    moments = [(p, x) for p, x in flat if np.ndim(x) > 0]
    assert moments
    first_keys = {next(k.key for k in p if isinstance(k, jax.tree_util.DictKey)) for p, _ in moments}
    assert first_keys == {"top"}, first_keys
    n_top = train_state.count_params(before.params)
    assert sum(np.size(x) for _, x in moments) == 2 * n_top  # Adam's mu and nu

    after, metrics = stage2["run"](fresh(before), sentence_batch(), 3)
    after = host(after)
    assert int(after.step) == 3
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    assert {k for k in metrics[0] if k.startswith("top/")} == {"top/top_ce", "top/top_accuracy"}
    assert_trees_identical(after.frozen_params, before.frozen_params)
    assert_trees_identical(after.model_state, before.model_state)  # the whole vq_state: EMA, buffers, step counters
    changed = [
        k for k, v in leaves_by_path(after.params).items() if not np.array_equal(v, leaves_by_path(before.params)[k])
    ]
    assert len(changed) == len(leaves_by_path(before.params)), "every top parameter should have moved"


@pytest.mark.slow
def test_stage2_top_loss_falls_on_repeated_sentences(stage2):
    _, metrics = stage2["run"](fresh(stage2["state0"]), sentence_batch(), STAGE2_STEPS)
    first, last = metrics[0]["top/top_ce"], metrics[-1]["top/top_ce"]
    assert np.isfinite(last) and last < 0.5 * first, (first, last)
    assert metrics[-1]["loss"] == pytest.approx(last)


# ---------------------------------------------------------------------------------------------------------------------
# Configuration and checkpoint errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "sentences.txt"
    path.write_text("\n<|endoftext|>\n".join(SENTENCES * 10) + "\n")
    return path


def test_stage2_without_init_from_is_a_config_error(corpus, tmp_path):
    cfg = two_level_config(stage=2)
    cfg.init_from = ""
    cfg.data.path = str(corpus)
    with pytest.raises(ConfigError, match="init_from"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_level_above_a_level_without_quantizer_is_a_config_error():
    cfg = two_level_config()
    cfg.levels[0].c_vq_K = 0
    with pytest.raises(ConfigError, match=r"levels\[1\].*levels\[0\].*c_vq_K"):
        validate_config(cfg)


def test_top_embed_dim_must_equal_top_level_width():
    cfg = two_level_config(stage=2)
    validate_config(cfg)
    cfg.top_transformer_config.embed_dim = 32
    with pytest.raises(ConfigError, match=r"embed_dim=32.*D=48"):
        validate_config(cfg)


def stage2_run_config(corpus, init_from):
    cfg = two_level_config(stage=2, init_from=str(init_from))
    cfg.data.path = str(corpus)
    cfg.log_interval = 1
    cfg.eval_interval = 1000  # no eval before max_steps: these runs stop early
    cfg.checkpoint_interval = 1000
    cfg.eval_batches = 1
    return cfg


def test_stage2_refuses_a_stage1_checkpoint_of_another_pyramid(corpus, tmp_path):
    # a stage-1 checkpoint of a pyramid whose level 0 is 64 wide
    other = two_level_config()
    other.levels[0].D = 64
    model = AbstractinatorPyramid(other)
    opt = train_state.make_optimizer(other)
    abstract, _ = train_state.abstract_train_state(other, model, make_mesh(other.mesh), opt)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    with CheckpointManager(tmp_path / "s1") as mngr:
        mngr.save(0, zeros, config=to_dict(other), force=True)
    with pytest.raises(CheckpointError) as err:
        train(stage2_run_config(corpus, tmp_path / "s1"), tmp_path / "s2")
    assert "levels[0].D: checkpoint 64 vs config 32" in str(err.value)


def test_stage2_accepts_a_stage1_run_with_other_segment_slots(corpus, tmp_path):
    """Segment slots (c_output_length) size a run, not the model: a stage-1 run trained with other slots (e.g. on
    shorter rows, where clamp_segment_slots lowers them) is a valid stage-2 init_from; any other level difference
    still is not."""
    stage1 = two_level_config()
    stage1.levels[0].c_output_length //= 2
    stage1.levels[1].c_output_length //= 2
    stage2 = stage2_run_config(corpus, tmp_path / "s1")
    # no parameter or state shape depends on the slots
    shapes = []
    for cfg in (stage1, two_level_config()):
        opt = train_state.make_optimizer(cfg)
        abstract, _ = train_state.abstract_train_state(cfg, AbstractinatorPyramid(cfg), make_mesh(cfg.mesh), opt)
        shapes.append(jax.tree.map(lambda s: (s.shape, s.dtype), abstract))
    assert shapes[0] == shapes[1]
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    with CheckpointManager(tmp_path / "s1") as mngr:
        mngr.save(0, zeros, config=to_dict(stage1), force=True)
    assert check_init_from(stage2) == (str(tmp_path / "s1"), 0)
    stage1.levels[1].D = 40  # and one setting that does define the model: refused, naming only that one
    with CheckpointManager(tmp_path / "s1") as mngr:
        mngr.save(1, zeros, config=to_dict(stage1), force=True)
    with pytest.raises(CheckpointError) as err:
        check_init_from(stage2)
    assert "levels[1].D: checkpoint 40 vs config 48" in str(err.value) and "c_output_length" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2 through the trainer: init from a stage-1 run, stop, resume
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_workdir(probe, tmp_path_factory):
    """A stage-1 checkpoint of the probe's pyramid (parameters and quantizer state), as a stage-1 run leaves it."""
    cfg = probe["cfg"]
    params = probe["variables"]["params"]
    state = train_state.TrainState(
        step=np.zeros((), np.int32),
        params=params,
        opt_state=host(train_state.make_optimizer(cfg).init(params)),
        model_state={"vq_state": probe["variables"]["vq_state"]},
        rng=np.asarray(jax.random.key_data(jax.random.key(1))),
        frozen_params={},
    )
    workdir = tmp_path_factory.mktemp("stage1")
    with CheckpointManager(workdir) as mngr:
        mngr.save(7, state, config=to_dict(cfg), force=True)
    return workdir


def restore(workdir, step):
    with CheckpointManager(workdir) as mngr:
        state, config = mngr.restore(step)
    return state, config


@pytest.mark.slow
def test_stage2_run_loads_the_pyramid_and_resumes_stage2(probe, fresh_stage2, stage1_workdir, corpus, tmp_path):
    s1_params, s1_vq = probe["variables"]["params"], probe["variables"]["vq_state"]
    # the stage-1 pyramid differs from the one a fresh stage-2 state starts with
    fresh_levels = leaves_by_path(fresh_stage2["state"].frozen_params)
    random_leaves = {k: v for k, v in fresh_levels.items() if np.ptp(v) > 0}  # not the ones / zeros of norms, biases
    assert random_leaves and not any(np.array_equal(v, leaves_by_path(s1_params)[k]) for k, v in random_leaves.items())
    workdir = tmp_path / "s2"
    cfg = stage2_run_config(corpus, stage1_workdir)
    first = train(cfg, workdir, stop_at_step=2)
    assert first["step"] == 2
    s2a, saved_cfg = restore(workdir, 2)
    assert saved_cfg["stage"] == 2
    assert set(s2a["params"]) == {"top"} and set(s2a["frozen_params"]) == {"level_0", "level_1"}
    assert_subtree_identical(s2a["frozen_params"], s1_params)
    # the whole pyramid is carried, expanders included (needed to generate bytes from a stage-2 checkpoint)
    assert set(leaves_by_path(s2a["frozen_params"])) == set(leaves_by_path(s1_params))
    assert "in_proj" in s2a["frozen_params"]["level_1"] and "expander" in s2a["frozen_params"]["level_1"]
    assert_trees_identical(s2a["model_state"]["vq_state"], s1_vq)

    # the resumed run reads its own checkpoint: the stage-1 run may be gone by now
    moved = shutil.move(str(stage1_workdir), str(tmp_path / "s1_moved"))
    try:
        second = train(cfg, workdir, stop_at_step=4)
    finally:
        shutil.move(moved, str(stage1_workdir))
    assert second["step"] == 4
    assert np.isfinite(second["train"]["loss"]) and "top/top_ce" in second["train"]
    with CheckpointManager(workdir) as mngr:
        assert mngr.all_steps() == [2, 4]
    # logged steps 1, 2 then 3, 4: the second call continued at step 3 (a restart would log 1..4 again)
    assert [s for s, _ in read_scalars(workdir / "tensorboard")["train/loss"]] == [1, 2, 3, 4]
    s2b, _ = restore(workdir, 4)
    assert int(s2b["step"]) == 4
    assert_subtree_identical(s2b["frozen_params"], s1_params)
    assert_trees_identical(s2b["model_state"]["vq_state"], s1_vq)
    a, b = leaves_by_path(s2a["params"]), leaves_by_path(s2b["params"])
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)

    # the workdir holds a stage-2 run: a stage-1 config must not resume it
    stage1_cfg = two_level_config()
    stage1_cfg.data.path = str(corpus)
    with pytest.raises(CheckpointError, match="stage: checkpoint 2 vs config 1"):
        train(stage1_cfg, workdir)


def test_three_level_pyramid_trains_end_to_end():
    """Three stacked levels (depth-2 codes at the bottom, widths 32 -> 48 -> 32) and a discrete top: every level
    reports its metrics, shapes shrink level by level, and every gradient is finite."""
    import copy

    cfg = tiny_config()
    lv0 = cfg.levels[0]
    lv0.c_vq_K, lv0.c_vq_d_c, lv0.c_vq_depth = 32, 8, 2
    lv1 = copy.deepcopy(lv0)
    lv1.D, lv1.c_heads, lv1.d_heads, lv1.c_window, lv1.d_window = 48, 2, 2, 8, 8
    lv1.c_output_length, lv1.c_vq_depth = 16, 1
    lv2 = copy.deepcopy(lv1)
    lv2.D, lv2.c_output_length, lv2.c_vq_K = 32, 8, 16
    cfg.levels, cfg.num_levels, cfg.use_top_code_lm = [lv0, lv1, lv2], 3, True
    top = cfg.top_transformer_config
    top.embed_dim, top.dim, top.num_layers, top.num_heads, top.continuous = 32, 32, 1, 2, False
    validate_config(cfg)
    batch = sentence_batch()
    ids, pad = jnp.asarray(batch["ids"][0]), jnp.asarray(batch["mask"][0])
    model = AbstractinatorPyramid(cfg)
    variables = jax.jit(model.init)(jax.random.key(0), ids, pad)

    def loss_fn(params):
        return model.apply({**variables, "params": params}, ids, pad)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    assert np.isfinite(float(loss))
    for k in range(3):
        assert np.isfinite(float(metrics[f"level{k}/code_ce"]))
    assert np.isfinite(float(metrics["top/top_ce"]))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    comps = jax.jit(lambda v: model.apply(v, ids, pad, method=model.compress_all))(variables)
    assert [c.quantized.shape for c in comps] == [(4, 32, 32), (4, 16, 48), (4, 8, 32)]
    # each level's valid rows never exceed the level below's
    for lo, hi in zip(comps, comps[1:]):
        assert bool(jnp.all(hi.valid_mask.sum(1) <= lo.valid_mask.sum(1)))
