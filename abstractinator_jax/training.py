"""Optimizer, train state, and the jitted train / eval steps (sharded over a device mesh)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh
from ml_collections import ConfigDict

from .sharding import LOGICAL_AXIS_RULES, batch_sharding, logical_sharding, replicated


@struct.dataclass
class TrainState:
    step: jax.Array  # () int32
    params: dict
    opt_state: optax.OptState
    model_state: dict  # non-parameter variable collections (e.g. the quantizer's EMA state); empty without one
    rng: jax.Array  # (2,) uint32 raw PRNG key data (checkpoint-friendly)
    frozen_params: dict  # parameters that are used but not trained (stage 2: the pyramid); {} in stage 1


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


def _loss_fn(model, params, model_state, ids, pad, rng=None, train: bool = False, frozen=None):
    """(loss, (metrics, new_model_state)). With train=True the model's mutable state collections are updated.
    `frozen` parameters take part in the forward pass but get no gradient."""
    variables = {"params": {**(frozen or {}), **params}, **model_state}
    if train and model_state:
        (loss, metrics), new_state = model.apply(
            variables, ids, pad, train=True, rngs={"vq": rng}, mutable=list(model_state)
        )
        return loss, (metrics, dict(new_state))
    loss, metrics = model.apply(variables, ids, pad, train=False)
    return loss, (metrics, model_state)


def make_train_step(cfg: ConfigDict, model: nn.Module, mesh: Mesh, optimizer, shardings: TrainState) -> Callable:
    """jit(state, batch) -> (state, metrics). batch: {'ids': (A, B, S) int32, 'mask': (A, B, S) bool (True = PAD)},
    A = gradient_accumulation_steps micro-batches whose gradients are averaged. The model state (quantizer EMA and
    buffers) is updated micro-batch by micro-batch, in order."""
    schedule = learning_rate_schedule(cfg)
    in_batch = {"ids": batch_sharding(mesh, 3, 1), "mask": batch_sharding(mesh, 3, 1)}

    def step(state: TrainState, batch):
        with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            # stage 2 keeps the pyramid fixed: no gradient, and no EMA / reset updates of its quantizers
            update_state = cfg.stage == 1
            grad_fn = jax.value_and_grad(
                functools.partial(_loss_fn, model, train=update_state, frozen=state.frozen_params), has_aux=True
            )
            step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            n = batch["ids"].shape[0]

            def micro(carry, xs):
                grads_acc, metrics_acc, model_state = carry
                mb, i = xs
                rng = jax.random.fold_in(step_key, i)
                (_, (metrics, model_state)), grads = grad_fn(state.params, model_state, mb["ids"], mb["mask"], rng)
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
                metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
                return (grads_acc, metrics_acc, model_state), None

            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            first = jax.tree.map(lambda x: x[0], batch)
            metrics_shape = jax.eval_shape(
                lambda: _loss_fn(
                    model, state.params, state.model_state, first["ids"], first["mask"], frozen=state.frozen_params
                )[1][0]
            )
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)
            (grads, metrics, model_state), _ = jax.lax.scan(
                micro, (zeros_g, zeros_m, state.model_state), (batch, jnp.arange(n))
            )
            grads = jax.tree.map(lambda g: g / n, grads)
            metrics = jax.tree.map(lambda m: m / n, metrics)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics["grad_norm"] = optax.global_norm(grads)
            metrics["learning_rate"] = schedule(state.step)
            metrics["real_bytes"] = jnp.sum(~batch["mask"]).astype(jnp.float32)
            new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
            return new_state, metrics

    return jax.jit(
        step,
        in_shardings=(shardings, in_batch),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def make_eval_step(model: nn.Module, mesh: Mesh, shardings: TrainState) -> Callable:
    """jit(params, model_state, ids (B, S), mask (B, S)) -> metrics (no update of any state). `params` are all the
    model's parameters (`all_params(state)`)."""

    def step(params, model_state, ids, pad):
        with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            return _loss_fn(model, params, model_state, ids, pad)[1][0]

    b2 = batch_sharding(mesh, 2, 0)
    return jax.jit(
        step,
        in_shardings=({**shardings.frozen_params, **shardings.params}, shardings.model_state, b2, b2),
        out_shardings=replicated(mesh),
    )


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
