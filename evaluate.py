"""Evaluate a trained run on held-out data and print its metrics as one JSON object.

    python evaluate.py --workdir runs/tiny
    python evaluate.py --workdir runs/tiny --step 300 --show_segments 3
    python evaluate.py --workdir runs/tiny --data_path ../shared/data/tinystories_valid.txt --max_batches 16

The model, mesh and data settings come from the config saved with the checkpoint (latest step, or --step); the eval
data is that run's held-out split (data.eval_path / data.eval_split, or the data.eval_fraction held out of the
training documents), unless --data_path names other files. `--config.<key>=value` changes any other saved setting
(e.g. --config.batch_size=4, --config.data.max_eval_documents=0). The metrics are the token-weighted means of
training's eval/* scalars over the eval batches; the JSON object is the last line of stdout.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import linen as nn
from ml_collections import ConfigDict, config_flags
from ml_collections.config_flags import config_path

from abstractinator_jax import trainer
from abstractinator_jax.checkpointing import CheckpointError, CheckpointManager
from abstractinator_jax.cli import fail
from abstractinator_jax.config import PAD_ID, ConfigError, base_config, from_dict, unknown_overrides, validate_config
from abstractinator_jax.sharding import LOGICAL_AXIS_RULES
from abstractinator_jax.training import make_eval_step

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py (holds checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate. Default: the latest.")
_DATA_PATH = flags.DEFINE_string(
    "data_path",
    None,
    "Evaluate on these files (a path, a glob or a comma-separated list; .txt/.jsonl/.parquet by extension) instead "
    "of the run's held-out split: sets data.path and data.eval_path (and data.source=auto).",
)
_MAX_BATCHES = flags.DEFINE_integer(
    "max_batches", None, "Evaluate at most this many batches of batch_size rows (sets eval_batches; 0 = all)."
)
_SHOW_SEGMENTS = flags.DEFINE_integer(
    "show_segments", 0, "Print this many held-out rows cut into their segments ('|'), before the JSON line."
)


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
    segment_fn = jax.jit(lambda p, ms, ids, pad: trainer.segment_outputs(model, p, ms, ids, pad))
    out = []
    for b in eval_batches:
        for row in b["ids"]:
            if len(out) == n:
                return out
            if np.any(row != PAD_ID):
                out.append(trainer.segmented_sample(segment_fn, state, np.asarray(row)[None], mesh))
    return out


def evaluate_run(
    workdir: str,
    step: int | None = None,
    data_path: str | None = None,
    max_batches: int | None = None,
    overrides: dict | None = None,
    show_segments: int = 0,
) -> tuple[dict, list[str]]:
    """Restore `workdir`'s checkpoint and evaluate it. Returns (metrics, segmented sample rows)."""
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
        data_cfg = trainer.resolve_data_config(cfg.data)
        # Data first: a bad path fails before the model is built.
        try:
            eval_batches = trainer.make_eval_batches(cfg, data_cfg)
        except ConfigError as e:
            raise ConfigError(f"--data_path={data_path!r}: {e}" if data_path else str(e)) from e

        # The model, mesh and state template as trainer.train builds them, then the checkpoint's values.
        run = trainer.build(cfg)
        mesh, model, shardings = run.mesh, run.model, run.shardings
        state, _ = ckpt.restore(step, abstract_state=run.abstract_state)
    eval_step = make_eval_step(model, mesh, shardings)

    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        metrics = trainer.evaluate(eval_step, state, eval_batches, mesh)
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


def main(argv):
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every step at INFO; keep stderr for errors
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; see python evaluate.py --help.")
    if not _WORKDIR.value:
        fail("missing --workdir; pass the run directory of a train.py run, e.g. --workdir runs/tiny.")
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    try:
        result, samples = evaluate_run(
            _WORKDIR.value, _STEP.value, _DATA_PATH.value, _MAX_BATCHES.value, overrides, _SHOW_SEGMENTS.value
        )
    except (ConfigError, CheckpointError) as e:
        fail(str(e))
    for i, text in enumerate(samples):
        print(f"--- segmented row {i} ---\n{text}")
    print(json.dumps(result))


def _check_args(argv) -> None:
    """Clear errors before absl's: the config comes from the checkpoint, and overrides must name known keys."""
    for arg in argv[1:]:
        if arg == "--config" or arg.startswith("--config="):
            fail("evaluate.py reads the config saved with the checkpoint; change settings with --config.<key>=value.")
    bad = unknown_overrides(base_config(), argv)
    if bad:
        fail("unknown config key(s): " + ", ".join(f"'{b}'" for b in bad) + " (see abstractinator_jax/config.py).")


def _define_config_flag() -> None:
    """`--config.<key>=value` overrides, typed by the schema. Defined after `_check_args`: the flag parses sys.argv
    when it is defined and would raise a traceback on an unknown key."""
    config_flags.DEFINE_config_dict(
        "config", base_config(), "Overrides of the run's saved config: --config.<key>=value.", lock_config=True
    )
    flags.FLAGS["config"].default_as_str = None  # --help: the defaults are the run's saved config, not base_config()'s


if __name__ == "__main__":
    _check_args(sys.argv)
    _define_config_flag()
    app.run(main)
