r"""Our train step against the PyTorch original's, same config, batch, length and real text, timed alternately.

One-time setup (its own environment; torch is never a dependency of this package):

    python bench/vs_original.py --setup --original-git <git dir or URL of OilProducts/abstractinator>

makes `.bench-venv/` (gitignored): a venv with a CPU build of torch and numpy, and the original's source at
`--original-rev` (default e38a88d) unpacked in `.bench-venv/original`. PyPI's default Linux torch wheel is a CUDA
build that pulls ~3 GB of NVIDIA wheels (~6 GB installed); setup therefore installs a local CPU wheel when pip's
find-links has one (or `--torch-wheel PATH`), and refuses the CUDA build unless `--allow-cuda-torch`.

Then (modes):

    # the paired step time: one JSON line with medians per step, bytes/s, the ratio and both last losses
    python bench/vs_original.py --config configs/stage1_super_tiny.py --batch_size 8 --sequence_length 512 \
        --rounds 5 --steps_per_round 2

    # per-component forward+backward times of both (level-0 compressor, level-0 expander, top transformer,
    # optimizer update) and the whole step: one JSON line
    python bench/vs_original.py --components --config configs/stage1_super_tiny.py --batch_size 8 \
        --sequence_length 512 --reps 5

    # either of the above at a trained model's segmentation (a train.py run of the same config), not at init's
    python bench/vs_original.py --segmentation trained --trained_workdir runs/stage1 \
        --config configs/stage1_super_tiny.py --batch_size 8 --sequence_length 512 --rounds 5 --steps_per_round 2

    # check the original's exact attention modes against torch's flex_attention, that they train, and the forced
    # segmentation (PASS/FAIL)
    python bench/vs_original.py --check --config configs/stage1_super_tiny.py --batch_size 2 --sequence_length 128

    # stage 2 (a stage-2 config): the top transformer trained over a frozen stage-1 pyramid; ours loads the
    # pyramid of a stage-1 run of the same levels (its init_from), the original freezes its own (segmentation forced)
    python bench/vs_original.py --config configs/stage2_super_tiny.py --trained_workdir runs/stage1 \
        --batch_size 8 --sequence_length 512 --rounds 3 --steps_per_round 2

`--top` trains the config's top transformer in stage 1 on both sides (the original's experiments/tiny.py does; our
configs/tiny.py leaves it to `--config.use_top_code_lm=True`); `--top_row_buckets N` and `--top_batch_chunks N` set our
top's row buckets and batch chunks.

Both models are built from the same config (the original's from its components/, sized by our config's fields);
each side compiles first (ours: jit; the original: eager, or `--torch_compile` as its train.py does), then the
driver alternates rounds of `--steps_per_round` steps: ours, then the original's (a subprocess waiting on stdin,
bench/original_side.py), so both see the same machine load.

The original's attention (`--original_attention`, see bench/original_side.py): `auto` (default) is its own
flex_attention with CUDA and `exact_dense` without: torch has no flex_attention backward on CPU, so on a CPU the
original trains with its flex_attention calls replaced by an exact dense PyTorch equivalent (same masks, scale and
empty-row handling; checked by `--check`), which computes every (query, key) score where flex skips the blocks its
mask leaves out. `exact_sparse` is the same function computed only on the blocks the mask lists, as flex's kernel
does (same losses; the work of a block-sparse kernel, so the fairer CPU stand-in for flex at long sequences).
`fallback` is the original's own use_flex_attention=False path: at e38a88d its masks are wrong and its loss is NaN
from the second step (see bench/original_side.py); timing only.

Segmentation (`--segmentation`): the original's cost depends on where level 0 cuts the bytes (its pooling, top
transformer and expander work depends on the real number of segments), ours much less (fixed slots, c_output_length /
c_num_queries per row, whatever the count). `init` (default): each side at its random initialisation, cutting where its
own untrained entropy model says (several times longer segments than a trained model's). `trained`: ours restores the
parameters and quantizer state (and optimizer state and step) of the latest checkpoint of `--trained_workdir` (a
train.py run whose saved config matches `--config` in the model, the loss weights and the optimizer; data, sequence,
batch, slot count (c_output_length) and run bookkeeping may differ; read only), so its step runs at that model's
segmentation. The original cannot load our weights: it keeps its own random initialisation, and its level-0 boundaries
are forced, for the benchmark batch, to ours (our trained model's patch_end_mask of that batch, see
bench/original_side.py Original.force_segmentation); its entropy model still runs and trains, only the boundary decision
is forced. Level 0 only, so `trained` takes one-level configs. Both modes report each side's level-0 bytes per segment
on the batch (`bytes_per_segment`; forced, the original's equals ours) and, in the paired mode, the same at the last
step (`bytes_per_segment_last`: ours from its last step's metric; the original's own boundaries move as its entropy
model trains, unless forced).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".bench-venv"
ORIGINAL = VENV / "original"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# ---------------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------------

CUDA_TORCH_NOTE = (
    "the torch wheel pip would install is PyPI's default Linux build, which depends on the CUDA libraries "
    "(nvidia-cudnn, cublas, nccl, cusparse, cufft, cusolver, nvshmem, triton, ...): about 3 GB to download and "
    "6 GB installed. Pass --torch-wheel <a torch-*+cpu wheel>, or --allow-cuda-torch to accept that."
)


def _find_cpu_wheel() -> str | None:
    """A torch '+cpu' wheel for this Python in pip's configured find-links folders, if any."""
    res = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    dirs = []
    for line in res.stdout.splitlines():
        if "find-links" in line:
            dirs += line.split("=", 1)[1].strip().strip("'\"").split()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for d in dirs:
        hits = sorted(glob.glob(os.path.join(d.removeprefix("file://"), f"torch-*+cpu-{tag}-*.whl")))
        if hits:
            return hits[-1]
    return None


