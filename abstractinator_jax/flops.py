"""Analytic model FLOPs per input byte (for the benchmark's model-FLOPs utilization).

Counts the useful multiply-adds of level 0 and of the top transformer per input byte (2 FLOPs each): projections,
feed-forward, heads, and attention scores/values over the keys each query may see (the sliding window's, not the
blocked kernel's 2W); the top over the segments that exist (S / compression ratio rows per sequence), not over
padded slots. A trained part costs 3x its forward (backward = 2x forward); stage 2 runs level 0's compressor
forward only (no expander, no backward) under the trained top. Levels above 0 are not counted.
"""

from __future__ import annotations

from .config import compressor_mla_dims, expander_mla_dims, num_compression_layers, num_lm_layers, top_mla_dims


def _mean_window(seq_len: int, window: int) -> float:
    """Mean number of visible keys per query for causal attention banded to `window` (0 = full causal)."""
    if window <= 0 or window >= seq_len:
        return (seq_len + 1) / 2
    # positions 0..W-1 see t+1 keys, the rest see W.
    head = window * (window + 1) / 2
    return (head + (seq_len - window) * window) / seq_len


def attention_macs(d: int, heads: int, keys: float, mla: dict | None = None, mix: bool = False) -> float:
    """Multiply-adds per token of one causal self-attention over `keys` visible keys: standard (mla=None), or latent
    with the sizes `mla` (head_dim, kv_comp_dim, q_comp_dim, retr_dim), counting the cheaper of the fused and the
    chained projections as attention.LatentSelfAttention computes them."""
    if mla is None:
        return 4 * d * d + 2 * d * keys
    n, k, c, cq, r = heads, mla["head_dim"], mla["kv_comp_dim"], mla["q_comp_dim"], mla["retr_dim"]
    queries = n * min(d * r, d * k + k * cq + cq * r)
    latent = d * c + c * n * r
    scores_values = n * (r + c) * keys
    out = min(n * c * d, n * c * k + n * k * d + (d * d if mix else 0))
    return queries + latent + scores_values + out


def level_macs_per_token(lv, seq_len: int, compression_ratio: float) -> dict:
    """{'compressor': ..., 'expander': ...} multiply-adds per input token of one level's forward."""
    d = lv.D
    f = lv.ffn_mult * d
    rows_per_token = lv.c_num_queries / max(compression_ratio, 1.0)
    mla = lv.attention_type == "mla"

    def block(window):
        keys = _mean_window(seq_len, window)
        return attention_macs(d, lv.c_heads, keys, compressor_mla_dims(lv) if mla else None) + 3 * d * f

    enc_layers = lv.c_num_shared_encoder_layers + num_lm_layers(lv) + num_compression_layers(lv)
    comp = enc_layers * block(lv.c_window)
    comp += 2 * d * d if lv.c_entropy_model == "gaussian" else d * lv.vocab_size
    # pooler: K, V projections, scores and weighted sums per token; output projection per memory row
    comp += 2 * d * d + 2 * lv.c_num_queries * d + rows_per_token * d * d
    visible_rows = (lv.d_cross_window + 1) * lv.c_num_queries
    self_attn = attention_macs(
        d, lv.d_heads, _mean_window(seq_len, lv.d_window), expander_mla_dims(lv) if mla else None, mix=True
    )
    dec = self_attn + 3 * d * f + 2 * d * d + 2 * d * d * rows_per_token + 2 * d * visible_rows
    exp = lv.d_layers * dec + 2 * lv.d_lo_d_c * d + lv.d_lo_d_c * lv.vocab_size  # + factorized embedding and head
    return {"compressor": comp, "expander": exp}


def top_macs_per_row(cfg, rows: float) -> float:
    """Multiply-adds per top row of the top transformer's forward over a sequence of `rows` rows (full causal)."""
    t = cfg.top_transformer_config
    lv = cfg.levels[-1]
    mla = top_mla_dims(t) if t.attention_type == "mla" else None
    block = attention_macs(t.dim, t.num_heads, (rows + 1) / 2, mla, mix=True) + 3 * t.dim * t.ffn_dim_multiplier * t.dim
    macs = t.embed_dim * t.dim + t.num_layers * block + t.dim * t.embed_dim
    if not t.continuous:  # code projection and one score per code of every stage
        d_c = lv.c_vq_d_c or lv.D
        macs += t.embed_dim * d_c + lv.c_vq_depth * lv.c_vq_K * d_c
    return macs


def flops_per_byte(cfg, compression_ratio: float) -> dict:
    """{'forward': FLOPs per input byte of the forward, 'train': of a train step} for level 0 of `cfg` and its top
    transformer (one level: the top's rows are level 0's segments)."""
    lv = cfg.levels[0]
    level = level_macs_per_token(lv, cfg.sequence_length, compression_ratio)
    top = 0.0
    if cfg.use_top_code_lm and len(cfg.levels) == 1:
        ratio = max(compression_ratio, 1.0)
        top = top_macs_per_row(cfg, cfg.sequence_length / ratio) / ratio
    fwd = 2 * (level["compressor"] + level["expander"] + top)
    if cfg.stage == 2:
        return {"forward": fwd, "train": 2 * level["compressor"] + 3 * 2 * top}
    return {"forward": fwd, "train": 3 * fwd}
