"""Test session setup: CPU only, deterministic, and a per-session persistent compilation cache so that identical
programs compiled by several tests (or several train() calls) are compiled once."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = tempfile.mkdtemp(prefix="abstractinator-jax-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
