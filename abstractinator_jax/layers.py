"""Small building blocks: dense layers with logical axis names, RMSNorm, SwiGLU, rotary position embedding.

Every parameter and constrained activation names its axes with the constants of axes.py (checked when traced);
`sharding.LOGICAL_AXIS_RULES` maps them onto the device mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from . import axes

DType = jnp.dtype

DEFAULT_INIT = nn.initializers.normal(stddev=0.02)


def kernel_init(*names: str | None, init=DEFAULT_INIT):
    """`init` with the parameter's logical axis names (constants of axes.py; None = replicated)."""
    return nn.with_logical_partitioning(init, axes.check(names, axes.PARAM_AXES))


def token_matmul(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """Contract the last `n_in` axes of x with the first `n_in` axes of w, as one 2-D matmul over all tokens.

    x: (..., *in), w: (*in, *out) -> (..., *out). Flattening the token axes first keeps XLA's CPU backend on its fast
    2-D GEMM path for both the forward and the weight gradient (a 3-D dot_general costs ~2x there).
    """
    lead, ins = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :]
    outs = w.shape[n_in:]
    k = math.prod(ins)
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(*lead, *outs)


class Dense(nn.Module):
    """y = x W (+ b) with W carrying logical axis names `axes` = (in, out)."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = False
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("kernel", kernel_init(*self.axes), (x.shape[-1], self.features))
        y = token_matmul(x.astype(self.dtype), w.astype(self.dtype))
        if self.use_bias:
            b = self.param("bias", kernel_init(self.axes[1], init=nn.initializers.zeros_init()), (self.features,))
            y = y + b.astype(self.dtype)
        return y


def dense(features: int, axes: tuple[str | None, str | None], *, dtype, name: str, use_bias: bool = False) -> Dense:
    return Dense(features, axes, use_bias=use_bias, dtype=dtype, name=name)


def rms_norm(*, dtype, name: str | None = None, axis_name: str = axes.EMBED) -> nn.RMSNorm:
    return nn.RMSNorm(
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
        name=name,
    )


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, axes.check(names, axes.ACTIVATION_AXES))


class SwiGLU(nn.Module):
    """silu(x W1) * (x W3) W2 with hidden width `hidden`."""

    hidden: int
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # (B, S, D) -> (B, S, D)
        d = x.shape[-1]
        gate = dense(self.hidden, (axes.EMBED, axes.MLP), dtype=self.dtype, name="w1")(x)
        up = dense(self.hidden, (axes.EMBED, axes.MLP), dtype=self.dtype, name="w3")(x)
        h = constrain(nn.silu(gate) * up, (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
        return dense(d, (axes.MLP, axes.EMBED), dtype=self.dtype, name="w2")(h)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding on the last axis of x.

    x: (B, T, N, H) with H even; positions: (B, T) or (T,) integer positions. Computed in float32 and cast back.
    The two halves of the head dimension are rotated together (the "rotate_half" convention).
    """
    h = x.shape[-1]
    half = h // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))  # (H/2,)
    pos = positions.astype(jnp.float32)
    if pos.ndim == 1:
        pos = pos[None, :]
    angles = pos[..., None] * inv_freq  # (B|1, T, H/2)
    cos = jnp.cos(angles)[:, :, None, :]  # (B|1, T, 1, H/2)
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
