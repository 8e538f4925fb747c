"""The train state (trainable and frozen parameters, optimizer state, quantizer state, step, RNG), the optimizer and
its schedule, and sharded initialisation on a device mesh. The jitted steps that advance the state are in steps.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh
from ml_collections import ConfigDict

from .guard import init_guard_state
from .sharding import LOGICAL_AXIS_RULES, logical_sharding


@struct.dataclass
class TrainState:
    step: jax.Array  # () int32
    params: dict
    opt_state: optax.OptState
    model_state: dict  # non-parameter variable collections (e.g. the quantizer's EMA state); empty without one
    rng: jax.Array  # (2,) uint32 raw PRNG key data (checkpoint-friendly)
    frozen_params: dict  # parameters that are used but not trained (stage 2: the pyramid); {} in stage 1
    guard: dict = struct.field(default_factory=dict)  # the step guard's counters (guard.init_guard_state)


def split_trainable(cfg: ConfigDict, params: dict) -> tuple[dict, dict]:
    """(trainable, frozen) parameter subtrees: stage 1 trains everything; stage 2 only the top transformer."""
    if cfg.stage == 2:
        return {"top": params["top"]}, {k: v for k, v in params.items() if k != "top"}
    return dict(params), {}


def all_params(state: TrainState) -> dict:
    return {**state.frozen_params, **state.params}


def learning_rate_schedule(cfg: ConfigDict) -> optax.Schedule:
    """Linear warmup to learning_rate, then cosine decay to min_lr at max_steps."""
    warmup = min(cfg.warmup_steps, max(cfg.max_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.learning_rate,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(cfg.max_steps, warmup + 1),
        end_value=cfg.min_lr,
    )


def _decay_mask(params):
    """Weight decay on matrices only (not on norm scales, biases or 1-D vectors)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: ConfigDict) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.gradient_clip_norm),
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.adam_b1,
            b2=cfg.adam_b2,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        ),
    )


def dummy_batch(cfg: ConfigDict, batch_size: int | None = None):
    b = batch_size or cfg.batch_size
    ids = jnp.zeros((b, cfg.sequence_length), jnp.int32)
    return ids, jnp.zeros((b, cfg.sequence_length), bool)


def _boxed_init_fn(cfg: ConfigDict, model: nn.Module, optimizer: optax.GradientTransformation):
    ids, pad = dummy_batch(cfg, 1)

    def init_boxed(rng):
        variables = model.init(rng, ids, pad)
        params, frozen = split_trainable(cfg, variables.pop("params"))  # boxed: leaves carry logical axis names
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),  # moments inherit the parameters' logical names
            model_state=dict(variables),
            rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
            frozen_params=frozen,
            guard=init_guard_state(),
        )

    return init_boxed


def abstract_train_state(cfg: ConfigDict, model: nn.Module, mesh: Mesh, optimizer: optax.GradientTransformation):
    """(state of jax.ShapeDtypeStruct with shardings, shardings) without allocating anything: a restore template."""
    init_boxed = _boxed_init_fn(cfg, model, optimizer)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        abstract = jax.eval_shape(init_boxed, jax.random.key(cfg.seed))
        shardings = logical_sharding(abstract, mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(abstract), shardings
    )
    return abstract, shardings


def create_train_state(cfg: ConfigDict, model: nn.Module, mesh: Mesh, optimizer: optax.GradientTransformation):
    """Initialise parameters and optimizer state directly with their shardings. Returns (state, state_shardings)."""
    init_boxed = _boxed_init_fn(cfg, model, optimizer)
    _, shardings = abstract_train_state(cfg, model, mesh, optimizer)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        state = jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=shardings)(jax.random.key(cfg.seed))
    return state, shardings


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
