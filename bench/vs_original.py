r"""Our train step against the PyTorch original's, same config, batch, length and real text, timed alternately.

One-time setup (its own environment; torch is never a dependency of this package):

    python bench/vs_original.py --setup --original-git <git dir or URL of OilProducts/abstractinator>

makes `.bench-venv/` (gitignored): a venv with a CPU build of torch and numpy, and the original's source at
`--original-rev` (default e38a88d) unpacked in `.bench-venv/original`. PyPI's default Linux torch wheel is a CUDA
build that pulls ~3 GB of NVIDIA wheels (~6 GB installed); setup therefore installs a local CPU wheel when pip's
find-links has one (or `--torch-wheel PATH`), and refuses the CUDA build unless `--allow-cuda-torch`.

Then:

    python bench/vs_original.py --config configs/stage1_super_tiny.py --batch_size 8 --sequence_length 512 \
        --rounds 5 --steps_per_round 2

Both models are built from the same config (the original's from its components/, sized by our config's fields);
each side compiles first (ours: jit; the original: eager, or `--torch_compile` as its train.py does), then the
driver alternates rounds of `--steps_per_round` steps: ours, then the original's (a subprocess waiting on stdin),
so both see the same machine load. Prints one JSON line: medians per step, bytes/s and the ratio.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
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


class OriginalSide:
    """The original's model in the torch venv, driven over stdin/stdout (bench/original_side.py)."""

    def __init__(self, cfg_dict: dict, torch_compile: bool, threads: int | None, attention: str):
        if not (VENV / "bin" / "python").exists() or not ORIGINAL.is_dir():
            sys.exit("error: no benchmark environment; run python bench/vs_original.py --setup first.")
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


def run(args) -> dict:
    import jax
    import numpy as np
    from train_step import real_batch

    from abstractinator_jax import steps, train_state
    from abstractinator_jax.cli import load_config_file
    from abstractinator_jax.config import to_dict, validate_config
    from abstractinator_jax.model import AbstractinatorPyramid
    from abstractinator_jax.sharding import make_mesh

    cfg = load_config_file(args.config)
    cfg.batch_size, cfg.sequence_length, cfg.gradient_accumulation_steps = args.batch_size, args.sequence_length, 1
    cfg.dtype = "float32"
    if cfg.stage == 2:
        sys.exit("error: compare stage-1 configs (the original's stage 2 trains on a frozen, loaded pyramid).")
    validate_config(cfg)
    ids = real_batch(args.batch_size, args.sequence_length, seed=args.seed)
    ids_path = os.path.join(tempfile.mkdtemp(), "ids.npy")
    np.save(ids_path, ids)

    theirs = OriginalSide(to_dict(cfg), args.torch_compile, args.threads, args.original_attention)
    mesh = make_mesh(cfg.mesh)
    model = AbstractinatorPyramid(cfg)
    opt = train_state.make_optimizer(cfg)
    state, shardings = train_state.create_train_state(cfg, model, mesh, opt)
    step = steps.make_train_step(cfg, model, mesh, opt, shardings)
    batch = {"ids": ids[None], "mask": np.zeros_like(ids, bool)[None]}
    holder = {}
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
        holder["state"], _ = compiled(state, batch)  # donated: keep the new state

        def ours(n):
            times = []
            for _ in range(n):
                t = time.perf_counter()
                holder["state"], m = compiled(holder["state"], batch)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t)
            return times, float(m["loss"])

        ours(args.warmup)
        first = theirs.ask(cmd="steps", n=args.warmup, ids=ids_path)  # eager warm-up, or torch.compile's compile
        mine_t, their_t, their_loss = [], [], first["loss"][-1]
        for _ in range(args.rounds):
            t, our_loss = ours(args.steps_per_round)
            mine_t += t
            r = theirs.ask(cmd="steps", n=args.steps_per_round, ids=ids_path)
            their_t += r["seconds"]
            their_loss = r["loss"][-1]
    theirs.close()
    ours_s, theirs_s = float(np.median(mine_t)), float(np.median(their_t))
    n_bytes = ids.size
    return {
        "config": os.path.basename(args.config),
        "batch_size": args.batch_size,
        "sequence_length": args.sequence_length,
        "torch": theirs.info.get("torch"),
        "torch_threads": theirs.info.get("threads"),
        "torch_compile": args.torch_compile,
        "original_attention": args.original_attention,
        "ours_step_s": round(ours_s, 4),
        "original_step_s": round(theirs_s, 4),
        "ours_bytes_per_s": round(n_bytes / ours_s, 1),
        "original_bytes_per_s": round(n_bytes / theirs_s, 1),
        "speedup_ours_over_original": round(theirs_s / ours_s, 3),
        "ours_last_loss": round(our_loss, 4),
        "original_last_loss": round(their_loss, 4),
        "steps_each": len(mine_t),
    }


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
        choices=("flex", "dense"),
        default="flex",
        help="flex (the original's kernels; on CPU torch has no eager flex_attention backward) or dense (its "
        "fallback: timing only, see bench/original_side.py)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.setup:
        setup(args)
        return
    if not args.config:
        sys.exit("error: pass --config (or --setup).")
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
