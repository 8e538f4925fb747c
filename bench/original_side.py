"""The PyTorch original's side of the paired benchmarks. Runs in the benchmark's own torch environment
(`.bench-venv/`, made by `bench/vs_original.py --setup`), never in the package's: torch is not a dependency.

    .bench-venv/bin/python bench/original_side.py --original .bench-venv/original --config-json cfg.json

Builds the original's model (its components/ at the commit that `--setup` unpacked) from one of our configs, saved
as JSON by `config.to_dict`, then answers commands read as JSON lines on stdin, one JSON line each on stdout:
  {"cmd": "count"}                            -> parameters per component (our component names)
  {"cmd": "steps", "n": 3, "ids": path}       -> seconds and loss of each of n train steps on the (B, S) int .npy batch
  {"cmd": "components", "reps": 3, "ids": p}  -> median forward+backward seconds per component, and the whole step
  {"cmd": "segmentation", "ids": p, "force": m} -> level 0's segmentation of the batch: bytes per segment etc.; with
                                                   "force" (a (B, S) bool .npy: True on the last byte of each
                                                   segment), first force level 0's boundaries to that mask for
                                                   every later forward (see Original.force_segmentation)
  {"cmd": "quit"}
A train step is the original's: forward (levels, and the top transformer when use_top_code_lm), loss_total plus
top_lm_loss_weight * top_lm_mse_weight * the top loss, backward, global-norm clipping, AdamW.

Attention (`--attention`; the original calls torch's flex_attention in its MLA blocks, components/mla.py, and in its
learned-query pooler, components/learned_query_attention.py):
  flex         its own flex_attention calls, untouched. Needs a CUDA GPU to train: torch (2.13) has no
               flex_attention backward on CPU, eager or compiled ("FlexAttention does not support backward on CPU").
  exact_dense  (the default without CUDA) flex_attention replaced, at every call site, by `exact_flex_attention`:
               plain PyTorch that evaluates the BlockMask's mask_mod and the score_mod over broadcast (b, h, q, kv)
               index tensors, with flex's default scale 1/sqrt(E) and its output 0 for a row with no visible key.
               The same function as flex_attention (bench/check_original_side.py checks the forward against torch's
               own flex_attention, the gradient against torch's reference math_attention, and that training lowers
               the loss), differentiable on any device. It computes all L x S scores where flex skips the blocks
               its BlockMask leaves out, so with a sliding window it does more work than flex's kernel.
  exact_sparse the same function restricted, per query block, to the key blocks the BlockMask lists (its partial and
               full blocks), which is what flex's kernel visits: exact_dense's result with the block-sparse work
               (sliding window: O(S (W + block)) instead of O(S^2)); also checked by check_original_side.py.
  fallback     the original's own `use_flex_attention=False` path (MLA and pooler). At e38a88d its MLA masks the keys
               the block mask keeps (so it attends to future keys and to those beyond the window), indexes the PAD
               mask with a scalar and drops flex's 1/sqrt(r) scale; its pooler's softmax over the empty query slots
               gives NaN gradients, so the loss is NaN from the second step on. Timing only.

Segmentation: by default the original segments with its own entropy model (at initialisation: long segments, as its
weights are random). `Original.force_segmentation(mask)` replaces level 0's Segmenter (the module whose forward
calls `entropy_segments`, components/segment_compressor.py) by `ForcedSegmenter`, which returns the given boundaries
for the batch they were computed on (same seg_id / patch_end_mask / first_byte_idx definitions and dtypes as
`entropy_segments` and Segmenter.forward); the entropy model still runs and trains (its loss is unchanged), only the
boundary decision is forced. bench/vs_original.py uses it to run the original at a trained model's segmentation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

PAD_ID = 258


def _cpu_patches():
    """The original places some RoPE tables on 'cuda' unconditionally; on a machine without CUDA put them on CPU."""
    if torch.cuda.is_available():
        return
    import components.rope as rope

    init = rope.RoPECache.__init__

    def cpu_init(self, *args, **kwargs):
        kwargs["device"] = "cpu"
        init(self, *args, **kwargs)

    rope.RoPECache.__init__ = cpu_init


def _prepare(query, key, value, scale, enable_gqa, return_aux):
    """flex_attention's argument handling: GQA head broadcast, batch broadcast, default scale, working precision."""
    if return_aux is not None:
        raise NotImplementedError("exact flex_attention: return_aux is not supported")
    B, Hq, _, E = query.shape
    if key.size(1) != Hq:
        if not enable_gqa or Hq % key.size(1):
            raise ValueError(f"query heads {Hq} vs key heads {key.size(1)}: set enable_gqa=True for GQA")
        g = Hq // key.size(1)
        key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    key = key.expand(B, *key.shape[1:])
    value = value.expand(B, *value.shape[1:])
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    return key, value, 1.0 / math.sqrt(E) if scale is None else scale, work