def _unpack_original(source: str, rev: str) -> None:
    """The original's tree at `rev` into .bench-venv/original, from a local git dir or a clonable URL."""
    if ORIGINAL.exists():
        shutil.rmtree(ORIGINAL)
    ORIGINAL.mkdir(parents=True)
    git_dir = source
    tmp = None
    if not Path(source).is_dir():
        tmp = tempfile.mkdtemp()
        subprocess.run(["git", "clone", "--quiet", "--no-checkout", source, tmp], check=True)
        git_dir = os.path.join(tmp, ".git")
    archive = subprocess.run(["git", "--git-dir", git_dir, "archive", rev], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(ORIGINAL)], input=archive.stdout, check=True)
    if tmp:
        shutil.rmtree(tmp)


def setup(args) -> None:
    if not args.original_git:
        sys.exit("error: --setup needs --original-git (a git dir or URL of the original's repository).")
    wheel = args.torch_wheel or _find_cpu_wheel()
    if not wheel and not args.allow_cuda_torch:
        sys.exit(f"error: {CUDA_TORCH_NOTE}")
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, wheel or "torch", "numpy"], check=True)
    _unpack_original(args.original_git, args.original_rev)
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    print(f"ready: torch {out.stdout.strip()} in {VENV}, the original at {args.original_rev} in {ORIGINAL}")


# ---------------------------------------------------------------------------------------------------------------------
# The paired benchmark
# ---------------------------------------------------------------------------------------------------------------------


def _need_venv():
    if not (VENV / "bin" / "python").exists() or not ORIGINAL.is_dir():
        sys.exit("error: no benchmark environment; run python bench/vs_original.py --setup first.")


