"""Logical axis names: the vocabulary in which parameters and activations say how they may be sharded.

Layers name their axes with these constants (never bare strings); `sharding.LOGICAL_AXIS_RULES` maps each onto the
device mesh ('data', 'fsdp', 'tensor'). `check` rejects an unknown name at trace time, so a misspelling fails loudly
instead of silently matching no rule.
"""

from __future__ import annotations

# Parameter axes.
EMBED = "embed"  # model width D (input side of a projection)
EMBED_OUT = "embed_out"  # model width D on the output side of a D -> D projection
MLP = "mlp"  # feed-forward hidden width
HEADS = "heads"  # attention heads
KV = "kv"  # per-head width
VOCAB = "vocab"  # token / code vocabularies (and codebook rows)
CODE = "code"  # low-rank code width d_c
QUERIES = "queries"  # learned pooling queries
LATENT = "latent"  # multi-head latent attention's compressed widths (kv_comp_dim, q_comp_dim)
RETRIEVAL = "retrieval"  # multi-head latent attention's per-head scoring width retr_dim (RoPE'd)

# Activation axes.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_MLP = "act_mlp"

PARAM_AXES = frozenset({EMBED, EMBED_OUT, MLP, HEADS, KV, VOCAB, CODE, QUERIES, LATENT, RETRIEVAL})
ACTIVATION_AXES = frozenset({BATCH, LENGTH, ACT_EMBED, ACT_HEADS, ACT_MLP})


def check(axes, known=PARAM_AXES | ACTIVATION_AXES) -> tuple:
    """`axes` as a tuple, after checking that every name (None = replicated) is a known logical axis."""
    axes = tuple(axes)
    unknown = [a for a in axes if a is not None and a not in known]
    if unknown:
        raise ValueError(f"unknown logical axis name(s) {unknown}; use the constants in abstractinator_jax/axes.py.")
    return axes
