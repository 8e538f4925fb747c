"""The segmentation report: every segment element carries the byte span the model's own segmentation gives (checked
by a loop over tokens written here), for a 1-level and a 2-level pyramid, and non-ASCII text (Chinese, emoji,
invalid UTF-8) renders without loss: the shown text and hex of each segment give back its bytes."""

from __future__ import annotations

import copy
import re
from html.parser import HTMLParser

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from abstractinator_jax import tokenizer
from abstractinator_jax.config import BOS_ID, EOS_ID, PAD_ID, validate_config
from abstractinator_jax.model import AbstractinatorPyramid
from abstractinator_jax.report import atlas_tsv, dead_codes, render_report, row_views, segmentation_report

from .helpers import tiny_config

SEQ = 64
DOCS = [
    b"The cat sat on the mat. It was warm.",
    "红楼梦是一部小说。😀 emoji 🎉 end".encode(),
    b"bad \xff\xfe bytes \xc3 cut \xe4\xb8",
    b"A long document that does not fit into a single row of sixty-four bytes, so it continues.",
]


def _config(levels: int):
    cfg = tiny_config(seq_len=SEQ, batch_size=len(DOCS))
    lv0 = cfg.levels[0]
    lv0.c_entropy_delta = 0.0  # random weights: many boundaries, some inside multi-byte characters
    lv0.c_output_length = SEQ
    if levels == 2:
        lv0.c_vq_K, lv0.c_vq_d_c, lv0.c_vq_depth = 16, 8, 2
        lv1 = copy.deepcopy(lv0)
        lv1.c_output_length = 16  # fewer slots than level-0 segments: overflow rows happen too
        lv1.c_vq_depth = 1
        lv1.c_entropy_delta = -0.05
        cfg.levels = [lv0, lv1]
        cfg.num_levels = 2
    return validate_config(cfg)


def _rows():
    return np.stack([tokenizer.to_rows(tokenizer.encode(d), SEQ)[0] for d in DOCS])


@pytest.fixture(scope="module", params=[1, 2], ids=["1-level", "2-level"])
def compressed(request):
    cfg = _config(request.param)
    model = AbstractinatorPyramid(cfg)
    ids = _rows()
    variables = model.init(jax.random.key(0), ids, ids == PAD_ID)

    @jax.jit
    def compress(ids, pad):
        return model.apply(variables, ids, pad, method=model.compress_all)

    return cfg, ids, compress, jax.device_get(compress(ids, ids == PAD_ID)), variables


def _level0_bytes_by_loop(row, seg_id, n_seg):
    """Bytes of each level-0 segment: byte tokens grouped by their segment id (a plain loop over positions)."""
    out = [b"" for _ in range(n_seg)]
    for t, tok in enumerate(row):
        if tok != PAD_ID and tok < 256:
            out[seg_id[t]] += bytes([tok])
    return out


def test_spans_match_the_model_segmentation(compressed):
    cfg, ids, _, comps, _ = compressed
    views = row_views(ids, comps, cfg.levels)
    for b, view in enumerate(views):
        assert view.data == bytes(t for t in ids[b] if t < 256)
        seg0 = comps[0].segments
        n0 = int(seg0.num_segments[b])
        want0 = _level0_bytes_by_loop(ids[b], np.asarray(seg0.seg_id[b]), n0)
        got0 = [view.data[s:e] for s, e in view.levels[0].segment_spans]
        assert got0 == want0
        assert len(view.levels[0].segments) == n0
        if len(cfg.levels) == 2:
            seg1 = comps[1].segments
            n1 = int(seg1.num_segments[b])
            sid1 = np.asarray(seg1.seg_id[b])
            valid0 = np.asarray(comps[0].valid_mask[b])
            want1 = [b""] * n1
            for q in range(len(valid0)):  # level-1 segment j = the bytes of the level-0 slots it holds
                if valid0[q]:
                    want1[sid1[q]] += want0[q]
            assert [view.data[s:e] for s, e in view.levels[1].segment_spans] == want1
            assert view.levels[1].codes == [int(c) for c in np.asarray(comps[1].codes[b])[:n1]]