class OriginalSide:
    """The original's model in the torch venv, driven over stdin/stdout (bench/original_side.py)."""

    def __init__(self, cfg_dict: dict, torch_compile: bool, threads: int | None, attention: str):
        _need_venv()
        self.tmp = tempfile.mkdtemp()
        cfg_path = os.path.join(self.tmp, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg_dict, f)
        cmd = [str(VENV / "bin" / "python"), str(ROOT / "bench" / "original_side.py"), "--original", str(ORIGINAL)]
        cmd += ["--config-json", cfg_path, "--attention", attention] + (["--compile"] if torch_compile else [])
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                sys.exit("error: the original's side stopped (see its messages above).")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.ask_quit()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def ask_quit(self):
        if self.proc.poll() is None:
            self.proc.stdin.write('{"cmd": "quit"}\n')
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def prepare(args):
    """(config, its JSON-able dict, the real-text batch (B, S) int32 and its .npy path) for these arguments."""
    import numpy as np
    from train_step import apply_overrides, real_batch

    from abstractinator_jax.cli import load_config_file
    from abstractinator_jax.config import to_dict, validate_config

    cfg = load_config_file(args.config)
    cfg.batch_size, cfg.sequence_length, cfg.gradient_accumulation_steps = args.batch_size, args.sequence_length, 1
    cfg.dtype = "float32"
    apply_overrides(cfg, args)
    if cfg.stage == 2:
        # stage 2 trains the top over a frozen stage-1 pyramid: ours loads --trained_workdir as its init_from, the
        # original keeps its own random pyramid, frozen, with level 0's boundaries forced to ours
        if not args.trained_workdir:
            sys.exit("error: a stage-2 config needs --trained_workdir <a stage-1 run of its levels> (its init_from).")
        if getattr(args, "components", False):
            sys.exit("error: --components times stage-1 parts; a stage-2 step is the frozen pyramid + the top.")
        cfg.init_from = args.trained_workdir
        args.segmentation = "trained"
    elif args.trained_workdir and args.segmentation != "trained":
        sys.exit("error: --trained_workdir needs --segmentation trained (a stage-1 config).")
    args.stage2 = cfg.stage == 2
    if getattr(args, "segmentation", "init") == "trained" and len(cfg.levels) > 1:
        sys.exit("error: --segmentation trained forces level 0's boundaries only: use a one-level config.")
    validate_config(cfg)
    ids = real_batch(args.batch_size, args.sequence_length, seed=args.seed)
    ids_path = os.path.join(tempfile.mkdtemp(), "ids.npy")
    np.save(ids_path, ids)
    return cfg, to_dict(cfg), ids, ids_path


# The saved config of a --trained_workdir run must equal the benchmarked one in these sections (besides
# config.MODEL_KEYS): what the train step computes. The rest (data, sequence length, batch, step count, logging,
# checkpoints, seed, mesh, dtype: the benchmark runs float32) may differ.
STEP_KEYS = (
    "top_lm_loss_weight",
    "top_lm_mse_weight",
    "top_lm_ce_weight",
    "learning_rate",
    "min_lr",
    "warmup_steps",
    "weight_decay",
    "adam_b1",
    "adam_b2",
    "gradient_clip_norm",
    "attention_impl",
)


def restore_trained(cfg, workdir: str):
    """(build(cfg)'s Run, the train state of `workdir`'s latest checkpoint, {trained_step, differences not checked})
    after checking that the checkpoint's saved config is `cfg` in the model and the step (MODEL_KEYS, STEP_KEYS).
    Reads the workdir only."""
    from abstractinator_jax.build import build
    from abstractinator_jax.checkpointing import CheckpointManager
    from abstractinator_jax.config import MODEL_KEYS, model_config_differences, to_dict
    from abstractinator_jax.recovery import restore_checked

    if not (Path(workdir) / "checkpoints").is_dir():
        sys.exit(f"error: --trained_workdir {workdir!r} holds no checkpoints/; pass the --workdir of a train.py run.")
    with CheckpointManager(workdir, max_to_keep=None) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            sys.exit(f"error: no checkpoint under {ckpt.directory}.")
        saved = ckpt.restore_config(step)
        if saved is None:
            sys.exit(f"error: checkpoint step {step} under {ckpt.directory} was saved without its config.")
        current = to_dict(cfg)
        diffs = model_config_differences(saved, current) + model_config_differences(saved, current, keys=STEP_KEYS)
        # the slot count (c_output_length) shapes no parameter or state: a run trained at another sequence length
        # benchmarks with this one's slots (its segmentation rule is the same)
        slots = [d for d in diffs if re.match(r"levels\[\d+\]\.c_output_length:", d)]
        diffs = [d for d in diffs if d not in slots]
        if diffs:
            sys.exit(
                f"error: --trained_workdir {workdir} (step {step}) was trained with a config that differs from "
                f"--config in the model or the train step:\n  - " + "\n  - ".join(diffs) + "\nBenchmark it with the "
                "config it was trained with (only data, sequence, batch and run settings may differ)."
            )
        other = sorted((set(saved) | set(current)) - {*MODEL_KEYS, *STEP_KEYS})
        unchecked = sorted({d.split(":")[0] for d in model_config_differences(saved, current, keys=other)})
        run = build(cfg)
        state = restore_checked(ckpt, step, run.abstract_state)
    slots = sorted(d.split(":")[0] for d in slots)
    return run, state, {"trained_step": int(step), "trained_config_differs_in": slots + unchecked}


