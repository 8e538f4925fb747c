r"""One prepared GPU check (issue 12): the cuDNN attention path against XLA, bfloat16 against float32 training, and
the train-step throughput and model-FLOPs utilization of configs/gpu_100m.py (~100M parameters) at S=8192 in
bfloat16. One call, one JSON file.

On a device machine (an NVIDIA H200 here; a bare, offline machine): first, here, `bash bench/gpu_wheels.sh` (the
pure-python wheels it lacks into .whl/, git-ignored), then one call of the device tool:

    run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=560)

gpu_run.sh installs the wheels, runs `python3 bench/gpu_check.py --budget_s 480` and leaves $OUT/gpu_check.json and
$OUT/gpu_check.log. Here, on CPU, every section at tiny shapes (cuDNN parts recorded as skipped), a few minutes:

    python bench/gpu_check.py --smoke --out /tmp/gpu_check_smoke.json

Sections, in this order; each runs in a process of its own (a crash, an out-of-memory or a hang loses only that
section; each records its wall time), and a section that would start after `--budget_s` is recorded as skipped:
  env          versions (jax, jaxlib, flax, the CUDA plugin, cuDNN), the devices and the GPU's name, which attention
               implementation 'auto' picks, and a measured bfloat16 matmul peak (8192^3, in jit).
  attention    attention.py's kernels with implementation='cudnn' against 'xla' in bfloat16 (full causal and sliding
               window 256, standard and latent attention, B=2, T=2048, 8 heads, one row with trailing PAD): output
               and gradients (q, k, v) against a float32 reference (matmul precision 'highest'); PASS when the cuDNN
               relative L2 error of each is <= 2e-2 and finite. Then fwd+bwd time of each, also at gpu_100m's shapes
               (compressor: B=16, T=8192, 12 heads, window 128; top: T=4096 full causal).
  train_none   the main figure: the jitted train step of gpu_100m (B=16, S=8192, bfloat16, remat 'none'): compile
               time, XLA memory analysis, median step time over --train_steps steps after warm-up (and the mean of
               as many back-to-back steps), real bytes/s, model FLOPs (flops.py's flops_per_byte at the batch's
               compression ratio x bytes) per second, MFU against the datasheet dense bf16 peak of the device
               (by its device_kind; unknown: none) and against the measured matmul peak, peak device memory.
  model_loss   configs/tiny.py with its top transformer (S=1024, B=2, a padded row), the same parameters: loss and
               gradients with attention_impl 'cudnn' against 'xla' in bfloat16, both against float32.
  bf16_fp32    configs/tiny.py (S=1024, B=8) trained 30 steps on the same batches in float32 and in bfloat16: both
               loss curves and the largest relative gap.
  train_block  train_none with remat 'block' (run right after train_none when that one runs out of memory).
  train_xla    train_none with attention_impl 'xla', run (right after it) only when train_none fails otherwise.

The JSON goes to $OUT/gpu_check.json when OUT is set, else to --out; it is rewritten after every section, so what
ran survives a later failure. A summary is printed as it goes and again at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (least seconds of budget left to start it, the most it may run), on a GPU
SECTIONS = {
    "env": (10, 90),
    "attention": (30, 150),
    "train_none": (60, 300),
    "model_loss": (40, 150),
    "bf16_fp32": (50, 180),
    "train_block": (60, 300),
    "train_xla": (60, 300),  # not in the default order: only when train_none fails other than by memory
}
DEFAULT_ORDER = ["env", "attention", "train_none", "model_loss", "bf16_fp32", "train_block"]
# Dense (no sparsity) bfloat16 tensor-core peaks from NVIDIA's datasheets, by jax's device_kind.
DATASHEET_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM
    "NVIDIA H200": 989e12,  # H200 SXM: the H100's compute
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
}
ATTENTION_TOL = 2e-2  # relative L2 error of bfloat16 attention (output, gradients) against a float32 reference


def say(*parts) -> None:
    print(*parts, flush=True)


def dump(obj, path) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.chmod(tmp, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    os.replace(tmp, path)


def short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 2000 else text[:1000] + " ... " + text[-1000:]


def is_oom(text: str) -> bool:
    t = text.lower()
    return "resource_exhausted" in t or "out of memory" in t or "oom" in t.split()


# ---------------------------------------------------------------------------------------------------------------------
# Helpers of the section processes (they import JAX; the orchestrating process never does)
# ---------------------------------------------------------------------------------------------------------------------


def text_rows(b: int, s: int, seed: int = 0, pad_rows: dict | None = None):
    """(B, S) int32 rows of real bytes (bench/train_step.py's real_batch: TinyStories beside the repository, else
    CPython's bundled documentation): BOS, text, EOS; row i of `pad_rows` {i: length} ends with EOS at length - 1 and
    is PAD after it (PAD a suffix of the row, as the data pipeline makes it)."""
    from train_step import real_batch

    from abstractinator_jax.config import EOS_ID, PAD_ID

    rows = real_batch(b, s, seed=seed)
    for i, n in (pad_rows or {}).items():
        rows[i, n - 1] = EOS_ID
        rows[i, n:] = PAD_ID
    return rows


def errors(a, ref) -> dict:
    """max abs error, max abs error / max |ref|, relative L2 error, all finite: of a against ref."""
    import numpy as np

    a = np.asarray(a, np.float32)
    ref = np.asarray(ref, np.float32)
    d = np.abs(a - ref)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return {
        "max_abs": float(d.max()),
        "max_rel": float(d.max() / max(scale, 1e-30)),
        "rel_l2": float(np.linalg.norm((a - ref).ravel()) / max(float(np.linalg.norm(ref.ravel())), 1e-30)),
        "finite": bool(np.isfinite(a).all()),
    }


def timed(fn, *args, warmup: int = 2, reps: int = 5) -> tuple[float, object]:
    """Median seconds of fn(*args) (synchronised) after `warmup` calls, and the last output: bench/train_step.py's,
    imported in the section's own process (importing it loads jax)."""
    from train_step import timed as train_step_timed

    return train_step_timed(fn, *args, warmup=warmup, reps=reps)


def device_memory() -> dict:
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        stats = {}
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit", "largest_alloc_size")
    return {f"{k.replace('_bytes', '').replace('bytes_', '')}_gb": round(stats[k] / 1e9, 2) for k in keys if k in stats}


def on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------


def section_env(args, rec, flush):
    import importlib.metadata as md
    import platform
    import shutil

    import jax

    from abstractinator_jax.model import resolve_attention_impl

    versions = {}
    for dist in (
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "chex",
        "numpy",
        "ml_collections",
        "jax-cuda13-plugin",
        "jax-cuda13-pjrt",
        "jax-cuda12-plugin",
        "jax-cuda12-pjrt",
        "nvidia-cudnn-cu13",
        "nvidia-cudnn-cu12",
    ):
        with contextlib.suppress(Exception):
            versions[dist] = md.version(dist)
    import flax
    import ml_collections

    rec["versions"] = versions
    rec["python"] = platform.python_version()
    rec["module_paths"] = {m.__name__: str(Path(m.__file__).parent) for m in (jax, flax, ml_collections)}
    rec["backend"] = jax.default_backend()
    devs = jax.devices()
    d = devs[0]
    rec["devices"] = [str(x) for x in devs]
    rec["device_kind"] = d.device_kind
    rec["compute_capability"] = getattr(d, "compute_capability", None)
    with contextlib.suppress(Exception):
        rec["platform_version"] = d.client.platform_version
    try:
        from jax._src.lib import cuda_versions

        if cuda_versions is not None:
            cv = {}
            for name in sorted(dir(cuda_versions)):
                if name.endswith("_version") and callable(getattr(cuda_versions, name)):
                    try:
                        cv[name] = getattr(cuda_versions, name)()
                    except Exception as e:
                        cv[name] = f"error: {e}"
            rec["cuda_versions"] = cv
    except Exception as e:
        rec["cuda_versions"] = f"unavailable: {short_error(e)}"
    rec["attention_auto"] = {dt: resolve_attention_impl("auto", dt) for dt in ("bfloat16", "float32")}
    rec["default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    rec["env"] = {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_PLATFORMS")}
    rec["datasheet_bf16_flops"] = DATASHEET_BF16_FLOPS.get(d.device_kind)
    rec.update(device_memory())
    if shutil.which("nvidia-smi"):
        q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
        try:
            r = subprocess.run(
                ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            )
            rec["nvidia_smi"] = {"query": q, "out": r.stdout.strip()}
        except Exception as e:
            rec["nvidia_smi"] = short_error(e)
    say(
        f"[env] {rec['backend']}: {rec['device_kind']} x{len(devs)}; jax {versions.get('jax')}, flax "
        f"{versions.get('flax')}; auto attention in bf16 -> {rec['attention_auto']['bfloat16']}"
    )
    if "cuda_versions" in rec:
        say(f"[env] cuda versions: {rec['cuda_versions']}")
    flush()

    # measured bfloat16 matmul peak: n^3 in jit on random data, the best of 3 trials of `reps` back-to-back products
    import jax.numpy as jnp

    n, reps = (512, 3) if args.smoke else (8192, 20)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    for _ in range(3):
        out = f(a, b)
    out.block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            out = f(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t) / reps)
    rec["matmul_bf16"] = {"n": n, "s": best, "flops": 2 * n**3 / best}
    say(
        f"[env] bf16 matmul {n}^3: {2 * n**3 / best / 1e12:.1f} TFLOP/s measured; datasheet dense bf16: "
        f"{rec['datasheet_bf16_flops'] / 1e12 if rec['datasheet_bf16_flops'] else 'unknown'} TFLOP/s"
    )


