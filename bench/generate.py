"""Generation speed: cached, jitted decoding (generation.Generator) against a loop that recomputes everything.

    python bench/generate.py                                   # tiny and stage1_super_tiny, each with a top
    python bench/generate.py --configs configs/tiny.py --new_bytes 256 --batch 1 --recompute_bytes 32

For each config (given a top transformer: `use_top_code_lm=True`, as stage 2 trains it) and each batch size:
- cached: compile time of the whole decoding program (once per (batch, budget) shape), then bytes/s at each byte
  budget of --new_bytes (the budget is an argument of that one program), and the per-byte cost of the bytes in the
  second half of the largest budget against the first half, prefill excluded (it should be flat: fixed-size caches).
- recompute: a Python loop that, for every new byte, reruns the full forward passes over the whole sequence so far
  (padded to its final length, so each pass compiles once): every level's compressor, the top transformer over all
  rows, the expander over all bytes. It times the first --recompute_bytes bytes of the largest budget (its per-byte
  cost is the same at every length because of the padding) and reports bytes/s and the cached/recompute ratio.
The models are randomly initialised (speed does not depend on the weights) and EOS is never sampled, so every sample
runs to its budget. One JSON line per (config, batch). Results go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from abstractinator_jax import generation as G  # noqa: E402
from abstractinator_jax.cli import load_config_file  # noqa: E402
from abstractinator_jax.config import EOS_ID, PAD_ID, validate_config  # noqa: E402
from abstractinator_jax.model import AbstractinatorPyramid  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = b"Once upon a time, there was a little girl named Lily."


def load(path: str):
    cfg = load_config_file(path)
    cfg.use_top_code_lm = True
    cfg.stage = 1
    validate_config(cfg)
    model = AbstractinatorPyramid(cfg)
    ids = jnp.zeros((1, cfg.sequence_length), jnp.int32)
    v = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids, ids == PAD_ID))
    return cfg, model, v


class NoEOSGenerator(G.Generator):
    """Never samples EOS, so that every sample runs to its budget (the speed of a fixed amount of work)."""

    def _allowed(self, k):
        allowed = super()._allowed(k)
        return allowed.at[EOS_ID].set(False) if k == 0 else allowed


def bench_cached(gen, v, batch: int, budgets: list[int], sp) -> dict:
    max_new = max(budgets)
    ids = jnp.asarray(G.encode_prompts([PROMPT] * batch))
    keys = G.sample_keys(0, batch)
    budget = jnp.full((batch,), max_new, jnp.int32)
    t = time.perf_counter()
    compiled = gen._jitted.lower(v, ids, keys, sp, max_new, budget).compile()
    compile_s = time.perf_counter() - t
    out = {"compile_s": round(compile_s, 2)}
    times = {}
    for n in sorted(set(budgets) | {1, max_new // 2}):
        b = jnp.full((batch,), n, jnp.int32)
        jax.block_until_ready(compiled(v, ids, keys, sp, b))  # warm
        reps = []
        for _ in range(3):
            t = time.perf_counter()
            generated = jax.block_until_ready(compiled(v, ids, keys, sp, b))[2]
            reps.append(time.perf_counter() - t)
        times[n] = float(np.median(reps))
        assert int(np.min(generated)) == n, "a sample stopped early"
        if n in budgets:
            out[f"cached_bytes_per_s@{n}"] = round(batch * n / times[n], 1)
    half = max_new // 2
    # the prefill (in every run) is taken out with the 1-byte run
    first, second = (times[half] - times[1]) / (half - 1), (times[max_new] - times[half]) / (max_new - half)
    out["cached_ms_per_byte_first_half"] = round(1e3 * first / batch, 4)
    out["cached_ms_per_byte_second_half"] = round(1e3 * second / batch, 4)
    out["second_half_vs_first"] = round(second / first, 3)
    return out


def make_recompute_step(model, cfg, length: int):
    """One byte per sample from full forward passes over ids (B, length) (real up to n): the level-0 compressor's
    rows and segments, the top transformer's prediction of the open segment's row from the rows before it, the
    expander's next byte. Greedy; the segmentation is the training rule applied to the whole prefix."""
    top_cfg = cfg.top_transformer_config

    def fn(m, ids, n):
        b = ids.shape[0]
        pad = jnp.arange(length)[None, :] >= n[:, None]
        comp = m.compress_all(ids, pad)[0]  # (one level in the benchmarked configs)
        rows, valid = comp.quantized, comp.valid_mask
        pred = m.top.predict(rows, valid)
        last = jnp.sum(valid, axis=1) - 1  # the open segment
        new = pred[jnp.arange(b), jnp.maximum(last - 1, 0)]
        if not top_cfg.continuous:
            z = m.top.code_space(new)
            books = m.levels[-1].compressor.quantizer.stage_codebooks()
            code = G.sample_code(G.sample_keys(0, b), z, books, G.sampling(greedy=True))
            new = m.levels[-1].compressor.quantizer.decode(code)
        memory = rows.at[jnp.arange(b), last].set(new)
        seg = comp.segments.seg_id.at[jnp.arange(b), n].set(last)
        logits, _ = m.levels[0].expander(memory, valid, ids, pad.at[jnp.arange(b), n].set(False), seg)
        lg = logits[0][jnp.arange(b), n]
        allowed = (jnp.arange(lg.shape[-1]) < 256)[None]  # no EOS, as in the cached runs
        return jnp.argmax(jnp.where(allowed, lg, -jnp.inf), axis=-1).astype(jnp.int32)

    @jax.jit
    def step(v, ids, n):
        byte = model.apply(v, ids, n, method=fn)
        ids = ids.at[jnp.arange(ids.shape[0]), n].set(byte)
        return ids, n + 1

    return step


