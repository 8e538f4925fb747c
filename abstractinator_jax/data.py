"""Input pipelines (docs/ARCHITECTURE.md 2): documents become rows of a fixed length S, and rows become batches.

`[BOS] + bytes + [EOS]` is cut into consecutive rows, the last padded with PAD (no byte is dropped). `RowSource`
indexes the rows of a document source (documents.py) lazily (only document lengths are read up front);
`make_train_iterator` shuffles them with grain (a new permutation every epoch), shards them over hosts, batches them
into `{'ids': (accum, B_local, S) int32, 'mask': same, True at PAD}` and returns a checkpointable
`grain.DatasetIterator`. `make_eval_batches` gives a fixed, unshuffled list of eval batches.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from ml_collections import ConfigDict

from abstractinator_jax.config import BOS_ID, EOS_ID, PAD_ID, ConfigError
from abstractinator_jax.documents import Documents, byte_lengths, make_documents, read_span

__all__ = ["RowSource", "make_row_dataset", "make_train_iterator", "make_eval_batches", "resolve_data_config"]


# ---------------------------------------------------------------------------------------------------------------------
# Rows and pipelines
# ---------------------------------------------------------------------------------------------------------------------


class RowSource:
    """Random access to the rows of length `seq_len` of a document source (grain RandomAccessDataSource).

    Document d is `[BOS] + bytes + [EOS]` cut into ceil((len_d + 2) / seq_len) consecutive rows, the last padded
    with PAD (the same rows as `tokenizer.to_rows(tokenizer.encode(doc), seq_len)`). Only document lengths are read
    up front; `src[i]` reads the bytes of row i (int32, shape (seq_len,)).
    """

    def __init__(self, documents: Documents, seq_len: int):
        if seq_len < 2:
            raise ConfigError(f"sequence_length={seq_len} must be >= 2 (BOS + at least one byte).")
        self.documents = documents
        self.seq_len = int(seq_len)
        self.doc_lengths = byte_lengths(documents)
        self.rows_per_doc = -(-(self.doc_lengths + 2) // self.seq_len)
        self.row_starts = np.concatenate([[0], np.cumsum(self.rows_per_doc)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.row_starts[-1])

    def __repr__(self) -> str:
        return f"RowSource(documents={len(self.documents)}, rows={len(self)}, seq_len={self.seq_len})"

    def locate(self, index: int) -> tuple[int, int]:
        """(document, row within the document) of row `index`."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"row index {index} out of range for {len(self)} rows")
        d = int(np.searchsorted(self.row_starts, index, side="right")) - 1
        return d, index - int(self.row_starts[d])

    def __getitem__(self, index: int) -> np.ndarray:
        d, r = self.locate(index)
        n_bytes, s = int(self.doc_lengths[d]), self.seq_len
        p0, p1 = r * s, min((r + 1) * s, n_bytes + 2)  # positions in the encoded document [BOS, bytes..., EOS]
        b0, b1 = max(p0 - 1, 0), min(p1 - 1, n_bytes)
        data = read_span(self.documents, d, b0, b1) if b1 > b0 else b""
        if len(data) != b1 - b0:
            raise RuntimeError(f"document {d} changed while reading (expected {b1 - b0} bytes, got {len(data)})")
        row = np.full(s, PAD_ID, dtype=np.int32)
        k = 0
        if p0 == 0:
            row[0], k = BOS_ID, 1
        row[k : k + len(data)] = np.frombuffer(data, dtype=np.uint8)
        if p1 == n_bytes + 2:
            row[p1 - p0 - 1] = EOS_ID
        return row


def make_row_dataset(documents: Documents, seq_len: int) -> grain.MapDataset:
    """A grain MapDataset whose element i is row i (int32 (seq_len,)) of `documents`."""
    return grain.MapDataset.source(RowSource(documents, seq_len))