def _softmax_values(scores, value, out_dtype):
    """(softmax(scores) @ value, logsumexp) over the last axis; a row of only -inf gives 0 (lse -inf), never NaN,
    in the forward or the backward."""
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # all -inf: exp gives 0
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (row_max + torch.log(denom)).squeeze(-1)  # log(0) = -inf for an empty row, as flex
    return p.to(out_dtype) @ value.to(out_dtype), lse


def exact_flex_attention(
    query,
    key,
    value,
    score_mod=None,
    block_mask=None,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    kernel_options=None,
    *,
    return_aux=None,
):
    """torch.nn.attention.flex_attention.flex_attention, densely, in differentiable PyTorch ops.

    query (B, Hq, L, E), key (B|1, Hkv, S, E), value (B|1, Hkv, S, Ev) -> (B, Hq, L, Ev). As flex_attention:
    scores = query @ key^T * scale (default 1/sqrt(E)) in float32 (float64 for float64 inputs), then
    score_mod(score, b, h, q_idx, kv_idx), then -inf where block_mask.mask_mod(b, h, q_idx, kv_idx) is False,
    softmax over keys, @ value; a row whose scores are all -inf gives 0 (and lse -inf). score_mod and mask_mod are
    called once with broadcast index tensors b (B,1,1,1), h (1,H,1,1), q_idx (1,1,L,1), kv_idx (1,1,1,S) instead of
    flex's per-element vmap: the original's mods use only elementwise ops and tensor indexing, which broadcast.
    """
    del kernel_options  # block sizes etc.: nothing to tune in a dense evaluation
    key, value, scale, work = _prepare(query, key, value, scale, enable_gqa, return_aux)
    B, H, L, _ = query.shape
    S = key.size(2)
    scores = (query.to(work) @ key.to(work).transpose(-2, -1)) * scale  # (B, H, L, S)
    dev = scores.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1, 1)
    q_idx = torch.arange(L, device=dev).view(1, 1, L, 1)
    kv_idx = torch.arange(S, device=dev).view(1, 1, 1, S)
    if score_mod is not None:
        scores = score_mod(scores, b, h, q_idx, kv_idx).to(work)
    if block_mask is not None:
        keep = block_mask.mask_mod(b, h, q_idx, kv_idx)
        scores = scores.masked_fill(~keep.to(torch.bool), float("-inf"))
    out, lse = _softmax_values(scores, value, query.dtype)
    return (out, lse) if return_lse else out