def stage2_state(cfg):
    """(build(cfg)'s Run, stage 2's first train state, info) as train.py starts stage 2: a fresh top transformer and
    its optimizer state over the frozen pyramid (parameters and quantizer state) of cfg.init_from, after checking
    that it is a stage-1 run of this config's levels."""
    from abstractinator_jax import train_state
    from abstractinator_jax.build import build, check_init_from, load_stage1
    from abstractinator_jax.checkpointing import CheckpointError

    run = build(cfg)
    try:
        init_from = check_init_from(cfg)
    except CheckpointError as e:
        sys.exit(f"error: --trained_workdir {cfg.init_from}: {e}")
    state, _ = train_state.create_train_state(cfg, run.model, run.mesh, run.optimizer)
    state = load_stage1(init_from, run, state)
    return run, state, {"init_from": init_from[0], "init_from_step": int(init_from[1])}


def ours_setup(cfg, ids, trained_workdir: str | None = None):
    """(mesh, model, optimizer, state, the compiled train step, batch, info) of our side: at initialisation, or with
    `trained_workdir` the state of its latest checkpoint (restore_trained; info: its step and the config settings
    in which it differs, unchecked)."""
    import jax
    import numpy as np

    from abstractinator_jax import steps, train_state
    from abstractinator_jax.model import AbstractinatorPyramid
    from abstractinator_jax.sharding import make_mesh

    info = {}
    if cfg.stage == 2:
        run, state, info = stage2_state(cfg)
        mesh, model, opt, shardings = run.mesh, run.model, run.optimizer, run.shardings
    elif trained_workdir:
        run, state, info = restore_trained(cfg, trained_workdir)
        mesh, model, opt, shardings = run.mesh, run.model, run.optimizer, run.shardings
    else:
        mesh = make_mesh(cfg.mesh)
        model = AbstractinatorPyramid(cfg)
        opt = train_state.make_optimizer(cfg)
        state, shardings = train_state.create_train_state(cfg, model, mesh, opt)
    step = steps.make_train_step(cfg, model, mesh, opt, shardings)
    batch = {"ids": ids[None], "mask": np.zeros_like(ids, bool)[None]}
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    return mesh, model, opt, state, compiled, batch, info


def ours_segmentation(model, state, ids, mesh) -> tuple:
    """(patch_end_mask (B, S) bool: True on the last byte of each segment, {real_bytes, segments, bytes_per_segment,
    overflow_rows}) of our level 0 on the batch, with `state`'s parameters and quantizer state (compress_all, no
    state update)."""
    import jax
    import numpy as np
    from flax import linen as nn

    from abstractinator_jax.generation import model_variables
    from abstractinator_jax.sharding import LOGICAL_AXIS_RULES

    pad = np.zeros_like(ids, bool)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        seg = jax.jit(lambda v, i, k: model.apply(v, i, k, method=model.compress_all)[0].segments)(
            model_variables(state), ids, pad
        )
    real, segments = int((~pad).sum()), int(np.sum(seg.num_segments))
    stats = {"real_bytes": real, "segments": segments, "bytes_per_segment": real / max(segments, 1)}
    stats["overflow_rows"] = int(np.sum(seg.overflow))  # rows with more segments than slots (the last slot merges)
    return np.asarray(seg.patch_end_mask), stats


