"""Document sources (docs/ARCHITECTURE.md 2): random-access collections of documents, `len(docs)` and
`docs[i] -> bytes`.

Hugging Face datasets (`HFDocuments`), local plain text / JSONL / Parquet files (`TextDocuments`, `JsonlDocuments`,
`ParquetDocuments`) and `OfflineCorpus` (the documentation text that ships with CPython: no download, no file).
`make_documents(config.data, 'train' | 'eval')` picks one from the config and splits off a held-out eval set when
there is no explicit one. Files are read as bytes: invalid UTF-8 is data, not an error. Every unusable setting
raises `ConfigError` naming the `config.data` key to change. Rows and batches are made from these in data.py.
"""

from __future__ import annotations

import functools
import glob
import json
import mmap
import os
import re
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np

from abstractinator_jax.config import ConfigError

__all__ = [
    "Documents",
    "HFDocuments",
    "TextDocuments",
    "JsonlDocuments",
    "ParquetDocuments",
    "OfflineCorpus",
    "SubsetDocuments",
    "resolve_paths",
    "holdout_split",
    "make_documents",
    "corpus_stats",
    "byte_lengths",
    "read_span",
]

_OFFLINE_HINT = (
    "Without network access use --config.data.source=offline (built-in English text, no download) or "
    "--config.data.source=text --config.data.path=/path/to/corpus.txt"
)


class Documents(Protocol):
    """What the pipeline needs from a document source. `byte_lengths()` and `read_span()` are optional speed-ups."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> bytes: ...


def byte_lengths(docs: Documents) -> np.ndarray:
    """Length in bytes of every document (int64): the source's own fast path, or one read of each document."""
    fast = getattr(docs, "byte_lengths", None)
    if fast is not None:
        return np.asarray(fast(), dtype=np.int64)
    return np.fromiter((len(docs[i]) for i in range(len(docs))), dtype=np.int64, count=len(docs))


def read_span(docs: Documents, index: int, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of document `index` (without reading the whole document when the source can)."""
    fast = getattr(docs, "read_span", None)
    if fast is not None:
        return fast(index, start, stop)
    return docs[index][start:stop]


def _check_index(index: int, n: int) -> int:
    index = int(index)
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"document index {index} out of range for {n} documents")
    return index


# ---------------------------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------------------------

_GLOB_CHARS = frozenset("*?[")


def resolve_paths(spec: str | os.PathLike | Sequence[str | os.PathLike], key: str = "data.path") -> list[str]:
    """Expand `spec` (a path, a glob, a comma-separated list of them, or a list) into readable files, in order.

    Raises ConfigError naming `key` when a path does not exist, a glob matches nothing, or a file is unreadable.
    """
    if isinstance(spec, (str, os.PathLike)):
        parts = [p.strip() for p in os.fspath(spec).split(",")]
    else:
        parts = [os.fspath(p).strip() for p in spec]
    parts = [p for p in parts if p]
    if not parts:
        raise ConfigError(f"{key} is empty; set --config.{key} to a file, a glob or a comma-separated list of files.")
    files: list[str] = []
    for part in parts:
        expanded = os.path.expanduser(part)
        if _GLOB_CHARS & set(expanded):
            matches = sorted(m for m in glob.glob(expanded, recursive=True) if os.path.isfile(m))
            if not matches:
                raise ConfigError(
                    f"{key}={part!r} matches no file; set --config.{key} to a readable file or a glob that matches."
                )
            files.extend(matches)
            continue
        if not os.path.exists(expanded):
            raise ConfigError(f"{key}={part!r} does not exist; set --config.{key} to a readable file.")
        if os.path.isdir(expanded):
            raise ConfigError(
                f"{key}={part!r} is a directory; set --config.{key} to a file or a glob such as '{part}/*.txt'."
            )
        files.append(expanded)
    for f in files:
        if not os.access(f, os.R_OK):
            raise ConfigError(f"{key}: {f!r} is not readable; set --config.{key} to a readable file.")
    return files


def _map_file(path: str, key: str) -> mmap.mmap | bytes:
    """A read-only memory map of the file (b"" when it is empty)."""
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return b""
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read {path!r} ({e}); set --config.{key} to a readable file.") from e


def _no_documents(kind: str, files: Sequence[str], key: str, extra: str = "") -> ConfigError:
    shown = ", ".join(repr(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
    return ConfigError(
        f"{key}: no non-empty {kind} document in {shown}{extra}; set --config.{key} to files that hold text."
    )


class _MappedFiles:
    """Per-process, lazily opened read-only memory maps of a list of files (picklable: maps are reopened)."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)
        self._maps: dict[int, mmap.mmap] = {}
        self._lock = threading.Lock()

    def get(self, file_index: int) -> mmap.mmap:
        m = self._maps.get(file_index)
        if m is None:
            with self._lock:
                m = self._maps.get(file_index)
                if m is None:
                    with open(self.files[file_index], "rb") as fh:
                        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                    self._maps[file_index] = m
        return m

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self.files}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["files"])