def sparse_flex_attention(
    query,
    key,
    value,
    score_mod=None,
    block_mask=None,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    kernel_options=None,
    *,
    return_aux=None,
):
    """exact_flex_attention restricted to the key blocks the BlockMask lists for each query block (its partial and
    full blocks), as flex's kernel visits them: the same function, with the block-sparse kernel's amount of work.

    Queries are cut into the mask's Q blocks; each gathers its M listed key blocks (M = the most any query block
    lists; unused slots masked), and scores, score_mod, mask_mod (with absolute indices, clamped inside the
    sequence, positions past its end masked) and the softmax run on (B, H, nQ, BQ, M * BK) tensors.
    """
    if block_mask is None:
        return exact_flex_attention(query, key, value, score_mod, None, scale, enable_gqa, return_lse, kernel_options)
    key, value, scale, work = _prepare(query, key, value, scale, enable_gqa, return_aux)
    B, H, L, E = query.shape
    S, Ev = key.size(2), value.size(-1)
    BQ, BK = block_mask.BLOCK_SIZE
    nQ, nK = -(-L // BQ), -(-S // BK)
    dev = query.device
    idx, ok = [], []
    for num, ind in (
        (block_mask.kv_num_blocks, block_mask.kv_indices),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    ):
        if num is None:
            continue
        num = num.expand(B, H, num.size(-1))[:, :, :nQ]
        m = int(num.max()) if num.numel() else 0
        if m:
            idx.append(ind.expand(B, H, *ind.shape[-2:])[:, :, :nQ, :m].long())
            ok.append(torch.arange(m, device=dev) < num[..., None])
    idx, ok = torch.cat(idx, dim=-1), torch.cat(ok, dim=-1)  # (B, H, nQ, M)
    idx = torch.where(ok, idx, torch.zeros_like(idx))
    M = idx.size(-1)
    q = torch.nn.functional.pad(query, (0, 0, 0, nQ * BQ - L)).view(B, H, nQ, BQ, E)
    k = torch.nn.functional.pad(key, (0, 0, 0, nK * BK - S)).view(B, H, nK, BK, E)
    v = torch.nn.functional.pad(value, (0, 0, 0, nK * BK - S)).view(B, H, nK, BK, Ev)
    bi = torch.arange(B, device=dev).view(B, 1, 1, 1)
    hi = torch.arange(H, device=dev).view(1, H, 1, 1)
    k = k[bi, hi, idx].reshape(B, H, nQ, M * BK, E)
    v = v[bi, hi, idx].reshape(B, H, nQ, M * BK, Ev)
    scores = (q.to(work) @ k.to(work).transpose(-2, -1)) * scale  # (B, H, nQ, BQ, M * BK)
    q_idx = (torch.arange(nQ, device=dev)[:, None] * BQ + torch.arange(BQ, device=dev)).view(1, 1, nQ, BQ, 1)
    kv_idx = (idx[..., None] * BK + torch.arange(BK, device=dev)).reshape(B, H, nQ, 1, M * BK)
    inside = (q_idx < L) & (kv_idx < S) & ok.repeat_interleave(BK, dim=-1)[:, :, :, None, :]
    q_idx, kv_idx = q_idx.clamp(max=L - 1), kv_idx.clamp(max=S - 1)
    b, h = bi.view(B, 1, 1, 1, 1), hi.view(1, H, 1, 1, 1)
    if score_mod is not None:
        scores = score_mod(scores, b, h, q_idx, kv_idx).to(work)
    keep = block_mask.mask_mod(b, h, q_idx, kv_idx).to(torch.bool) & inside
    scores = scores.masked_fill(~keep, float("-inf"))
    out, lse = _softmax_values(scores, v, query.dtype)  # (B, H, nQ, BQ, Ev), (B, H, nQ, BQ)
    out = out.reshape(B, H, nQ * BQ, Ev)[:, :, :L]
    return (out, lse.reshape(B, H, nQ * BQ)[:, :, :L]) if return_lse else out


def _exact_attention_patch(fn=None):
    """Replace flex_attention at every call site of the original with `fn` (default exact_flex_attention):
    components/mla.py imports the name at module level (patched in its namespace); the pooler,
    components/learned_query_attention.py, imports it inside forward() from torch's module (patched there)."""
    import components.learned_query_attention as lqa
    import components.mla as mla
    import torch.nn.attention.flex_attention as torch_flex

    fn = fn or exact_flex_attention
    mla.flex_attention = fn
    torch_flex.flex_attention = fn
    assert "flex_attention" not in vars(lqa), "the pooler now imports flex_attention at module level: patch it there"


def _fallback_attention_patch():
    """Switch the original's MLA and pooling attention from flex_attention to its own dense fallback. Note: at
    e38a88d the fallback's MLA masks the keys the block mask keeps, indexes the PAD mask with a scalar and drops the
    1/sqrt(r) scale, and its pooler gives NaN gradients (softmax over empty query slots): the loss it trains is not
    the original's, and NaN after one step. Timing only."""
    import components.learned_query_attention as lqa
    import components.mla as mla

    for cls in (mla.MultiheadLatentAttention, lqa.LearnedQueryAttention):
        init = cls.__init__

        def no_flex(self, *args, _init=init, **kwargs):
            kwargs["use_flex_attention"] = False
            _init(self, *args, **kwargs)

        cls.__init__ = no_flex


def setup_attention(mode: str) -> str:
    """Apply `--attention` (auto: flex with CUDA, else exact_dense) before the model is built; returns the mode."""
    if mode == "auto":
        mode = "flex" if torch.cuda.is_available() else "exact_dense"
    if mode == "exact_dense":
        _exact_attention_patch()
    elif mode == "exact_sparse":
        _exact_attention_patch(sparse_flex_attention)
    elif mode == "fallback":
        _fallback_attention_patch()
    return mode


def build(cfg: dict):
    """(pyramid, top transformer or None) of the original, sized by our config dict."""
    from components.abstractinator_pyramid import AbstractinatorPyramid
    from components.code_sequence_transformer import CodeSequenceTransformer
    from components.config_types import AbstractinatorConfig, PyramidConfig, TopTransformerConfig

    same = [
        "vocab_size",
        "D",
        "c_heads",
        "c_window",
        "c_head_dim",
        "c_kv_comp_dim",
        "c_q_comp_dim",
        "c_retr_dim",
        "c_num_encoder_layers",
        "c_num_shared_encoder_layers",
        "c_num_lm_encoder_layers",
        "c_num_compression_encoder_layers",
        "c_num_queries",
        "c_entropy_delta",
        "c_entropy_abs_threshold",
        "c_output_length",
        "c_vq_K",
        "c_vq_depth",
        "c_vq_d_c",
        "c_vq_beta",
        "c_vq_reset_interval",
        "d_layers",
        "d_heads",
        "d_cross_window",
        "d_residual_conditioning",
        "d_use_sqdist_logits",
        "d_lo_d_c",
        "w_code_ce",
        "w_byte_lm_ce",
        "w_vq",
    ]
    levels = [AbstractinatorConfig(**{k: lv[k] for k in same}) for lv in cfg["levels"]]
    pyramid_cfg = PyramidConfig(levels=levels, use_top_code_lm=bool(cfg["use_top_code_lm"]))
    top = None
    if cfg["use_top_code_lm"]:
        t = cfg["top_transformer_config"]
        keys = ["embed_dim", "dim", "num_layers", "num_heads", "continuous", "head_dim", "kv_comp_dim"]
        keys += ["q_comp_dim", "retr_dim"]
        top = CodeSequenceTransformer(
            TopTransformerConfig(**{k: t[k] for k in keys}, ffn_dim_multiplier=t["ffn_dim_multiplier"])
        )
    return AbstractinatorPyramid(cfg=pyramid_cfg, top_lm=top), top


def count(model, top) -> dict:
    """Parameters per component, named as bench/param_counts.py names ours."""
    out = {}
    names = {
        "embedding": "embedding",
        "compressor.shared_layers": "compressor.shared",
        "compressor.entropy_model": "compressor.entropy",
        "compressor.compression_layers": "compressor.compression",
        "compressor.pooler": "compressor.pooler",
        "compressor.quantizer": "compressor.quantizer",
        "expander": "expander",
    }
    for name, p in model.named_parameters():
        if name.startswith("top_lm."):
            continue
        parts = name.split(".")
        level = f"level{parts[1]}"
        rest = ".".join(parts[2:])
        comp = next((ours for theirs, ours in names.items() if rest.startswith(theirs + ".")), rest)
        key = f"{level}.{comp}"
        out[key] = out.get(key, 0) + p.numel()
    if top is not None:
        out["top"] = sum(p.numel() for p in top.parameters())
    return out


def forced_boundaries(patch_end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(seg_id int64, patch_end_mask bool), both (B, S), as components/utils.py `entropy_segments(...,
    return_boundary=True)` defines them, from a boundary mask (B, S) True on the last token of each segment: token 0
    is in segment 0, token t >= 1 starts a new segment when token t-1 ends one, and the last token always ends one."""
    patch_end = patch_end.to(torch.bool)
    if patch_end.ndim != 2 or not bool(patch_end[:, -1].all()):
        raise ValueError("a forced boundary mask must be (B, S) and True on each row's last token")
    start = torch.zeros_like(patch_end, dtype=torch.long)
    start[:, 1:] = patch_end[:, :-1].long()
    seg_id = torch.cumsum(start, dim=1)
    check = torch.zeros_like(patch_end)
    check[:, :-1] = seg_id[:, 1:] != seg_id[:, :-1]
    check[:, -1] = True
    assert torch.equal(check, patch_end), "forced boundaries do not round-trip through entropy_segments' definition"
    return seg_id, patch_end


def _segmenter_class():
    import components.segment_compressor as sc

    class ForcedSegmenter(sc.Segmenter):
        """components/segment_compressor.py's Segmenter with its boundary decision (`entropy_segments` on the entropy
        bits) replaced by fixed boundaries for one (B, S) batch; the rest of its forward (first_byte_idx) as there."""

        def __init__(self, base, patch_end: torch.Tensor):
            super().__init__(increase_delta=base.increase_delta, abs_threshold=base.abs_threshold)
            seg_id, patch_end = forced_boundaries(patch_end)
            self.register_buffer("forced_seg_id", seg_id, persistent=False)
            self.register_buffer("forced_patch_end", patch_end, persistent=False)

        @torch.no_grad()
        def forward(self, entropy_bits):
            if entropy_bits.shape != self.forced_seg_id.shape:
                raise ValueError(
                    f"forced segmentation is for (B, S) = {tuple(self.forced_seg_id.shape)}, got entropy bits "
                    f"{tuple(entropy_bits.shape)}: force it for the batch being run"
                )
            seg_id = self.forced_seg_id.to(entropy_bits.device)
            patch_end_mask = self.forced_patch_end.to(entropy_bits.device)
            B, S = seg_id.shape  # from here on as Segmenter.forward
            idx = torch.arange(S, device=seg_id.device).expand(B, -1)
            is_start = torch.ones_like(seg_id, dtype=torch.bool)
            is_start[:, 1:] = seg_id[:, 1:] != seg_id[:, :-1]
            first_pos = torch.where(is_start, idx, torch.zeros_like(idx))
            first_byte_idx = torch.cummax(first_pos, dim=1).values
            return sc.SegmentBoundaries(seg_id=seg_id, patch_end_mask=patch_end_mask, first_byte_idx=first_byte_idx)

    return ForcedSegmenter


class Original:
    """The original's model, top transformer, AdamW and train step, built from our config dict."""

    def __init__(self, cfg: dict, compile_model: bool = False):
        torch.manual_seed(cfg.get("seed", 0))
        self.cfg = cfg
        self.model, self.top = build(cfg)
        if cfg.get("stage") == 2:
            self.freeze_levels()
        self.step_model = torch.compile(self.model) if compile_model else self.model
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg["learning_rate"])
        self.w_top = cfg["top_lm_loss_weight"] * cfg["top_lm_mse_weight"]

    def freeze_levels(self) -> None:
        """Stage 2 (the original's train.py with --load_base_from): its pyramid is loaded with
        load_base_components(freeze=True), which sets requires_grad=False and eval mode on the loaded compressors and
        expanders, and the train loop keeps them in eval mode; the optimizer takes the parameters that still need a
        gradient (the top transformer's). At e38a88d both name model.compressors / model.expanders, which the pyramid
        no longer has (its own TODO says so: they live under model.levels), so that path stops with an
        AttributeError; here the same freezing is applied to model.levels. The forward still runs every level
        (compressor and expander, without autograd) and loss_total, as its train step does."""
        for level in self.model.levels:
            level.requires_grad_(False)
            level.eval()

    def loss(self, ids, kpm):
        out = self.step_model(ids, key_padding_mask=kpm)
        loss = out["loss_total"]
        if self.top is not None and "avg_top_code_lm_loss" in out:
            loss = loss + self.w_top * out["avg_top_code_lm_loss"]
        return loss

    def optimizer_update(self):
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["gradient_clip_norm"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def force_segmentation(self, patch_end) -> None:
        """From now on level 0 cuts the batch (B, S) into the segments of `patch_end` (bool (B, S), True on the last
        token of each segment) instead of where its entropy model's bits jump; the entropy model still runs and
        trains. Levels above 0 (their inputs are level 0's rows) keep their own segmentation."""
        comp = self.model.levels[0].compressor
        comp.segmenter = _segmenter_class()(comp.segmenter, torch.as_tensor(np.asarray(patch_end)))

    @torch.no_grad()
    def segmentation(self, ids, kpm) -> dict:
        """Level 0's segmentation of the batch as the compressor's forward computes it (its shared stack, entropy
        model and Segmenter, forced or not: `segment_only`): real bytes, segments (counted as its forward counts
        them for valid_mask), bytes per segment, and the (B, S) patch_end_mask."""
        level = self.model.levels[0]
        seg_id, patch_end = level.compressor.segment_only(level.embedding(ids), kpm)
        seg_real = torch.where(kpm, seg_id.new_full((), -1), seg_id)
        nseg = seg_real.amax(dim=1).clamp(min=-1) + 1
        real = int((~kpm).sum())
        segments = int(nseg.sum())
        return {
            "real_bytes": real,
            "segments": segments,
            "bytes_per_segment": real / max(segments, 1),
            "patch_end_mask": patch_end,
        }

    def train_step(self, ids, kpm) -> float:
        loss = self.loss(ids, kpm)
        loss.backward()
        self.optimizer_update()
        return float(loss.detach())

    def clear_grads(self, *leaves):
        for p in self.model.parameters():
            p.grad = None
        for x in leaves:
            x.grad = None

    def components(self, ids, kpm, reps: int) -> dict:
        """Median seconds (over `reps`, after one untimed call) of forward+backward of each level-0 part on this
        batch, each alone: the compressor (embedding, shared + entropy + compression stacks, segmentation, pooler,
        quantizer) with, as the cotangent of its memory rows, the gradient the expander (and the top) give them;
        the expander on the compressor's memory rows (a leaf that needs its gradient) with its code CE; the top
        transformer on the top level's rows with its masked MSE (when use_top_code_lm); the optimizer update
        (clipping + AdamW) on a real step's gradients; and, not parts, the whole loss's forward+backward and the whole
        train step."""
        import torch.nn.functional as F

        level, lv = self.model.levels[0], self.cfg["levels"][0]
        use_top = self.top is not None and self.cfg["use_top_code_lm"]

        def timed(fn, prep=lambda: None):
            times = []
            for i in range(reps + 1):
                prep()
                t = time.perf_counter()
                fn()
                if i:
                    times.append(time.perf_counter() - t)
            self.clear_grads(*leaves)
            return float(np.median(times))

        with torch.no_grad():
            comp_outs = self.model.compress_all(ids, kpm)
        comp = comp_outs[0]["comp_out"]
        mem = comp.pre_vq_embeddings.detach().clone().requires_grad_(True)
        leaves = [mem]
        nq = level.compressor.num_queries_per_segment
        src_kpm = ~comp.valid_mask if nq == 1 else ~comp.valid_mask.repeat_interleave(nq, dim=1)
        seg_ids = (comp.seg_id * nq if nq > 1 else comp.seg_id).clamp(min=0, max=mem.size(1) - 1)

        def expander():
            logits = level.expander(
                codes_hi=mem, codes_lo=ids, src_key_padding_mask=src_kpm, tgt_key_padding_mask=kpm, seg_ids=seg_ids
            )
            ce = F.cross_entropy(logits["stage_logits"][0].transpose(1, 2), ids)
            (lv["w_code_ce"] * ce).backward()

        out = {}
        if use_top:
            top_co = comp_outs[-1]["comp_out"]
            top_mem = top_co.pre_vq_embeddings.detach().clone().requires_grad_(True)
            kpm_in = (~top_co.valid_mask)[:, :-1]
            leaves.append(top_mem)

            def top():  # as AbstractinatorPyramid.forward: rows predict the next row, target not detached
                pred = self.top(top_mem[:, :-1], key_padding_mask=kpm_in)["predictions_pre_vq"]
                valid = (~kpm_in).float()
                mse = ((pred - top_mem[:, 1:]) ** 2).mean(dim=-1)
                mse = (mse * valid).sum() / valid.sum().clamp(min=1)
                (self.w_top * mse).backward()

            top()
            top_ct = top_mem.grad.clone()
            self.clear_grads(*leaves)
            out["top"] = timed(top)
        expander()
        mem_ct = mem.grad.clone()
        if use_top and len(self.model.levels) == 1:
            mem_ct = mem_ct + top_ct
        self.clear_grads(*leaves)
        out["expander"] = timed(expander)

        def compressor():
            c = level.compressor(level.embedding(ids), key_padding_mask=kpm, token_ids=ids)
            torch.autograd.backward([lv["w_byte_lm_ce"] * c.entropy_loss, c.pre_vq_embeddings], [None, mem_ct])

        out["compressor"] = timed(compressor)

        out["forward_backward"] = timed(lambda: self.loss(ids, kpm).backward())
        self.loss(ids, kpm).backward()
        grads = [(p, p.grad.clone()) for p in self.model.parameters() if p.grad is not None]

        def restore():
            for p, g in grads:
                p.grad = g.clone()

        out["optimizer"] = timed(self.optimizer_update, restore)
        out["step"] = timed(lambda: self.train_step(ids, kpm))
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", required=True, help="the original's source tree (components/, experiments/)")
    ap.add_argument("--config-json", required=True)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model, as the original's train.py does")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument(
        "--attention",
        choices=("auto", "flex", "exact_dense", "exact_sparse", "fallback"),
        default="auto",
        help="auto (flex with CUDA, else exact_dense), flex, exact_dense, exact_sparse or fallback: see the module "
        "docstring",
    )
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.original))
    torch.set_num_threads(args.threads)
    _cpu_patches()
    attention = setup_attention(args.attention)
    with open(args.config_json) as f:
        cfg = json.load(f)
    orig = Original(cfg, args.compile)

    info = {"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(), "attention": attention}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "count":
            print(json.dumps(count(orig.model, orig.top)), flush=True)
            continue
        ids = torch.from_numpy(np.load(cmd["ids"]).astype(np.int64))
        kpm = ids == PAD_ID
        if cmd["cmd"] == "steps":
            times, losses = [], []
            for _ in range(cmd["n"]):
                t = time.perf_counter()
                losses.append(orig.train_step(ids, kpm))
                times.append(time.perf_counter() - t)
            ok = all(math.isfinite(x) for x in losses)
            print(json.dumps({"seconds": times, "loss": losses, "finite": ok}), flush=True)
        elif cmd["cmd"] == "components":
            print(json.dumps(orig.components(ids, kpm, cmd["reps"])), flush=True)
        elif cmd["cmd"] == "segmentation":
            forced = None
            if cmd.get("force"):
                forced = np.load(cmd["force"]).astype(bool)
                orig.force_segmentation(forced)
            seg = orig.segmentation(ids, kpm)
            mask = seg.pop("patch_end_mask").numpy()
            seg["forced"] = forced is not None
            if forced is not None:
                seg["matches_forced"] = bool(np.array_equal(mask, forced))
            print(json.dumps(seg), flush=True)


if __name__ == "__main__":
    main()
