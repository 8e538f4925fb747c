"""Throughput and memory of the jitted train step (and of a forward-only pass) for a named config.

    python bench/train_step.py --config configs/tiny.py --batch_size 8 --sequence_length 1024

Prints one JSON line: bytes/s (real bytes: the batch is real English text packed to full rows), step time, analytic
FLOPs per byte and model-FLOPs utilization against a measured matmul peak, XLA's memory analysis of the compiled
step and the process's peak resident memory. Run one configuration per process for a clean peak-memory figure.
`--compile_only` stops after the memory analysis; `--remat` and `--top` change the config's rematerialization and
add its top transformer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from abstractinator_jax import steps, train_state  # noqa: E402
from abstractinator_jax.cli import load_config_file  # noqa: E402
from abstractinator_jax.config import BOS_ID, EOS_ID, validate_config  # noqa: E402
from abstractinator_jax.flops import flops_per_byte  # noqa: E402
from abstractinator_jax.model import AbstractinatorPyramid  # noqa: E402
from abstractinator_jax.sharding import make_mesh  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories_train.txt"


def real_batch(b: int, s: int, seed: int = 0) -> np.ndarray:
    """(B, S) rows of real English bytes (TinyStories when present, else CPython's docs), no PAD."""
    if SHARED.exists():
        text = SHARED.read_bytes()
    else:
        from pydoc_data.topics import topics

        text = "\n".join(topics[k] for k in sorted(topics)).encode()
    rng = np.random.default_rng(seed)
    rows = np.empty((b, s), np.int32)
    for i in range(b):
        start = int(rng.integers(0, len(text) - s))
        rows[i] = np.frombuffer(text[start : start + s], np.uint8)
    rows[:, 0] = BOS_ID
    rows[:, -1] = EOS_ID
    return rows


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Measured fp32 matmul FLOP/s of this backend (the utilization's denominator)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def timed(fn, *args, warmup: int = 2, reps: int = 5):
    for _ in range(warmup):
        out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def apply_overrides(cfg, args) -> None:
    """The config settings a benchmark's flags override (bench/vs_original.py takes the same ones): --top,
    --top_row_buckets, --top_batch_chunks, --c_output_length, and where the benchmark has them --dtype,
    --attention_impl, --remat."""
    for key in ("dtype", "attention_impl", "remat"):
        if getattr(args, key, None):
            cfg[key] = getattr(args, key)
    if args.top:
        cfg.use_top_code_lm = True
    if args.top_row_buckets:
        cfg.top_row_buckets = args.top_row_buckets
    if getattr(args, "top_batch_chunks", None):
        cfg.top_batch_chunks = args.top_batch_chunks
    if args.c_output_length:
        cfg.levels[0].c_output_length = args.c_output_length


def run_fields(args, cfg, state, compile_s: float) -> dict:
    """The fields every result line starts with: what ran, and how long it took to compile."""
    return {
        "config": os.path.basename(args.config),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "dtype": cfg.dtype,
        "attention_impl": cfg.attention_impl,
        "remat": cfg.remat,
        "top": cfg.use_top_code_lm,
        "top_row_buckets": cfg.top_row_buckets if cfg.use_top_code_lm else None,
        "top_batch_chunks": cfg.top_batch_chunks if cfg.use_top_code_lm else None,
        "batch_size": args.batch_size,
        "sequence_length": args.sequence_length,
        "c_output_length": cfg.levels[0].c_output_length,
        "parameters": train_state.count_params(state.params),
        "compile_s": round(compile_s, 2),
    }


def memory_report(args, cfg, state, compile_s: float, mem) -> dict:
    """What --compile_only prints: the compiled step's memory analysis (XLA temp and arguments), no timing."""
    out = {**run_fields(args, cfg, state, compile_s), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if mem is not None:
        out["xla_temp_mb"] = round(mem.temp_size_in_bytes / 2**20, 1)
        out["xla_args_mb"] = round(mem.argument_size_in_bytes / 2**20, 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--sequence_length", type=int, default=1024)
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the config's)")
    ap.add_argument("--attention_impl", default=None, help="auto, xla or cudnn (default: the config's)")
    ap.add_argument("--remat", default=None, help="none, block or dots (default: the config's)")
    ap.add_argument("--top", action="store_true", help="train the config's top transformer too (use_top_code_lm)")
    ap.add_argument("--top_row_buckets", type=int, default=None, help="the top's row buckets (default: the config's)")
    ap.add_argument("--top_batch_chunks", type=int, default=None, help="the top's batch chunks (default: the config's)")
    ap.add_argument("--c_output_length", type=int, default=None, help="level 0's segment slots (default: the config's)")
    ap.add_argument(
        "--compile_only", action="store_true", help="compile and report memory only (deterministic on a busy machine)"
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip_forward", action="store_true")
    args = ap.parse_args()

    cfg = load_config_file(args.config)
    cfg.batch_size = args.batch_size
    cfg.sequence_length = args.sequence_length
    cfg.gradient_accumulation_steps = 1
    apply_overrides(cfg, args)
    validate_config(cfg)

    mesh = make_mesh(cfg.mesh)
    model = AbstractinatorPyramid(cfg)
    opt = train_state.make_optimizer(cfg)
    state, shardings = train_state.create_train_state(cfg, model, mesh, opt)
    step = steps.make_train_step(cfg, model, mesh, opt, shardings)
    ids = real_batch(args.batch_size, args.sequence_length)
    batch = {"ids": ids[None], "mask": np.zeros_like(ids, bool)[None]}
    n_bytes = ids.size

    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        if args.compile_only:
            print(json.dumps(memory_report(args, cfg, state, compile_s, mem)))
            return
        state, _ = compiled(state, batch)  # donated: keep the new state
        holder = {"state": state}

        def run_step(b):
            holder["state"], m = compiled(holder["state"], b)
            return m

        step_s, metrics = timed(run_step, batch, reps=args.reps)
        result = {
            **run_fields(args, cfg, state, compile_s),
            "train_step_s": round(step_s, 4),
            "train_bytes_per_s": round(n_bytes / step_s, 1),
        }
        fpb = flops_per_byte(cfg, float(metrics["level0/compression_ratio"]))
        peak = matmul_peak() if jax.default_backend() == "cpu" else None
        result["train_flops_per_byte"] = round(fpb["train"], 1)
        result["segments_per_row"] = round(float(metrics["level0/segments_per_row"]), 2)
        if peak:
            result["matmul_peak_gflops"] = round(peak / 1e9, 1)
            result["train_mfu"] = round(fpb["train"] * n_bytes / step_s / peak, 3)
        if mem is not None:
            result["xla_temp_mb"] = round(mem.temp_size_in_bytes / 2**20, 1)
            result["xla_args_mb"] = round(mem.argument_size_in_bytes / 2**20, 1)
        if not args.skip_forward:
            eval_step = steps.make_eval_step(model, mesh, shardings)
            st = holder["state"]
            fwd_s, _ = timed(
                eval_step, train_state.all_params(st), st.model_state, ids, np.zeros_like(ids, bool), reps=args.reps
            )
            result["forward_s"] = round(fwd_s, 4)
            result["forward_bytes_per_s"] = round(n_bytes / fwd_s, 1)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