_SPACE = frozenset(b" \t\n\r\x0b\x0c")  # what bytes.strip() removes
_NON_SPACE = re.compile(rb"[^ \t\n\r\x0b\x0c]")


class TextDocuments:
    """Plain-text files split on `separator` (e.g. '<|endoftext|>'); "" makes each file one document.

    Each document is stripped of surrounding ASCII whitespace and empty ones are dropped. Files are read as bytes:
    invalid UTF-8 is data, not an error. Documents are memory-mapped and read lazily; the files are scanned once.
    """

    def __init__(
        self,
        paths: str | Sequence[str],
        separator: str = "<|endoftext|>",
        *,
        key: str = "data.path",
    ):
        self.files = resolve_paths(paths, key)
        self.separator = separator
        sep = separator.encode("utf-8")
        file_ids, starts, ends = [], [], []
        for fi, path in enumerate(self.files):
            data = _map_file(path, key)  # scanned through a memory map: no full copy of a large file
            pos, n = 0, len(data)
            while pos <= n:
                j = data.find(sep, pos) if sep else -1
                stop = n if j < 0 else j
                first = _NON_SPACE.search(data, pos, stop)  # strip() without copying the document
                if first is not None:
                    end = stop
                    while data[end - 1] in _SPACE:
                        end -= 1
                    file_ids.append(fi)
                    starts.append(first.start())
                    ends.append(end)
                if j < 0:
                    break
                pos = j + len(sep)
            if isinstance(data, mmap.mmap):
                data.close()
        if not starts:
            raise _no_documents("text", self.files, key, f" (separator={separator!r}, data.separator)")
        self._file = np.asarray(file_ids, dtype=np.int32)
        self._start = np.asarray(starts, dtype=np.int64)
        self._end = np.asarray(ends, dtype=np.int64)
        self._maps = _MappedFiles(self.files)

    def __len__(self) -> int:
        return int(self._start.size)

    def byte_lengths(self) -> np.ndarray:
        return self._end - self._start

    def read_span(self, index: int, start: int, stop: int) -> bytes:
        i = _check_index(index, len(self))
        s, e = int(self._start[i]), int(self._end[i])
        lo, hi = min(s + max(start, 0), e), min(s + max(stop, 0), e)
        return self._maps.get(int(self._file[i]))[lo:hi] if hi > lo else b""

    def __getitem__(self, index: int) -> bytes:
        i = _check_index(index, len(self))
        return self._maps.get(int(self._file[i]))[int(self._start[i]) : int(self._end[i])]


