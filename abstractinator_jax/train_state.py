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
    # parameters that are used but not trained: stage 2, the pyramid; stage 1 with freeze_entropy_model, the stage-0
    # entropy model (`split_entropy_model`); else {}. The same nesting as params (`merge_params` joins them).
    frozen_params: dict
    guard: dict = struct.field(default_factory=dict)  # the step guard's counters (guard.init_guard_state)


def is_entropy_model_path(path: tuple[str, ...]) -> bool:
    """Whether a parameter path (or the subtree at it) belongs to level 0's entropy model as stage 0 trains it: the
    embedding (level_0/embedding), the shared blocks (level_0/compressor/shared_<i>) and the entropy branch
    (level_0/compressor/entropy: its blocks and head)."""
    if path[:2] == ("level_0", "embedding"):
        return True
    return len(path) >= 3 and path[:2] == ("level_0", "compressor") and (path[2] == "entropy" or _is_shared(path[2]))


def _is_shared(name: str) -> bool:
    return name.startswith("shared_") and name[len("shared_") :].isdigit()


def split_entropy_model(tree: dict) -> tuple[dict, dict]:
    """(level 0's entropy model, the rest) of a parameter tree (or of anything nested like it: shardings, templates),
    as two nested dicts without empty branches. A stage-0 run's params are exactly the first part."""

    def go(node, path):
        picked, rest = {}, {}
        for k, v in node.items():
            p = (*path, k)
            if is_entropy_model_path(p):
                picked[k] = v
            elif isinstance(v, dict):
                a, b = go(v, p)
                if a:
                    picked[k] = a
                if b:
                    rest[k] = b
            else:
                rest[k] = v
        return picked, rest

    return go(tree, ())


def merge_params(*trees: dict) -> dict:
    """Nested dicts joined key by key (later trees win on a leaf): e.g. frozen and trainable parameters, which may
    share branches (stage 1 with a frozen entropy model: both hold part of level_0/compressor)."""
    out: dict = {}
    for tree in trees:
        for k, v in tree.items():
            out[k] = merge_params(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def split_trainable(cfg: ConfigDict, params: dict) -> tuple[dict, dict]:
    """(trainable, frozen) parameter subtrees: stage 0 and 1 train everything, except stage 1's stage-0 entropy model
    with freeze_entropy_model; stage 2 only the top transformer."""
    if cfg.stage == 2:
        return {"top": params["top"]}, {k: v for k, v in params.items() if k != "top"}
    if cfg.stage == 1 and cfg.freeze_entropy_model:
        frozen, trainable = split_entropy_model(params)
        return trainable, frozen
    return dict(params), {}


def all_params(state: TrainState) -> dict:
    return merge_params(state.frozen_params, state.params)


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
