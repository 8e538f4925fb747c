"""Forward + backward time of one XLA attention kernel alone, at a model's shapes: for changes to attention.py.

    python bench/attention_kernel.py --kind causal --length 448               # the stage-2 top at S=1024
    python bench/attention_kernel.py --kind window --length 1024 --window 64  # stage1_super_tiny's compressor

Defaults are latent attention's (the original's MLA): 8 heads scoring with 32-wide RoPE'd keys, one shared 64-wide
value head (`--value_heads 8 --value_width 32` for standard attention), batch 8, the last 20 positions of each row
PAD and one row all PAD. Prints one JSON line: the median and fastest of `--reps` jitted forward + backward calls.
Compare two revisions by running the same command in each (a `git worktree` of the other one), back to back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from abstractinator_jax.attention import causal_attention, sliding_window_attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=("causal", "window"), required=True)
    ap.add_argument("--length", type=int, required=True, help="T: queries (and keys) per row")
    ap.add_argument("--window", type=int, default=64, help="--kind window: keys each query sees")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--key_width", type=int, default=32)
    ap.add_argument("--value_heads", type=int, default=1, help="1: one value head shared by all heads (latent)")
    ap.add_argument("--value_width", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    if args.value_heads not in (1, args.heads):
        sys.exit(f"error: --value_heads must be 1 (shared) or --heads={args.heads}, not {args.value_heads}.")
    if args.value_heads == args.heads and args.value_width != args.key_width:
        sys.exit("error: standard attention (--value_heads = --heads) needs --value_width = --key_width.")

    b, t, n = args.batch_size, args.length, args.heads
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, args.key_width))
    k = jax.random.normal(keys[1], (b, t, n, args.key_width))
    v = jax.random.normal(keys[2], (b, t, args.value_heads, args.value_width))
    cot = jax.random.normal(keys[3], (b, t, n, args.value_width))  # the output's cotangent
    pad = jnp.zeros((b, t), bool).at[:, max(0, t - 20) :].set(True).at[min(1, b - 1)].set(True)

    def kernel(q, k, v):
        if args.kind == "causal":
            return causal_attention(q, k, v, pad)
        return sliding_window_attention(q, k, v, pad, window=args.window)

    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(kernel(q, k, v) * cot), argnums=(0, 1, 2)))
    jax.block_until_ready(grad(q, k, v))
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(q, k, v))
        times.append(time.perf_counter() - t0)
    out = {k_: v_ for k_, v_ in vars(args).items() if k_ != "reps"}
    out.update(median_ms=round(1e3 * statistics.median(times), 2), min_ms=round(1e3 * min(times), 2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