def _json_text(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8", errors="replace")
    return None if not isinstance(value, (bytes, bytearray)) else bytes(value)


class JsonlDocuments:
    """JSON-lines files; each line is an object whose `text_field` holds one document (empty ones are skipped).

    The files are parsed once at start-up (to find the documents and their lengths); lines are re-parsed on access.
    """

    def __init__(self, paths: str | Sequence[str], text_field: str = "text", *, key: str = "data.path"):
        self.files = resolve_paths(paths, key)
        self.text_field = text_field
        file_ids, offsets, line_lens, lengths = [], [], [], []
        for fi, path in enumerate(self.files):
            for start, line, text_len in self._scan(path, key):
                file_ids.append(fi)
                offsets.append(start)
                line_lens.append(len(line))
                lengths.append(text_len)
        if not offsets:
            raise _no_documents("JSONL", self.files, key, f" (field data.text_column_name={text_field!r})")
        self._file = np.asarray(file_ids, dtype=np.int32)
        self._offset = np.asarray(offsets, dtype=np.int64)
        self._line_len = np.asarray(line_lens, dtype=np.int64)
        self._length = np.asarray(lengths, dtype=np.int64)
        self._maps = _MappedFiles(self.files)

    def _scan(self, path: str, key: str) -> Iterator[tuple[int, bytes, int]]:
        """(byte offset, line, text length in bytes) of every line of `path` with a non-empty text field."""
        field = self.text_field
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the `with` below
        except OSError as e:
            raise ConfigError(f"{key}: cannot read {path!r} ({e}); set --config.{key} to a readable file.") from e
        with fh:
            pos = 0
            for lineno, line in enumerate(fh, start=1):  # split on b"\n" only
                start, pos = pos, pos + len(line)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ConfigError(
                        f"{key}: {path}:{lineno} is not valid JSON ({e}); data.source='jsonl' needs one JSON object "
                        "per line (use --config.data.source=text for plain text)."
                    ) from e
                if not isinstance(obj, dict) or field not in obj:
                    fields = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
                    raise ConfigError(
                        f"{path}:{lineno} has no field {field!r} (found {fields}); set "
                        "--config.data.text_column_name to the field that holds the text."
                    )
                value = obj[field]
                if value is not None and not isinstance(value, str):
                    raise ConfigError(
                        f"{path}:{lineno}: field {field!r} holds a {type(value).__name__}, not text; set "
                        "--config.data.text_column_name to a text field."
                    )
                text = _json_text(value)
                if text:
                    yield start, line, len(text)

    def __len__(self) -> int:
        return int(self._offset.size)

    def byte_lengths(self) -> np.ndarray:
        return self._length.copy()

    def __getitem__(self, index: int) -> bytes:
        i = _check_index(index, len(self))
        off = int(self._offset[i])
        line = self._maps.get(int(self._file[i]))[off : off + int(self._line_len[i])]
        return _json_text(json.loads(line)[self.text_field]) or b""


class _ArrowColumnDocuments:
    """Documents held in one Arrow string/binary column (list of chunks); empty and null entries are skipped."""

    _chunks: list[Any] | None

    def _init_column(self, chunks: list[Any], column: str, what: str) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        lengths, kept = [], []
        offset = 0
        for chunk in chunks:
            t = chunk.type
            if not (
                pa.types.is_string(t)
                or pa.types.is_large_string(t)
                or pa.types.is_binary(t)
                or pa.types.is_large_binary(t)
                or getattr(pa.types, "is_string_view", lambda _: False)(t)
            ):
                raise ConfigError(
                    f"{what}: column data.text_column_name={column!r} has type {t}, not text; set "
                    "--config.data.text_column_name to a string column."
                )
            n = len(chunk)
            lens = pc.fill_null(pc.binary_length(chunk), 0).to_numpy(zero_copy_only=False).astype(np.int64)
            nz = np.flatnonzero(lens > 0)
            kept.append(nz + offset)
            lengths.append(lens[nz])
            offset += n
        self._chunk_starts = np.cumsum([0] + [len(c) for c in chunks], dtype=np.int64)
        self._kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
        self._length = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self._chunks = chunks

    def _load_chunks(self) -> list[Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        return int(self._kept.size)

    def byte_lengths(self) -> np.ndarray:
        return self._length.copy()

    def __getitem__(self, index: int) -> bytes:
        i = _check_index(index, len(self))
        if self._chunks is None:
            self._chunks = self._load_chunks()
        row = int(self._kept[i])
        c = int(np.searchsorted(self._chunk_starts, row, side="right")) - 1
        value = self._chunks[c][row - int(self._chunk_starts[c])].as_py()
        return value.encode("utf-8", errors="replace") if isinstance(value, str) else bytes(value)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_chunks"] = None  # reloaded (memory-mapped) in the worker instead of being copied
        return state


class ParquetDocuments(_ArrowColumnDocuments):
    """Parquet files; `text_column` holds one document per row.

    Only that column is read (pyarrow); it is decoded into memory once per process (worker processes reload it
    rather than receive a pickled copy).
    """

    def __init__(self, paths: str | Sequence[str], text_column: str = "text", *, key: str = "data.path"):
        self.files = resolve_paths(paths, key)
        self.text_column = text_column
        self._key = key
        self._init_column(self._load_chunks(), text_column, f"{key}={','.join(self.files)!r}")
        if not len(self):
            raise _no_documents("Parquet", self.files, key, f" (column data.text_column_name={text_column!r})")

    def _load_chunks(self) -> list[Any]:
        import pyarrow.parquet as pq

        chunks = []
        for path in self.files:
            try:
                schema = pq.read_schema(path)
            except Exception as e:
                raise ConfigError(
                    f"{self._key}: {path!r} is not a readable Parquet file ({e}); set --config.{self._key} to "
                    "Parquet files or change data.source."
                ) from e
            if self.text_column not in schema.names:
                raise ConfigError(
                    f"{path}: no column data.text_column_name={self.text_column!r} (columns: {schema.names}); set "
                    "--config.data.text_column_name to the column that holds the text."
                )
            table = pq.read_table(path, columns=[self.text_column], memory_map=True)
            chunks.extend(table.column(self.text_column).chunks)
        return chunks


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within `timeout` seconds (assumed when proxied)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


@contextmanager
def _hf_offline(enabled: bool) -> Iterator[None]:
    """Put `datasets` / `huggingface_hub` in offline mode for one call (they read the env only at import)."""
    if not enabled:
        yield
        return
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    saved = (ds_config.HF_HUB_OFFLINE, getattr(ds_config, "HF_DATASETS_OFFLINE", None), hub_constants.HF_HUB_OFFLINE)
    ds_config.HF_HUB_OFFLINE = True
    ds_config.HF_DATASETS_OFFLINE = True
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


class HFDocuments(_ArrowColumnDocuments):
    """One split of a Hugging Face dataset (`datasets.load_dataset`); `text_column` holds the documents.

    When the hub is unreachable (or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) only the local cache is tried, so
    this fails fast instead of retrying the network. Any failure raises ConfigError naming data.source and
    data.dataset_name. `data_files` and `cache_dir` are passed to `load_dataset` (e.g. name='json' with local files).
    """

    def __init__(
        self,
        name: str,
        config: str | None = None,
        split: str = "train",
        text_column: str = "text",
        *,
        split_key: str = "data.train_split",
        data_files: str | Sequence[str] | None = None,
        cache_dir: str | None = None,
    ):
        self.name, self.config, self.split, self.text_column = name, config or None, split, text_column
        where = f"data.source='hf', data.dataset_name={name!r}, data.dataset_config={config!r}, {split_key}={split!r}"
        offline = _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")
        try:
            import datasets

            offline = offline or not _hub_reachable()
            with _hf_offline(offline):
                ds = datasets.load_dataset(name, self.config, split=split, data_files=data_files, cache_dir=cache_dir)
        except Exception as e:  # any failure of `datasets` becomes an actionable message
            why = " (offline: the hub is unreachable or HF_HUB_OFFLINE is set, so only the local cache was searched)"
            raise ConfigError(
                f"cannot load the Hugging Face dataset ({where}){why if offline else ''}: {type(e).__name__}: {e}. "
                f"Check data.dataset_name / data.dataset_config / {split_key}. {_OFFLINE_HINT}."
            ) from e
        if not isinstance(ds, datasets.Dataset):
            raise ConfigError(f"{where}: load_dataset returned {type(ds).__name__}; set {split_key} to one split.")
        if text_column not in ds.column_names:
            raise ConfigError(
                f"{where}: no column data.text_column_name={text_column!r} (columns: {ds.column_names}); set "
                "--config.data.text_column_name to the column that holds the text."
            )
        if ds._indices is not None:  # a view with an indices mapping: make rows contiguous
            ds = ds.flatten_indices()
        self._dataset = ds
        self._init_column(self._load_chunks(), text_column, where)
        if not len(self):
            raise ConfigError(f"{where}: every document is empty. {_OFFLINE_HINT}.")

    def _load_chunks(self) -> list[Any]:
        return list(self._dataset.data.column(self.text_column).chunks)


# ---------------------------------------------------------------------------------------------------------------------
# Built-in and derived sources
# ---------------------------------------------------------------------------------------------------------------------


class OfflineCorpus:
    """English text that needs no download and no file: CPython's documentation topics (`pydoc_data.topics`).

    One document per topic, sorted by topic name (about 80 documents, ~0.5 MB).
    """

    def __init__(self) -> None:
        try:
            from pydoc_data.topics import topics
        except ImportError as e:  # pragma: no cover - part of every standard CPython install
            raise ConfigError(
                "data.source='offline' needs the standard-library module pydoc_data, which this Python lacks; "
                "use --config.data.source=text --config.data.path=/path/to/corpus.txt."
            ) from e
        docs = [topics[k].encode("utf-8", errors="replace").strip() for k in sorted(topics)]
        self.names = [k for k, d in zip(sorted(topics), docs) if d]
        self._docs = [d for d in docs if d]

    def __len__(self) -> int:
        return len(self._docs)

    def byte_lengths(self) -> np.ndarray:
        return np.asarray([len(d) for d in self._docs], dtype=np.int64)

    def __getitem__(self, index: int) -> bytes:
        return self._docs[_check_index(index, len(self))]


class SubsetDocuments:
    """The documents `indices` of `base`, in that order."""

    def __init__(self, base: Documents, indices: Sequence[int] | np.ndarray):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)

    def __len__(self) -> int:
        return int(self.indices.size)

    def byte_lengths(self) -> np.ndarray:
        return byte_lengths(self.base)[self.indices]

    def read_span(self, index: int, start: int, stop: int) -> bytes:
        return read_span(self.base, int(self.indices[_check_index(index, len(self))]), start, stop)

    def __getitem__(self, index: int) -> bytes:
        return self.base[int(self.indices[_check_index(index, len(self))])]


def holdout_split(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, eval) document indices: eval is the last max(1, round(eval_fraction * n)) entries of a
    permutation seeded by `seed`; train is the rest. Both are returned sorted and never overlap."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={eval_fraction} must be in [0, 1).")
    n_eval = max(1, round(eval_fraction * n))
    if n - n_eval < 1:
        raise ConfigError(
            f"only {n} document(s): holding out {n_eval} for evaluation (data.eval_fraction={eval_fraction}) leaves "
            "none to train on. Add documents, set data.eval_path to separate eval files, or split the text into more "
            "documents with data.separator."
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n - n_eval]), np.sort(perm[n - n_eval :])


