"""Composed code ids and their factorized scoring: the one place that turns ids into per-stage digits and back
(`CodeCodec`), and that scores a vector against per-stage code tables with residual conditioning
(`residual_code_logits`). The expander (embedding and head) and the top transformer (discrete head) both use them.

A level with a depth-`d` residual quantizer of K codes per stage names a segment by one composed id
sum_s digit_s * K**s; nothing of size K**d is ever materialised. At level 0 the "codes" are bytes (K = 260, d = 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Stage-0 codes reserved for specials, counted from the end of the codebook: K-1 PAD, K-2 BOS, K-3 EOS, K-4 EOP.
SPECIALS = ("pad", "bos", "eos", "eop")


@struct.dataclass
class CodeCodec:
    """Composes per-stage digits into one id (sum_s digit_s * K**s) and back; tells special ids apart."""

    K: int = struct.field(pytree_node=False)
    depth: int = struct.field(pytree_node=False)

    @property
    def pad_id(self) -> int:
        return self.K - 1

    @property
    def bos_id(self) -> int:
        return self.K - 2

    @property
    def eos_id(self) -> int:
        return self.K - 3

    @property
    def eop_id(self) -> int:
        return self.K - 4

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.bos_id, self.eos_id, self.eop_id)

    @property
    def vocab_size(self) -> int:
        return self.K**self.depth

    def compose(self, digits):
        """digits: (..., depth) int -> (...) int32."""
        base = jnp.asarray([self.K**s for s in range(self.depth)], jnp.int32)
        return jnp.sum(jnp.asarray(digits, jnp.int32) * base, axis=-1)

    def decompose(self, ids):
        """(...) int -> (..., depth) int32 digits in [0, K)."""
        base = jnp.asarray([self.K**s for s in range(self.depth)], jnp.int32)
        return (jnp.asarray(ids, jnp.int32)[..., None] // base) % self.K

    def is_special(self, ids):
        """True for the four special ids (stage-0 digit in the reserved range, higher digits zero)."""
        ids = jnp.asarray(ids, jnp.int32)
        return (ids >= self.K - len(SPECIALS)) & (ids < self.K)


def residual_code_logits(
    z: jax.Array, tables, teacher_digits: jax.Array, *, sqdist: bool = False, residual: bool = True
) -> list[jax.Array]:
    """Per-stage logits [(..., K)] of code-space vectors z (..., d_c) against stage tables [(K, d_c)].

    Stage s scores by dot product (or, with `sqdist`, by negative squared distance). With `residual`, stage s+1
    scores what is left of z after subtracting the stage-s vector of the teacher digit `teacher_digits[..., s]`
    (teacher forcing in training, the chosen digit when decoding); the subtracted vector carries no gradient.
    """
    z = z.astype(jnp.float32)
    out = []
    for s, table in enumerate(tables):
        table = table.astype(jnp.float32)
        dots = z @ table.T
        if sqdist:
            dots = 2.0 * dots - jnp.sum(z * z, -1, keepdims=True) - jnp.sum(table * table, -1)
        out.append(dots)
        if residual and s + 1 < len(tables):
            z = z - jax.lax.stop_gradient(table[teacher_digits[..., s]])
    return out