def bench_recompute(model, cfg, v, batch: int, max_new: int, measure: int) -> dict:
    prompt = G.encode_prompts([PROMPT] * batch, bucket=1)
    length = prompt.shape[1] + max_new
    ids = np.full((batch, length), PAD_ID, np.int32)
    ids[:, : prompt.shape[1]] = prompt
    ids, n = jnp.asarray(ids), jnp.full((batch,), prompt.shape[1], jnp.int32)
    step = make_recompute_step(model, cfg, length)
    t = time.perf_counter()
    jax.block_until_ready(step(v, ids, n))
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(measure):  # one host round trip per byte, as such a loop has
        ids, n = step(v, ids, n)
        jax.block_until_ready(n)
    dt = time.perf_counter() - t
    rate = round(batch * measure / dt, 1)
    return {"recompute_compile_s": round(compile_s, 2), f"recompute_bytes_per_s@{max_new}": rate}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="configs/tiny.py,configs/stage1_super_tiny.py")
    ap.add_argument("--new_bytes", default="256,1024", help="byte budgets (comma-separated)")
    ap.add_argument("--batch", default="1,8", help="batch sizes (comma-separated)")
    ap.add_argument("--recompute_bytes", type=int, default=64, help="bytes timed in the recompute loop")
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()
    budgets = [int(x) for x in args.new_bytes.split(",")]
    sp = G.sampling(temperature=args.temperature)
    for path in args.configs.split(","):
        cfg, model, v = load(str(REPO / path) if not Path(path).is_absolute() else path)
        gen = NoEOSGenerator(model, cfg)
        for batch in (int(x) for x in args.batch.split(",")):
            row = {"config": Path(path).stem + "+top", "batch": batch, "backend": jax.default_backend()}
            row.update(bench_cached(gen, v, batch, budgets, sp))
            measure = min(args.recompute_bytes, max(budgets))
            row.update(bench_recompute(model, cfg, v, batch, max(budgets), measure))
            key = f"cached_bytes_per_s@{max(budgets)}"
            row["cached_over_recompute"] = round(row[key] / row[f"recompute_bytes_per_s@{max(budgets)}"], 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