def _cap(docs: Documents, max_docs: int) -> Documents:
    if max_docs and max_docs > 0 and len(docs) > max_docs:
        return SubsetDocuments(docs, np.arange(max_docs))
    return docs


def _file_key(files: Sequence[str]) -> tuple:
    out = []
    for f in files:
        st = os.stat(f)
        out.append((os.path.abspath(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _cached_local(source: str, file_key: tuple, separator: str, column: str, key: str) -> Documents:
    files = [f for f, _, _ in file_key]
    if source == "text":
        return TextDocuments(files, separator, key=key)
    if source == "jsonl":
        return JsonlDocuments(files, column, key=key)
    return ParquetDocuments(files, column, key=key)


def _local_documents(data_cfg: Any, spec: str, key: str) -> Documents:
    files = resolve_paths(spec, key)
    return _cached_local(data_cfg.source, _file_key(files), data_cfg.separator, data_cfg.text_column_name, key)


@functools.lru_cache(maxsize=4)
def _cached_hf(name: str, config: str | None, split: str, column: str, split_key: str) -> HFDocuments:
    return HFDocuments(name, config, split, column, split_key=split_key)


@functools.lru_cache(maxsize=1)
def _cached_offline() -> OfflineCorpus:
    return OfflineCorpus()


def make_documents(data_cfg: Any, split: str) -> Documents:
    """The documents of `split` ('train' or 'eval') for `config.data`.

    Eval documents come from `data.eval_split` (hf) or `data.eval_path` (local files) when set; otherwise a seeded
    held-out subset (`holdout_split` with `data.eval_fraction`, `data.shuffle_seed`) that train then excludes.
    Eval is capped at `data.max_eval_documents` documents (<= 0: no cap).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; choose 'train' or 'eval'.")
    source = data_cfg.source
    max_eval = int(data_cfg.max_eval_documents)
    if source == "hf":
        if split == "eval" and data_cfg.eval_split:
            docs = _cached_hf(
                data_cfg.dataset_name,
                data_cfg.dataset_config,
                data_cfg.eval_split,
                data_cfg.text_column_name,
                "data.eval_split",
            )
            return _cap(docs, max_eval)
        base = _cached_hf(
            data_cfg.dataset_name,
            data_cfg.dataset_config,
            data_cfg.train_split,
            data_cfg.text_column_name,
            "data.train_split",
        )
        if data_cfg.eval_split:
            return base
    elif source in ("text", "jsonl", "parquet"):
        if not data_cfg.path:
            raise ConfigError(
                f"data.source={source!r} needs data.path; set --config.data.path to a file, a glob or a "
                "comma-separated list (or use --config.data.source=offline)."
            )
        if data_cfg.eval_path:
            if split == "eval":
                return _cap(_local_documents(data_cfg, data_cfg.eval_path, "data.eval_path"), max_eval)
            return _local_documents(data_cfg, data_cfg.path, "data.path")
        base = _local_documents(data_cfg, data_cfg.path, "data.path")
    elif source == "offline":
        base = _cached_offline()
    else:
        raise ConfigError(f"data.source={source!r}; choose one of 'hf', 'text', 'jsonl', 'parquet', 'offline'.")
    train_idx, eval_idx = holdout_split(len(base), float(data_cfg.eval_fraction), int(data_cfg.shuffle_seed))
    if split == "train":
        return SubsetDocuments(base, train_idx)
    if max_eval > 0 and eval_idx.size > max_eval:
        # A seeded random subset of the held-out documents (the held-out set itself does not depend on the cap).
        eval_idx = np.sort(np.random.default_rng(int(data_cfg.shuffle_seed) + 1).permutation(eval_idx)[:max_eval])
    return SubsetDocuments(base, eval_idx)


def corpus_stats(documents: Documents) -> dict[str, float]:
    """Document count and byte-length statistics (for the log)."""
    lengths = byte_lengths(documents)
    if lengths.size == 0:
        return {"documents": 0, "bytes": 0, "min_bytes": 0, "mean_bytes": 0.0, "max_bytes": 0}
    return {
        "documents": int(lengths.size),
        "bytes": int(lengths.sum()),
        "min_bytes": int(lengths.min()),
        "mean_bytes": float(lengths.mean()),
        "max_bytes": int(lengths.max()),
    }
