"""The training loop: data, jitted steps, TensorBoard, periodic evaluation, Orbax checkpoints, resume."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh
from ml_collections import ConfigDict

from . import data as data_lib
from . import tokenizer
from .checkpointing import CheckpointError, CheckpointManager, resolve_init_from
from .config import PAD_ID, ConfigError, to_dict, validate_config
from .model import AbstractinatorPyramid
from .sharding import LOGICAL_AXIS_RULES, batch_divisor, batch_sharding, make_mesh, replicated
from .summaries import SummaryWriter
from .training import (
    TrainState,
    abstract_train_state,
    all_params,
    count_params,
    create_train_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
)

log = logging.getLogger("abstractinator_jax")

# Config keys that define the model's parameters: a checkpoint must agree on these to be resumed.
MODEL_KEYS = ("stage", "num_levels", "levels", "use_top_code_lm", "top_transformer_config")


def resolve_data_config(data_cfg: ConfigDict) -> ConfigDict:
    """`source='auto'`: local files when data.path is set (by extension), else the Hugging Face dataset."""
    d = copy.deepcopy(data_cfg)
    if d.source == "auto":
        with d.unlocked():
            if d.path:
                first = d.path.split(",")[0].strip().lower()
                if first.endswith((".jsonl", ".json", ".jsonl.gz")):
                    d.source = "jsonl"
                elif first.endswith(".parquet"):
                    d.source = "parquet"
                else:
                    d.source = "text"
            else:
                d.source = "hf"
    return d


def model_config_differences(saved: dict, current: dict, keys=None) -> list[str]:
    """Human-readable differences between the model sections of two config dicts."""
    out = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}" if path else k)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif a != b:
            out.append(f"{path}: checkpoint {a!r} vs config {b!r}")

    for key in keys or MODEL_KEYS:
        walk(saved.get(key, "<missing>"), current.get(key, "<missing>"), key)
    return out


@dataclasses.dataclass
class Run:
    """What a config builds: the device mesh, the model, the optimizer and the train state's template/shardings."""

    mesh: Mesh
    model: AbstractinatorPyramid
    optimizer: optax.GradientTransformation
    abstract_state: TrainState  # jax.ShapeDtypeStruct leaves with shardings (a restore template)
    shardings: TrainState


def build(cfg: ConfigDict) -> Run:
    """Validate `cfg` and build mesh, model, optimizer and the train state's template (nothing allocated)."""
    validate_config(cfg)
    mesh = make_mesh(cfg.mesh)
    if cfg.batch_size % batch_divisor(mesh):
        raise ConfigError(
            f"batch_size={cfg.batch_size} is not divisible by the {batch_divisor(mesh)} data-parallel devices; "
            f"set --config.batch_size to a multiple of {batch_divisor(mesh)}."
        )
    model = AbstractinatorPyramid(cfg)
    optimizer = make_optimizer(cfg)
    abstract, shardings = abstract_train_state(cfg, model, mesh, optimizer)
    return Run(mesh, model, optimizer, abstract, shardings)


def check_init_from(cfg: ConfigDict) -> tuple[str, int]:
    """Stage 2's `init_from` resolved to (workdir, step), after checking that its levels are this config's."""
    workdir, step = resolve_init_from(cfg.init_from)
    with CheckpointManager(workdir) as src:
        saved = src.restore_config(step) or {}
    diffs = model_config_differences(saved, to_dict(cfg), keys=("num_levels", "levels"))
    if diffs:
        raise CheckpointError(
            f"init_from={cfg.init_from!r} (step {step}) holds a pyramid that differs from this config:\n  - "
            + "\n  - ".join(diffs)
            + "\nStage 2 must use the stage-1 run's level settings."
        )
    return workdir, step


def load_stage1(init_from: tuple[str, int], run: Run, state: TrainState) -> TrainState:
    """Stage 2's start: the pyramid's parameters and quantizer state from the stage-1 checkpoint `init_from`."""
    workdir, step = init_from
    with CheckpointManager(workdir) as src:
        template = {"params": run.abstract_state.frozen_params, "model_state": run.abstract_state.model_state}
        restored, _ = src.restore(step, abstract_state=template, partial=True)
    log.info("Stage 2: loaded the frozen pyramid from %s (step %d)", workdir, step)
    return state.replace(frozen_params=restored["params"], model_state=restored["model_state"])


def check_checkpoint_config(ckpt: CheckpointManager, step: int, cfg: ConfigDict, where) -> None:
    """Raise CheckpointError naming every model setting in which checkpoint `step` differs from `cfg`."""
    saved = ckpt.restore_config(step) or {}
    diffs = model_config_differences(saved, to_dict(cfg))
    if diffs:
        raise CheckpointError(
            f"{where} holds a checkpoint (step {step}) of a different model:\n  - "
            + "\n  - ".join(diffs)
            + "\nUse a new --workdir, or run with the checkpoint's model settings."
        )


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


