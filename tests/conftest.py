"""Test session setup: CPU only, deterministic, and one persistent compilation cache per test run, shared by the
xdist workers and every subprocess the tests start (train.py, evaluate.py, generate.py, multi-host workers inherit
it through the environment), so that a program compiled by one test is compiled once for the whole run. The cache
only skips recompiling an identical program: results are the same with or without it.

The tests' programs are tiny and compiled far more than they run, so XLA is asked for cheap code generation
(`FAST_COMPILE`: no backend optimisation, no expensive LLVM passes, and XLA's older elemental fusion emitter instead
of the MLIR fusion emitters, which compiles a tiny train step in 6 s instead of 10 s; the suite went from 6 min 19 s
to 4 min 42 s with the last one). The flags go into XLA_FLAGS, so subprocesses inherit them (tests/helpers.xla_flags
adds a forced device count). Benchmarks and training never see these flags."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
)
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

# xdist gives every worker of one run the same id; a plain pytest run gets its own directory
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
_CACHE = Path(tempfile.gettempdir()) / f"abstractinator-jax-cache-{_RUN}"
_CACHE.mkdir(exist_ok=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_CACHE)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
