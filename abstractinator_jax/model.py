"""The model entry point: the pyramid of levels (ARCHITECTURE 4). One level today; levels k+1.. and the top
transformer attach here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from ml_collections import ConfigDict

from .abstractinator import AbstractinatorLevel, LevelOutput
from .compressor import CompressorOutput


def resolve_attention_impl(requested: str, dtype: str) -> str:
    """'auto' -> 'cudnn' on a CUDA GPU with a 16-bit compute dtype, else 'xla'."""
    if requested != "auto":
        return requested
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and dtype in ("bfloat16", "float16") else "xla"


class AbstractinatorPyramid(nn.Module):
    """ids (B, S) bytes -> total loss and metrics (`level{k}/<name>`)."""

    config: ConfigDict  # the full run config (levels, top_transformer_config, dtype, ...)

    def setup(self):
        cfg = self.config
        impl = resolve_attention_impl(cfg.attention_impl, cfg.dtype)
        dtype = jnp.dtype(cfg.dtype)
        self.levels = [
            AbstractinatorLevel(lv, implementation=impl, dtype=dtype, name=f"level_{i}")
            for i, lv in enumerate(cfg.levels)
        ]

    def __call__(self, ids, key_pad, train: bool = False) -> tuple[jax.Array, dict]:
        """`train=True` with mutable=['vq_state'] and an rng stream 'vq' updates quantizer state (EMA, resets)."""
        out: LevelOutput = self.levels[0](ids, key_pad, train)
        metrics = {f"level0/{k}": v for k, v in out.metrics.items()}
        metrics["loss"] = out.loss
        return out.loss, metrics

    def compress_all(self, ids, key_pad) -> list[CompressorOutput]:
        """Per-level compressor outputs (one level today); never updates state."""
        return [self.levels[0].compress(ids, key_pad, False)]