class _Segments(HTMLParser):
    """Collects every segment element: its attributes, its text, and its hex-marked bytes."""

    def __init__(self):
        super().__init__()
        self.segments, self._stack = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "")
        if tag == "span" and cls.split()[:1] == ["seg"]:
            self.segments.append({**a, "text": "", "hex": [], "special": []})
            self._stack.append("seg")
        elif tag == "span" and self._stack:
            self._stack.append(cls)

    def handle_endtag(self, tag):
        if tag == "span" and self._stack:
            self._stack.pop()

    def handle_data(self, data):
        if not self._stack:
            return
        seg = self.segments[-1]
        if self._stack[-1] == "hex":
            seg["hex"].append(data)
        elif self._stack[-1] == "special":
            seg["special"].append(data)
        else:
            seg["text"] += data


def test_report_has_one_element_per_segment_with_its_span_and_bytes(compressed):
    cfg, ids, compress, comps, _ = compressed
    views = row_views(ids, comps, cfg.levels)
    stats = {
        "segment_lengths": [np.ones(3, np.int64)] * len(cfg.levels),
        "code_counts": [None] * len(cfg.levels),
        "bytes_per_segment": [1.0],
    }
    page = render_report(views, stats, cfg.levels)
    parser = _Segments()
    parser.feed(page)
    parser.close()
    want = [
        (r, k, j, s, e)
        for r, v in enumerate(views)
        for k, lv in enumerate(v.levels)
        for j, (s, e) in enumerate(lv.segment_spans)
    ]
    assert len(parser.segments) == len(want)
    cuts = 0
    for seg, (r, k, j, s, e) in zip(parser.segments, want):
        assert (int(seg["data-level"]), int(seg["data-segment"])) == (k, j)
        assert (int(seg["data-start"]), int(seg["data-end"])) == (s, e)
        raw = views[r].data[s:e]
        hexed = b"".join(bytes.fromhex(h.strip("[]")) for h in seg["hex"])
        if r != 2:  # valid UTF-8 documents: shown text + hex give back the segment's bytes exactly
            assert sorted(hexed + seg["text"].encode()) == sorted(raw)
            assert seg["text"].encode() in raw
        cuts += "cut" in seg["class"].split()
    assert cuts > 0  # with these weights some boundary falls inside a multi-byte character
    # the whole report is produced from batches too (summary plots), and stays one self-contained file
    full, atlases = segmentation_report(compress, [{"ids": ids, "mask": ids == PAD_ID}], cfg.levels, max_rows=2)
    assert "<script src" not in full and "http://" not in re.sub(r'xmlns="http://www.w3.org/2000/svg"', "", full)
    assert full.count('data-level="0" data-segment="0"') == 2


def test_codebook_atlas_counts_the_segments_of_each_code(compressed):
    cfg, ids, compress, comps, _ = compressed
    k = len(cfg.levels) - 1 if len(cfg.levels) == 2 else None
    if k is None:
        pytest.skip("the 1-level config has no quantizer")
    lv = cfg.levels[0]
    # level 0's atlas, by a loop: code of each valid slot -> the bytes of its segment
    want: dict[int, dict[bytes, int]] = {}
    for b in range(ids.shape[0]):
        n = int(comps[0].segments.num_segments[b])
        seg_bytes = _level0_bytes_by_loop(ids[b], np.asarray(comps[0].segments.seg_id[b]), n)
        for j in range(n):
            code = int(comps[0].codes[b, j])
            want.setdefault(code, {}).setdefault(seg_bytes[j], 0)
            want[code][seg_bytes[j]] += 1
    state = {
        "vq_state": {
            "level_0": {
                "compressor": {
                    "quantizer": {"stage_0": {"ema_cluster_size": np.where(np.arange(lv.c_vq_K) % 3 == 0, 0.5, 2.0)}}
                }
            }
        }
    }
    page, atlases = segmentation_report(compress, [{"ids": ids, "mask": ids == PAD_ID}], cfg.levels, state)
    atlas0 = atlases[0]
    assert {c: dict(n) for c, n in atlas0.segments.items()} == want
    assert atlas0.dead == [c for c in range(lv.c_vq_K - 4) if c % 3 == 0] == dead_codes(state, 0, lv)
    usage = atlas0.by_usage()
    assert [n for _, n in usage] == sorted((sum(v.values()) for v in want.values()), reverse=True)
    tsv = atlas_tsv(atlas0).splitlines()
    assert tsv[0].startswith("code\tsegments") and len(tsv) == len(want) + 2
    assert int(tsv[1].split("\t")[0]) == usage[0][0] and int(tsv[1].split("\t")[1]) == usage[0][1]
    assert f"<tr data-code='{usage[0][0]}'>" in page and "Codebook atlas, level 0" in page


