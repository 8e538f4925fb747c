"""Parameters per component, ours beside the PyTorch original's, for config files.

    python bench/param_counts.py                       # every shipped config
    python bench/param_counts.py --config configs/stage1_super_tiny.py

Ours: counted on the model's parameter tree (shapes only, nothing allocated); trainable parameters, so an EMA
codebook (quantizer state, not a parameter) is not counted. The original's: by `original_counts`, a formula written
from its code (components/ at e38a88d: mla.py, segment_compressor.py, learned_query_attention.py, expander.py,
vector_quantizer.py, code_sequence_transformer.py, swiglu.py), and, when the benchmark's torch environment exists
(`python bench/vs_original.py --setup`), also by building the original's modules from the same config and counting
(a third column, which must equal the formula). Every difference is itemised by `differences` with its reason; the
test suite checks ours == original + differences for every shipped config.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

from abstractinator_jax.cli import load_config_file  # noqa: E402
from abstractinator_jax.config import (  # noqa: E402
    compressor_mla_dims,
    expander_mla_dims,
    num_compression_layers,
    num_lm_layers,
    to_dict,
    top_mla_dims,
)
from abstractinator_jax.model import AbstractinatorPyramid  # noqa: E402

CONFIGS = ["stage1_super_tiny", "stage2_super_tiny", "tiny", "tiny_vq", "super_tiny", "two_level_tiny"]
VENV_PYTHON = ROOT / ".bench-venv" / "bin" / "python"
ORIGINAL_SRC = ROOT / ".bench-venv" / "original"

# ---------------------------------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------------------------------

_LEVEL_PARTS = {
    "shared": "compressor.shared",
    "entropy": "compressor.entropy",
    "compression": "compressor.compression",
    "pooler": "compressor.pooler",
    "quantizer": "compressor.quantizer",
}


def ours(cfg) -> dict:
    """{component: parameters} of our model for `cfg` (levels as level{k}.<component>, and 'top')."""
    model = AbstractinatorPyramid(cfg)
    s = min(cfg.sequence_length, 64)
    ids = jnp.zeros((1, s), jnp.int32)
    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0), "vq": jax.random.key(1)}, ids, ids == 1)["params"]
    )
    out = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        leaf = getattr(leaf, "value", leaf)
        if path[0] == "top":
            key = "top"
        else:
            level = "level" + path[0].split("_")[1]
            if path[1] == "compressor":
                key = f"{level}.{_LEVEL_PARTS[path[2].rsplit('_', 1)[0] if path[2][-1].isdigit() else path[2]]}"
            else:
                key = f"{level}.{path[1]}"
        out[key] = out.get(key, 0) + int(leaf.size)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The original, by formula
# ---------------------------------------------------------------------------------------------------------------------


def _swiglu(d: int, hidden: int) -> int:
    """components/swiglu.py: w1 = Linear(d, 2 * hidden), w2 = Linear(hidden, d), both with bias."""
    return d * 2 * hidden + 2 * hidden + hidden * d + d


def _mla(d: int, heads: int, head_dim: int, kv_comp_dim: int, q_comp_dim: int, retr_dim: int) -> int:
    """components/mla.py MultiheadLatentAttention: q_proj, w_kc_q, w_kc_kv, W_qr, W_kr, out_proj (no biases)."""
    n, k, c, cq, r = heads, head_dim, kv_comp_dim, q_comp_dim, retr_dim
    return d * n * k + n * k * cq + n * k * c + n * cq * r + n * c * r + n * k * d


def _mla_block(d: int, heads: int, dims: dict, ffn_hidden: int) -> int:
    """SlidingWindowMLATransformerBlock / CausalMLATransformerBlock: two RMSNorms, the MLA wrapper (the MLA core,
    kv_proj d -> kv_comp_dim, o_proj d x d) and a SwiGLU."""
    return 2 * d + _mla(d, heads, **dims) + d * dims["kv_comp_dim"] + d * d + _swiglu(d, ffn_hidden)


def original_counts(cfg) -> dict:
    """The original's parameters per component for our config (its AbstractinatorPyramid levels, built as its
    Abstractinator builds them, and its CodeSequenceTransformer when use_top_code_lm). At e38a88d the compressor's
    quantizer is the identity (Abstractinator passes none), and every level is built like level 0."""
    out = {}
    for i, lv in enumerate(cfg.levels):
        d, v = lv.D, lv.vocab_size
        block = _mla_block(d, lv.c_heads, compressor_mla_dims(lv), 4 * d)  # encoder_ffn_dim_multiplier = 4
        p = f"level{i}."
        out[p + "embedding"] = v * d
        if lv.c_num_shared_encoder_layers:
            out[p + "compressor.shared"] = lv.c_num_shared_encoder_layers * block
        # GaussianEntropyModel (Abstractinator never passes use_gaussian_segmentation): blocks, mu and logvar heads.
        out[p + "compressor.entropy"] = num_lm_layers(lv) * block + 2 * (d * d + d)
        out[p + "compressor.compression"] = num_compression_layers(lv) * block
        out[p + "compressor.pooler"] = lv.c_num_queries * d + 2 * d + 4 * d * d  # template, 2 norms, q k v out
        # expander: LearnedCodebookAdapter (table + shared d_c x D), SlidingDecoder blocks, final norm.
        dec_block = 3 * d + _mla(d, lv.d_heads, **expander_mla_dims(lv)) + d * (d // 16) + d * d  # CausalMLA
        dec_block += 4 * d * d + _swiglu(d, 4 * d)  # SegmentCausalCrossAttention q, kv (2x), o; SwiGLU(D, 4D)
        out[p + "expander"] = v * lv.d_lo_d_c + lv.d_lo_d_c * d + lv.d_layers * dec_block + d
    if cfg.use_top_code_lm:
        t = cfg.top_transformer_config
        block = _mla_block(t.dim, t.num_heads, top_mla_dims(t), t.ffn_dim_multiplier * t.dim)
        out["top"] = t.embed_dim * t.dim + t.dim + t.num_layers * block + t.dim + t.dim * t.embed_dim + t.embed_dim
    return out


def differences(cfg) -> dict:
    """{component: [(ours - original, reason)]} for every component whose counts differ (level 0 and the top;
    levels above 0 are not comparable: the original builds them like level 0 and never wires them to the level
    below at e38a88d)."""
    out: dict = {}

    def add(key, delta, reason):
        if delta:
            out.setdefault(key, []).append((delta, reason))

    lv = cfg.levels[0]
    d, f = lv.D, lv.ffn_mult * lv.D
    blocks = {
        "compressor.shared": lv.c_num_shared_encoder_layers,
        "compressor.entropy": num_lm_layers(lv),
        "compressor.compression": num_compression_layers(lv),
    }
    for part, n in blocks.items():
        if lv.attention_type == "mla":
            add(f"level0.{part}", -n * d * d, "the original's SlidingWindowMLA o_proj (D x D), never applied")
        add(f"level0.{part}", n * (3 * d * f - _swiglu(d, 4 * d)), "SwiGLU without biases")
    if lv.c_vq_K > 0:
        dc = lv.c_vq_d_c or d
        add(
            "level0.compressor.quantizer",
            2 * d * dc,
            "our quantizer's down/up projections (the original's is the identity)",
        )
        if not lv.c_vq_ema:
            add("level0.compressor.quantizer", lv.c_vq_depth * lv.c_vq_K * dc, "codebooks trained by gradient")
    add("level0.expander", lv.d_layers * (3 * d * f - _swiglu(d, 4 * d)), "SwiGLU without biases")
    if cfg.use_top_code_lm:
        t = cfg.top_transformer_config
        tf = t.ffn_dim_multiplier * t.dim
        add("top", t.num_layers * (3 * t.dim * tf - _swiglu(t.dim, tf)), "SwiGLU without biases")
        add("top", -(t.dim + t.embed_dim), "in/out projections without biases")
        if not t.continuous:
            add("top", t.embed_dim * (cfg.levels[-1].c_vq_d_c or cfg.levels[-1].D), "the code head's projection")
    return out


def original_torch(cfg) -> dict | None:
    """The original's counts by building its modules with torch (None without the benchmark's torch venv)."""
    if not (VENV_PYTHON.exists() and ORIGINAL_SRC.is_dir()):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(to_dict(cfg), f)
    cmd = [str(VENV_PYTHON), str(ROOT / "bench" / "original_side.py"), "--original", str(ORIGINAL_SRC)]
    cmd += ["--config-json", f.name]
    res = subprocess.run(cmd, input='{"cmd": "count"}\n{"cmd": "quit"}\n', capture_output=True, text=True)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode or len(lines) < 2:
        print(f"(the original's torch count failed: {res.stderr.strip()[-500:]})", file=sys.stderr)
        return None
    return json.loads(lines[1])


def table(name: str, cfg) -> str:
    mine, theirs, torch_counts = ours(cfg), original_counts(cfg), original_torch(cfg)
    diffs = differences(cfg)
    head = f"| {name} | ours | original (formula) |" + (" original (torch) |" if torch_counts else "") + " why |"
    rows = [head, "|---|---|---|" + ("---|" if torch_counts else "") + "---|"]
    for key in sorted(set(mine) | set(theirs) | set(torch_counts or {})):
        why = "; ".join(f"{delta:+,}: {reason}" for delta, reason in diffs.get(key, []))
        if key.startswith("level") and not key.startswith("level0."):
            why = "not comparable: the original builds upper levels like level 0"
        row = f"| {key} | {mine.get(key, 0):,} | {theirs.get(key, 0):,} |"
        if torch_counts:
            row += f" {torch_counts.get(key, 0):,} |"
        rows.append(row + f" {why} |")
    total = f"| total | {sum(mine.values()):,} | {sum(theirs.values()):,} |"
    if torch_counts:
        total += f" {sum(torch_counts.values()):,} |"
    rows.append(total + " |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", help="config file(s); default: every shipped config")
    args = ap.parse_args()
    paths = args.config or [str(ROOT / "configs" / f"{c}.py") for c in CONFIGS]
    for path in paths:
        cfg = load_config_file(path)
        if cfg.stage == 2:
            cfg.init_from = cfg.init_from or "unused"
        print(table(Path(path).stem, cfg) + "\n")


if __name__ == "__main__":
    main()
