"""Vector quantizers (docs/ARCHITECTURE.md 3.6): a VQ with EMA codebook and dead-code reset, and the multi-stage
residual VQ in a shared low-rank space. Composed code ids are handled by codes.py.

State (EMA statistics, the EMA codebook, the ring buffer of recent inputs, the step counter) lives in the Flax
variable collection `vq_state`. It changes only when the module is applied with `train=True` and
`mutable=['vq_state']`; every update is shape-static and runs under `jit`. Under a data-parallel `jit` the sums over
the batch are global (GSPMD), so the EMA statistics are the global batch's, not one device's.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from . import axes
from .codes import CodeCodec
from .layers import kernel_init

VQ_STATE = "vq_state"


# On the CPU the nearest-code search scans the codebook in chunks of this many codes, so that one chunk's (N, chunk)
# distances stay in cache: 4x faster than one argmin over the (N, K) matrix (4,096 rows x 2,048 codes: 35 -> 9 ms).
# A GPU or TPU takes the whole codebook at once (one chunk): one large matmul beats a loop of small ones there.
NEAREST_CODE_CHUNK = 128


def nearest_code_chunk() -> int:
    """The codes per chunk of `nearest_code` on the default backend (0 = the whole codebook at once)."""
    return NEAREST_CODE_CHUNK if jax.default_backend() == "cpu" else 0


def nearest_code(z, codebook, forbidden, chunk: int = 0):
    """Index of the nearest allowed code of each row by squared L2, the first one on ties (jnp.argmin's answer, a NaN
    distance counting as the smallest). z (N, d), codebook (K, d), forbidden (K,) bool -> (N,) int32.

    The codebook is scanned in chunks of `chunk` codes (when that divides K; 0 = one chunk), keeping each row's best
    distance and index; within a chunk the index is the smallest one at the chunk's minimum (two plain reductions,
    where argmin is one slower index-carrying reduction)."""
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    k = codebook.shape[0]
    chunk = chunk if 0 < chunk < k and k % chunk == 0 else k
    zz = jnp.sum(z * z, -1, keepdims=True)  # (N, 1)

    def scan_chunk(best, part):
        best_d, best_i = best
        cb, banned, first = part  # (chunk, d), (chunk,), ()
        d2 = zz - 2.0 * z @ cb.T + jnp.sum(cb * cb, -1)[None]  # (N, chunk)
        d2 = jnp.where(banned[None], jnp.inf, d2)
        d2 = jnp.where(jnp.isnan(d2), -jnp.inf, d2)  # NaN first, as argmin
        low = jnp.min(d2, axis=-1)
        at = jnp.min(jnp.where(d2 == low[:, None], jnp.arange(chunk, dtype=jnp.int32), chunk), axis=-1) + first
        better = low < best_d  # strict: an earlier chunk keeps its tie
        return (jnp.where(better, low, best_d), jnp.where(better, at, best_i)), None

    n = z.shape[0]
    init = (jnp.full((n,), jnp.inf, jnp.float32), jnp.zeros((n,), jnp.int32))
    parts = (
        codebook.reshape(k // chunk, chunk, -1),
        forbidden.reshape(k // chunk, chunk),
        jnp.arange(0, k, chunk, dtype=jnp.int32),
    )
    (_, idx), _ = jax.lax.scan(scan_chunk, init, parts)
    return idx


def _perplexity(counts):
    p = counts / jnp.maximum(jnp.sum(counts), 1e-9)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


class VectorQuantizer(nn.Module):
    """Nearest-code VQ over a K x d codebook.

    __call__(z (N, d), valid (N,), train) -> (e (N, d) hard code vectors, idx (N,), loss (), metrics dict).
    loss = ||sg(z) - e||^2 + beta ||z - sg(e)||^2 (means over valid rows). The caller applies the straight-through
    estimator. With `ema`, the codebook is a state variable updated by exponential moving averages (Laplace-smoothed
    cluster sizes) and dead-code reset; without it, the codebook is a parameter trained by the codebook loss.
    """

    K: int
    dim: int
    beta: float = 0.25
    ema: bool = True
    decay: float = 0.999
    eps: float = 1e-5
    reset_interval: int = 250  # 0 disables dead-code reset
    reset_fraction: float = 0.1  # at most this fraction of K codes replaced per reset
    dead_threshold: float = 1.0  # EMA usage below which a code is dead
    buffer_size: int = 4096  # ring buffer of recent inputs (reset sources)
    vectors_per_step: int = 256  # inputs written to the buffer per training step
    forbidden: tuple[int, ...] = ()  # excluded from nearest-code search
    protected: tuple[int, ...] = ()  # never reset, never EMA-updated

    def setup(self):
        init = nn.initializers.normal(1.0)
        if self.ema:
            self.codebook = self.variable(
                VQ_STATE, "codebook", lambda: init(self.make_rng("params"), (self.K, self.dim))
            )
            self.cluster_size = self.variable(VQ_STATE, "ema_cluster_size", lambda: jnp.ones((self.K,), jnp.float32))
            self.weight_sum = self.variable(VQ_STATE, "ema_weight_sum", lambda: self.codebook.value)
        else:
            self._codebook_param = self.param(
                "codebook", kernel_init(axes.VOCAB, axes.CODE, init=init), (self.K, self.dim)
            )
        self.buffer = self.variable(VQ_STATE, "buffer", lambda: jnp.zeros((self.buffer_size, self.dim), jnp.float32))
        self.buffer_pos = self.variable(VQ_STATE, "buffer_pos", lambda: jnp.zeros((), jnp.int32))
        self.buffer_count = self.variable(VQ_STATE, "buffer_count", lambda: jnp.zeros((), jnp.int32))
        self.step = self.variable(VQ_STATE, "step", lambda: jnp.zeros((), jnp.int32))

    def codebook_value(self) -> jax.Array:
        return self.codebook.value if self.ema else self._codebook_param

    def _masks(self):
        forbidden = np.zeros((self.K,), bool)
        forbidden[list(self.forbidden)] = True
        protected = np.zeros((self.K,), bool)
        protected[list(self.protected) + list(self.forbidden)] = True
        return jnp.asarray(forbidden), jnp.asarray(protected)

    def nearest(self, z):
        """Index of the nearest allowed code by squared L2; z (N, d) -> (N,) int32."""
        forbidden, _ = self._masks()
        return nearest_code(z, self.codebook_value(), forbidden, nearest_code_chunk())

    def __call__(self, z, valid, train: bool = False):
        chex.assert_rank(z, 2)
        chex.assert_shape(valid, (z.shape[0],))
        z32 = z.astype(jnp.float32)
        idx = self.nearest(jax.lax.stop_gradient(z32))
        cb = self.codebook_value().astype(jnp.float32)
        e = cb[idx]  # (N, d)
        w = valid.astype(jnp.float32)[:, None]
        denom = jnp.maximum(jnp.sum(valid) * self.dim, 1.0)
        codebook_loss = jnp.sum(w * (jax.lax.stop_gradient(z32) - e) ** 2) / denom
        commitment = jnp.sum(w * (z32 - jax.lax.stop_gradient(e)) ** 2) / denom
        loss = codebook_loss + self.beta * commitment

        # per-code sums over the valid rows by scatter-add: O(N d), where a (N, K) one-hot and its matmul cost O(N K d)
        counts = jax.ops.segment_sum(w[:, 0], idx, num_segments=self.K)  # (K,)
        if train and self.is_mutable_collection(VQ_STATE) and not self.is_initializing():
            self._update(jax.lax.stop_gradient(z32), valid, idx, w, counts)
        usage = self.cluster_size.value if self.ema else counts
        _, protected = self._masks()
        metrics = {
            "perplexity": _perplexity(counts),
            "dead_codes": jnp.sum((usage < self.dead_threshold) & ~protected).astype(jnp.float32),
        }
        return e, idx, loss, metrics

    # -- training-time state updates ------------------------------------------------------------------------------

    def _update(self, z, valid, idx, w, counts):
        self.step.value = self.step.value + 1
        self._write_buffer(z, valid)
        if self.ema:
            self._ema(z, idx, w, counts)
            if self.reset_interval > 0:
                self._reset_dead_codes()

    def _write_buffer(self, z, valid):
        m = min(self.vectors_per_step, z.shape[0], self.buffer_size)
        n_valid = jnp.sum(valid)
        # m rows drawn uniformly from the valid rows (with replacement); nothing is written when none is valid. The
        # valid rows' indices first (a stable sort), then m uniform picks among the first n_valid: O(N log N + m),
        # where a categorical draw over N rows costs m x N random numbers.
        valid_rows = jnp.argsort(~valid, stable=True)  # (N,) valid row indices first, in order
        pick = jax.random.randint(self.make_rng("vq"), (m,), 0, jnp.maximum(n_valid, 1))
        rows = valid_rows[pick]
        take = jnp.minimum(n_valid, m)
        pos = (self.buffer_pos.value + jnp.arange(m)) % self.buffer_size
        write = jnp.arange(m) < take
        old = self.buffer.value[pos]
        self.buffer.value = self.buffer.value.at[pos].set(jnp.where(write[:, None], z[rows], old))
        self.buffer_pos.value = (self.buffer_pos.value + take) % self.buffer_size
        self.buffer_count.value = jnp.minimum(self.buffer_count.value + take, self.buffer_size)

    def _ema(self, z, idx, w, counts):
        """EMA of each code's count and of the sum of the valid rows assigned to it; z (N, d), idx (N,), w (N, 1) 1.0
        on valid rows."""
        _, protected = self._masks()
        d = self.decay
        cs = jnp.where(protected, self.cluster_size.value, d * self.cluster_size.value + (1 - d) * counts)
        dw = jax.ops.segment_sum(w * z, idx, num_segments=self.K)  # (K, d)
        ws = jnp.where(protected[:, None], self.weight_sum.value, d * self.weight_sum.value + (1 - d) * dw)
        n = jnp.sum(cs)
        smoothed = (cs + self.eps) / (n + self.K * self.eps) * n  # Laplace smoothing
        cb = jnp.where(protected[:, None], self.codebook.value, ws / smoothed[:, None])
        self.cluster_size.value, self.weight_sum.value, self.codebook.value = cs, ws, cb

    def _reset_dead_codes(self):
        """Every reset_interval steps, replace up to reset_fraction * K dead codes (lowest usage first) with vectors
        drawn from the ring buffer; protected / special codes are never touched."""
        r = max(1, int(round(self.K * self.reset_fraction)))
        _, protected = self._masks()
        usage = self.cluster_size.value
        dead = (usage < self.dead_threshold) & ~protected
        due = (self.step.value % self.reset_interval) == 0
        have = self.buffer_count.value > 0
        score = jnp.where(dead, -usage, -jnp.inf)
        _, cand = jax.lax.top_k(score, r)  # (r,) the r least-used dead codes (or fewer dead ones)
        apply = dead[cand] & due & have
        src = jax.random.randint(self.make_rng("vq"), (r,), 0, jnp.maximum(self.buffer_count.value, 1))
        new = self.buffer.value[src]
        cb = self.codebook.value
        self.codebook.value = cb.at[cand].set(jnp.where(apply[:, None], new, cb[cand]))
        self.weight_sum.value = self.weight_sum.value.at[cand].set(
            jnp.where(apply[:, None], new, self.weight_sum.value[cand])
        )
        self.cluster_size.value = self.cluster_size.value.at[cand].set(
            jnp.where(apply, 1.0, self.cluster_size.value[cand])
        )


class ResidualVQ(nn.Module):
    """Multi-stage residual VQ in a shared low-rank space (docs/ARCHITECTURE.md 3.6).

    z (B, Q, D) -> down (D -> d_c) -> `depth` stages, each quantizing the residual of the previous (residual taken
    with stop-gradient on the quantized part) -> sum -> up (d_c -> D, initialised as down's transpose). One
    straight-through estimator on the whole path: the output's gradient w.r.t. the input is the identity map through
    the projections. Invalid slots get the PAD id and the pad sentinel (zeros).
    """

    K: int
    depth: int
    code_dim: int
    beta: float = 0.25
    ema: bool = True
    decay: float = 0.999
    reset_interval: int = 250
    reset_fraction: float = 0.1
    dead_threshold: float = 1.0
    buffer_size: int = 4096
    vectors_per_step: int = 256

    @property
    def codec(self) -> CodeCodec:
        return CodeCodec(self.K, self.depth)

    def setup(self):
        specials = self.codec.special_ids
        self.stages = [
            VectorQuantizer(
                K=self.K,
                dim=self.code_dim,
                beta=self.beta,
                ema=self.ema,
                decay=self.decay,
                reset_interval=self.reset_interval,
                reset_fraction=self.reset_fraction,
                dead_threshold=self.dead_threshold,
                buffer_size=self.buffer_size,
                vectors_per_step=self.vectors_per_step,
                forbidden=specials if s == 0 else (),
                protected=specials if s == 0 else (),
                name=f"stage_{s}",
            )
            for s in range(self.depth)
        ]

    def _projections(self, d_model):
        down = self.param(
            "down", kernel_init(axes.EMBED, axes.CODE, init=nn.initializers.xavier_uniform()), (d_model, self.code_dim)
        )
        up = self.param(
            "up", kernel_init(axes.CODE, axes.EMBED, init=lambda *_: jnp.asarray(down).T), (self.code_dim, d_model)
        )
        return down, up

    @nn.compact
    def __call__(self, z, valid, train: bool = False):
        """z: (B, Q, D); valid: (B, Q) -> (quantized (B, Q, D) straight-through, codes (B, Q) int32, loss, metrics)."""
        b, q, d = z.shape
        down, up = self._projections(d)
        y = z.reshape(b * q, d).astype(jnp.float32) @ down  # (N, d_c)
        flat_valid = valid.reshape(-1)
        r = y
        hard = jnp.zeros_like(y)
        digits, loss, metrics = [], 0.0, {}
        for s, stage in enumerate(self.stages):
            e, idx, loss_s, m = stage(r, flat_valid, train)
            hard = hard + e
            r = r - jax.lax.stop_gradient(e)
            digits.append(idx)
            loss = loss + loss_s
            metrics.update({f"vq_stage{s}_perplexity": m["perplexity"], f"vq_stage{s}_dead_codes": m["dead_codes"]})
        y_st = y + jax.lax.stop_gradient(hard - y)
        out = (y_st @ up).reshape(b, q, d)
        out = jnp.where(valid[..., None], out, 0.0).astype(z.dtype)  # pad sentinel: zeros
        codes = self.codec.compose(jnp.stack(digits, -1)).reshape(b, q)
        codes = jnp.where(valid, codes, self.codec.pad_id)
        metrics["vq_perplexity"] = math.prod(metrics[f"vq_stage{s}_perplexity"] for s in range(self.depth))
        metrics["vq_dead_codes"] = sum(metrics[f"vq_stage{s}_dead_codes"] for s in range(self.depth))
        metrics["vq_residual_mse"] = jnp.sum(jnp.where(flat_valid[:, None], r**2, 0.0)) / jnp.maximum(
            jnp.sum(flat_valid) * self.code_dim, 1.0
        )
        return out, codes, loss, metrics

    def decode(self, codes: jax.Array) -> jax.Array:
        """Composed code ids (...) -> their vectors (..., D): up(sum of the stage code vectors), the value __call__
        outputs for an input that quantizes to these codes (generation turns a sampled code into a row with it)."""
        digits = self.codec.decompose(codes)  # (..., depth)
        z = sum(st.codebook_value().astype(jnp.float32)[digits[..., s]] for s, st in enumerate(self.stages))
        return z @ jnp.asarray(self.get_variable("params", "up"), jnp.float32)

    def stage_codebooks(self) -> list[jax.Array]:
        """[(K, d_c)] per stage (the upper level's expander embeds and predicts through these)."""
        return [st.codebook_value() for st in self.stages]
