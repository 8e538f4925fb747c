"""The metric protocol of evaluation: every figure is kept as totals and divided once, at the very end.

A jitted eval step returns, per batch, a dict `name -> Ratio | Count | CodeUsage` whose arrays are sums over the
whole global batch (every device and host: the step runs under the mesh and its outputs are replicated).
`accumulate` adds those per-batch totals on the host in float64, in batch order; `finalize` turns the totals into
plain numbers (a `Ratio` is `total / count`, so a compression ratio is real tokens over segments of the whole
evaluation, never a mean of per-batch ratios). The result does not depend on the eval batch size or the number of
devices. Training's periodic eval, evaluate.py, the lm-eval adapter and TensorBoard all read figures made here; what
is measured (the names and the code length) is defined in scoring.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import struct


@struct.dataclass
class Ratio:
    """`total / count`, both summed over the evaluation (bits over the tokens they cover, tokens over segments...).
    Finalizes to nothing when `count` is 0 (the figure does not exist for this data)."""

    total: jax.Array  # () float32 (per batch) / float64 (accumulated)
    count: jax.Array  # () float32 / float64

    def values(self, name: str) -> dict[str, float]:
        count = float(self.count)
        return {name: float(self.total) / count} if count > 0 else {}


@struct.dataclass
class Count:
    """A plain total over the evaluation (rows, bytes, overflowing rows)."""

    total: jax.Array  # ()

    def values(self, name: str) -> dict[str, float]:
        return {name: float(self.total)}


@struct.dataclass
class CodeUsage:
    """How often each code of each residual-VQ stage was chosen over the evaluation. Finalizes to
    `{name}_stage{s}_perplexity` (exp of the entropy of stage s's usage), `{name}_perplexity` (their product) and
    `{name}_unused_codes` (codes never chosen, summed over stages; the `reserved` stage-0 codes are not counted)."""

    counts: jax.Array  # (depth, K)
    reserved: int = struct.field(pytree_node=False, default=0)  # stage-0 codes (at the end) that are never chosen

    def values(self, name: str) -> dict[str, float]:
        counts = np.asarray(self.counts, np.float64)
        if counts.sum() <= 0:
            return {}
        out, unused = {}, 0
        for s, c in enumerate(counts):
            p = c[c > 0] / c.sum()
            out[f"{name}_stage{s}_perplexity"] = math.exp(-float(np.sum(p * np.log(p))))
            usable = c[: len(c) - self.reserved] if s == 0 else c
            unused += int(np.sum(usable == 0))
        out[f"{name}_perplexity"] = math.prod(out[f"{name}_stage{s}_perplexity"] for s in range(len(counts)))
        out[f"{name}_unused_codes"] = float(unused)
        return out


Metric = Ratio | Count | CodeUsage


def accumulate(batches: Sequence[Mapping[str, Metric]]) -> dict[str, Metric]:
    """The per-batch totals of an evaluation (device or host values, one dict per batch) added up in float64.

    The device values are fetched together, once: the eval steps of all batches are dispatched before any waits."""
    if not batches:
        return {}
    host = jax.device_get(list(batches))
    return jax.tree.map(lambda *xs: np.sum(np.stack([np.asarray(x, np.float64) for x in xs]), axis=0), *host)


def finalize(totals: Mapping[str, Metric]) -> dict[str, float]:
    """The figures of accumulated totals: name -> float. Figures without data (a ratio over nothing) are absent."""
    out: dict[str, float] = {}
    for name, metric in totals.items():
        out.update(metric.values(name))
    return out