def align_segmentation(args, theirs, model, state, mesh, ids, ids_path) -> dict:
    """Level 0's segmentation of the batch on both sides, before any step; with --segmentation trained, first force
    the original's to ours (the mask saved beside ids_path and sent to bench/original_side.py), and check that it took.
    Returns the result's segmentation fields."""
    import numpy as np

    patch_end, ours = ours_segmentation(model, state, ids, mesh)
    force = None
    if args.segmentation == "trained":
        if not patch_end[:, -1].all():  # ours ends the last segment on the last real byte; real_batch has no PAD
            sys.exit("error: our segmentation does not end every row's last segment on its last byte (PAD?).")
        force = os.path.join(os.path.dirname(ids_path), "patch_end_mask.npy")
        np.save(force, patch_end)
    original = theirs.ask(cmd="segmentation", ids=ids_path, force=force)
    if force and not (original["matches_forced"] and original["segments"] == ours["segments"]):
        sys.exit(f"error: forcing the original's segmentation failed: ours {ours}, the original's {original}.")
    if args.segmentation == "trained" and args.stage2:
        note = (
            f"stage 2. Ours: the frozen pyramid (parameters and quantizer state) of {args.trained_workdir} and a fresh "
            "top transformer; the original: its own random pyramid, frozen as its load_base_components(freeze=True) "
            "freezes a loaded one, with its level-0 boundaries forced to ours for this batch, and a fresh top"
        )
    elif args.segmentation == "trained":
        note = (
            f"ours: the parameters and quantizer state of {args.trained_workdir} (step {int(state.step)}); the "
            "original: its own random initialisation (ours cannot be loaded into it), with its level-0 boundaries "
            "forced to ours for this batch (its entropy model still runs and trains)"
        )
    else:
        note = "both at random initialisation, each cutting where its own untrained entropy model says"
    return {
        "segmentation": args.segmentation,
        "segmentation_note": note,
        "bytes_per_segment": {
            "ours": round(ours["bytes_per_segment"], 3),
            "original": round(original["bytes_per_segment"], 3),
        },
        "segments": {"ours": ours["segments"], "original": original["segments"]},
        "ours_overflow_rows": ours["overflow_rows"],
    }


def run(args) -> dict:
    import jax
    import numpy as np

    cfg, cfg_dict, ids, ids_path = prepare(args)
    mesh, model, _, state, compiled, batch, info = ours_setup(cfg, ids, args.trained_workdir)
    theirs = OriginalSide(cfg_dict, args.torch_compile, args.threads, args.original_attention)
    seg = align_segmentation(args, theirs, model, state, mesh, ids, ids_path)
    holder = {}
    with jax.set_mesh(mesh):
        holder["state"], _ = compiled(state, batch)  # donated: keep the new state

        def ours(n):
            times = []
            for _ in range(n):
                t = time.perf_counter()
                holder["state"], m = compiled(holder["state"], batch)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t)
            holder["bytes_per_segment"] = float(m["level0/compression_ratio"])  # at this step's forward
            return times, float(m["loss"])

        ours(args.warmup)
        first = theirs.ask(cmd="steps", n=args.warmup, ids=ids_path)  # eager warm-up, or torch.compile's compile
        mine_t, their_t, their_loss, all_finite = [], [], first["loss"][-1], first["finite"]
        for _ in range(args.rounds):
            t, our_loss = ours(args.steps_per_round)
            mine_t += t
            r = theirs.ask(cmd="steps", n=args.steps_per_round, ids=ids_path)
            their_t += r["seconds"]
            their_loss = r["loss"][-1]
            all_finite = all_finite and r["finite"]
    their_last = theirs.ask(cmd="segmentation", ids=ids_path)  # the boundaries its last step's forward used
    theirs.close()
    ours_s, theirs_s = float(np.median(mine_t)), float(np.median(their_t))
    n_bytes = ids.size
    return {
        "config": os.path.basename(args.config),
        "stage": 2 if args.stage2 else 1,
        "batch_size": args.batch_size,
        "sequence_length": args.sequence_length,
        "torch": theirs.info.get("torch"),
        "torch_threads": theirs.info.get("threads"),
        "torch_compile": args.torch_compile,
        "original_attention": theirs.info.get("attention"),
        "ours_step_s": round(ours_s, 4),
        "original_step_s": round(theirs_s, 4),
        "ours_bytes_per_s": round(n_bytes / ours_s, 1),
        "original_bytes_per_s": round(n_bytes / theirs_s, 1),
        "speedup_ours_over_original": round(theirs_s / ours_s, 3),
        "ours_last_loss": round(our_loss, 4),
        "original_last_loss": round(their_loss, 4),
        "original_losses_finite": bool(all_finite),
        "steps_each": len(mine_t),
        **seg,
        "bytes_per_segment_last": {
            "ours": round(holder["bytes_per_segment"], 3),
            "original": round(their_last["bytes_per_segment"], 3),
        },
        **_trained_fields(args, info),
    }


