"""What a run checks before its first step and how it picks the checkpoint to resume from. `check_run_dirs` makes sure
the workdir, its checkpoints/ and tensorboard/ directories exist and take a file (one line naming the path and the
problem otherwise, before anything is compiled). `resume_intact` restores the newest checkpoint that reads back
exactly as saved and holds finite numbers; a damaged newer step is reported in one line and moved aside to
``<workdir>/checkpoints.damaged/<step>`` (kept for inspection, out of the way of the steps the run will save).
`save_checked` is the loop's only way to write a checkpoint: never a state with NaN/inf, and no periodic checkpoint
in the middle of a run of skipped steps (so a diverging run cannot rotate its last good checkpoint out)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from .checkpointing import CHECKPOINT_SUBDIR, CheckpointDamaged, CheckpointError, CheckpointManager
from .config import to_dict as cfg_dict
from .guard import TrainingDiverged, check_guard, nonfinite_parts

__all__ = [
    "DAMAGED_SUBDIR",
    "RunDirError",
    "check_run_dirs",
    "intact_steps",
    "restore_checked",
    "resume_intact",
    "save_checked",
]

DAMAGED_SUBDIR = "checkpoints.damaged"
TENSORBOARD_SUBDIR = "tensorboard"

log = logging.getLogger("abstractinator_jax")


class RunDirError(CheckpointError):
    """The workdir or one of its directories cannot be created or written."""


def _problem(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _check_dir(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what} {path} is a file, not a directory; pass another --workdir or move the file.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create {what} {path}: {_problem(e)}.") from e
    probe = path / f".write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise RunDirError(
            f"{what} {path} is not writable: {_problem(e)}; fix its permissions or pass another --workdir."
        ) from e


def check_run_dirs(workdir: str | os.PathLike) -> Path:
    """Create the workdir, checkpoints/ and tensorboard/ and write a probe file into each; raise RunDirError naming
    the path and the problem. Returns the workdir as an absolute Path."""
    workdir = Path(os.path.expanduser(os.fspath(workdir))).absolute()
    _check_dir(workdir, "workdir")
    _check_dir(workdir / CHECKPOINT_SUBDIR, "checkpoint directory")
    _check_dir(workdir / TENSORBOARD_SUBDIR, "TensorBoard directory")
    return workdir


def restore_checked(ckpt: CheckpointManager, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
    """Restore `step` and make sure it holds finite numbers: CheckpointDamaged otherwise (a checkpoint written by a
    diverged run before the step guard existed). A checkpoint saved before the step guard existed has no guard
    counters: they start afresh (all zero), as for a new run."""
    fresh_guard = None
    if getattr(abstract_state, "guard", None) and "guard" not in ckpt.saved_state_keys(step):
        fresh_guard = jax.tree.map(
            lambda x: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding), abstract_state.guard
        )
        abstract_state = abstract_state.replace(guard={})
        log.info("checkpoint step %d predates the step guard: its counters start at zero", step)
    state, _ = ckpt.restore(
        step, abstract_state=abstract_state, data_iterator=data_iterator, partial=fresh_guard is not None
    )
    if fresh_guard is not None:
        state = state.replace(guard=fresh_guard)
    bad = nonfinite_parts(state)
    if bad:
        raise CheckpointDamaged(ckpt.directory, step, [f"its {', '.join(bad)} hold NaN or inf (a diverged run)"])
    return state


def intact_steps(workdir: str | os.PathLike, exclude: tuple[int, ...] = ()) -> list[int]:
    """The steps under `workdir` (oldest first) that read back as saved and hold finite numbers. Reads every step
    (the saved trees as they are, no model needed): for error messages, not for a loop."""
    good = []
    with CheckpointManager(workdir, max_to_keep=None) as ckpt:
        for step in ckpt.all_steps():
            if step in exclude:
                continue
            try:
                restore_checked(ckpt, step, None)
            except CheckpointDamaged:
                continue
            good.append(step)
    return good


def _move_aside(ckpt: CheckpointManager, step: int) -> Path:
    dest = ckpt.workdir / DAMAGED_SUBDIR / str(step)
    if jax.process_index() == 0:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(ckpt.directory / str(step)), str(dest))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"moved damaged checkpoint {step}")
    ckpt.reload()
    return dest


def resume_intact(ckpt: CheckpointManager, run: Any, cfg: ConfigDict, data_iterator: Any, check_config) -> Any:
    """The state of the newest intact checkpoint (the iterator restored with it), after `check_config(ckpt, step)`
    (a model mismatch is an error, not damage). Damaged newer steps are reported and moved aside. Raises
    CheckpointError when no step is intact."""
    damaged: list[CheckpointDamaged] = []
    for step in reversed(ckpt.all_steps()):
        try:
            check_config(ckpt, step)
            state = restore_checked(ckpt, step, run.abstract_state, data_iterator)
        except CheckpointDamaged as e:
            log.warning("%s", e)
            damaged.append(e)
            continue
        for e in damaged:
            dest = _move_aside(ckpt, e.step)
            log.warning(
                "resuming from step %d, the newest intact checkpoint; moved damaged step %d to %s", step, e.step, dest
            )
        return state
    raise CheckpointError(
        f"no intact checkpoint under {ckpt.directory} (damaged: {', '.join(str(e.step) for e in damaged)}; first "
        f"problem: {damaged[0].problems[0] if damaged else 'none'}). Move the directory away to start afresh."
    )


def save_checked(
    ckpt: CheckpointManager, cfg: ConfigDict, step: int, state: Any, data_iterator: Any, final: bool
) -> bool:
    """Checkpoint `state` at `step` unless it must not be: a periodic save (not `final`: the run's last step, a stop
    or a preemption) is skipped while the last step was skipped by the guard; a state holding NaN/inf raises
    TrainingDiverged instead of being saved. Stops a diverged run (guard.check_guard). Returns whether it saved."""
    guard = jax.device_get(state.guard)
    check_guard(cfg, guard, step, ckpt.latest_step())
    if not final and int(guard["consecutive"]) > 0:
        log.warning(
            "step %d: not checkpointing, the last %d steps were skipped (non-finite loss or gradient); the last "
            "checkpoint is step %s",
            step,
            int(guard["consecutive"]),
            ckpt.latest_step(),
        )
        return False
    bad = nonfinite_parts(state)
    if bad:
        raise TrainingDiverged(
            f"step {step}: not checkpointing, its {', '.join(bad)} hold NaN or inf; the last good checkpoint is step "
            f"{ckpt.latest_step()}. Lower --config.learning_rate and rerun the same command to resume from it."
        )
    return ckpt.save(step, state, data_iterator=data_iterator, config=cfg_dict(cfg), force=True)
