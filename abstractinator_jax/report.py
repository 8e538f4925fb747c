"""The segmentation report: one self-contained HTML file (no network, no external JS or CSS) that shows what a trained
pyramid does to text. For a few held-out rows, per level: the text with each segment shaded and its boundaries
visible, each segment's code id and byte span on hover, and the entropy model's bits per input unit drawn as a line
with the boundary rule's decisions marked; then summary plots over all evaluated rows (segment lengths per level,
code usage as a rank-frequency (Zipf) plot, bytes per segment per document). Plots are inline SVG.

Bytes are bytes: a segment that starts or ends inside a multi-byte UTF-8 character shows the partial bytes in hex
(class `cut`), invalid UTF-8 is drawn with replacement characters, and nothing here raises on any byte sequence.
The extraction (`row_views`) is pure NumPy over `compress_all`'s outputs, so tests can check every span against the
segmentation the model computes.
"""

from __future__ import annotations

import dataclasses
import html
from collections import Counter
from collections.abc import Sequence

import jax
import numpy as np

from .config import BOS_ID, EOS_ID, PAD_ID

__all__ = [
    "LevelView",
    "RowView",
    "row_views",
    "render_report",
    "segmentation_report",
    "CodebookAtlas",
    "dead_codes",
    "atlas_tsv",
]

ATLAS_CODES = 64  # codes shown (with their generated expansion) per level in the HTML atlas; the TSV lists every one


@dataclasses.dataclass
class LevelView:
    """One level of one row. Units are the level's input positions (tokens at level 0, level k-1's valid segment
    slots above); every span is a half-open byte range [start, end) into the row's bytes."""

    unit_spans: list[tuple[int, int]]  # byte span of each real input unit (BOS/EOS: empty spans)
    unit_labels: list[str | None]  # 'BOS' / 'EOS' for special units at level 0, else None
    bits: np.ndarray  # (U,) entropy bits of each unit
    starts: np.ndarray  # (U,) bool, the unit starts a segment
    fired: np.ndarray  # (U,) bool, the boundary rule fired there (a start, or merged away by overflow)
    segments: list[tuple[int, int]]  # per segment: [first unit, last unit + 1)
    segment_spans: list[tuple[int, int]]  # per segment: byte span
    codes: list[int] | None  # per segment, when the level has a quantizer
    overflow: bool


@dataclasses.dataclass
class RowView:
    data: bytes  # the row's real bytes (without BOS / EOS / PAD)
    levels: list[LevelView]


def _rule(bits: np.ndarray, delta: float, abs_threshold: float | None) -> np.ndarray:
    """Where the boundary rule fires (the compressor's rule, docs/ARCHITECTURE.md 3.2 step 3), unit 0 excluded."""
    fired = np.zeros(bits.shape, bool)
    fired[1:] = bits[1:] > bits[:-1] + delta
    if abs_threshold is not None:
        fired[1:] |= bits[1:] > abs_threshold
    return fired


