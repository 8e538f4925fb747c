"""The step guard: a training step whose loss, gradient norm or quantizer state is not finite, or, with
`loss_spike_factor` > 0, whose loss exceeds that factor times the running mean of the accepted losses, is not applied.
The decision is made inside the jitted step before the optimizer runs (`step_accepted`; the update runs under a
lax.cond on it), so parameters, optimizer state and quantizer state stay those of the last good step while the step
counter (and the data) move on. The counts live in `TrainState.guard` (`init_guard_state`), are checkpointed with the
state (so a resumed run is bit-exact, spike guard included), and are read on the host only where the loop syncs anyway
(log and checkpoint steps): `check_guard` stops the run with `TrainingDiverged` after `max_consecutive_skipped_steps`
skips in a row. `nonfinite_parts` is the host-side check that no non-finite state is ever checkpointed."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

__all__ = [
    "TrainingDiverged",
    "check_guard",
    "count_step",
    "guard_scalars",
    "init_guard_state",
    "nonfinite_parts",
    "step_accepted",
]

SPIKE_EMA_DECAY = 0.99  # running mean of accepted losses: an exponential moving average, bias-corrected
SPIKE_MIN_STEPS = 20  # accepted steps before the spike guard can skip a step (the mean needs some history)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps were skipped (non-finite or spiking loss), or a state to save is not finite."""


def init_guard_state() -> dict:
    """The guard's counters: skipped (total), consecutive (current run of skips), and the loss mean's EMA state."""
    return {
        "skipped": jnp.zeros((), jnp.int32),
        "consecutive": jnp.zeros((), jnp.int32),
        "loss_ema": jnp.zeros((), jnp.float32),
        "accepted": jnp.zeros((), jnp.int32),
    }


def _tree_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def step_accepted(cfg: ConfigDict, guard: dict, loss: jax.Array, grad_norm: jax.Array, model_state) -> jax.Array:
    """Whether a step is applied: its loss, its gradient norm and the model state it leaves (quantizer EMA) are
    finite and, with `loss_spike_factor` > 0, its loss is not a spike. Known before the optimizer runs: a finite
    gradient norm means every gradient is finite, so the AdamW update is too (`nonfinite_parts` checks again on the
    host before anything is saved). Traced inside the train step."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _tree_finite(model_state)
    decay = jnp.float32(SPIKE_EMA_DECAY)
    mean = guard["loss_ema"] / (1.0 - decay ** guard["accepted"].astype(jnp.float32))
    spike = jnp.asarray(False)
    if cfg.loss_spike_factor > 0:
        spike = (guard["accepted"] >= SPIKE_MIN_STEPS) & (loss > cfg.loss_spike_factor * mean)
    return finite & ~spike


def count_step(guard: dict, accept: jax.Array, loss: jax.Array) -> dict:
    """The guard's counters after a step that was applied (`accept`) or skipped."""
    decay = jnp.float32(SPIKE_EMA_DECAY)
    return {
        "skipped": guard["skipped"] + (~accept).astype(jnp.int32),
        "consecutive": jnp.where(accept, 0, guard["consecutive"] + 1),
        "loss_ema": jnp.where(accept, decay * guard["loss_ema"] + (1.0 - decay) * loss, guard["loss_ema"]),
        "accepted": guard["accepted"] + accept.astype(jnp.int32),
    }


def guard_scalars(guard_host: dict) -> dict:
    """TensorBoard scalars of the guard's (host) counters."""
    return {
        "optim/skipped_steps": int(guard_host["skipped"]),
        "optim/consecutive_skipped_steps": int(guard_host["consecutive"]),
    }


def check_guard(cfg: ConfigDict, guard_host: dict, step: int, last_checkpoint: int | None) -> None:
    """Raise TrainingDiverged once `max_consecutive_skipped_steps` steps in a row were skipped."""
    consecutive = int(guard_host["consecutive"])
    if consecutive < cfg.max_consecutive_skipped_steps:
        return
    why = "a non-finite loss or gradient"
    if cfg.loss_spike_factor > 0:
        why += f", or a loss above {cfg.loss_spike_factor:g} x its running mean"
    where = f"the last good checkpoint is step {last_checkpoint}" if last_checkpoint is not None else "no checkpoint"
    raise TrainingDiverged(
        f"training diverged: the last {consecutive} steps (up to step {step}) were skipped for {why}; {where}. Lower "
        "--config.learning_rate (or check the data) and rerun the same command to resume from it."
    )


@jax.jit
def _finite_flags(tree):
    return {k: _tree_finite(v) for k, v in tree.items()}


def nonfinite_parts(state) -> list[str]:
    """The parts of a TrainState (params, opt_state, model_state, frozen_params; or the top-level keys of a restored
    dict) that hold a NaN or inf (one sync)."""
    if isinstance(state, Mapping):
        parts = dict(state)
    else:
        names = ("params", "opt_state", "model_state", "frozen_params")
        parts = {k: getattr(state, k) for k in names}
    flags = jax.device_get(_finite_flags(parts))
    return [k for k, ok in flags.items() if not bool(np.asarray(ok))]