def _attention_fn(kind_window: int, impl: str):
    """jit(q, k, v, key_pad, ct) -> (out, dq, dk, dv) of attention.py's kernel for `impl`."""
    import jax

    from abstractinator_jax.attention import causal_attention, sliding_window_attention

    def attn(q, k, v, key_pad):
        if kind_window > 0:
            return sliding_window_attention(q, k, v, key_pad, window=kind_window, implementation=impl)
        return causal_attention(q, k, v, key_pad, implementation=impl)

    def fwd_bwd(q, k, v, key_pad, ct):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, key_pad), q, k, v)
        return (out, *vjp(ct.astype(out.dtype)))

    return jax.jit(fwd_bwd)


def _attention_inputs(key, b, t, n, width, value_heads, value_width, lengths):
    import jax
    import jax.numpy as jnp

    kq, kk, kv, kc = jax.random.split(key, 4)
    q = jax.random.normal(kq, (b, t, n, width), jnp.float32)
    k = jax.random.normal(kk, (b, t, n, width), jnp.float32)
    v = jax.random.normal(kv, (b, t, value_heads, value_width), jnp.float32)
    ct = jax.random.normal(kc, (b, t, n, value_width), jnp.float32)
    key_pad = jnp.arange(t)[None, :] >= jnp.asarray(lengths)[:, None]
    # bfloat16 inputs; the float32 reference sees exactly the same (rounded) values
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    return q, k, v, key_pad, ct


