"""Checks that the original's `--attention exact_dense` (bench/original_side.py) is the original's flex_attention,
on this CPU. Runs in the benchmark's torch environment; normally started by

    python bench/vs_original.py --check --config configs/stage1_super_tiny.py --batch_size 2 --sequence_length 128

which saves the config as JSON and a real-text batch as .npy, then runs

    .bench-venv/bin/python bench/check_original_side.py --original .bench-venv/original --config-json cfg.json \
        --ids ids.npy

1. every flex_attention call of one forward pass of the original (its MLA blocks: sliding window in the compressor,
   causal in the expander and the top transformer; its learned-query pooler), on the batch repeated to >= 384
   bytes (3 key blocks) with the last row's tail padded: for exact_flex_attention (exact_dense) and
   sparse_flex_attention (exact_sparse), the output against torch's own flex_attention forward (eager;
   `--compiled-flex` also against the compiled CPU kernel), max abs difference <= 1e-5 and no NaN; and the gradient
   against autograd through torch's reference math_attention (float64, max abs difference <= 1e-9 relative to the
   gradient's size);
2. `--steps` (20) train steps of the original with each mode on the repeated unpadded batch: a finite loss that goes
   down, and the same losses in both modes;
3. forced segmentation (`Original.force_segmentation`, used by `vs_original.py --segmentation trained`): forcing
   the original's own level-0 boundaries gives the same seg_id / patch_end_mask / first_byte_idx as its Segmenter
   and the same loss and gradients as an unforced twin (same seed); forcing other boundaries (a segment
   every 3 bytes) gives 3 bytes per segment and finite, trainable losses.
Also reports (INFO, not checked) that the untouched flex_attention cannot train on CPU, and the loss the original's
own dense fallback gives over 3 steps. Prints PASS/FAIL lines; exits 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import original_side as side  # noqa: E402
from torch._higher_order_ops.flex_attention import math_attention  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention as REAL_FLEX  # noqa: E402

FWD_TOL = 1e-5
GRAD_TOL = 1e-9


FUNCS = {"exact_dense": side.exact_flex_attention, "exact_sparse": side.sparse_flex_attention}


class Recorder:
    """A flex_attention stand-in that compares exact_flex_attention and sparse_flex_attention with torch's
    flex_attention at each call site and returns exact_flex_attention's output."""

    def __init__(self, compiled: bool):
        self.sites: dict[str, dict] = {}
        self.compiled = torch.compile(REAL_FLEX) if compiled else None

    def __call__(self, q, k, v, score_mod=None, block_mask=None, **kw):
        caller = sys._getframe(1).f_code.co_qualname
        mod = block_mask.mask_mod if block_mask is not None else None
        mask = getattr(mod, "__qualname__", None)
        mask = mask if isinstance(mask, str) else getattr(getattr(mod, "__code__", None), "co_qualname", repr(mod))
        name = f"{caller} [{mask}]"
        site = self.sites.setdefault(name, {"calls": 0, "shapes": set(), **{f: {} for f in FUNCS}})
        site["calls"] += 1
        site["shapes"].add(f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
        q0, k0, v0 = (t.detach() for t in (q, k, v))
        with torch.no_grad():
            ref = REAL_FLEX(q0, k0, v0, score_mod=score_mod, block_mask=block_mask, **kw)
            ref_c = None
            if self.compiled is not None:
                ref_c = self.compiled(q0, k0, v0, score_mod=score_mod, block_mask=block_mask, **kw)
        # gradient reference: autograd through torch's reference math (float64)
        with torch.enable_grad():
            qd, kd, vd = (t.double().requires_grad_(True) for t in (q0, k0, v0))
            scale = kw.get("scale") or 1.0 / math.sqrt(q.size(-1))
            mod = score_mod if score_mod is not None else (lambda s, *_: s)
            ref_out, _, _ = math_attention(qd, kd, vd, mod, block_mask.as_tuple(), scale, {})
            ct = torch.randn_like(ref_out)
            g_ref = torch.autograd.grad(ref_out, (qd, kd, vd), ct)
        for fname, fn in FUNCS.items():
            r = site[fname]
            with torch.no_grad():
                ours = fn(q0, k0, v0, score_mod=score_mod, block_mask=block_mask, **kw)
            bad = not torch.isfinite(ours).all()
            r["fwd"] = math.inf if bad else max(r.get("fwd", 0.0), float((ref - ours).abs().max()))
            if ref_c is not None:
                r["fwd_compiled"] = max(r.get("fwd_compiled", 0.0), float((ref_c - ours).abs().max()))
            with torch.enable_grad():
                out = fn(qd, kd, vd, score_mod=score_mod, block_mask=block_mask, **kw)
                g = torch.autograd.grad(out, (qd, kd, vd), ct)
            for a, b in zip(g_ref, g):
                rel = float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))
                r["grad"] = max(r.get("grad", 0.0), rel if torch.isfinite(b).all() else math.inf)
        return side.exact_flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, **kw)


