"""The PyTorch original's side of the paired benchmarks. Runs in the benchmark's own torch environment
(`.bench-venv/`, made by `bench/vs_original.py --setup`), never in the package's: torch is not a dependency.

    .bench-venv/bin/python bench/original_side.py --original .bench-venv/original --config-json cfg.json

Builds the original's model (its components/ at the commit that `--setup` unpacked) from one of our configs, saved
as JSON by `config.to_dict`, then answers commands read as JSON lines on stdin, one JSON line each on stdout:
  {"cmd": "count"}                          -> parameters per component (our component names)
  {"cmd": "steps", "n": 3, "ids": path}     -> seconds of each of n train steps on the (B, S) int32 .npy batch
  {"cmd": "quit"}
A train step is the original's: forward (levels, and the top transformer when use_top_code_lm), loss_total plus
top_lm_loss_weight * top_lm_mse_weight * the top loss, backward, global-norm clipping, AdamW.
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


def _dense_attention_patch():
    """Switch the original's MLA and pooling attention from flex_attention to its own dense fallback (torch has no
    flex_attention backward on CPU in eager mode). Same FLOPs as a dense mask, but note: at e38a88d the fallback
    masks the keys the block mask keeps and indexes the PAD mask with a scalar, so the loss it trains is not the
    original's; use it for timing only."""
    import components.learned_query_attention as lqa
    import components.mla as mla

    for cls in (mla.MultiheadLatentAttention, lqa.LearnedQueryAttention):
        init = cls.__init__

        def no_flex(self, *args, _init=init, **kwargs):
            kwargs["use_flex_attention"] = False
            _init(self, *args, **kwargs)

        cls.__init__ = no_flex


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--original", required=True, help="the original's source tree (components/, experiments/)")
    ap.add_argument("--config-json", required=True)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model, as the original's train.py does")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument(
        "--attention",
        choices=("flex", "dense"),
        default="flex",
        help="the original's attention kernels: flex_attention (its default) or its dense fallback (timing only)",
    )
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.original))
    torch.set_num_threads(args.threads)
    _cpu_patches()
    if args.attention == "dense":
        _dense_attention_patch()
    with open(args.config_json) as f:
        cfg = json.load(f)
    torch.manual_seed(cfg.get("seed", 0))
    model, top = build(cfg)
    step_model = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["learning_rate"])
    w_top = cfg["top_lm_loss_weight"] * cfg["top_lm_mse_weight"]

    def train_step(ids, kpm):
        out = step_model(ids, key_padding_mask=kpm)
        loss = out["loss_total"]
        if top is not None and "avg_top_code_lm_loss" in out:
            loss = loss + w_top * out["avg_top_code_lm_loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["gradient_clip_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "count":
            print(json.dumps(count(model, top)), flush=True)
        elif cmd["cmd"] == "steps":
            ids = torch.from_numpy(np.load(cmd["ids"]).astype(np.int64))
            kpm = ids == PAD_ID
            times, losses = [], []
            for _ in range(cmd["n"]):
                t = time.perf_counter()
                losses.append(train_step(ids, kpm))
                times.append(time.perf_counter() - t)
            ok = all(math.isfinite(x) for x in losses)
            print(json.dumps({"seconds": times, "loss": losses, "finite": ok}), flush=True)


if __name__ == "__main__":
    main()