def make_eval_batches(cfg: ConfigDict, data_cfg: ConfigDict) -> list[dict]:
    """This process's share of the fixed held-out batches (`cfg.eval_batches` of them, `cfg.batch_size` rows)."""
    return data_lib.make_eval_batches(
        data_cfg,
        cfg.sequence_length,
        cfg.batch_size,
        cfg.eval_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def train(cfg: ConfigDict, workdir: str | os.PathLike, stop_at_step: int | None = None) -> dict:
    """Train (or resume) a run in `workdir`. Returns the last logged metrics and eval metrics.

    `stop_at_step` ends the run early at that step with a checkpoint, as a preemption would (a later call resumes).
    """
    validate_config(cfg)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
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
        init_from = check_init_from(cfg) if cfg.stage == 2 else None  # before any compile: fail fast
        state, _ = create_train_state(cfg, model, mesh, optimizer)
        if init_from is not None:
            state = load_stage1(init_from, run, state)
    else:
        check_checkpoint_config(ckpt, latest, cfg, workdir)
        state = ckpt.restore(latest, abstract_state=run.abstract_state, data_iterator=train_it)[0]
        log.info("Resumed from %s at step %d", ckpt.directory, int(state.step))
    start_step = int(state.step)
    n_params = count_params(all_params(state))

    writer = SummaryWriter(workdir / "tensorboard")
    if start_step == 0:
        writer.text(0, "config", json.dumps(to_dict(cfg), indent=2, default=str))
        writer.scalars(0, {"model/parameters": n_params, "model/trainable_parameters": count_params(state.params)})

    sample_ids = first_real_row(eval_batches)
    segment_fn = jax.jit(lambda p, ms, ids, pad: segment_outputs(model, p, ms, ids, pad))

    batch_in_sharding = batch_sharding(mesh, 3, 1)
    acc = _MetricAccumulator()
    last_logged: dict = {}
    last_eval: dict = {}
    progress = _progress(cfg, start_step)
    t_last = time.perf_counter()
    step = start_step
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
                            "Bps": "throughput/bytes_per_s",
                        }
                        progress.set_postfix({k: f"{scalars[t]:.4g}" for k, t in shown.items() if t in scalars})
                    else:
                        log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
                    if not np.isfinite(scalars["loss"]):
                        raise FloatingPointError(
                            f"loss became {scalars['loss']} at step {step}; lower --config.learning_rate or check "
                            "the data. The last checkpoint is intact."
                        )
                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    last_eval = evaluate(eval_step, state, eval_batches, mesh)
                    writer.scalars(step, {f"eval/{k}": v for k, v in last_eval.items()})
                    if sample_ids is not None:
                        seg_text = segmented_sample(segment_fn, state, sample_ids, mesh)
                        writer.text(step, "samples/segmented", seg_text)
                    writer.flush()
                if step % cfg.checkpoint_interval == 0 or step in (cfg.max_steps, end):
                    ckpt.save(step, state, data_iterator=train_it, config=to_dict(cfg), force=True)
        finally:
            if hasattr(train_it, "close"):
                train_it.close()
            if progress is not None:
                progress.close()
            ckpt.wait()
            ckpt.close()
            writer.close()
    return {"train": last_logged, "eval": last_eval, "step": step, "parameters": n_params}


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


def evaluate(eval_step, state, eval_batches, mesh) -> dict:
    """Token-weighted mean of the eval metrics over the held-out batches (all-PAD padding rows carry no weight)."""
    sums: dict = {}
    weight_total = 0.0
    sh = batch_sharding(mesh, 2, 0)
    for b in eval_batches:
        ids = jax.make_array_from_process_local_data(sh, b["ids"])
        pad = jax.make_array_from_process_local_data(sh, b["mask"])
        m = jax.device_get(eval_step(all_params(state), state.model_state, ids, pad))
        w = float(m["level0/real_tokens"])
        if w == 0:
            continue
        weight_total += w
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v) * w
    return {k: v / weight_total for k, v in sums.items() if not k.endswith("/real_tokens")} if weight_total else {}


def first_real_row(eval_batches):
    """The first held-out row with real bytes, (1, S), shown cut into segments in TensorBoard."""
    for b in eval_batches:
        for row in b["ids"]:
            if np.any(row != PAD_ID):
                return np.asarray(row)[None]
    return None


def segment_outputs(model, params, model_state, ids, pad):
    comp = model.apply({"params": params, **model_state}, ids, pad, method=model.compress_all)[0]
    return comp.segments.patch_end_mask, comp.codes, comp.valid_mask


def segmented_sample(segment_fn, state, ids, mesh) -> str:
    """The sample row cut into its segments, and (with a quantizer) the code id of each segment."""
    pad = ids == PAD_ID
    rep = replicated(mesh)
    ends, codes, valid = jax.device_get(
        segment_fn(all_params(state), state.model_state, jax.device_put(ids, rep), jax.device_put(pad, rep))
    )
    text = tokenizer.render_segments(ids[0], np.asarray(ends)[0])
    row_codes = np.asarray(codes)[0][np.asarray(valid)[0]]
    if row_codes.size and row_codes[0] >= 0:
        text += "\n\ncodes: " + " ".join(str(c) for c in row_codes)
    return text


def _progress(cfg, start_step):
    if not cfg.progress_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
