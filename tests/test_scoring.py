"""Scoring and the metric protocol: the code length is a sum of -log2 p that a loop reproduces, the level-0
reconstruction of a model without memory is its expander's byte LM, the figures do not depend on the eval batch
size or the device count, a long document is scored across its rows exactly once, and the lm-eval adapter runs
offline on a local task."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abstractinator_jax import data, scoring, steps, tokenizer
from abstractinator_jax.build import build
from abstractinator_jax.codes import CodeCodec
from abstractinator_jax.compressor import EntropyOut
from abstractinator_jax.config import BOS_ID, BYTE_VOCAB, EOS_ID, PAD_ID, base_config, level_defaults
from abstractinator_jax.evaluation import TextScorer, evaluate
from abstractinator_jax.expander import Expander
from abstractinator_jax.segmentation import entropy_segments
from abstractinator_jax.train_state import create_train_state

from .helpers import EVAL_DOCS, tiny_discrete_config, xla_flags

REPO = Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)


def log2p(logits: np.ndarray, target: int) -> float:
    logits = np.asarray(logits, np.float64)
    m = logits.max()
    return float(logits[target] - m - np.log(np.sum(np.exp(logits - m)))) / LN2


def kt_sequential(flags) -> float:
    """Bits of a binary sequence under the Krichevsky-Trofimov estimator, flag by flag."""
    ones = zeros = 0
    bits = 0.0
    for f in flags:
        p1 = (ones + 0.5) / (ones + zeros + 1.0)
        bits -= math.log2(p1 if f else 1.0 - p1)
        ones, zeros = ones + bool(f), zeros + (not f)
    return bits


# ---------------------------------------------------------------------------------------------------------------------
# The code length against a loop, on stubbed model outputs (two levels, discrete top)
# ---------------------------------------------------------------------------------------------------------------------


def stub_parts(level0_kind: str):
    """Random model outputs of the right shapes for a 2-level pyramid: level 0 (K=8, depth 2, 4 slots), level 1
    (K=6, depth 1, 3 slots), a discrete top. Rows: a document start, a full later row (overflows), an all-PAD row."""
    rng = np.random.default_rng(0)
    cfg = base_config()
    cfg.num_levels = 2
    cfg.levels = [level_defaults(), level_defaults()]
    cfg.levels[0].update(c_vq_K=8, c_vq_depth=2, c_entropy_model=level0_kind)
    cfg.levels[1].update(c_vq_K=6, c_vq_depth=1)
    cfg.use_top_code_lm = True
    (k0, d0, q0), (k1, q1) = (8, 2, 4), (6, 3)
    ids0 = np.full((3, 10), PAD_ID, np.int32)
    ids0[0, :5] = [BOS_ID, 72, 105, 33, EOS_ID]
    ids0[1] = rng.integers(0, 256, 10)
    pad0 = ids0 == PAD_ID

    def segments(pad, q):
        bits = jnp.asarray(rng.normal(size=pad.shape) * 2.0, jnp.float32)
        return bits, entropy_segments(bits, jnp.asarray(pad), delta=0.0, abs_threshold=None, max_segments=q)

    bits0, seg0 = segments(pad0, q0)
    valid0 = np.arange(q0)[None] < np.asarray(seg0.num_segments)[:, None]
    codec0 = CodeCodec(k0, d0)
    codes0 = np.asarray(codec0.compose(np.stack([rng.integers(0, k0 - 4, (3, q0)), rng.integers(0, k0, (3, q0))], -1)))
    codes0 = np.where(valid0, codes0, codec0.pad_id).astype(np.int32)
    logits0 = rng.normal(size=(3, 10, BYTE_VOCAB)).astype(np.float32) * 2
    ent_logits = rng.normal(size=(3, 10, BYTE_VOCAB)).astype(np.float32) * 2 if level0_kind == "logit" else None
    bits1, seg1 = segments(~valid0, q1)
    valid1 = np.arange(q1)[None] < np.asarray(seg1.num_segments)[:, None]
    codes1 = np.where(valid1, rng.integers(0, k1 - 4, (3, q1)), k1 - 1).astype(np.int32)
    logits1 = [rng.normal(size=(3, q0, k0)).astype(np.float32) * 2 for _ in range(d0)]
    top_logits = rng.normal(size=(3, q1, k1)).astype(np.float32) * 2
    parts = scoring.ScoreParts(
        levels=[
            scoring.LevelParts(
                ids=jnp.asarray(ids0),
                pad=jnp.asarray(pad0),
                logits=[jnp.asarray(logits0)],
                digits=jnp.asarray(ids0)[..., None],
                segments=seg0,
                entropy=EntropyOut(bits=bits0, loss=jnp.zeros(()), logits=None if ent_logits is None else ent_logits),
                codes=jnp.asarray(codes0),
                valid=jnp.asarray(valid0),
            ),
            scoring.LevelParts(
                ids=jnp.asarray(codes0),
                pad=jnp.asarray(~valid0),
                logits=[jnp.asarray(lg) for lg in logits1],
                digits=codec0.decompose(codes0),
                segments=seg1,
                entropy=EntropyOut(bits=bits1, loss=jnp.zeros(())),
                codes=jnp.asarray(codes1),
                valid=jnp.asarray(valid1),
            ),
        ],
        top=scoring.TopParts(valid=jnp.asarray(valid1), logits=[jnp.asarray(top_logits)], digits=codes1[..., None]),
    )
    return cfg, parts


@pytest.mark.parametrize("level0_kind", ["gaussian", "logit"])
def test_code_length_is_the_sum_of_minus_log2_p_of_a_loop(level0_kind):
    cfg, parts = stub_parts(level0_kind)
    lv0, lv1, top = parts.levels[0], parts.levels[1], parts.top
    ids0, pad0, valid0 = np.asarray(lv0.ids), np.asarray(lv0.pad), ~np.asarray(lv1.pad)
    valid1, codes1 = np.asarray(top.valid), np.asarray(lv1.codes)
    digits1 = np.asarray(lv1.digits)
    assert np.asarray(lv0.segments.overflow)[1], "row 1 should overflow its 4 segment slots"
    want, want_lm = [], []
    for b in range(3):
        bits = 0.0
        if valid1[b].any():  # the first top code: uniform over the 6 - 4 non-special codes
            bits += math.log2(2)
        for t in range(valid1.shape[1] - 1):
            if valid1[b, t] and valid1[b, t + 1]:
                bits -= log2p(top.logits[0][b, t], codes1[b, t + 1])
        for t in range(valid0.shape[1]):  # level 1: level 0's codes, two digits each, given level 1's codes
            if valid0[b, t]:
                bits -= sum(log2p(lv1.logits[s][b, t], digits1[b, t, s]) for s in range(2))
        bits += kt_sequential(np.asarray(lv1.segments.patch_end_mask)[b][valid0[b]])
        for t in range(ids0.shape[1]):  # level 0: bytes and EOS given level 0's codes; BOS is given
            if not pad0[b, t] and ids0[b, t] != BOS_ID:
                bits -= log2p(lv0.logits[0][b, t], ids0[b, t])
        if level0_kind == "gaussian":
            bits += kt_sequential(np.asarray(lv0.segments.patch_end_mask)[b][~pad0[b]])
        want.append(bits)
        if level0_kind == "logit":
            lm = math.log2(257) if not pad0[b, 0] and ids0[b, 0] != BOS_ID else 0.0
            lm -= sum(log2p(lv0.entropy.logits[b, t - 1], ids0[b, t]) for t in range(1, 10) if not pad0[b, t])
            want_lm.append(lm)

    totals, rb = jax.jit(functools.partial(scoring.batch_totals, cfg))(parts)
    np.testing.assert_allclose(np.asarray(rb.total), want, rtol=1e-5, atol=1e-4)
    assert want[2] == 0.0 and want[0] > 0
    assert float(totals["data/bytes"].total) == 3 + 10 and float(totals["data/documents"].total) == 1
    np.testing.assert_allclose(float(totals["bits_per_byte"].total), sum(want), rtol=1e-5)
    assert float(totals["bits_per_byte"].count) == 13
    assert ("level0/boundary_bits_per_byte" in totals) == (level0_kind == "gaussian")
    if level0_kind == "logit":
        np.testing.assert_allclose(np.asarray(rb.entropy_model), want_lm, rtol=1e-5, atol=1e-4)
    else:
        assert rb.entropy_model is None


def test_kt_closed_form_matches_the_sequential_estimator():
    for flags in ([], [1], [0], [1, 0, 0, 1, 1, 0, 0, 0], [0] * 30 + [1]):
        ones = sum(flags)
        got = float(scoring.kt_bits(jnp.asarray(len(flags) - ones), jnp.asarray(ones)))
        np.testing.assert_allclose(got, kt_sequential(flags), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# A tiny model with a total code length (quantizer, logit entropy model, discrete top)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_discrete_config(seq_len=32, batch_size=2)
    run = build(cfg)
    state, _ = create_train_state(cfg, run.model, run.mesh, run.optimizer)
    eval_step = steps.make_eval_step(run.model, run.mesh, run.shardings)

    def evaluate_docs(docs, batch_size, params=None):
        batches = data.make_eval_batches(None, cfg.sequence_length, batch_size, documents=docs)
        st = state if params is None else state.replace(params=params)
        with jax.set_mesh(run.mesh):
            return evaluate(eval_step, st, batches, run.mesh)

    return SimpleNamespace(cfg=cfg, run=run, state=state, eval_step=eval_step, evaluate=evaluate_docs)


def test_figures_do_not_depend_on_the_eval_batch_size(tiny):
    small = tiny.evaluate(EVAL_DOCS, 2)
    large = tiny.evaluate(EVAL_DOCS, 8)
    assert small.keys() == large.keys()
    for key in (
        "bits_per_byte",
        "top/code_bits_per_byte",
        "top/code_bits_per_code",
        "level0/recon_bits_per_byte",
        "level0/recon_bits_per_token_given_codes",
        "level0/eos_bits_given_codes",
        "level0/recon_accuracy",
        "level0/input_tokens_per_segment",
        "level0/bytes_per_segment",
        "level0/segments_per_row",
        "level0/overflow_rows",
        "level0/entropy_model_bits_per_byte",
        "level0/vq_perplexity",
        "level0/vq_unused_codes",
    ):
        assert key in small, key
    for key, value in small.items():
        np.testing.assert_allclose(large[key], value, rtol=1e-6, err_msg=key)
    # the bytes are the documents' UTF-8 bytes (multi-byte characters count as what they are), nothing else
    assert small["data/bytes"] == sum(len(d) for d in EVAL_DOCS)
    assert small["data/documents"] == len(EVAL_DOCS)
    # bits_per_byte is the sum of its parts; the logit entropy model's boundaries cost nothing
    parts = small["top/code_bits_per_byte"] + small["level0/recon_bits_per_byte"]
    np.testing.assert_allclose(small["bits_per_byte"], parts, rtol=1e-6)
    assert "level0/boundary_bits_per_byte" not in small
    # level 0's reconstruction bits are the bytes' and EOS's (BOS is given)
    recon = small["level0/recon_bits_per_token_given_codes"] * small["data/bytes"]
    recon += small["level0/eos_bits_given_codes"] * small["data/documents"]
    np.testing.assert_allclose(small["level0/recon_bits_per_byte"] * small["data/bytes"], recon, rtol=1e-6)


def test_level0_recon_without_memory_is_the_expander_as_a_byte_lm(tiny):
    """Zeroed memory vectors (the quantizer's up-projection set to 0): the level-0 reconstruction bits are those of
    the same expander run as a pure byte LM (no memory rows at all), computed token by token here."""
    params = jax.tree.map(jnp.asarray, tiny.state.params)
    params["level_0"]["compressor"]["quantizer"]["up"] = jnp.zeros_like(
        params["level_0"]["compressor"]["quantizer"]["up"]
    )
    got = tiny.evaluate(EVAL_DOCS, 8, params=params)

    rows = np.concatenate([tokenizer.to_rows(tokenizer.encode(d), tiny.cfg.sequence_length) for d in EVAL_DOCS])
    pad = rows == PAD_ID
    lv = tiny.cfg.levels[0]
    expander = Expander(lv, BYTE_VOCAB, EOS_ID, BYTE_VOCAB, 1)
    n = len(rows)
    logits, _ = jax.jit(expander.apply)(
        {"params": params["level_0"]["expander"]},
        jnp.zeros((n, 1, lv.D)),
        jnp.zeros((n, 1), bool),
        jnp.asarray(rows),
        jnp.asarray(pad),
        jnp.zeros(rows.shape, jnp.int32),
    )
    logits = np.asarray(logits[0])
    byte_bits = eos_bits = 0.0
    n_bytes = n_eos = 0
    for r in range(n):
        for t in range(rows.shape[1]):
            tok = int(rows[r, t])
            if tok < 256:
                byte_bits -= log2p(logits[r, t], tok)
                n_bytes += 1
            elif tok == EOS_ID:
                eos_bits -= log2p(logits[r, t], tok)
                n_eos += 1
    np.testing.assert_allclose(got["level0/recon_bits_per_token_given_codes"], byte_bits / n_bytes, rtol=1e-5)
    np.testing.assert_allclose(got["level0/eos_bits_given_codes"], eos_bits / n_eos, rtol=1e-5)


def test_a_long_document_is_scored_across_its_rows_once(tiny):
    doc = " ".join(d.decode() for d in EVAL_DOCS).encode() * 2  # ~330 bytes: 11 rows of 32
    s = tiny.cfg.sequence_length
    n_rows = -(-(len(doc) + 2) // s)
    got = tiny.evaluate([doc], 2)
    assert got["data/rows"] == n_rows > 3
    assert got["data/bytes"] == len(doc) and got["data/documents"] == 1
    total = got["bits_per_byte"] * len(doc)
    # every row on its own (a batch with an all-PAD row), through the tokenizer's own cut of the document
    rows = tokenizer.to_rows(tokenizer.encode(doc), s)
    assert len(rows) == n_rows
    per_row = []
    for row in rows:
        batch = np.stack([row, np.full(s, PAD_ID, np.int32)])
        with jax.set_mesh(tiny.run.mesh):
            rb = tiny.eval_step(tiny.state.params, tiny.state.model_state, batch, batch == PAD_ID)[1]
        per_row.append(float(rb.total[0]))
        assert float(rb.total[1]) == 0.0
    np.testing.assert_allclose(sum(per_row), total, rtol=1e-6)
    scorer = TextScorer(tiny.cfg, tiny.run, tiny.state, batch_size=2)
    np.testing.assert_allclose(scorer.bits([doc], eos=True)[0], total, rtol=1e-6)


_DEVICES_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from abstractinator_jax import data, sharding, steps, train_state
    from abstractinator_jax.evaluation import evaluate
    from abstractinator_jax.model import AbstractinatorPyramid
    from tests.helpers import EVAL_DOCS, tiny_discrete_config

    assert jax.device_count() == 4, jax.devices()
    cfg = tiny_discrete_config(seq_len=32, batch_size=2)  # the in-process tests' model (compilation cache)
    batches = data.make_eval_batches(None, 32, 8, documents=EVAL_DOCS)
    model, opt = AbstractinatorPyramid(cfg), train_state.make_optimizer(cfg)
    state = None
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(cfg.mesh, devices=devices)
        if state is None:
            state, sh = train_state.create_train_state(cfg, model, mesh, opt)
        else:  # the same values, placed on the 4-device mesh
            sh = train_state.abstract_train_state(cfg, model, mesh, opt)[1]
            state = jax.device_put(jax.device_get(state), sh)
        with jax.set_mesh(mesh):
            results.append(evaluate(steps.make_eval_step(model, mesh, sh), state, batches, mesh))
    one, four = results
    assert one.keys() == four.keys() and "bits_per_byte" in one
    for k in one:
        np.testing.assert_allclose(four[k], one[k], rtol=1e-6, err_msg=k)
    print("DEVICES_OK", one["bits_per_byte"])
    """
)