def _stack_blocks(blocks: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    ids = np.stack(blocks)  # (accum_steps, per_process, S)
    return {"ids": ids, "mask": ids == PAD_ID}


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    return int(process_index), int(process_count)


def _per_process(batch_size: int, process_count: int) -> int:
    if batch_size < 1 or batch_size % process_count:
        raise ConfigError(
            f"batch_size={batch_size} must be a positive multiple of the number of processes ({process_count}); "
            f"set --config.batch_size to a multiple of {process_count}."
        )
    return batch_size // process_count


def make_train_iterator(
    data_cfg: Any,
    seq_len: int,
    batch_size: int,
    accum_steps: int = 1,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    documents: Documents | None = None,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of training batches for this process.

    Each element is `{'ids': int32 (accum_steps, batch_size // process_count, seq_len), 'mask': bool, True at PAD}`.
    Rows are shuffled with `seed`, a new permutation each epoch (grain's `shuffle` folds the epoch into the seed);
    each global micro-batch is `batch_size` consecutive rows of that stream, of which process p takes the p-th
    contiguous block, so processes never overlap, together cover every row once per epoch, and the global batch is
    the same for any number of processes. `process_index` / `process_count` default to JAX's. `documents` overrides the
    source chosen by `data_cfg` (tests, custom corpora). Save/restore with `it.get_state()` / `it.set_state()` or
    `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` under orbax.
    """
    process_index, process_count = _process_defaults(process_index, process_count)
    per = _per_process(batch_size, process_count)
    if accum_steps < 1:
        raise ConfigError(f"gradient_accumulation_steps={accum_steps} must be >= 1.")
    docs = make_documents(data_cfg, "train") if documents is None else documents
    ds = make_row_dataset(docs, seq_len)
    if len(ds) == 0:
        raise ConfigError("the training set has no rows; check data.path / data.source.")
    ds = ds.shuffle(seed=int(seed) % 2**32).repeat(None)  # shuffle before repeat: a new permutation per epoch
    # Global micro-batch g holds the stream's positions [g * batch_size, (g + 1) * batch_size); process p holds the
    # p-th contiguous block of `per` of them, so the global batch (processes' blocks in order) is the same rows in
    # the same order for any number of processes.
    ds = ds.batch(per, drop_remainder=True, batch_fn=np.stack)[process_index::process_count]
    ds = ds.batch(accum_steps, drop_remainder=True, batch_fn=_stack_blocks)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=8))
    workers = int(getattr(data_cfg, "num_workers", 0) or 0)
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app nothing parsed them
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it_ds)


def make_eval_batches(
    data_cfg: Any,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    process_index: int | None = 0,
    process_count: int | None = 1,
    *,
    documents: Documents | None = None,
) -> list[dict[str, np.ndarray]]:
    """A fixed list of eval batches `{'ids': int32 (B, S), 'mask': bool (B, S)}`, in document order, no shuffle.

    Global batch k holds eval rows [k*B, (k+1)*B); the last one is filled up with all-PAD rows (mask all True), so
    no eval row is lost. With several processes, process p gets rows [p*B/P, (p+1)*B/P) of every global batch
    (B = `batch_size` is global), so all processes see the same number of batches. `max_batches` None or <= 0 keeps
    them all. `process_index` / `process_count` None mean JAX's.
    """
    process_index, process_count = _process_defaults(process_index, process_count)
    per = _per_process(batch_size, process_count)
    docs = make_documents(data_cfg, "eval") if documents is None else documents
    rows = RowSource(docs, seq_len)
    n_batches = math.ceil(len(rows) / batch_size)
    if max_batches is not None and max_batches > 0:
        n_batches = min(n_batches, int(max_batches))
    batches = []
    for k in range(n_batches):
        ids = np.full((per, seq_len), PAD_ID, dtype=np.int32)
        start = k * batch_size + process_index * per
        for j in range(per):
            if start + j < len(rows):
                ids[j] = rows[start + j]
        batches.append({"ids": ids, "mask": ids == PAD_ID})
    return batches


def resolve_data_config(data_cfg: ConfigDict) -> ConfigDict:
    """`source='auto'`: local files when data.path is set (by extension), else the Hugging Face dataset."""
    d = copy.deepcopy(data_cfg)
    if d.source == "auto":
        with d.unlocked():
            if d.path:
                first = d.path.split(",")[0].strip().lower()
                if first.endswith((".jsonl", ".json", ".jsonl.gz")):
                    d.source = "jsonl"
                elif first.endswith(".parquet"):
                    d.source = "parquet"
                else:
                    d.source = "text"
            else:
                d.source = "hf"
    return d