def section_attention(args, rec, flush):
    import jax
    import jax.numpy as jnp

    from abstractinator_jax.model import resolve_attention_impl

    gpu = on_gpu()
    rec["auto_bf16"] = resolve_attention_impl("auto", "bfloat16")
    rec["tolerance_rel_l2"] = ATTENTION_TOL
    if args.smoke:
        b, t, n, h, window, r, c = 2, 256, 2, 16, 32, 8, 16
    else:
        b, t, n, h, window, r, c = 2, 2048, 8, 64, 256, 32, 64
    lengths = [t, t * 3 // 4 + 5]  # row 1: trailing PAD
    rec["shape"] = {"B": b, "T": t, "heads": n, "mha_head_dim": h, "window": window, "mla_retr": r, "mla_latent": c}
    rec["lengths"] = lengths
    impls = ["xla", "cudnn"] if gpu else ["xla"]
    if not gpu:
        rec["cudnn"] = "skipped: no GPU"
    cases = {}
    rec["cases"] = cases
    for kind in ("mha", "mla"):
        for win in (0, window):
            name = f"{kind}_{'full' if win == 0 else f'window{win}'}"
            case = cases[name] = {}
            try:
                width, vh, vw = (h, n, h) if kind == "mha" else (r, 1, c)
                q, k, v, key_pad, ct = _attention_inputs(jax.random.key(1), b, t, n, width, vh, vw, lengths)
                with jax.default_matmul_precision("highest"):
                    ref = _attention_fn(win, "xla")(*(x.astype(jnp.float32) for x in (q, k, v)), key_pad, ct)
                    ref = jax.device_get(ref)
                outs = {}
                for impl in impls:
                    try:
                        fn = _attention_fn(win, impl)
                        got = outs[impl] = jax.device_get(fn(q, k, v, key_pad, ct))
                        errs = {part: errors(g, rr) for part, g, rr in zip(("out", "dq", "dk", "dv"), got, ref)}
                        ok = all(e["finite"] and e["rel_l2"] <= ATTENTION_TOL for e in errs.values())
                        sec, _ = timed(fn, q, k, v, key_pad, ct, warmup=2, reps=5)
                        case[impl] = {"vs_fp32": errs, "pass": ok, "fwd_bwd_s": sec}
                    except Exception as e:
                        case[impl] = {"error": short_error(e), "pass": False}
                if len(outs) == 2:
                    case["cudnn_vs_xla_bf16"] = {
                        part: errors(gc, gx)
                        for part, gc, gx in zip(("out", "dq", "dk", "dv"), outs["cudnn"], outs["xla"])
                    }
                line = []
                for impl in impls:
                    e = case.get(impl, {})
                    if "error" in e:
                        line.append(f"{impl} ERROR {e['error'][:200]}")
                    else:
                        worst = max(x["rel_l2"] for x in e["vs_fp32"].values())
                        line.append(
                            f"{impl} worst rel_l2 {worst:.1e} {'PASS' if e['pass'] else 'FAIL'} "
                            f"{e['fwd_bwd_s'] * 1e3:.2f} ms"
                        )
                say(f"[attention] {name}: " + "; ".join(line))
            except Exception as e:
                case["error"] = short_error(e)
                say(f"[attention] {name}: ERROR {case['error'][:300]}")
            flush()
    rec["pass"] = bool(gpu) and all(cs.get("cudnn", {}).get("pass", False) for cs in cases.values())

    # fwd+bwd time at gpu_100m's shapes (timing and cudnn-vs-xla agreement only)
    perf = rec["model_shapes"] = {}
    if args.smoke:
        shapes = {"compressor_window128": (1, 512, 2, 8, 16, 32), "top_full": (1, 256, 2, 8, 16, 0)}
    else:
        shapes = {"compressor_window128": (16, 8192, 12, 32, 64, 128), "top_full": (16, 4096, 12, 32, 64, 0)}
    for name, (pb, pt, pn, pr, pc, pw) in shapes.items():
        entry = perf[name] = {"B": pb, "T": pt, "heads": pn, "retr": pr, "latent": pc, "window": pw}
        try:
            q, k, v, key_pad, ct = _attention_inputs(
                jax.random.key(2), pb, pt, pn, pr, 1, pc, [pt] * (pb - 1) + [pt // 2]
            )
            outs = {}
            for impl in impls:
                try:
                    fn = _attention_fn(pw, impl)
                    entry[f"{impl}_fwd_bwd_s"], outs[impl] = timed(fn, q, k, v, key_pad, ct, warmup=2, reps=5)
                except Exception as e:
                    entry[f"{impl}_error"] = short_error(e)
            if len(outs) == 2:
                got_c, got_x = jax.device_get(outs["cudnn"]), jax.device_get(outs["xla"])
                entry["cudnn_vs_xla_rel_l2"] = {
                    part: errors(gc, gx)["rel_l2"] for part, gc, gx in zip(("out", "dq", "dk", "dv"), got_c, got_x)
                }
            say(f"[attention] {name} {entry}")
        except Exception as e:
            entry["error"] = short_error(e)
            say(f"[attention] {name}: ERROR {entry['error'][:300]}")
        flush()


def _tiny(seq_len: int, batch: int, top: bool):
    from abstractinator_jax.cli import load_config_file
    from abstractinator_jax.config import validate_config

    cfg = load_config_file(str(ROOT / "configs" / "tiny.py"))
    cfg.sequence_length = seq_len
    cfg.batch_size = batch
    cfg.gradient_accumulation_steps = 1
    if top:
        cfg.use_top_code_lm = True
        cfg.top_row_buckets = 1  # one compiled branch
    return validate_config(cfg)


def section_model_loss(args, rec, flush):
    import jax
    import numpy as np
    from flax import linen as nn
    from jax.flatten_util import ravel_pytree

    from abstractinator_jax.config import PAD_ID
    from abstractinator_jax.model import AbstractinatorPyramid

    gpu = on_gpu()
    s, b = (128, 2) if args.smoke else (1024, 2)
    cfg = _tiny(s, b, top=True)
    ids = text_rows(b, s, seed=1, pad_rows={1: s * 3 // 4})
    pad = ids == PAD_ID
    rec["shape"] = {"config": "tiny.py + top", "S": s, "B": b, "padded_row_length": s * 3 // 4}
    variables = nn.unbox(
        AbstractinatorPyramid(cfg).init({"params": jax.random.key(0), "vq": jax.random.key(1)}, ids, pad)
    )
    params = variables.pop("params")
    runs = [("xla_fp32", "xla", "float32"), ("xla_bf16", "xla", "bfloat16")]
    runs += [("cudnn_bf16", "cudnn", "bfloat16")] if gpu else []
    if not gpu:
        rec["cudnn_bf16"] = "skipped: no GPU"
    got = {}
    for name, impl, dtype in runs:
        try:
            c = copy.deepcopy(cfg)
            c.attention_impl, c.dtype = impl, dtype
            model = AbstractinatorPyramid(c)

            def loss(p, model=model):
                return model.apply({"params": p, **variables}, ids, pad, train=False)

            t0 = time.perf_counter()
            with jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext():
                (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
                value = float(value)
            flat = np.asarray(ravel_pytree(jax.device_get(grads))[0], np.float32)
            got[name] = (value, flat)
            rec[name] = {
                "loss": value,
                "segments_per_row": float(metrics["level0/segments_per_row"]),
                "grad_l2": float(np.linalg.norm(flat)),
                "grad_finite": bool(np.isfinite(flat).all()),
                "compile_and_run_s": time.perf_counter() - t0,
            }
            say(f"[model_loss] {name}: loss {value:.6f}, segments/row {rec[name]['segments_per_row']:.1f}")
        except Exception as e:
            rec[name] = {"error": short_error(e)}
            say(f"[model_loss] {name}: ERROR {rec[name]['error'][:300]}")
        flush()

    def compare(a, ref):
        (la, ga), (lr, gr) = got[a], got[ref]
        return {"loss_rel_diff": abs(la - lr) / max(abs(lr), 1e-30), "grad": errors(ga, gr)}

    for a, ref in (("xla_bf16", "xla_fp32"), ("cudnn_bf16", "xla_fp32"), ("cudnn_bf16", "xla_bf16")):
        if a in got and ref in got:
            rec[f"{a}_vs_{ref}"] = compare(a, ref)
    if "cudnn_bf16_vs_xla_bf16" in rec and "xla_bf16_vs_xla_fp32" in rec:
        loss_ok = rec["cudnn_bf16_vs_xla_bf16"]["loss_rel_diff"] <= 1e-2
        g_c = rec["cudnn_bf16_vs_xla_fp32"]["grad"]["rel_l2"]
        g_x = rec["xla_bf16_vs_xla_fp32"]["grad"]["rel_l2"]
        rec["pass"] = bool(loss_ok and rec["cudnn_bf16"]["grad_finite"] and g_c <= 2 * g_x + 1e-2)
        rec["pass_rule"] = "loss within 1% of XLA bf16; gradient error vs fp32 <= 2x XLA bf16's + 0.01"
        say(
            f"[model_loss] cudnn vs xla bf16: loss rel diff {rec['cudnn_bf16_vs_xla_bf16']['loss_rel_diff']:.2e}; "
            f"grad rel_l2 vs fp32: cudnn {g_c:.2e}, xla {g_x:.2e} -> {'PASS' if rec['pass'] else 'FAIL'}"
        )
    elif "xla_bf16_vs_xla_fp32" in rec:
        say(f"[model_loss] xla bf16 vs fp32: {rec['xla_bf16_vs_xla_fp32']}")


def section_bf16_fp32(args, rec, flush):
    import jax
    import numpy as np

    from abstractinator_jax import steps, train_state
    from abstractinator_jax.config import PAD_ID
    from abstractinator_jax.model import AbstractinatorPyramid, resolve_attention_impl
    from abstractinator_jax.sharding import make_mesh

    s, b, n_steps = (128, 2, 3) if args.smoke else (1024, 8, 30)
    rec["shape"] = {"config": "tiny.py", "S": s, "B": b, "steps": n_steps, "warmup_steps": 5, "batches": "distinct"}
    batches = []
    for i in range(n_steps):
        ids = text_rows(b, s, seed=100 + i)
        batches.append({"ids": ids[None], "mask": (ids == PAD_ID)[None]})
    curves = {}
    for dtype in ("float32", "bfloat16"):
        r = rec[dtype] = {}
        try:
            cfg = _tiny(s, b, top=False)
            cfg.dtype = dtype
            cfg.warmup_steps, cfg.max_steps = 5, n_steps
            r["attention_impl"] = resolve_attention_impl(cfg.attention_impl, dtype)
            mesh = make_mesh(cfg.mesh)
            model = AbstractinatorPyramid(cfg)
            opt = train_state.make_optimizer(cfg)
            state, shardings = train_state.create_train_state(cfg, model, mesh, opt)
            r["initial_param_l2"] = float(
                np.sqrt(sum(float(np.sum(np.square(np.asarray(x)))) for x in jax.tree.leaves(state.params)))
            )
            step = steps.make_train_step(cfg, model, mesh, opt, shardings)
            with jax.set_mesh(mesh):
                t0 = time.perf_counter()
                compiled = step.lower(state, batches[0]).compile()
                r["compile_s"] = time.perf_counter() - t0
                losses, norms = [], []
                t0 = time.perf_counter()
                for batch in batches:
                    state, m = compiled(state, batch)
                    losses.append(float(m["loss"]))
                    norms.append(float(m["grad_norm"]))
                r["run_s"] = time.perf_counter() - t0
            r["loss"], r["grad_norm"] = losses, norms
            curves[dtype] = np.asarray(losses)
            say(f"[bf16_fp32] {dtype} ({r['attention_impl']}): loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        except Exception as e:
            r["error"] = short_error(e)
            say(f"[bf16_fp32] {dtype}: ERROR {r['error'][:300]}")
        flush()
    if len(curves) == 2:
        f32, b16 = curves["float32"], curves["bfloat16"]
        gap = np.abs(b16 - f32) / np.maximum(np.abs(f32), 1e-30)
        rec["max_rel_gap"] = float(gap.max())
        rec["max_rel_gap_step"] = int(gap.argmax())
        rec["final_rel_gap"] = float(gap[-1])
        say(f"[bf16_fp32] max relative loss gap {gap.max():.2e} (step {int(gap.argmax())}), final {gap[-1]:.2e}")


def _section_train(args, rec, flush, remat: str, attention_impl: str | None = None):
    import jax
    import numpy as np

    from abstractinator_jax import steps, train_state
    from abstractinator_jax.cli import load_config_file
    from abstractinator_jax.config import PAD_ID, validate_config
    from abstractinator_jax.flops import flops_per_byte
    from abstractinator_jax.model import AbstractinatorPyramid, resolve_attention_impl
    from abstractinator_jax.sharding import make_mesh

    cfg = load_config_file(str(ROOT / "configs" / "gpu_100m.py"))
    if args.smoke:
        cfg.sequence_length, cfg.batch_size = 512, 1
    if args.train_batch_size:
        cfg.batch_size = args.train_batch_size
    if args.train_sequence_length:
        cfg.sequence_length = args.train_sequence_length
    cfg.remat = remat
    if attention_impl:
        cfg.attention_impl = attention_impl
    cfg.gradient_accumulation_steps = 1
    validate_config(cfg)
    b, s = cfg.batch_size, cfg.sequence_length
    n_steps = 2 if args.smoke else args.train_steps
    impl = resolve_attention_impl(cfg.attention_impl, cfg.dtype)
    rec.update(config="gpu_100m.py", batch_size=b, sequence_length=s, dtype=cfg.dtype, remat=remat, attention_impl=impl)
    kind = jax.devices()[0].device_kind
    peaks = {"datasheet": DATASHEET_BF16_FLOPS.get(kind), "measured_matmul": args.measured_peak_flops}
    rec["peak_flops"] = peaks
    try:
        mesh = make_mesh(cfg.mesh)
        model = AbstractinatorPyramid(cfg)
        opt = train_state.make_optimizer(cfg)
        state, shardings = train_state.create_train_state(cfg, model, mesh, opt)
        rec["parameters"] = train_state.count_params(state.params)
        step = steps.make_train_step(cfg, model, mesh, opt, shardings)
        ids = text_rows(b, s, seed=0)
        batch = {"ids": ids[None], "mask": (ids == PAD_ID)[None]}
        real_bytes = int(np.sum(ids != PAD_ID))
        with jax.set_mesh(mesh):
            t0 = time.perf_counter()
            compiled = step.lower(state, batch).compile()
            rec["compile_s"] = time.perf_counter() - t0
            say(f"[train {remat}] B={b} S={s} {cfg.dtype} {impl}: compiled in {rec['compile_s']:.1f} s")
            try:
                mem = compiled.memory_analysis()
                rec["xla_memory_gb"] = {
                    k: round(getattr(mem, f"{k}_size_in_bytes") / 1e9, 3)
                    for k in ("temp", "argument", "output", "alias", "generated_code")
                    if hasattr(mem, f"{k}_size_in_bytes")
                }
            except Exception as e:
                rec["xla_memory_gb"] = short_error(e)
            flush()
            t0 = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
            rec["first_step_s"] = time.perf_counter() - t0
            holder = {"state": state}

            def run_step(bt):
                holder["state"], met = compiled(holder["state"], bt)
                return met

            step_s, m = timed(run_step, batch, warmup=1 if args.smoke else 2, reps=n_steps)
            t0 = time.perf_counter()
            for _ in range(n_steps):
                m2 = run_step(batch)
            jax.block_until_ready(m2)
            pipelined_s = (time.perf_counter() - t0) / n_steps
        m = jax.device_get(m)
        ratio = float(m["level0/compression_ratio"])
        fpb = flops_per_byte(cfg, ratio)["train"]
        flops = fpb * real_bytes
        rec.update(
            step_s_median=step_s,
            step_s_pipelined_mean=pipelined_s,
            real_bytes_per_step=real_bytes,
            bytes_per_s=real_bytes / step_s,
            bytes_per_s_pipelined=real_bytes / pipelined_s,
            compression_ratio=ratio,
            segments_per_row=float(m["level0/segments_per_row"]),
            loss=float(m["loss"]),
            grad_norm=float(m["grad_norm"]),
            train_flops_per_byte=fpb,
            model_flops_per_step=flops,
            model_flops_per_s=flops / step_s,
        )
        for name, peak in peaks.items():
            if peak:
                rec[f"mfu_{name}"] = flops / step_s / peak
                rec[f"mfu_{name}_pipelined"] = flops / pipelined_s / peak
        rec.update(device_memory())
        mfu = ", ".join(f"{k[4:]} {v:.1%}" for k, v in rec.items() if k.startswith("mfu_") and "pipelined" not in k)
        say(
            f"[train {remat}] step {step_s * 1e3:.1f} ms (pipelined {pipelined_s * 1e3:.1f} ms), "
            f"{real_bytes / step_s:,.0f} bytes/s, {flops / step_s / 1e12:.2f} model TFLOP/s, MFU {mfu or 'n/a'}; "
            f"{ratio:.2f} bytes/segment; peak memory {rec.get('peak_in_use_gb', 'n/a')} GB"
        )
    except Exception as e:
        text = short_error(e)
        rec["error"] = text
        rec["oom"] = is_oom(text)
        rec.update(device_memory())
        say(f"[train {remat}] {'OUT OF MEMORY' if rec['oom'] else 'ERROR'}: {text[:400]}")


def section_train_none(args, rec, flush):
    _section_train(args, rec, flush, "none")


def section_train_block(args, rec, flush):
    _section_train(args, rec, flush, "block")


def section_train_xla(args, rec, flush):
    _section_train(args, rec, flush, "none", attention_impl="xla")


SECTION_FNS = {
    "env": section_env,
    "attention": section_attention,
    "train_none": section_train_none,
    "model_loss": section_model_loss,
    "bf16_fp32": section_bf16_fp32,
    "train_block": section_train_block,
    "train_xla": section_train_xla,
}


def run_section(args) -> None:
    """In a section process: run one section, writing its record to --result_file after every part."""
    rec: dict = {}

    def flush():
        rec["imported_grain"] = "grain" in sys.modules
        dump(rec, args.result_file)

    try:
        SECTION_FNS[args.section](args, rec, flush)
        rec.setdefault("status", "error" if "error" in rec else "ok")
    except BaseException as e:  # record it, whatever it is
        rec["status"] = "error"
        rec["error"] = short_error(e)
        rec["traceback"] = traceback.format_exc()[-4000:]
        say(f"[{args.section}] ERROR {rec['error'][:400]}")
    flush()


# ---------------------------------------------------------------------------------------------------------------------
# The orchestrating process
# ---------------------------------------------------------------------------------------------------------------------


def summary_line(name: str, r: dict) -> str:
    head = f"{name:<12} {r.get('status', '?'):<8} {r.get('wall_s', 0):6.1f} s"
    if r.get("status") == "skipped":
        return f"{head}  {r.get('reason', '')}"
    if name == "env":
        return f"{head}  {r.get('device_kind')} / jax {r.get('versions', {}).get('jax')} / bf16 matmul " + (
            f"{r['matmul_bf16']['flops'] / 1e12:.0f} TFLOP/s" if "matmul_bf16" in r else "n/a"
        )
    if name == "attention":
        cases = r.get("cases", {})
        if not any("cudnn" in c for c in cases.values()):
            return f"{head}  cuDNN {r.get('cudnn', 'not run')}; xla bf16 vs fp32 " + " ".join(
                f"{k}:{'PASS' if c.get('xla', {}).get('pass') else 'FAIL'}" for k, c in cases.items()
            )
        return f"{head}  cuDNN vs fp32: {'PASS' if r.get('pass') else 'FAIL'} " + " ".join(
            f"{k}:{'PASS' if c.get('cudnn', {}).get('pass') else 'FAIL'}" for k, c in cases.items()
        )
    if name.startswith("train"):
        if "step_s_median" in r:
            mfu = " ".join(f"{k}={v:.1%}" for k, v in r.items() if k.startswith("mfu_") and "pipelined" not in k)
            return (
                f"{head}  B={r['batch_size']} S={r['sequence_length']} {r['step_s_median'] * 1e3:.1f} ms/step "
                f"{r['bytes_per_s']:,.0f} bytes/s {mfu} peak {r.get('peak_in_use_gb', 'n/a')} GB "
                f"compile {r.get('compile_s', 0):.0f} s"
            )
        return f"{head}  {'OOM' if r.get('oom') else 'error'}: {str(r.get('error', ''))[:150]}"
    if name == "model_loss":
        verdict = {True: "PASS", False: "FAIL"}.get(r.get("pass"), "cuDNN not run")
        return f"{head}  {verdict} " + str(
            {k: round(v["loss_rel_diff"], 6) for k, v in r.items() if k.endswith(("_fp32", "_bf16")) and "_vs_" in k}
        )
    if name == "bf16_fp32":
        if "max_rel_gap" not in r:
            return f"{head}  " + "; ".join(
                f"{k}: {str(r.get(k, {}).get('error', 'ok' if 'loss' in r.get(k, {}) else 'not finished'))[:100]}"
                for k in ("float32", "bfloat16")
            )
        gap = f"max {r['max_rel_gap']:.2e} (step {r['max_rel_gap_step']}), final {r['final_rel_gap']:.2e}"
        return f"{head}  loss gap bf16 vs fp32: {gap}"
    return head


def orchestrate(args) -> None:
    out_path = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path(args.out)
    t_start = time.perf_counter()
    result = {
        "script": "bench/gpu_check.py",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:],
        "smoke": args.smoke,
        "budget_s": args.budget_s,
        "sections": {},
    }
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        result["commit"] = rev.stdout.strip() or None
    except Exception:
        result["commit"] = None
    order = [s for s in SECTIONS if s in args.sections.split(",")] if args.sections else list(DEFAULT_ORDER)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")  # the training section's batch wants most of the GPU
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    say(f"gpu_check: sections {order}, budget {args.budget_s:.0f} s, JSON -> {out_path}")
    measured_peak = None
    queue = list(order)
    with tempfile.TemporaryDirectory() as tmp:
        while queue:
            name = queue.pop(0)
            least, most = SECTIONS[name]
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < least:
                result["sections"][name] = {
                    "status": "skipped",
                    "reason": f"budget: {left:.0f} s left, needs >= {least} s",
                    "wall_s": 0.0,
                }
                say(f"== {name}: skipped ({left:.0f} s of budget left)")
                dump(result, out_path)
                continue
            timeout = max(1.0, min(most * (3 if args.smoke else 1), left))
            rfile = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--result_file", str(rfile)]
            cmd += ["--train_steps", str(args.train_steps)]
            for flag, value in (
                ("--train_batch_size", args.train_batch_size),
                ("--train_sequence_length", args.train_sequence_length),
                ("--measured_peak_flops", measured_peak),
            ):
                if value:
                    cmd += [flag, str(value)]
            if args.smoke:
                cmd.append("--smoke")
            say(f"== {name} (timeout {timeout:.0f} s)")
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                status = None
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
                status = "timeout"
            wall = time.perf_counter() - t0
            try:
                rec = json.loads(rfile.read_text())
            except Exception:
                rec = {}
            if status:
                rec["status"] = status
                rec["error"] = f"killed after {timeout:.0f} s (the section's limit or the budget)"
            elif rc != 0 and rec.get("status") != "error":
                rec["status"] = "crashed"
                rec["error"] = f"exit code {rc}" + (" (a signal)" if rc < 0 else "")
            rec.setdefault("status", "crashed")
            rec["wall_s"] = round(wall, 2)
            rec["exit_code"] = rc
            result["sections"][name] = rec
            if name == "env" and "matmul_bf16" in rec:
                measured_peak = rec["matmul_bf16"]["flops"]
            if name == "train_none" and "step_s_median" not in rec:
                # no main figure yet: out of memory -> remat 'block' next; another failure (say, of the cuDNN
                # path) -> the same step with XLA attention next; before the other checks either way
                nxt = "train_block" if rec.get("oom") else "train_xla" if rec["status"] != "timeout" else None
                if nxt in queue:
                    queue.remove(nxt)
                if nxt:
                    queue.insert(0, nxt)
            result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            dump(result, out_path)
            say(f"== {name}: {rec['status']} in {wall:.1f} s")
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    dump(result, out_path)
    say("\n=== gpu_check summary ===")
    for name, r in result["sections"].items():
        say(summary_line(name, r))
    grain = [n for n, r in result["sections"].items() if r.get("imported_grain")]
    if grain:
        say(f"note: grain was imported by {grain}")
    say(f"JSON: {out_path} ({result['elapsed_s']:.0f} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget_s", type=float, default=480.0, help="no section starts after this many seconds")
    ap.add_argument("--out", default="/tmp/gpu_check.json", help="the JSON file when $OUT is not set")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (cuDNN parts skipped)")
    ap.add_argument("--sections", default="", help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--train_steps", type=int, default=20, help="timed steps of the train sections")
    ap.add_argument("--train_batch_size", type=int, default=0, help="gpu_100m's batch (default: the config's)")
    ap.add_argument("--train_sequence_length", type=int, default=0, help="gpu_100m's S (default: the config's)")
    # internal: a section process
    ap.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    ap.add_argument("--result_file", help=argparse.SUPPRESS)
    ap.add_argument("--measured_peak_flops", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.section:
        run_section(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