def row_views(ids: np.ndarray, comps: Sequence, level_cfgs: Sequence) -> list[RowView]:
    """Per-row views of `compress_all` outputs (`comps`, one per level, host NumPy) for rows `ids` (B, S)."""
    ids = np.asarray(ids)
    views = []
    for b in range(ids.shape[0]):
        row = ids[b]
        real = row != PAD_ID
        is_byte = real & (row < 256)
        offsets = np.concatenate([[0], np.cumsum(is_byte)])  # byte offset before each token
        data = row[is_byte].astype(np.uint8).tobytes()
        n_units = int(real.sum())
        unit_spans = [(int(offsets[t]), int(offsets[t] + is_byte[t])) for t in range(n_units)]
        labels = [None if is_byte[t] else {BOS_ID: "BOS", EOS_ID: "EOS"}.get(int(row[t]), "?") for t in range(n_units)]
        levels = []
        for comp, lv in zip(comps, level_cfgs):
            seg = comp.segments
            seg_id = np.asarray(seg.seg_id[b])[:n_units]
            bits = np.asarray(comp.entropy.bits[b], np.float64)[:n_units]
            n_seg = int(seg.num_segments[b])
            segments = []
            for j in range(n_seg):
                where = np.flatnonzero(seg_id == j)
                segments.append((int(where[0]), int(where[-1]) + 1) if where.size else (0, 0))
            starts = np.zeros(n_units, bool)
            starts[[s for s, e in segments if e > s]] = True
            seg_spans = [
                (unit_spans[s][0], unit_spans[e - 1][1]) if e > s else (0, 0) for s, e in segments
            ]  # units are contiguous and in order, so a segment's bytes run from its first unit's to its last's
            lq = lv.c_num_queries
            codes = None
            if lv.c_vq_K > 0:
                codes = [int(np.asarray(comp.codes[b])[j * lq]) for j in range(n_seg)]
            levels.append(
                LevelView(
                    unit_spans=unit_spans,
                    unit_labels=labels,
                    bits=bits,
                    starts=starts,
                    fired=_rule(bits, lv.c_entropy_delta, lv.c_entropy_abs_threshold) | starts,
                    segments=segments,
                    segment_spans=seg_spans,
                    codes=codes,
                    overflow=bool(seg.overflow[b]),
                )
            )
            # the next level's units are this level's valid slots: L (= c_num_queries) per segment, in order
            unit_spans = [span for span in seg_spans for _ in range(lq)]
            labels, n_units = [None] * len(unit_spans), len(unit_spans)
        views.append(RowView(data=data, levels=levels))
    return views


