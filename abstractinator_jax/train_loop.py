"""The training loop (`train`): resume or initialise, step through the data, log to TensorBoard and the console,
evaluate periodically, write checkpoints. What it runs is built in build.py, steps.py and evaluation.py."""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
from flax import linen as nn
from ml_collections import ConfigDict

from . import data as data_lib
from .build import build, check_checkpoint_config, check_init_from, load_stage0, load_stage1
from .checkpointing import CheckpointManager
from .config import to_dict, validate_config
from .data import resolve_data_config
from .evaluation import evaluate, make_eval_batches, segment_outputs, segmented_sample, shared_sample_row
from .generation import training_sampler
from .guard import check_guard, guard_scalars
from .preemption import Preemption
from .recovery import check_run_dirs, resume_intact, save_checked
from .sharding import LOGICAL_AXIS_RULES, batch_sharding
from .steps import make_eval_step, make_train_step
from .summaries import SummaryWriter
from .train_state import all_params, count_params, create_train_state

log = logging.getLogger("abstractinator_jax")


class _MetricAccumulator:
    """Sums device metrics between log points without a host round-trip per step."""

    def __init__(self):
        self.sum = None
        self.count = 0

    def add(self, metrics):
        self.sum = metrics if self.sum is None else jax.tree.map(jnp.add, self.sum, metrics)
        self.count += 1

    def pop(self) -> dict:
        host = jax.device_get(self.sum)
        out = {k: float(v) / self.count for k, v in host.items()}
        out["real_bytes_total"] = float(host["real_bytes"])
        self.sum, self.count = None, 0
        return out