def test_report_files_for_a_pyramid_and_greedy_code_expansion(compressed, tmp_path):
    """write_report (behind evaluate.py --report): the HTML page and one atlas TSV per quantized level, the atlas
    counts adding up to the segments read, and each shown code's expansion a greedy decode of the expander under that
    code alone: every generated id is the argmax of the teacher-forced logits given the ids before it."""
    from types import SimpleNamespace

    from abstractinator_jax.code_expansion import CodeExpander
    from abstractinator_jax.evaluation import report_paths, write_report

    cfg, ids, compress, comps, variables = compressed
    variables = nn.meta.unbox(variables)  # as a train state holds them
    model = AbstractinatorPyramid(cfg)
    state = SimpleNamespace(
        params=variables["params"], frozen_params={}, model_state={k: v for k, v in variables.items() if k != "params"}
    )
    batches = [{"ids": ids, "mask": ids == PAD_ID}]
    paths = write_report(cfg, model, state, batches, tmp_path / "report.html", rows=2, title="t")
    assert paths == report_paths(tmp_path / "report.html", cfg)
    quantized = [k for k, lv in enumerate(cfg.levels) if lv.c_vq_K > 0]
    assert [p.name for p in paths] == ["report.html"] + [f"report.level{k}.atlas.tsv" for k in quantized]
    page = paths[0].read_text(encoding="utf-8")
    parser = _Segments()
    parser.feed(page)
    assert len(parser.segments) > 0
    for k, tsv in zip(quantized, paths[1:]):
        lines = [ln.split("\t") for ln in tsv.read_text(encoding="utf-8").splitlines()[1:-1]]
        read = int(np.sum(comps[k].segments.num_segments))
        assert sum(int(ln[1]) for ln in lines) == read  # every segment of the rows counted once
        assert f"Codebook atlas, level {k}" in page
    if not quantized:
        return

    # level 0's expansion against the teacher-forced expander
    expander = CodeExpander(model, variables, cfg)
    codes = np.unique(np.asarray(comps[0].codes)[np.asarray(comps[0].valid_mask)])[:6]
    cap = cfg.levels[0].gen_max_segment_len
    # where each expansion stops, by a loop: the uncut greedy ids, cut before the first id t >= 1 that starts a new
    # segment of [BOS] + ids under the level's own rule, or after an EOS, or at the cap
    uncut = np.asarray(expander._program(0)(variables, jnp.asarray(np.resize(codes, 64).astype(np.int32)))[0])
    rows = np.concatenate([np.full((64, 1), BOS_ID), uncut], axis=1).astype(np.int32)
    seg = np.asarray(
        jax.jit(lambda v, r: model.apply(v, r, r == PAD_ID, method=model.compress_all)[0])(
            variables, rows
        ).segments.seg_id
    )
    for i, (code, gen) in enumerate(zip(codes, expander.expand(0, codes))):
        want = cap
        for t in range(1, cap):
            if seg[i, t + 1] != seg[i, t] or uncut[i, t - 1] == EOS_ID:
                want = t
                break
        assert gen == [int(x) for x in uncut[i, :want]], (code, gen, want)
        assert 1 <= len(gen) <= cap
        assert expander.expand(0, [code])[0] == gen  # the same alone as in a batch

        def logits(m, targets, code):
            level = m.levels[0]
            row = level.compressor.quantizer.decode(code)[:, None]
            t = targets.shape[1]
            out, _ = level.expander(
                row, jnp.ones((1, 1), bool), targets, jnp.zeros((1, t), bool), jnp.zeros((1, t), int)
            )
            return out[0]

        lg = np.asarray(model.apply(variables, jnp.asarray([gen]), jnp.asarray([code]), method=logits))[0]  # (T, V)
        allowed = (np.arange(lg.shape[-1]) < 256) | (np.arange(lg.shape[-1]) == EOS_ID)
        for t, tok in enumerate(gen):
            assert tok == int(np.argmax(np.where(allowed, lg[t], -np.inf))), (code, t, gen)
    # bytes of an upper code: the lower codes it expands to, each expanded to bytes
    if len(cfg.levels) == 2:
        up = int(np.asarray(comps[1].codes)[0, 0])
        lower = expander.expand(1, [up])[0]
        assert expander.to_bytes(1, [up])[0] == b"".join(expander.to_bytes(0, lower))
