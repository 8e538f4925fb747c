"""What a config builds, and what a run must check before it starts: the device mesh, the model, the optimizer, the
train state's template and shardings (`build`), the checks that a checkpoint to resume or to initialise from
(`init_from`: stage 1's stage-0 run, stage 2's stage-1 run) holds this config's model, and the loading of the
`init_from` parameters into a new train state."""

from __future__ import annotations

import dataclasses
import logging

import optax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from .checkpointing import CheckpointError, CheckpointManager, resolve_init_from
from .config import (
    SLOT_KEYS,
    ConfigError,
    entropy_model_settings,
    model_config_differences,
    to_dict,
    validate_config,
)
from .model import AbstractinatorPyramid
from .sharding import batch_divisor, make_mesh
from .train_state import TrainState, abstract_train_state, make_optimizer, merge_params, split_entropy_model

log = logging.getLogger("abstractinator_jax")


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
    """`init_from` resolved to (workdir, step), after checking that it holds what this stage starts from: stage 2, a
    stage-1 run with this config's levels; stage 1, a stage-0 run whose level-0 entropy model has this config's
    settings (config.ENTROPY_MODEL_KEYS). Raises CheckpointError naming every difference. Reads only the config."""
    workdir, step = resolve_init_from(cfg.init_from)
    with CheckpointManager(workdir) as src:
        saved = src.restore_config(step)
    where = f"init_from={cfg.init_from!r} (step {step})"
    if saved is None:
        raise CheckpointError(f"{where} was saved without its config, so it cannot be checked; pass a train.py run.")
    want = 0 if cfg.stage == 1 else 1
    if saved.get("stage") != want:
        what = "a stage-0 run (level 0's entropy model)" if want == 0 else "a stage-1 run (the pyramid)"
        raise CheckpointError(
            f"{where} holds a stage-{saved.get('stage')} run; stage {cfg.stage} starts from {what}: pass the workdir "
            f"of a train.py run with --config.stage={want}."
        )
    if cfg.stage == 2:
        levels = ("num_levels", "levels")
        diffs = model_config_differences(saved, to_dict(cfg), keys=levels, ignore=SLOT_KEYS)
        fix = "Stage 2 must use the stage-1 run's level settings."
        for slots in model_config_differences(saved, to_dict(cfg), keys=levels):
            if slots not in diffs:  # segment slots: no parameter depends on them
                log.info("Stage 2 over other segment slots than its stage-1 run: %s", slots)
    else:
        levels = saved.get("levels") or [{}]
        diffs = model_config_differences(
            {"levels": [entropy_model_settings(levels[0])]},
            {"levels": [entropy_model_settings(to_dict(cfg.levels[0]))]},
            keys=("levels",),
        )
        fix = "Stage 1 must use the stage-0 run's entropy-model settings for level 0."
    if diffs:
        what = "a pyramid" if cfg.stage == 2 else "a level-0 entropy model"
        raise CheckpointError(
            f"{where} holds {what} that differs from this config:\n  - " + "\n  - ".join(diffs) + "\n" + fix
        )
    return workdir, step


def load_stage1(init_from: tuple[str, int], run: Run, state: TrainState) -> TrainState:
    """Stage 2's start: the pyramid's parameters and quantizer state from the stage-1 checkpoint `init_from` (its
    `frozen_params` too when that run kept a stage-0 entropy model frozen)."""
    workdir, step = init_from
    with CheckpointManager(workdir) as src:
        saved = src.restore_config(step) or {}
        pyramid = run.abstract_state.frozen_params
        template = {"params": pyramid, "model_state": run.abstract_state.model_state}
        if saved.get("freeze_entropy_model"):
            template["frozen_params"], template["params"] = split_entropy_model(pyramid)
        restored, _ = src.restore(step, abstract_state=template, partial=True)
    log.info("Stage 2: loaded the frozen pyramid from %s (step %d)", workdir, step)
    params = merge_params(restored.get("frozen_params", {}), restored["params"])
    return state.replace(frozen_params=params, model_state=restored["model_state"])


def load_stage0(init_from: tuple[str, int], cfg: ConfigDict, run: Run, state: TrainState) -> TrainState:
    """Stage 1's start from a stage-0 run: level 0's embedding, shared blocks and entropy branch from the checkpoint
    `init_from`, bit for bit, into the fresh `state` (frozen_params with freeze_entropy_model, else params; the
    optimizer's moments of fresh parameters are zeros either way). Everything else stays freshly initialised."""
    workdir, step = init_from
    part = "frozen_params" if cfg.freeze_entropy_model else "params"
    template, _ = split_entropy_model(getattr(run.abstract_state, part))
    with CheckpointManager(workdir) as src:
        restored, _ = src.restore(step, abstract_state={"params": template}, partial=True)
    log.info(
        "Stage 1: level 0's entropy model from %s (step %d)%s",
        workdir,
        step,
        ", frozen" if cfg.freeze_entropy_model else "",
    )
    return state.replace(**{part: merge_params(getattr(state, part), restored["params"])})


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