def _trained_fields(args, info: dict) -> dict:
    return {"trained_workdir": args.trained_workdir, **info} if args.segmentation == "trained" else {}


def our_components(cfg, model, opt, state, compiled, batch, mesh, reps: int) -> dict:
    """Median seconds (over `reps`, after a compiling call) of our level-0 parts, each its own jitted forward+backward
    on the real batch, split as bench/original_side.py splits the original (Original.components): the compressor
    (embedding, stacks, segmentation, pooler, quantizer with its state update) with the expander's (and the top's)
    gradient on its memory rows as cotangent; the expander on those rows (and their gradient) with its code CE; the
    top transformer on the top level's rows (when use_top_code_lm); the optimizer update (clipping + AdamW) on a real
    step's gradients; and, not parts, the whole loss's forward+backward and the whole compiled train step. `state`
    is donated to the last (do not use it after)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import linen as nn

    from abstractinator_jax.losses import masked_cross_entropy
    from abstractinator_jax.sharding import LOGICAL_AXIS_RULES
    from abstractinator_jax.steps import _loss_fn

    ids, pad = jnp.asarray(batch["ids"][0]), jnp.asarray(batch["mask"][0])
    lv = cfg.levels[0]
    params, model_state = state.params, state.model_state
    mutable, rng = list(model_state), jax.random.key(0)
    use_top = bool(cfg.use_top_code_lm)

    def apply(p, fn, *args, train=False):
        """(output, new model state) of `fn(module, *args)` with parameters p."""
        variables = {"params": p, **model_state}
        if train and mutable:
            return model.apply(variables, *args, method=fn, mutable=mutable, rngs={"vq": rng})
        return model.apply(variables, *args, method=fn), model_state

    def with_level0(rest, sub):
        return {**rest, "level_0": {**rest["level_0"], **sub}}

    l0 = params["level_0"]
    comp_names = [k for k in l0 if k != "expander"]  # the embedding (level 0) and the compressor
    comp_sub = {k: l0[k] for k in comp_names}
    exp_sub = {"expander": l0["expander"]}

    def compress(p, train):
        return apply(p, lambda m, i, k: m.levels[0].compress(i, k, train), ids, pad, train=train)

    def compressor_fb(sub, ct):
        def f(sub):
            c, new_state = compress(with_level0(params, sub), True)
            aux = lv.w_byte_lm_ce * c.entropy.loss + lv.w_vq * c.vq_loss
            return aux + jnp.sum(c.quantized * ct), new_state

        return jax.grad(f, has_aux=True)(sub)

    def expander_fb(sub, memory, valid, seg_id):
        def f(sub, memory):
            def run(m, *a):
                return m.levels[0].expander(*a)

            (logits, digits), _ = apply(with_level0(params, sub), run, memory, valid, ids, pad, seg_id, None)
            ce = sum(masked_cross_entropy(lg, digits[..., s], ~pad) for s, lg in enumerate(logits))
            return lv.w_code_ce * ce

        return jax.grad(f, argnums=(0, 1))(sub, memory)

    def top_fb(sub, comp):
        def f(sub, rows):
            (loss, _), _ = apply({**params, "top": sub}, lambda m, c: m._top(c), comp.replace(quantized=rows))
            return cfg.top_lm_loss_weight * loss

        return jax.grad(f, argnums=(0, 1))(sub, comp.quantized)

    def full_grads(p, train=False):
        """The whole loss's gradient (and, training, the new quantizer state), as the train step computes it."""
        grads, (_, new_state) = jax.grad(
            lambda p: _loss_fn(model, p, model_state, ids, pad, rng, train=train), has_aux=True
        )(p)
        return grads, new_state

    def opt_update(grads, opt_state, p):
        updates, opt_state = opt.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    def timed(fn, *args):
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    out = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        comp, _ = jax.jit(compress, static_argnums=1)(params, False)
        exp_j = jax.jit(expander_fb)
        _, ct = exp_j(exp_sub, comp.quantized, comp.valid_mask, comp.segments.seg_id)
        if use_top:
            top_comp = jax.jit(lambda p: apply(p, lambda m, i, k: m._levels(i, k, False)[2], ids, pad)[0])(params)
            top_j = jax.jit(top_fb)
            _, top_ct = top_j(params["top"], top_comp)
            if len(cfg.levels) == 1:
                ct = ct + top_ct
            out["top"] = timed(top_j, params["top"], top_comp)
        out["expander"] = timed(exp_j, exp_sub, comp.quantized, comp.valid_mask, comp.segments.seg_id)
        out["compressor"] = timed(jax.jit(compressor_fb), comp_sub, ct)
        full_j = jax.jit(full_grads, static_argnums=1)
        grads, _ = full_j(params, False)
        out["forward_backward"] = timed(full_j, params, True)
        out["optimizer"] = timed(jax.jit(opt_update), grads, state.opt_state, params)
        holder = {"state": state}

        def step():
            holder["state"], m = compiled(holder["state"], batch)
            return m

        out["step"] = timed(step)
    return out


