"""The top transformer ("CodeSequenceTransformer", docs/ARCHITECTURE.md 5): a causal transformer over the top level's
valid rows, and its two losses, next-row mean squared error (continuous) and next-code cross-entropy through a
factorized, residually conditioned head over the top quantizer's codebooks (discrete)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn
from ml_collections import ConfigDict

from . import axes
from .blocks import TransformerBlock, run_stack, top_attention
from .codes import CodeCodec, residual_code_logits
from .config import top_batch_chunks
from .layers import dense, rms_norm
from .losses import masked_cross_entropy


def row_bucket_sizes(num_rows: int, buckets: int) -> tuple[int, ...]:
    """The prefix lengths the top transformer may run over: `buckets` equal steps up to num_rows (ascending, unique;
    the last is num_rows). 1 bucket = always every row."""
    b = max(1, min(buckets, num_rows))
    return tuple(sorted({-(-num_rows * (i + 1) // b) for i in range(b)}))


def row_bucket_index(valid: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
    """valid (B, Q) -> int32 scalar: the smallest bucket whose prefix holds every valid row of the batch (rows past
    the last valid one are never seen by a valid row: causal attention and the next-row pairs stop there)."""
    q = valid.shape[1]
    last = jnp.max(jnp.where(valid, jnp.arange(1, q + 1, dtype=jnp.int32), 0))  # 1 + index of the last valid row
    return jnp.minimum(jnp.searchsorted(jnp.asarray(sizes, jnp.int32), last), len(sizes) - 1).astype(jnp.int32)


def _pad_rows(x: jax.Array, q: int) -> jax.Array:
    """(B, n, ...) -> (B, q, ...) with zeros after row n."""
    return jnp.pad(x, [(0, 0), (0, q - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _split(x: jax.Array, chunks: int) -> jax.Array:
    """(B, ...) -> (chunks, B / chunks, ...); chunk c holds batch rows c, c + chunks, c + 2 chunks, ... (a batch
    sharded in contiguous blocks over devices keeps each chunk's rows on the devices that hold them)."""
    return jnp.moveaxis(x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:]), 1, 0)


def _merge(x: jax.Array) -> jax.Array:
    """_split's inverse: (chunks, B / chunks, ...) -> (B, ...)."""
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def bucketed_loss(module: nn.Module, sizes: tuple[int, ...], code_K: int, outputs: bool, chunks: int = 1):
    """(params, rows (B, Q, E), valid (B, Q), codes, codebooks) -> (loss, (metrics[, outputs])) of the unbound top
    `module` over the smallest prefix of `sizes` rows that holds every valid row (lax.switch; outputs zero-padded to Q
    rows). Its gradient is computed with the value, inside the same branch (a custom VJP): differentiating a switch
    makes every branch carry the residuals of all of them (memory and zero-filling of the sum of all buckets), where
    this carries only the gradients of the parameters and rows. The loss is a scalar, so its VJP is that gradient
    scaled by the loss's cotangent; valid, codes and codebooks get none (the top scores codes against stopped
    codebooks).

    With `chunks` > 1 (a divisor of B) the batch runs in that many chunks of rows, one after another (lax.scan), each
    over its own smallest bucket: less padding and arrays small enough to stay in cache. The loss and every metric
    are means over next-row pairs, so the batch's are the chunks' weighted by their share of the pairs, and so is the
    gradient: the same values as in one pass."""
    q = sizes[-1]

    def branch(n):
        def f(params, rows, valid, codes, codebooks):
            res = module.apply(
                {"params": params},
                rows[:, :n],
                valid[:, :n],
                None if codes is None else codes[:, :n],
                codebooks,
                code_K,
                outputs,
                method=module._loss,
            )
            if outputs:
                return res[0], (res[1], jax.tree.map(lambda x: _pad_rows(x, q), res[2]))
            return res[0], (res[1],)

        return f

    def with_grad(n):
        def f(*args):
            return jax.value_and_grad(branch(n), argnums=(0, 1), has_aux=True)(*args)

        return f

    def bucketed(fns, params, rows, valid, codes, codebooks):
        return jax.lax.switch(row_bucket_index(valid, sizes), fns, params, rows, valid, codes, codebooks)

    def over_chunks(grad: bool, params, rows, valid, codes, codebooks):
        """The bucketed pass (with the gradients of the parameters and rows if `grad`) chunk by chunk."""
        fns = [(with_grad if grad else branch)(n) for n in sizes]
        if chunks == 1:
            return bucketed(fns, params, rows, valid, codes, codebooks)
        pairs = jnp.sum(_split(next_row_pairs(valid), chunks), axis=(1, 2), dtype=jnp.float32)  # (chunks,)
        weights = pairs / jnp.maximum(jnp.sum(pairs), 1.0)

        def body(grad_params, xs):
            w, r, v, c = xs
            out = bucketed(fns, params, r, v, c, codebooks)
            (loss, (metrics, *outs)), grads = out if grad else (out, None)
            grad_rows = None
            if grad:
                grad_params = jax.tree.map(lambda a, g: a + g * w.astype(g.dtype), grad_params, grads[0])
                grad_rows = grads[1] * w.astype(grads[1].dtype)
            return grad_params, (loss * w, jax.tree.map(lambda m: m * w, metrics), outs, grad_rows)

        xs = (weights, *(None if x is None else _split(x, chunks) for x in (rows, valid, codes)))
        init = jax.tree.map(jnp.zeros_like, params) if grad else None
        grad_params, (losses, metrics, outs, grad_rows) = jax.lax.scan(body, init, xs)
        value = jnp.sum(losses), (jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics), *jax.tree.map(_merge, outs))
        return (value, (grad_params, _merge(grad_rows))) if grad else value

    @jax.custom_vjp
    def run(params, rows, valid, codes, codebooks):
        return over_chunks(False, params, rows, valid, codes, codebooks)

    def forward(params, rows, valid, codes, codebooks):
        return over_chunks(True, params, rows, valid, codes, codebooks)

    def backward(grads, cotangent):
        g = cotangent[0]  # the loss's; metrics and outputs are not differentiated
        grad_params, grad_rows = grads
        return (
            jax.tree.map(lambda x: x * g.astype(x.dtype), grad_params),
            grad_rows * g.astype(grad_rows.dtype),
            None,
            None,
            None,
        )

    run.defvjp(forward, backward)
    return run


