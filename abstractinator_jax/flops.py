"""Analytic model FLOPs per input byte (for the benchmark's model-FLOPs utilization).

Counts the useful multiply-adds of one level per input token (2 FLOPs each): projections, feed-forward, heads, and
attention scores/values over the keys each query may see (the sliding window's, not the blocked kernel's 2W). A
train step costs 3x the forward (backward = 2x forward).
"""

from __future__ import annotations

from .config import compressor_mla_dims, expander_mla_dims, num_compression_layers, num_lm_layers


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


def level_macs_per_token(lv, seq_len: int, compression_ratio: float) -> float:
    d = lv.D
    f = lv.ffn_mult * d
    rows_per_token = lv.c_num_queries / max(compression_ratio, 1.0)
    mla = lv.attention_type == "mla"

    def block(window):
        keys = _mean_window(seq_len, window)
        return attention_macs(d, lv.c_heads, keys, compressor_mla_dims(lv) if mla else None) + 3 * d * f

    enc_layers = lv.c_num_shared_encoder_layers + num_lm_layers(lv) + num_compression_layers(lv)
    macs = enc_layers * block(lv.c_window)
    macs += 2 * d * d if lv.c_entropy_model == "gaussian" else d * lv.vocab_size
    # pooler: K, V projections, scores and weighted sums per token; output projection per memory row
    macs += 2 * d * d + 2 * lv.c_num_queries * d + rows_per_token * d * d
    # expander
    visible_rows = (lv.d_cross_window + 1) * lv.c_num_queries
    self_attn = attention_macs(
        d, lv.d_heads, _mean_window(seq_len, lv.d_window), expander_mla_dims(lv) if mla else None, mix=True
    )
    dec = self_attn + 3 * d * f + 2 * d * d + 2 * d * d * rows_per_token + 2 * d * visible_rows
    macs += lv.d_layers * dec
    macs += 2 * lv.d_lo_d_c * d + lv.d_lo_d_c * lv.vocab_size  # factorized embedding + head
    return macs


def flops_per_byte(cfg, compression_ratio: float) -> dict:
    """{'forward': FLOPs per input byte, 'train': 3x that} for level 0 of `cfg`."""
    fwd = 2 * level_macs_per_token(cfg.levels[0], cfg.sequence_length, compression_ratio)
    return {"forward": fwd, "train": 3 * fwd}