PARTS = ("compressor", "expander", "top", "optimizer")


def _parts_note(t: dict) -> tuple[float, str]:
    """(sum of the parts / the whole step, a sentence saying whether they add up and where the rest goes)."""
    parts = sum(t[k] for k in PARTS if k in t)
    ratio = parts / t["step"]
    model = sum(t[k] for k in PARTS if k in t and k != "optimizer") / t["forward_backward"]
    rest = t["step"] - t["forward_backward"] - t["optimizer"]
    where = (
        f"compressor+expander(+top) = {model:.2f} x the whole loss's forward+backward, which also has the loss sums, "
        f"metrics and any level above 0; the step minus that forward+backward and the optimizer leaves {rest:.4f} s "
        "(ours: gradient accumulation, metrics, the step guard)"
    )
    if abs(ratio - 1) <= 0.15:
        return round(ratio, 3), f"the parts add up to the whole step within 15% ({where})"
    return round(ratio, 3), f"the parts do NOT add up: they sum to {ratio:.2f} x the whole step ({where})"


def components(args) -> dict:
    cfg, cfg_dict, ids, ids_path = prepare(args)
    mesh, model, opt, state, compiled, batch, info = ours_setup(cfg, ids, args.trained_workdir)
    theirs = OriginalSide(cfg_dict, False, args.threads, args.original_attention)
    seg = align_segmentation(args, theirs, model, state, mesh, ids, ids_path)
    ours = our_components(cfg, model, opt, state, compiled, batch, mesh, args.reps)
    original = theirs.ask(cmd="components", reps=args.reps, ids=ids_path)
    theirs.close()
    res = {
        "config": os.path.basename(args.config),
        "batch_size": args.batch_size,
        "sequence_length": args.sequence_length,
        "torch": theirs.info.get("torch"),
        "torch_threads": theirs.info.get("threads"),
        "original_attention": theirs.info.get("attention"),
        "reps": args.reps,
        **seg,
        **_trained_fields(args, info),
        "seconds": {
            k: {"ours": round(ours[k], 4), "original": round(original[k], 4), "original_over_ours": 0.0}
            for k in (*PARTS, "forward_backward", "step")
            if k in ours
        },
    }
    for v in res["seconds"].values():
        v["original_over_ours"] = round(v["original"] / v["ours"], 3)
    res["ours_parts_over_step"], res["ours_note"] = _parts_note(ours)
    res["original_parts_over_step"], res["original_note"] = _parts_note(original)
    return res