def test_four_devices_give_the_figures_of_one():
    env = dict(
        os.environ,
        XLA_FLAGS=xla_flags(devices=4),
        JAX_PLATFORMS="cpu",
        # this session's compilation cache (conftest.py) holds the one-device programs of the tests above
        JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
    proc = subprocess.run(
        [sys.executable, "-c", _DEVICES_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DEVICES_OK" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------------
# lm-eval adapter
# ---------------------------------------------------------------------------------------------------------------------


def _instances(request_type, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type, {}, args, i) for i, args in enumerate(args_list)]


@pytest.fixture(scope="module")
def lm(tiny):
    pytest.importorskip("lm_eval")
    from abstractinator_jax.lm_eval_adapter import AbstractinatorLM

    return AbstractinatorLM(text_scorer=TextScorer(tiny.cfg, tiny.run, tiny.state, batch_size=2))


def test_loglikelihood_is_a_difference_of_rolling_code_lengths(lm):
    pairs = [("The cat sat on the", " mat."), ("", "Birds sing."), ("A café", " serves tea ☕ " * 5)]
    ll = lm.loglikelihood(_instances("loglikelihood", pairs))
    rolling = lm.loglikelihood_rolling(
        _instances("loglikelihood_rolling", [(c + x,) for c, x in pairs] + [(c,) for c, _ in pairs])
    )
    for i, (value, greedy) in enumerate(ll):
        assert math.isfinite(value) and greedy is False
        np.testing.assert_allclose(value, rolling[i] - rolling[len(pairs) + i], rtol=1e-4, atol=1e-4)


def test_generate_until_is_greedy_generation_cut_before_the_first_stop_string(lm):
    """The adapter's continuations are the Generator's greedy ones (generate_text, the same compiled program: batch
    2, one budget bucket), cut before the earliest stop string, and never longer than max_gen_toks bytes."""
    from flax import linen as nn

    from abstractinator_jax import generation as G
    from abstractinator_jax.sharding import LOGICAL_AXIS_RULES

    contexts = ["Once upon a time", ""]
    run = lm.scorer.run
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        full = G.generate_text(
            lm.generator(),
            G.model_variables(lm.scorer.state),
            [c.encode() for c in contexts],
            12,
            G.sampling(greedy=True),
            seed=0,
            mesh=run.mesh,
            budgets=[12, 12],
        )
    texts = [r["continuation"] for r in full]
    stop = texts[0][3:5]
    requests = [
        (contexts[0], {"until": ["never in the text \x00"], "max_gen_toks": 12}),
        (contexts[1], {"until": [], "max_gen_toks": 12}),
        (contexts[0], {"until": ["never in the text \x00", stop], "max_gen_toks": 12}),
        (contexts[1], {"until": "never in the text \x00", "max_gen_toks": 5}),
    ]
    got = lm.generate_until(_instances("generate_until", requests))
    assert got[:2] == texts
    assert got[2] == texts[0][: texts[0].find(stop)] and stop not in got[2]
    assert len(got[3].encode()) <= 5 * 3 and len(got[3]) <= 5  # 5 bytes (U+FFFD, 3 UTF-8 bytes, stands for one)
    assert got[3] == texts[1][: len(got[3])] or "\ufffd" in got[3]


def test_lm_eval_runs_a_local_task_offline(lm, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    choice = [
        {"context": "The cat sat on the", "choices": [" mat.", " moon.", " xqzv"], "label": 0},
        {"context": "Birds sing at", "choices": [" dawn.", " 12345"], "label": 0},
    ]
    texts = [{"text": "Fish swim deep below the blue waves."}, {"text": "Tom ate his soup and asked for more."}]
    gen = [{"context": "Once upon a", "target": " time"}, {"context": "The cat sat", "target": " on the mat"}]
    for name, rows in (("choice", choice), ("text", texts), ("gen", gen)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (tmp_path / "abj_choice.yaml").write_text(
        "task: abj_choice\n"
        + common.format(path=tmp_path / "choice.jsonl")
        + 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{label}}"\n'
        + 'doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n'
    )
    (tmp_path / "abj_text.yaml").write_text(
        "task: abj_text\n"
        + common.format(path=tmp_path / "text.jsonl")
        + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        + "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (tmp_path / "abj_gen.yaml").write_text(
        "task: abj_gen\n"
        + common.format(path=tmp_path / "gen.jsonl")
        + 'output_type: generate_until\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
        + 'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 8\n  do_sample: false\n'
        + "metric_list:\n  - metric: exact_match\n"
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["abj_choice", "abj_text", "abj_gen"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )
    res = out["results"]
    assert 0.0 <= res["abj_choice"]["acc,none"] <= 1.0
    assert 0.0 <= res["abj_gen"]["exact_match,none"] <= 1.0  # generated through generate_until
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isfinite(res["abj_text"][metric]) and res["abj_text"][metric] > 0, metric
    # lm-eval's bits per byte of the texts is the adapter's code length (no EOS) over their UTF-8 bytes
    bits = lm.scorer.bits([t["text"] for t in texts]).sum()
    n_bytes = sum(len(t["text"].encode()) for t in texts)
    np.testing.assert_allclose(res["abj_text"]["bits_per_byte,none"], bits / n_bytes, rtol=1e-4)
