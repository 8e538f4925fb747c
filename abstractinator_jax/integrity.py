"""Checksums that prove a restored checkpoint holds what was saved. At save time `array_checksums` computes, on the
devices and in one jitted pass, a 64-bit position-weighted sum of every array's bits (exact integer arithmetic, so
the result does not depend on the sharding or the device layout), and `json_digest` hashes the JSON items (the data
iterator's state, the config); the checkpoint stores them in its metadata. Restoring recomputes them from what was
read and `compare` names every part that differs: a flipped byte in array data, a truncated chunk that reads back
differently, or a swapped file all show up, while a value that is merely unusual does not. Not cryptographic: it
detects accidents, not tampering."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["FORMAT", "array_checksums", "compare", "json_digest"]

FORMAT = "abstractinator-checksums-v1"  # stored with the checksums; a different format is not compared
_GOLDEN = np.uint32(0x9E3779B1)


def _bits_u32(x: jax.Array) -> jax.Array:
    """The array's raw bits as uint32 values of the same shape (8-byte types: a trailing axis of 2)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    if size == 4:
        return lax.bitcast_convert_type(x, jnp.uint32)
    if size == 8:
        return lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """(2,) uint32: sum(bits * (2 i + 1)) and sum(rotl(bits, 13) * (golden * i | 1)) over the flat index i, mod 2^32.
    Odd weights make every single-element change visible; the index comes from iotas, so no reshape (no
    resharding) of a sharded array is needed."""
    bits = _bits_u32(x)
    idx = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(bits.ndim)):
        idx = idx + lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[d]
    rotated = (bits << 13) | (bits >> 19)
    a = jnp.sum(bits * (idx * 2 + 1), dtype=jnp.uint32)
    b = jnp.sum(rotated * ((idx * _GOLDEN) | 1), dtype=jnp.uint32)
    return jnp.stack([a, b])


@jax.jit
def _checksums(leaves):
    return [_leaf_checksum(x) for x in leaves]


def array_checksums(tree: Any) -> dict[str, str]:
    """{path: 16 hex digits} for every array leaf of `tree` (jax or numpy arrays, numpy or Python scalars)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = ["/".join(_key(k) for k in p) or "<root>" for p, _ in flat]
    leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
    sums = jax.device_get(_checksums(leaves))
    return {p: f"{int(s[0]):08x}{int(s[1]):08x}" for p, s in zip(paths, sums, strict=True)}


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def json_digest(value: Any) -> str:
    """sha256 of a JSON-serialisable value (keys sorted), for the config and the data iterator's state."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def compare(saved: dict[str, str], restored: dict[str, str], what: str) -> list[str]:
    """One line per part of `what` whose checksum differs from (or is missing against) the saved one."""
    problems = [f"{what} {p}: checksum {restored[p]} != saved {c}" for p, c in saved.items() if restored.get(p, c) != c]
    problems += [f"{what} {p}: not in the checkpoint" for p in saved if p not in restored]
    return problems