def next_row_pairs(valid: jax.Array) -> jax.Array:
    """(B, Q) -> (B, Q-1): True where row t and its successor t+1 are both valid (a next-row target exists)."""
    return valid[:, :-1] & valid[:, 1:]


def continuous_loss(pred: jax.Array, rows: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean squared error of pred[t] against rows[t+1] over valid pairs and dimensions. pred, rows: (B, Q, E)."""
    pairs = next_row_pairs(valid).astype(jnp.float32)  # (B, Q-1)
    err = jnp.mean((pred[:, :-1].astype(jnp.float32) - rows[:, 1:].astype(jnp.float32)) ** 2, axis=-1)
    return jnp.sum(err * pairs) / jnp.maximum(jnp.sum(pairs), 1.0)


def discrete_loss(logits, next_digits: jax.Array, valid: jax.Array) -> jax.Array:
    """Sum over stages of the mean cross-entropy of logits[s][:, t] against the digits of row t+1 over valid pairs.
    logits: [(B, Q, K)] computed at every row t; next_digits: (B, Q, depth) digits of each row's code."""
    pairs = next_row_pairs(valid)
    return sum(masked_cross_entropy(lg[:, :-1], next_digits[:, 1:, s], pairs) for s, lg in enumerate(logits))


class CodeSequenceTransformer(nn.Module):
    """Causal transformer over the top level's rows (invalid rows are keys no one sees and carry no loss).

    continuous: predicts row t+1's vector from rows <= t (MSE). discrete: predicts row t+1's code digits with a
    factorized head over the top quantizer's stage codebooks (cross-entropy, residual conditioning). `predict` (with a
    decoding cache for generation) and `code_space` are the pieces `__call__` is made of.
    """

    cfg: ConfigDict  # top_transformer_config
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    code_dim: int = 0  # width of the top quantizer's codebooks (discrete top)
    remat: str = "none"  # blocks.run_stack: rematerialization of the blocks in training
    # __call__ runs over the smallest of `row_buckets` equal prefixes of the rows that holds every valid row of the
    # batch (lax.switch: one compiled branch per bucket; the same loss and gradients as over all rows).
    row_buckets: int = 1
    # ... and runs the batch in this many chunks of rows, one after another, each over its own bucket (at most: the
    # largest divisor of the batch that is not more; bucketed_loss).
    batch_chunks: int = 1

    def setup(self):
        cfg = self.cfg
        self.in_proj = dense(cfg.dim, (axes.EMBED_OUT, axes.EMBED), dtype=self.dtype, name="in_proj")
        self.blocks = [
            TransformerBlock(
                features=cfg.dim,
                num_heads=cfg.num_heads,
                window=0,
                attention=top_attention(cfg),
                ffn_mult=cfg.ffn_dim_multiplier,
                implementation=self.implementation,
                dtype=self.dtype,
                name=f"block_{i}",
            )
            for i in range(cfg.num_layers)
        ]
        self.final_norm = rms_norm(dtype=self.dtype, name="final_norm")
        # the output projections feed the losses (and generation's next row / code): float32 in any compute dtype
        self.out_proj = dense(cfg.embed_dim, (axes.EMBED, axes.EMBED_OUT), dtype=jnp.float32, name="out_proj")
        if not cfg.continuous:
            if self.code_dim <= 0:
                raise ValueError("a discrete CodeSequenceTransformer needs code_dim (the top codebooks' width).")
            self.code_proj = dense(self.code_dim, (axes.EMBED_OUT, axes.CODE), dtype=jnp.float32, name="code_proj")

    def predict(self, rows, valid, positions=None, cache=None):
        """rows (B, Q, E), valid (B, Q) -> the prediction at every row for the next one (B, Q, E) float32; with a
        `cache` (blocks.run_stack; one step: rows (B, 1, E), positions (B,)) -> (prediction, caches)."""
        h = self.in_proj(rows.astype(self.dtype))
        positions = jnp.arange(rows.shape[1]) if positions is None else positions
        out = run_stack(self.blocks, h, ~valid, positions, cache=cache, remat=self.remat)
        h, caches = out if cache is not None else (out, None)
        pred = self.out_proj(self.final_norm(h))
        return pred if cache is None else (pred, caches)

    def code_space(self, pred):
        """Discrete top: predictions (..., E) -> code space (..., d_c), scored against the top codebooks."""
        return self.code_proj(pred)

    def __call__(self, rows, valid, codes=None, codebooks=None, code_K: int = 0, outputs: bool = False):
        """rows: (B, Q, E) top-level vectors; valid: (B, Q); codes: (B, Q) composed ids (discrete). Returns (loss,
        metrics), and with `outputs` also the predictions at every row t of row t+1: {'pred': (B, Q, E)}
        (continuous) or {'logits': [(B, Q, K)] per stage, 'digits': (B, Q, depth) of each row's code} (discrete);
        with row buckets, rows past the computed bucket hold zeros there (they are invalid). Only the loss carries
        a gradient (metrics and outputs are constants to it)."""
        b, q, e = rows.shape
        chex.assert_shape(valid, (b, q))
        sizes = row_bucket_sizes(q, self.row_buckets)
        chunks = top_batch_chunks(b, self.batch_chunks)
        if (len(sizes) == 1 and chunks == 1) or self.is_initializing():
            return self._loss(rows, valid, codes, codebooks, code_K, outputs)
        run = bucketed_loss(self.clone(parent=None), sizes, code_K, outputs, chunks)
        loss, rest = run(nn.meta.unbox(self.variables["params"]), rows, valid, codes, codebooks)
        return (loss, *rest)

    def _loss(self, rows, valid, codes, codebooks, code_K, outputs):
        """__call__ over all the rows given."""
        cfg = self.cfg
        out = self.predict(rows, valid)
        target = jax.lax.stop_gradient(rows)
        if cfg.continuous:
            loss = continuous_loss(out, target, valid)
            return (loss, {"top_mse": loss}, {"pred": out}) if outputs else (loss, {"top_mse": loss})
        digits = CodeCodec(code_K, len(codebooks)).decompose(codes)  # (B, Q, depth)
        z = self.code_space(out)
        # stage s+1 at row t is conditioned on the teacher digits of row t+1 (the target), shifted to align with t
        teacher = jnp.concatenate([digits[:, 1:], digits[:, -1:]], axis=1)
        logits = residual_code_logits(z, [jax.lax.stop_gradient(c) for c in codebooks], teacher)
        loss = discrete_loss(logits, digits, valid)
        pairs = next_row_pairs(valid)
        match = jnp.ones(pairs.shape, bool)
        for s, lg in enumerate(logits):
            match &= jnp.argmax(lg[:, :-1], axis=-1) == digits[:, 1:, s]
        acc = jnp.sum(match & pairs) / jnp.maximum(jnp.sum(pairs), 1)
        metrics = {"top_ce": loss, "top_accuracy": acc.astype(jnp.float32)}
        return (loss, metrics, {"logits": logits, "digits": digits}) if outputs else (loss, metrics)
