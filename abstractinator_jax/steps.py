"""The jitted train and eval steps over a device mesh: loss and gradients (with gradient accumulation and quantizer
state updates micro-batch by micro-batch), the optimizer update, and the metrics each step returns."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh
from ml_collections import ConfigDict

from .guard import count_step, step_accepted
from .scoring import score_batch
from .sharding import LOGICAL_AXIS_RULES, batch_sharding, replicated
from .train_state import TrainState, learning_rate_schedule, merge_params


def _loss_fn(model, params, model_state, ids, pad, rng=None, train: bool = False, frozen=None):
    """(loss, (metrics, new_model_state)). With train=True the model's mutable state collections are updated.
    `frozen` parameters take part in the forward pass but get no gradient."""
    variables = {"params": merge_params(frozen or {}, params), **model_state}
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
    buffers) is updated micro-batch by micro-batch, in order. A step with a non-finite loss or gradient norm (or a
    loss spike, see guard.py) is not applied: only the step counter and the guard's counters move."""
    schedule = learning_rate_schedule(cfg)
    in_batch = {"ids": batch_sharding(mesh, 3, 1), "mask": batch_sharding(mesh, 3, 1)}

    def step(state: TrainState, batch):
        with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            # stage 2 keeps the pyramid fixed: no gradient, and no EMA / reset updates of its quantizers (stage 0 has
            # no quantizer)
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

            # The first micro-batch starts the sums (no zeros to add to); the others, if any, run in a lax.scan.
            first = jax.tree.map(lambda x: x[0], batch)
            (_, (metrics, model_state)), grads = grad_fn(
                state.params, state.model_state, first["ids"], first["mask"], jax.random.fold_in(step_key, 0)
            )
            if n > 1:
                rest = jax.tree.map(lambda x: x[1:], batch)
                (grads, metrics, model_state), _ = jax.lax.scan(
                    micro, (grads, metrics, model_state), (rest, jnp.arange(1, n))
                )
                grads = jax.tree.map(lambda g: g / n, grads)
                metrics = jax.tree.map(lambda m: m / n, metrics)
            metrics["grad_norm"] = optax.global_norm(grads)
            metrics["learning_rate"] = schedule(state.step)
            metrics["real_bytes"] = jnp.sum(~batch["mask"]).astype(jnp.float32)
            # A bad step (guard.py) is not applied: the update runs under a lax.cond, so that a good step writes its
            # new state once (no select between the old and the new state after it).
            accept = step_accepted(cfg, state.guard, metrics["loss"], metrics["grad_norm"], model_state)

            def update(grads, params, opt_state, model_state):
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, model_state

            def skip(grads, params, opt_state, model_state):
                return params, opt_state, state.model_state

            params, opt_state, model_state = jax.lax.cond(
                accept, update, skip, grads, state.params, state.opt_state, model_state
            )
            new_state = state.replace(
                step=state.step + 1,
                params=params,
                opt_state=opt_state,
                model_state=model_state,
                guard=count_step(state.guard, accept, metrics["loss"]),
            )
            return new_state, metrics

    return jax.jit(
        step,
        in_shardings=(shardings, in_batch),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def make_eval_step(model: nn.Module, mesh: Mesh, shardings: TrainState) -> Callable:
    """jit(params, model_state, ids (B, S), mask (B, S)) -> (the batch's metric totals, its rows' code lengths)
    (scoring.score_batch; no update of any state). The totals are sums over the global batch, replicated on every
    device. `params` are all the model's parameters (`all_params(state)`)."""

    def step(params, model_state, ids, pad):
        with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            return score_batch(model, {"params": params, **model_state}, ids, pad)

    b2 = batch_sharding(mesh, 2, 0)
    return jax.jit(
        step,
        in_shardings=(merge_params(shardings.frozen_params, shardings.params), shardings.model_state, b2, b2),
        out_shardings=replicated(mesh),
    )