def check_forced_segmentation(cfg: dict, ids, kpm, report) -> None:
    """Check 3 of the module docstring."""
    import components.segment_compressor as sc

    side._exact_attention_patch()
    free, forced = side.Original(cfg), side.Original(cfg)  # same seed: twins
    own = free.segmentation(ids, kpm)
    forced.force_segmentation(own["patch_end_mask"])
    again = forced.segmentation(ids, kpm)
    with torch.no_grad():
        level = free.model.levels[0]
        bits = level.compressor.entropy_model.entropy(level.compressor._run_shared(level.embedding(ids), kpm), kpm)
        want = sc.Segmenter.forward(level.compressor.segmenter, bits)
        got = forced.model.levels[0].compressor.segmenter(bits)
    same = all(
        torch.equal(getattr(want, k), getattr(got, k)) and getattr(want, k).dtype == getattr(got, k).dtype
        for k in ("seg_id", "patch_end_mask", "first_byte_idx")
    )
    report(
        same and torch.equal(again["patch_end_mask"], own["patch_end_mask"]),
        f"forcing the original's own boundaries ({own['bytes_per_segment']:.2f} bytes/segment) reproduces its "
        "Segmenter's seg_id, patch_end_mask and first_byte_idx (values and dtypes)",
    )
    la, lb = free.loss(ids, kpm), forced.loss(ids, kpm)
    la.backward()
    lb.backward()
    la, lb = la.item(), lb.item()
    grads = [(p.grad, q.grad) for p, q in zip(free.model.parameters(), forced.model.parameters())]
    same_grads = all((g is None and h is None) or torch.equal(g, h) for g, h in grads)
    report(  # one step only: after it the unforced twin's entropy model has moved its boundaries, the forced not
        la == lb and same_grads,
        f"... and the same loss ({la:.6f} vs {lb:.6f}) and gradients (equal: {same_grads})",
    )
    every3 = torch.zeros_like(kpm)
    every3[:, 2::3] = True
    every3[:, -1] = True
    other = side.Original(cfg)
    other.force_segmentation(every3)
    seg = other.segmentation(ids, kpm)
    losses = [other.train_step(ids, kpm) for _ in range(5)]
    report(
        abs(seg["bytes_per_segment"] - 3) < 0.05 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0],
        f"forcing a segment every 3 bytes: {seg['bytes_per_segment']:.3f} bytes/segment, losses "
        + " ".join(f"{x:.4f}" for x in losses),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", required=True)
    ap.add_argument("--config-json", required=True)
    ap.add_argument("--ids", required=True, help="(B, S) int .npy of real text, no PAD")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compiled-flex", action="store_true", help="also compare with torch.compile(flex_attention)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.original))
    torch.set_num_threads(args.threads)
    side._cpu_patches()
    with open(args.config_json) as f:
        cfg = json.load(f)
    ids = torch.from_numpy(np.load(args.ids).astype(np.int64))
    kpm = ids == side.PAD_ID
    failed = []

    def report(ok: bool, what: str):
        print(f"{'PASS' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            failed.append(what)

    # INFO: the untouched flex_attention on this machine
    if not torch.cuda.is_available():
        orig = side.Original(cfg)
        try:
            orig.loss(ids, kpm).backward()
            print("INFO flex_attention: the original's backward ran on CPU", flush=True)
        except NotImplementedError as e:
            print(f"INFO flex_attention cannot train here: {str(e).splitlines()[0]}", flush=True)

    # 1. each call site, one forward with padding, on at least 3 blocks of 128 keys (the sparse path's blocks)
    recorder = Recorder(args.compiled_flex)
    side._exact_attention_patch(recorder)
    orig = side.Original(cfg)
    padded = ids.repeat(1, -(-384 // ids.size(1)))
    pad = torch.zeros_like(padded, dtype=torch.bool)
    tail = padded.size(1) // 5
    padded[-1, -tail:] = side.PAD_ID
    pad[-1, -tail:] = True
    with torch.no_grad():
        orig.model(padded, key_padding_mask=pad)
        if orig.top is not None:  # the top transformer's blocks, eagerly (its forward is torch.compile'd)
            x = orig.top.in_proj(torch.randn(ids.size(0), 300, orig.top.embed_dim))
            top_pad = torch.zeros(ids.size(0), 300, dtype=torch.bool)
            top_pad[-1, -50:] = True
            for layer in orig.top.encoder:
                x = layer(x, key_padding_mask=top_pad)
    for name, site in recorder.sites.items():
        shapes = ", ".join(sorted(site["shapes"]))
        for fname in FUNCS:
            r = site[fname]
            fwd = r["fwd"] <= FWD_TOL and r.get("fwd_compiled", 0.0) <= FWD_TOL
            compiled = f", vs compiled flex {r['fwd_compiled']:.2e}" if "fwd_compiled" in r else ""
            report(
                fwd and r["grad"] <= GRAD_TOL,
                f"{fname} at {name} ({site['calls']} calls, {shapes}): forward max |{fname} - flex| {r['fwd']:.2e}"
                f"{compiled}; gradient max |{fname} - math_attention| / max |grad| {r['grad']:.2e}",
            )
    names = " ".join(recorder.sites)
    for needed in ("MultiheadLatentAttention", "LearnedQueryAttention"):
        report(needed in names, f"call site {needed} exercised")

    # 2. training with each exact mode on the repeated batch
    curves = {}
    for mode, fn in FUNCS.items():
        side._exact_attention_patch(fn)
        orig = side.Original(cfg)
        losses = curves[mode] = [orig.train_step(ids, kpm) for _ in range(args.steps)]
        print(f"INFO {mode} losses: " + " ".join(f"{x:.4f}" for x in losses), flush=True)
        finite = all(math.isfinite(x) for x in losses)
        report(
            finite and losses[-1] < losses[0] and min(losses[-5:]) < losses[0],
            f"{args.steps} {mode} train steps: finite loss, {losses[0]:.4f} -> {losses[-1]:.4f}",
        )
    gap = max(abs(a - b) for a, b in zip(*curves.values()))
    report(gap <= 1e-3, f"exact_dense and exact_sparse train alike: max loss difference {gap:.2e}")

    # 3. forced segmentation
    check_forced_segmentation(cfg, ids, kpm, report)

    # INFO: the original's own dense fallback (timing only)
    side._fallback_attention_patch()
    orig = side.Original(cfg)
    fb = " ".join(f"{orig.train_step(ids, kpm):.4f}" for _ in range(3))
    print(f"INFO the original's fallback attention (--attention fallback), 3 train steps: {fb}", flush=True)

    print("ALL PASS" if not failed else f"{len(failed)} FAILED", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
