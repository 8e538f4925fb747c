"""Evaluation: the fixed held-out batches, the metrics over them, segmented samples, and the evaluation of a saved
checkpoint (`evaluate_run`, behind evaluate.py). Training's periodic evaluation and evaluate.py share all of it, and
`restore_run` (a saved run's config, model and state) serves evaluate.py and generate.py alike."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn
from ml_collections import ConfigDict
from ml_collections.config_flags import config_path

from . import data as data_lib
from . import tokenizer
from .build import Run, build
from .checkpointing import CheckpointError, CheckpointManager
from .config import PAD_ID, ConfigError, from_dict, validate_config
from .data import resolve_data_config
from .sharding import LOGICAL_AXIS_RULES, batch_sharding, replicated
from .steps import make_eval_step
from .train_state import TrainState, all_params


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


def run_config(saved: dict, data_path: str | None, max_batches: int | None, overrides: dict) -> ConfigDict:
    """The saved config of a run with this evaluation's changes applied, validated."""
    try:
        cfg = from_dict(saved)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"the checkpoint's config does not fit this version's schema ({type(e).__name__}: {e})."
        ) from e
    if data_path:
        cfg.data.source = "auto"
        cfg.data.path = data_path
        cfg.data.eval_path = data_path
    if max_batches is not None:
        cfg.eval_batches = max_batches
    for path, value in overrides.items():
        config_path.set_value(path, cfg, value)
    return validate_config(cfg)


def describe_eval_data(d: ConfigDict) -> str:
    """Where the eval documents come from, in one line (for the JSON output)."""
    held_out = f"held-out {d.eval_fraction:g} of"
    if d.source == "hf":
        return f"hf {d.dataset_name} " + (f"split {d.eval_split}" if d.eval_split else f"{held_out} {d.train_split}")
    if d.source == "offline":
        return f"offline, {held_out} the corpus"
    return f"{d.source} {d.eval_path}" if d.eval_path else f"{d.source}, {held_out} {d.path}"


def segmented_rows(model, state, eval_batches, mesh, n: int) -> list[str]:
    """The first `n` held-out rows that hold real bytes, cut into their segments with '|'."""
    segment_fn = jax.jit(lambda p, ms, ids, pad: segment_outputs(model, p, ms, ids, pad))
    out = []
    for b in eval_batches:
        for row in b["ids"]:
            if len(out) == n:
                return out
            if np.any(row != PAD_ID):
                out.append(segmented_sample(segment_fn, state, np.asarray(row)[None], mesh))
    return out


def restore_run(
    workdir: str,
    step: int | None = None,
    overrides: dict | None = None,
    *,
    data_path: str | None = None,
    max_batches: int | None = None,
    before_build: Callable[[ConfigDict], None] | None = None,
) -> tuple[ConfigDict, Run, TrainState]:
    """Restore `workdir`'s checkpoint `step` (the latest when None) with the config saved in it (`overrides`,
    `data_path`, `max_batches` applied, then validated): the model, mesh and state as training built them, with the
    checkpoint's values. `before_build(cfg)` runs before anything is built, to fail fast on bad input."""
    if not Path(workdir).is_dir():
        raise CheckpointError(f"workdir {workdir!r} does not exist; pass the --workdir of a train.py run.")
    with CheckpointManager(workdir, max_to_keep=None) as ckpt:
        if step is None:
            step = ckpt.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint under {ckpt.directory}; pass the --workdir of a train.py run.")
        saved = ckpt.restore_config(step)
        if saved is None:
            raise CheckpointError(f"checkpoint step {step} under {ckpt.directory} was saved without its config.")
        cfg = run_config(saved, data_path, max_batches, overrides or {})
        if before_build is not None:
            before_build(cfg)
        run = build(cfg)
        state, _ = ckpt.restore(step, abstract_state=run.abstract_state)
    return cfg, run, state


def evaluate_run(
    workdir: str,
    step: int | None = None,
    data_path: str | None = None,
    max_batches: int | None = None,
    overrides: dict | None = None,
    show_segments: int = 0,
) -> tuple[dict, list[str]]:
    """Restore `workdir`'s checkpoint and evaluate it. Returns (metrics, segmented sample rows)."""
    data = {}

    def load_eval_data(cfg):  # data first: a bad path fails before the model is built
        data["cfg"] = resolve_data_config(cfg.data)
        try:
            data["batches"] = make_eval_batches(cfg, data["cfg"])
        except ConfigError as e:
            raise ConfigError(f"--data_path={data_path!r}: {e}" if data_path else str(e)) from e

    cfg, run, state = restore_run(
        workdir, step, overrides, data_path=data_path, max_batches=max_batches, before_build=load_eval_data
    )
    data_cfg, eval_batches = data["cfg"], data["batches"]
    mesh, model, shardings = run.mesh, run.model, run.shardings
    eval_step = make_eval_step(model, mesh, shardings)

    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        metrics = evaluate(eval_step, state, eval_batches, mesh)
        if not metrics:
            raise ConfigError("the eval data holds no bytes; check --data_path / the run's data settings.")
        samples = segmented_rows(model, state, eval_batches, mesh, show_segments) if show_segments > 0 else []

    result = {
        "step": int(state.step),
        "workdir": str(workdir),
        "data": {
            "source": describe_eval_data(data_cfg),
            "batches": len(eval_batches),
            "rows": int(sum(np.any(~b["mask"], axis=1).sum() for b in eval_batches)),
            "tokens": int(sum((~b["mask"]).sum() for b in eval_batches)),
        },
    }
    result.update(sorted(metrics.items()))
    result["level0/code_bits_per_byte"] = metrics["level0/code_ce"] / math.log(2.0)
    return result, samples