def check(args) -> int:
    """Run bench/check_original_side.py in the benchmark environment on this config and a real-text batch."""
    _need_venv()
    _, cfg_dict, _, ids_path = prepare(args)
    cfg_path = os.path.join(os.path.dirname(ids_path), "config.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg_dict, f)
    cmd = [str(VENV / "bin" / "python"), str(ROOT / "bench" / "check_original_side.py"), "--original", str(ORIGINAL)]
    cmd += ["--config-json", cfg_path, "--ids", ids_path, "--steps", str(args.check_steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return subprocess.run(cmd).returncode


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="make .bench-venv (torch + the original's source) and stop")
    ap.add_argument("--original-git", help="setup: a git dir or URL of the original's repository")
    ap.add_argument("--original-rev", default="e38a88d", help="setup: the original's commit")
    ap.add_argument("--torch-wheel", help="setup: a torch wheel to install (default: a local +cpu wheel)")
    ap.add_argument("--allow-cuda-torch", action="store_true", help="setup: accept PyPI's CUDA torch build")
    ap.add_argument("--config")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--sequence_length", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side (compilation)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps_per_round", type=int, default=2)
    ap.add_argument("--torch_compile", action="store_true", help="torch.compile the original (as its train.py)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument(
        "--original_attention",
        choices=("auto", "flex", "exact_dense", "exact_sparse", "fallback"),
        default="auto",
        help="auto: flex with CUDA, else exact_dense (its flex_attention calls evaluated densely, exactly; torch has "
        "no flex_attention backward on CPU); exact_sparse: the same on the BlockMask's blocks only (flex's work); "
        "fallback: its own dense path, wrong masks at e38a88d, timing only",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--segmentation",
        choices=("init", "trained"),
        default="init",
        help="init: both sides at random initialisation, each with its own segmentation; trained: ours restored from "
        "--trained_workdir, the original (its own init) forced to our level-0 segmentation of the batch",
    )
    ap.add_argument(
        "--trained_workdir",
        help="--segmentation trained: a train.py run of this config (read only); a stage-2 config: its stage-1 run",
    )
    ap.add_argument("--components", action="store_true", help="per-component forward+backward times of both sides")
    ap.add_argument("--reps", type=int, default=5, help="--components: timed repetitions per part (median)")
    ap.add_argument("--top", action="store_true", help="both sides train the config's top transformer (stage 1)")
    ap.add_argument("--top_row_buckets", type=int, default=None, help="ours: the top's row buckets (config's default)")
    ap.add_argument("--top_batch_chunks", type=int, default=None, help="ours: the top's batch chunks (config's)")
    ap.add_argument(
        "--c_output_length",
        type=int,
        default=None,
        help="both sides: level 0's segment slots per row (the config's by default; scale it with the sequence length)",
    )
    ap.add_argument("--check", action="store_true", help="check the original's exact attention modes (PASS/FAIL)")
    ap.add_argument("--check_steps", type=int, default=20, help="--check: train steps on the repeated batch")
    args = ap.parse_args()
    if args.setup:
        setup(args)
        return
    if not args.config:
        sys.exit("error: pass --config (or --setup).")
    if args.check:
        sys.exit(check(args))
    if args.segmentation == "trained" and not args.trained_workdir:
        sys.exit("error: --segmentation trained needs --trained_workdir.")
    if args.components and args.torch_compile:
        sys.exit("error: --components runs the original eagerly (its top transformer's own @torch.compile aside).")
    print(json.dumps(components(args) if args.components else run(args)))


if __name__ == "__main__":
    main()
