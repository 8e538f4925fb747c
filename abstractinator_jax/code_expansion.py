"""What a level's expander generates from one code alone (the codebook atlas's "generated" column, report.py).

Level k's expander gets a single memory row, the code's vector (the quantizer's `decode`), and generates greedily
from its start id, as generation does for the first id of a segment (docs/ARCHITECTURE.md 6). The segment ends at
the first of: EOS, the level's own boundary rule firing on the ids generated so far (the training rule, applied by
the level's compressor to the generated ids as a row of their own, after BOS at level 0 as rows start in training;
the rule is causal, so cutting afterwards equals stopping while generating), or `gen_max_segment_len` ids. Above
level 0 the ids are level k-1 codes; each is expanded the same way, down to bytes, so every code of every quantized
level reads as text. A batch of codes is expanded at once by one jitted program per level (recomputing the prefix
for each new id: these segments are short).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from .codes import CodeCodec
from .config import BOS_ID, EOS_ID
from .generation import sample_code, sampling

BATCH = 64  # codes expanded per call of the compiled program


class CodeExpander:
    """`expand(k, codes) -> [ids per code]` and `to_bytes(k, codes) -> [bytes per code]` for a restored model."""

    def __init__(self, model, variables: dict, cfg: ConfigDict):
        self.model, self.variables, self.cfg = model, variables, cfg
        self._programs = {}
        self._cache: dict[tuple[int, int], bytes] = {}

    def _start_id(self, k: int) -> int:
        if k == 0:
            return EOS_ID
        lo = self.cfg.levels[k - 1]
        return CodeCodec(lo.c_vq_K, lo.c_vq_depth).eos_id

    def _program(self, k: int):
        if k in self._programs:
            return self._programs[k]
        lv = self.cfg.levels[k]
        cap, start = int(lv.gen_max_segment_len), self._start_id(k)
        if k == 0:
            ids = np.arange(lv.vocab_size)
            allowed = jnp.asarray((ids < 256) | (ids == EOS_ID))
            stop_id = EOS_ID
        else:
            lo = self.cfg.levels[k - 1]
            allowed = jnp.arange(lo.c_vq_K) < lo.c_vq_K - 4  # no reserved specials
            stop_id = CodeCodec(lo.c_vq_K, lo.c_vq_depth).eos_id
        sp = sampling(greedy=True)

        def expand(m, codes):  # (N,) level-k codes -> (N, cap) generated ids, (N,) their count
            level = m.levels[k]
            books = m.levels[k - 1].compressor.quantizer.stage_codebooks() if k else None
            n = codes.shape[0]
            memory = level.compressor.quantizer.decode(codes)[:, None]  # (N, 1, D)
            row_valid = jnp.ones((n, 1), bool)
            pad = jnp.zeros((n, cap), bool)
            seg = jnp.zeros((n, cap), jnp.int32)
            tables = [t.astype(jnp.float32) for t in level.expander.tables(books)]
            keys = jax.random.split(jax.random.key(0), n)

            def body(t, inputs):  # inputs (N, cap + 1): [start] + ids generated so far
                h = level.expander.hidden(inputs[:, :cap], pad, jnp.arange(cap), memory, row_valid, seg, books)
                z = level.expander.code_space(h)[:, t].astype(jnp.float32)
                new = sample_code(
                    keys,
                    z,
                    tables,
                    sp,
                    allowed0=allowed,
                    sqdist=lv.d_use_sqdist_logits,
                    residual=lv.d_residual_conditioning,
                )
                return inputs.at[:, t + 1].set(new)

            inputs = jax.lax.fori_loop(0, cap, body, jnp.full((n, cap + 1), start, jnp.int32))
            gen = inputs[:, 1:]  # (N, cap)
            # the level's boundary rule on the generated ids, as a row of their own (at level 0 after BOS, as rows
            # start in training): a new segment starting before id t >= 1 ends the expansion there
            if k == 0:
                row = jnp.concatenate([jnp.full((n, 1), BOS_ID, jnp.int32), gen], axis=1)
                sid = level.compress(row, jnp.zeros(row.shape, bool), False).segments.seg_id[:, 1:]  # (N, cap)
            else:
                lo_vectors = m.levels[k - 1].compressor.quantizer.decode(gen)
                sid = level.compress(gen, pad, False, lo_vectors).segments.seg_id  # (N, cap)
            cut = jnp.concatenate([jnp.zeros((n, 1), bool), sid[:, 1:] != sid[:, :-1]], axis=1)  # (N, cap)
            eos = gen == stop_id
            stop = cut | jnp.concatenate([jnp.zeros((n, 1), bool), eos[:, :-1]], axis=1)  # EOS is kept, then stop
            length = jnp.where(jnp.any(stop, axis=1), jnp.argmax(stop, axis=1), cap)
            return gen, length

        fn = jax.jit(lambda v, codes: self.model.apply(v, codes, method=expand))
        self._programs[k] = fn
        return fn

    def expand(self, k: int, codes) -> list[list[int]]:
        """Level k's greedy expansion of each code alone: level k-1 ids (bytes at level 0, EOS included if emitted)."""
        codes = np.asarray(codes, np.int32).reshape(-1)
        if codes.size == 0:
            return []
        padded = np.resize(codes, -(-codes.size // BATCH) * BATCH)  # whole batches: one compile per level
        gen, length = jax.device_get(self._program(k)(self.variables, jnp.asarray(padded)))
        return [[int(x) for x in gen[i, : int(length[i])]] for i in range(codes.size)]

    def to_bytes(self, k: int, codes) -> list[bytes]:
        """Each level-k code expanded alone, recursively down to bytes (EOS dropped)."""
        codes = [int(c) for c in np.asarray(codes).reshape(-1)]
        todo = sorted({c for c in codes if (k, c) not in self._cache})
        if todo:
            expansions = self.expand(k, todo)
            if k == 0:
                for c, ids in zip(todo, expansions):
                    self._cache[(0, c)] = bytes(i for i in ids if i < 256)
            else:
                lower = sorted({i for ids in expansions for i in ids})
                lower_bytes = dict(zip(lower, self.to_bytes(k - 1, lower)))
                eos = self._start_id(k)  # the lower level's EOS code id
                for c, ids in zip(todo, expansions):
                    self._cache[(k, c)] = b"".join(lower_bytes[i] for i in ids if i != eos)
        return [self._cache[(k, c)] for c in codes]
