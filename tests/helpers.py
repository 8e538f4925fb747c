"""Shared test fixtures: tiny configs and batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from abstractinator_jax import tokenizer
from abstractinator_jax.config import PAD_ID, base_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a subprocess: this session's (conftest.py's compile settings) without any forced device count,
    plus `devices` forced host devices when given."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


def tiny_config(seq_len: int = 64, batch_size: int = 4, attention: str = "mha"):
    """A model small enough for CPU tests (one level, D=32). `attention` sets every attention type: standard
    attention by default, which compiles in about half the time of latent attention; the configs' latent attention
    is what tests/test_mla.py, tests/test_generation.py (both kinds) and the training tests (overfitting, bfloat16,
    4-device fsdp) run (attention='mla')."""
    cfg = base_config()
    lv = cfg.levels[0]
    lv.D = 32
    lv.c_heads = 2
    lv.d_heads = 2
    lv.c_window = 16
    lv.d_window = 16
    lv.c_num_lm_encoder_layers = 1
    lv.c_num_compression_encoder_layers = 1
    lv.d_layers = 1
    lv.c_output_length = 32
    lv.d_lo_d_c = 16
    # latent attention (the default) sized for D=32: the defaults (64, 64, 128, 32) would cost more than the model
    lv.c_head_dim, lv.c_kv_comp_dim, lv.c_q_comp_dim, lv.c_retr_dim = 16, 16, 16, 8
    lv.attention_type = attention
    cfg.top_transformer_config.attention_type = attention
    cfg.top_row_buckets = 2  # the bucketed top (lax.switch) at the least compile cost; test_pyramid checks buckets
    cfg.top_batch_chunks = 1  # the top in one pass (the least compile cost); test_pyramid's stage 2 runs chunks
    cfg.sequence_length = seq_len
    cfg.batch_size = batch_size
    cfg.warmup_steps = 10
    cfg.max_steps = 300
    cfg.learning_rate = 3e-3
    cfg.progress_bar = False
    cfg.sample_max_bytes = (
        0  # no generated TensorBoard sample (a generation program to compile); test_generate_cli has one
    )
    return cfg


SENTENCES = ["The cat sat on the mat.", "A dog ran in the park!", "Birds sing at dawn.", "Fish swim deep below."]


def sentence_batch(seq_len: int = 64, sentences=SENTENCES) -> dict:
    """{'ids': (1, B, S), 'mask': (1, B, S)}: one micro-batch of the given sentences, one per row."""
    ids = np.stack([tokenizer.to_rows(tokenizer.encode(s), seq_len)[0] for s in sentences])[None]
    return {"ids": ids, "mask": ids == PAD_ID}


def tiny_discrete_config(seq_len: int = 32, batch_size: int = 2, attention: str = "mha"):
    """`tiny_config` with a code for every row: a 16-code quantizer, a logit entropy model and a one-block discrete
    top transformer (so the evaluation has a total code length, `bits_per_byte`)."""
    cfg = tiny_config(seq_len=seq_len, batch_size=batch_size, attention=attention)
    lv = cfg.levels[0]
    lv.c_vq_K = 16
    lv.c_vq_d_c = 8
    lv.c_entropy_model = "logit"
    cfg.use_top_code_lm = True
    top = cfg.top_transformer_config
    top.embed_dim, top.dim, top.num_layers, top.num_heads = lv.D, 32, 1, 2
    return cfg


# Eval documents of mixed lengths (one spans several rows of 32) and multi-byte UTF-8 characters.
EVAL_DOCS = [
    s.encode("utf-8")
    for s in (
        "The cat sat on the mat.",
        "A café serves crème brûlée — and tea ☕.",
        "Once upon a time there was a little girl named Lily who loved to draw houses with green doors.",
        "Birds sing.",
        "Fish swim deep below the blue waves, past the rocks.",
        "",
        "Tom ate his soup.",
    )
]


REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts (evaluate.py, generate.py, ...) on CPU, reusing this test session's
    compilation cache (conftest.py), so programs the test process compiled already are not compiled again."""
    import jax

    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(jax.config.jax_compilation_cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
    return subprocess.run(
        [sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )
