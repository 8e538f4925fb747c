"""What a config builds, and what a run must check before it starts: the device mesh, the model, the optimizer, the
train state's template and shardings (`build`), and the checks that a checkpoint to resume or to initialise from
(stage 2's `init_from`) holds this config's model."""

from __future__ import annotations

import dataclasses
import logging

import optax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from .checkpointing import CheckpointError, CheckpointManager, resolve_init_from
from .config import ConfigError, model_config_differences, to_dict, validate_config
from .model import AbstractinatorPyramid
from .sharding import batch_divisor, make_mesh
from .train_state import TrainState, abstract_train_state, make_optimizer

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
