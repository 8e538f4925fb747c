"""Analytic model FLOPs per input byte (for the benchmark's model-FLOPs utilization).

Counts the useful multiply-adds of one level per input token (2 FLOPs each): projections, feed-forward, heads, and
attention scores/values over the keys each query may see (the sliding window's, not the blocked kernel's 2W). A
train step costs 3x the forward (backward = 2x forward).
"""

from __future__ import annotations

from .config import num_compression_layers, num_lm_layers


def _mean_window(seq_len: int, window: int) -> float:
    """Mean number of visible keys per query for causal attention banded to `window` (0 = full causal)."""
    if window <= 0 or window >= seq_len:
        return (seq_len + 1) / 2
    # positions 0..W-1 see t+1 keys, the rest see W.
    head = window * (window + 1) / 2
    return (head + (seq_len - window) * window) / seq_len


def level_macs_per_token(lv, seq_len: int, compression_ratio: float) -> float:
    d = lv.D
    f = lv.ffn_mult * d
    rows_per_token = lv.c_num_queries / max(compression_ratio, 1.0)

    def block(window):
        return 4 * d * d + 3 * d * f + 2 * d * _mean_window(seq_len, window)

    enc_layers = lv.c_num_shared_encoder_layers + num_lm_layers(lv) + num_compression_layers(lv)
    macs = enc_layers * block(lv.c_window)
    macs += 2 * d * d if lv.c_entropy_model == "gaussian" else d * lv.vocab_size
    # pooler: K, V projections, scores and weighted sums per token; output projection per memory row
    macs += 2 * d * d + 2 * lv.c_num_queries * d + rows_per_token * d * d
    # expander
    visible_rows = (lv.d_cross_window + 1) * lv.c_num_queries
    dec = block(lv.d_window) + 2 * d * d + 2 * d * d * rows_per_token + 2 * d * visible_rows
    macs += lv.d_layers * dec
    macs += 2 * lv.d_lo_d_c * d + lv.d_lo_d_c * lv.vocab_size  # factorized embedding + head
    return macs


def flops_per_byte(cfg, compression_ratio: float) -> dict:
    """{'forward': FLOPs per input byte, 'train': 3x that} for level 0 of `cfg`."""
    fwd = 2 * level_macs_per_token(cfg.levels[0], cfg.sequence_length, compression_ratio)
    return {"forward": fwd, "train": 3 * fwd}