# ---------------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; } h3 { font-size: 1em; margin: 1em 0 .3em; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; word-break: break-all; }
.seg { border-right: 2px solid #c33; padding: 1px 0; }
.seg.a { background: #dbe9f8; } .seg.b { background: #f8ecd0; }
.seg.cut { outline: 1px dashed #c33; }
.hex { color: #a00; font-size: .8em; }
.special { color: #777; font-size: .75em; border: 1px solid #bbb; border-radius: 3px; padding: 0 2px; }
.plot { overflow-x: auto; border: 1px solid #eee; }
.meta { color: #555; font-size: .9em; }
table.summary td, table.summary th { padding: 2px 10px; text-align: right; }
"""


def _split_partial(b: bytes) -> tuple[bytes, bytes, bytes]:
    """(leading continuation bytes, the rest, a trailing incomplete multi-byte sequence)."""
    i = 0
    while i < len(b) and i < 3 and 0x80 <= b[i] <= 0xBF:
        i += 1
    head, rest = b[:i], b[i:]
    cut = len(rest)
    for k in range(1, min(4, len(rest)) + 1):
        c = rest[-k]
        if c < 0x80:
            break
        if c >= 0xC0:
            need = 2 if c < 0xE0 else 3 if c < 0xF0 else 4
            if need > k:
                cut = len(rest) - k
            break
    return head, rest[:cut], rest[cut:]


def _hex(b: bytes) -> str:
    return f'<span class="hex">[{" ".join(f"{x:02x}" for x in b)}]</span>' if b else ""


def _segment_html(data: bytes, view: LevelView, j: int, level: int) -> str:
    s, e = view.segment_spans[j]
    first, last = view.segments[j]
    head, body, tail = _split_partial(data[s:e])
    inner = _hex(head) + html.escape(body.decode("utf-8", errors="replace")) + _hex(tail)
    if level == 0:  # BOS / EOS units inside the segment
        specials = [view.unit_labels[u] for u in range(first, last) if view.unit_labels[u]]
        if specials and view.unit_labels[first]:
            inner = f'<span class="special">{specials[0]}</span>' + inner
        if specials and last - 1 != first and view.unit_labels[last - 1]:
            inner += f'<span class="special">{view.unit_labels[last - 1]}</span>'
    code = "" if view.codes is None else f" code {view.codes[j]}"
    title = f"segment {j}:{code} bytes {s}-{e} ({e - s} bytes, {last - first} units)"
    cls = "seg " + ("a" if j % 2 == 0 else "b") + (" cut" if head or tail else "")
    code_attr = "" if view.codes is None else f' data-code="{view.codes[j]}"'
    return (
        f'<span class="{cls}" data-level="{level}" data-segment="{j}" data-start="{s}" data-end="{e}"{code_attr} '
        f'title="{html.escape(title)}">{inner}</span>'
    )


def _entropy_svg(view: LevelView, unit_px: int = 7, height: int = 90) -> str:
    n = len(view.bits)
    if n == 0:
        return ""
    top = max(float(np.max(view.bits)), 1e-6)
    w = max(n * unit_px, 40)

    def y(v):
        return height - 10 - (height - 20) * float(v) / top

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}">']
    for j, (s, e) in enumerate(view.segments):
        if e > s:
            fill = "#dbe9f8" if j % 2 == 0 else "#f8ecd0"
            parts.append(f'<rect x="{s * unit_px}" y="0" width="{(e - s) * unit_px}" height="{height}" fill="{fill}"/>')
    pts = " ".join(f"{i * unit_px + unit_px / 2:.1f},{y(v):.1f}" for i, v in enumerate(view.bits))
    parts.append(f'<polyline points="{pts}" fill="none" stroke="#246" stroke-width="1.2"/>')
    for i in np.flatnonzero(view.fired):
        cx, cy = i * unit_px + unit_px / 2, y(view.bits[i])
        style = 'fill="#c33"' if view.starts[i] else 'fill="none" stroke="#c33"'  # hollow: merged by overflow
        what = "segment start" if view.starts[i] else "rule fired, merged (overflow)"
        parts.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.6" {style}><title>unit {i}: {what}, '
            f"{view.bits[i]:.2f} bits</title></circle>"
        )
    parts.append(f'<text x="2" y="10" font-size="9" fill="#555">{top:.2f} bits</text></svg>')
    return "".join(parts)


def _bar_svg(values: Sequence[float], labels: Sequence[str], title: str, width: int = 520, height: int = 160) -> str:
    if not values:
        return f"<p class='meta'>{html.escape(title)}: no data</p>"
    top = max(max(values), 1e-9)
    bw = max(2.0, (width - 40) / len(values))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{40 + bw * len(values):.0f}" height="{height + 30}">',
        f'<text x="0" y="12" font-size="11">{html.escape(title)}</text>',
        f'<text x="0" y="{height - (height - 20) + 8}" font-size="9">{top:.3g}</text>',  # the tallest bar's value
        f'<text x="20" y="{height}" font-size="9">0</text>',
    ]
    for i, (v, lab) in enumerate(zip(values, labels)):
        h = (height - 20) * v / top
        parts.append(
            f'<rect x="{30 + i * bw:.1f}" y="{height - h:.1f}" width="{bw * 0.85:.1f}" height="{h:.1f}" fill="#4a7">'
            f"<title>{html.escape(lab)}: {v:g}</title></rect>"
        )
    parts.append(f'<text x="30" y="{height + 14}" font-size="9">{html.escape(labels[0])}</text>')
    parts.append(
        f'<text x="{30 + bw * (len(values) - 1):.0f}" y="{height + 14}" font-size="9">'
        f"{html.escape(labels[-1])}</text></svg>"
    )
    return "".join(parts)


def _zipf_svg(counts: np.ndarray, title: str, size: int = 260) -> str:
    counts = np.sort(counts[counts > 0])[::-1]
    if counts.size == 0:
        return f"<p class='meta'>{html.escape(title)}: no codes used</p>"
    lx, ly = np.log10(np.arange(1, counts.size + 1)), np.log10(counts)
    mx, my = max(lx[-1], 1e-9), max(ly[0], 1e-9)
    pts = " ".join(f"{30 + (size - 40) * a / mx:.1f},{size - 20 - (size - 40) * b / my:.1f}" for a, b in zip(lx, ly))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}">'
        f'<text x="0" y="12" font-size="11">{html.escape(title)}</text>'
        f'<polyline points="{pts}" fill="none" stroke="#a44" stroke-width="1.5"/>'
        f'<text x="30" y="{size - 4}" font-size="9">log10 rank (1..{counts.size})</text>'
        f'<text x="2" y="24" font-size="9">log10 count (max {int(counts[0])})</text></svg>'
    )


def _histogram(lengths: np.ndarray, max_bins: int = 40) -> tuple[list[float], list[str]]:
    if lengths.size == 0:
        return [], []
    top = int(min(lengths.max(), max_bins))
    counts = np.bincount(np.minimum(lengths, top), minlength=top + 1)[1:]
    labels = [str(i) for i in range(1, top + 1)]
    labels[-1] = f">={top}" if lengths.max() > top else labels[-1]
    return counts.astype(float).tolist(), labels


def render_report(
    rows: Sequence[RowView],
    stats: dict,
    level_cfgs: Sequence,
    title: str = "Segmentation report",
    atlases: Sequence[CodebookAtlas] = (),
) -> str:
    """The whole report as one HTML document. `stats` comes from `segmentation_report` (or any dict with
    'segment_lengths' [per level arrays], 'code_counts' [per level arrays or None], 'bytes_per_segment' [per
    document])."""
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p class='meta'>Shaded spans are segments (hover for the code id and byte span); a red border ends each "
        "one; <span class='hex'>[hex]</span> marks bytes of a character cut by a boundary. Under each text, the "
        "entropy model's bits per input unit, with the boundary rule's decisions (filled: a segment starts; "
        "hollow: the rule fired but the row had no slot left).</p>",
    ]
    for r, row in enumerate(rows):
        out.append(f"<h2>Row {r} ({len(row.data)} bytes)</h2>")
        for k, view in enumerate(row.levels):
            unit = "tokens (bytes, BOS, EOS)" if k == 0 else f"level-{k - 1} segments"
            flag = " <b>overflow: later segments merged into the last slot</b>" if view.overflow else ""
            ratio = len(row.data) / max(len(view.segments), 1)
            out.append(
                f"<h3>Level {k}: {len(view.segments)} segments over {len(view.bits)} {unit} "
                f"({ratio:.2f} bytes per segment){flag}</h3>"
            )
            segs = "".join(_segment_html(row.data, view, j, k) for j in range(len(view.segments)))
            out.append(f'<div class="text" data-level="{k}">{segs}</div>')
            out.append(f'<div class="plot">{_entropy_svg(view)}</div>')
    out.append("<h2>Summary over the evaluated rows</h2>")
    cells = []
    for k, lengths in enumerate(stats["segment_lengths"]):
        vals, labels = _histogram(np.asarray(lengths, np.int64))
        unit = "bytes" if k == 0 else f"level-{k - 1} segments"
        cells.append(_bar_svg(vals, labels, f"level {k}: segment length ({unit})"))
        counts = stats["code_counts"][k]
        if counts is not None:
            lv = level_cfgs[k]
            cells.append(
                _zipf_svg(
                    np.asarray(counts), f"level {k}: code usage ({len(counts)} of {lv.c_vq_K**lv.c_vq_depth} codes)"
                )
            )
    bps = list(stats["bytes_per_segment"])
    cells.append(_bar_svg(bps, [f"doc {i}" for i in range(len(bps))], "bytes per level-0 segment, per document"))
    out.append("<div>" + "".join(f"<div style='display:inline-block;margin:8px'>{c}</div>" for c in cells) + "</div>")
    rows_html = "".join(
        f"<tr><td>{k}</td><td>{np.mean(lengths) if len(lengths) else 0:.2f}</td><td>{len(lengths)}</td></tr>"
        for k, lengths in enumerate(stats["segment_lengths"])
    )
    out.append(
        "<table class='summary'><tr><th>level</th><th>mean segment length (units)</th><th>segments</th></tr>"
        f"{rows_html}</table>"
    )
    out.extend(_atlas_html(a) for a in atlases)
    out.append("</body></html>")
    return "\n".join(out)


@dataclasses.dataclass
class CodebookAtlas:
    """What each code of a quantized level stands for: the byte strings of the segments that map to it (with
    counts), the codes never used in the evaluated text, and the codes the quantizer's EMA usage calls dead."""

    level: int
    num_codes: int  # K ** depth
    segments: dict[int, Counter]  # code -> Counter(segment bytes)
    dead: list[int]  # stage-0 codes whose EMA usage is below the dead threshold (specials excluded)
    generated: dict[int, bytes] = dataclasses.field(default_factory=dict)  # code -> greedy expansion, when known

    def by_usage(self) -> list[tuple[int, int]]:
        """(code, segments) pairs, most used first."""
        return sorted(((c, sum(n.values())) for c, n in self.segments.items()), key=lambda x: (-x[1], x[0]))


def dead_codes(model_state: dict, level: int, lv) -> list[int]:
    """Stage-0 codes of `level` whose EMA usage (vq_state ema_cluster_size) is below c_vq_dead_threshold, without
    the four reserved specials; [] when the level has no EMA codebook."""
    try:
        size = model_state["vq_state"][f"level_{level}"]["compressor"]["quantizer"]["stage_0"]["ema_cluster_size"]
    except (KeyError, TypeError):
        return []
    size = np.asarray(jax.device_get(size))
    return [int(c) for c in np.flatnonzero(size < lv.c_vq_dead_threshold) if c < lv.c_vq_K - 4]


def _shown(b: bytes) -> str:
    head, body, tail = _split_partial(b)
    text = body.decode("utf-8", errors="replace").replace("\n", "\u21b5").replace("\t", "\u21e5")
    return (f"[{head.hex(' ')}]" if head else "") + text + (f"[{tail.hex(' ')}]" if tail else "")


def atlas_tsv(atlas: CodebookAtlas, per_code: int = 10) -> str:
    """One line per used code, most used first: code, segments, distinct strings, the top strings with counts."""
    lines = ["code\tsegments\tdistinct\tgenerated\ttop_segments"]
    for code, n in atlas.by_usage():
        top = atlas.segments[code].most_common(per_code)
        shown = " | ".join(f"{_shown(b)!r}x{k}" for b, k in top)
        gen = _shown(atlas.generated[code]) if code in atlas.generated else ""
        lines.append(f"{code}\t{n}\t{len(atlas.segments[code])}\t{gen!r}\t{shown}")
    lines.append(f"# dead codes (EMA usage below threshold): {' '.join(map(str, atlas.dead)) or 'none'}")
    return "\n".join(lines) + "\n"


def _atlas_html(atlas: CodebookAtlas, top_codes: int = ATLAS_CODES, per_code: int = 8) -> str:
    used = atlas.by_usage()
    out = [
        f"<h2>Codebook atlas, level {atlas.level}</h2>",
        f"<p class='meta'>{len(used)} of {atlas.num_codes} codes used in the evaluated text; "
        f"{len(atlas.dead)} dead by EMA usage. The {min(top_codes, len(used))} most used codes, each with the "
        "segments that map to it (most frequent first)"
        + (" and what the expander generates from the code alone (greedy)." if atlas.generated else ".")
        + "</p><table class='summary'><tr><th>code</th><th>segments</th><th>distinct</th>"
        + ("<th>generated</th>" if atlas.generated else "")
        + "<th style='text-align:left'>segments (count)</th></tr>",
    ]
    for code, n in used[:top_codes]:
        top = atlas.segments[code].most_common(per_code)
        cells = " ".join(
            f"<span class='seg a' data-code='{code}'>{html.escape(_shown(b))}</span>&times;{k}" for b, k in top
        )
        gen = _shown(atlas.generated.get(code, b""))
        gen = (
            f"<td class='text' style='text-align:left;white-space:pre'>{html.escape(gen)}</td>"
            if atlas.generated
            else ""
        )
        out.append(
            f"<tr data-code='{code}'><td>{code}</td><td>{n}</td><td>{len(atlas.segments[code])}</td>{gen}"
            f"<td class='text' style='text-align:left'>{cells}</td></tr>"
        )
    out.append("</table>")
    dead = " ".join(map(str, atlas.dead[:512])) + (" ..." if len(atlas.dead) > 512 else "")
    out.append(f"<p class='meta'>Dead codes: {dead or 'none'}</p>")
    return "\n".join(out)


def segmentation_report(
    compress_fn,
    batches,
    level_cfgs,
    model_state: dict | None = None,
    max_rows: int = 6,
    title: str = "",
    expand_codes_fn=None,
) -> tuple[str, list[CodebookAtlas]]:
    """Run `compress_fn(ids, pad) -> per-level compressor outputs` over `batches` ({'ids', 'mask'} dicts), show the
    first `max_rows` rows that start a document in detail, summarise every row, and build a codebook atlas for each
    quantized level (dead codes from `model_state`'s quantizer state; `expand_codes_fn(level, codes) -> [bytes]`, when
    given, adds what the expander generates from each shown code alone). Returns (HTML, atlases)."""
    shown: list[RowView] = []
    seg_lengths: list[list[np.ndarray]] = [[] for _ in level_cfgs]
    atlases = {
        k: CodebookAtlas(k, lv.c_vq_K**lv.c_vq_depth, {}, dead_codes(model_state or {}, k, lv))
        for k, lv in enumerate(level_cfgs)
        if lv.c_vq_K > 0
    }
    doc_totals: list[list[int]] = []  # per document (rows in order): [bytes, level-0 segments]
    for batch in batches:
        ids = np.asarray(batch["ids"])
        comps = jax.device_get(compress_fn(ids, ids == PAD_ID))
        for b, view in enumerate(row_views(ids, comps, level_cfgs)):
            if not np.any(ids[b] != PAD_ID):
                continue
            for k, lv in enumerate(view.levels):
                seg_lengths[k].append(np.asarray([e - s for s, e in lv.segments], np.int64))
                if k in atlases:
                    for code, (s, e) in zip(lv.codes, lv.segment_spans):
                        atlases[k].segments.setdefault(code, Counter())[view.data[s:e]] += 1
            if ids[b, 0] == BOS_ID or not doc_totals:  # a row that starts with BOS starts a document
                doc_totals.append([0, 0])
            doc_totals[-1][0] += len(view.data)
            doc_totals[-1][1] += len(view.levels[0].segments)
            if len(shown) < max_rows and ids[b, 0] == BOS_ID:
                shown.append(view)
    if expand_codes_fn is not None:
        for k, atlas in atlases.items():
            shown_codes = [code for code, _ in atlas.by_usage()[:ATLAS_CODES]]
            atlas.generated = dict(zip(shown_codes, expand_codes_fn(k, shown_codes)))
    stats = {
        "segment_lengths": [np.concatenate(x) if x else np.zeros(0, np.int64) for x in seg_lengths],
        "code_counts": [
            np.asarray([n for _, n in atlases[k].by_usage()]) if k in atlases else None for k in range(len(level_cfgs))
        ],
        "bytes_per_segment": [n / max(segs, 1) for n, segs in doc_totals],
    }
    atlas_list = list(atlases.values())
    page = render_report(shown, stats, level_cfgs, title=title or "Segmentation report", atlases=atlas_list)
    return page, atlas_list