def train(
    cfg: ConfigDict,
    workdir: str | os.PathLike,
    stop_at_step: int | None = None,
    preemption: Preemption | None = None,
) -> dict:
    """Train (or resume) a run in `workdir`. Returns the last logged metrics and eval metrics, the step reached and
    `preempted`: the signal that stopped the run early (with a checkpoint at that step), or None.

    `stop_at_step` ends the run early at that step with a checkpoint, as a preemption would (a later call resumes).
    `preemption`: signal handling installed by the caller (train.py, from before the model is built); by default the
    loop installs its own (SIGTERM/SIGINT: finish the step, checkpoint, return).
    """
    validate_config(cfg)
    workdir = check_run_dirs(workdir)  # before anything is built: one line naming an unusable directory
    data_cfg = resolve_data_config(cfg.data)

    run = build(cfg)
    mesh, model, optimizer, shardings = run.mesh, run.model, run.optimizer, run.shardings
    train_step = make_train_step(cfg, model, mesh, optimizer, shardings)
    eval_step = make_eval_step(model, mesh, shardings)

    train_it = data_lib.make_train_iterator(
        data_cfg,
        cfg.sequence_length,
        cfg.batch_size,
        cfg.gradient_accumulation_steps,
        seed=cfg.data.shuffle_seed,
    )
    eval_batches = make_eval_batches(cfg, data_cfg)

    ckpt = CheckpointManager(workdir, max_to_keep=cfg.max_checkpoints_to_keep)
    latest = ckpt.latest_step()
    if latest is None:
        # a new run (a resumed one reads only its own checkpoint): check init_from before any compile, fail fast
        init_from = check_init_from(cfg) if cfg.init_from else None
        state, _ = create_train_state(cfg, model, mesh, optimizer)
        if init_from is not None and cfg.stage == 2:
            state = load_stage1(init_from, run, state)
        elif init_from is not None:
            state = load_stage0(init_from, cfg, run, state)
    else:
        state = resume_intact(ckpt, run, cfg, train_it, lambda c, s: check_checkpoint_config(c, s, cfg, workdir))
        log.info("Resumed from %s at step %d", ckpt.directory, int(state.step))
    start_step = int(state.step)
    n_params = count_params(all_params(state))

    writer = SummaryWriter(workdir / "tensorboard")
    if start_step == 0:
        writer.text(0, "config", json.dumps(to_dict(cfg), indent=2, default=str))
        writer.scalars(0, {"model/parameters": n_params, "model/trainable_parameters": count_params(state.params)})

    sample_ids = shared_sample_row(eval_batches, cfg.sequence_length)
    segment_fn = jax.jit(lambda p, ms, ids, pad: segment_outputs(model, p, ms, ids, pad))
    generate_sample = training_sampler(cfg, model, mesh)  # None: the run cannot generate (no top, no byte LM)

    batch_in_sharding = batch_sharding(mesh, 3, 1)
    acc = _MetricAccumulator()
    last_logged: dict = {}
    last_eval: dict = {}
    progress = _progress(cfg, start_step)
    t_last = time.perf_counter()
    step = start_step
    preempted = None
    own_preemption = preemption is None
    preemption = Preemption().__enter__() if own_preemption else preemption
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        try:
            end = cfg.max_steps if stop_at_step is None else min(cfg.max_steps, stop_at_step)
            while step < end:
                host_batch = next(train_it)
                batch = {k: jax.make_array_from_process_local_data(batch_in_sharding, v) for k, v in host_batch.items()}
                state, metrics = train_step(state, batch)
                acc.add(metrics)
                step += 1
                if progress is not None:
                    progress.update(1)
                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    scalars = acc.pop()
                    now = time.perf_counter()
                    dt = now - t_last
                    t_last = now
                    steps_done = cfg.log_interval if step % cfg.log_interval == 0 else step % cfg.log_interval
                    scalars["throughput/bytes_per_s"] = scalars.pop("real_bytes_total") / dt
                    scalars["throughput/steps_per_s"] = steps_done / dt
                    scalars.pop("real_bytes")
                    scalars = {k: v for k, v in scalars.items() if not k.endswith("/real_tokens")}
                    writer.scalars(step, _train_tags(scalars))
                    last_logged = scalars
                    if progress is not None:
                        shown = {
                            "loss": "loss",
                            "recon": "level0/code_ce",
                            "acc": "level0/recon_accuracy",
                            "top": "top/top_mse" if "top/top_mse" in scalars else "top/top_ce",
                            "ratio": "level0/compression_ratio",
                            "entropy": "entropy/loss",
                            "bpb": "entropy/bits_per_byte",
                            "Bps": "throughput/bytes_per_s",
                        }
                        progress.set_postfix({k: f"{scalars[t]:.4g}" for k, t in shown.items() if t in scalars})
                    else:
                        log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
                    guard = jax.device_get(state.guard)  # skipped steps (guard.py): logged, and too many stop the run
                    writer.scalars(step, guard_scalars(guard))
                    check_guard(cfg, guard, step, ckpt.latest_step())
                ckpt.check_background_save()  # a failed background save stops the run now, not at the next save
                if preemption.requested(step, agree_now=step % cfg.log_interval == 0):
                    save_checked(ckpt, cfg, step, state, train_it, final=True)
                    preempted = preemption.signal_name
                    break
                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    last_eval = evaluate(eval_step, state, eval_batches, mesh)
                    writer.scalars(step, {f"eval/{k}": v for k, v in last_eval.items()})
                    if sample_ids is not None:
                        seg_text = segmented_sample(segment_fn, state, sample_ids, mesh)
                        writer.text(step, "samples/segmented", seg_text)
                    if generate_sample is not None:
                        writer.text(step, "samples/generated", generate_sample(state))
                    writer.flush()
                if step % cfg.checkpoint_interval == 0 or step in (cfg.max_steps, end):
                    save_checked(ckpt, cfg, step, state, train_it, final=step in (cfg.max_steps, end))
        finally:
            if own_preemption:
                preemption.__exit__(None, None, None)
            if hasattr(train_it, "close"):
                train_it.close()
            if progress is not None:
                progress.close()
            ckpt.wait()
            ckpt.close()
            writer.close()
    return {"train": last_logged, "eval": last_eval, "step": step, "parameters": n_params, "preempted": preempted}


def _train_tags(scalars: dict) -> dict:
    out = {}
    for k, v in scalars.items():
        if k.startswith("throughput/"):
            out[k] = v
        elif k in ("learning_rate", "grad_norm"):
            out[f"optim/{k}"] = v
        else:
            out[f"train/{k}"] = v
    return out


def _progress(cfg, start_step):
    if not cfg.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
