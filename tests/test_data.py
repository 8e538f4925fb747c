import json
import time
from pathlib import Path

import numpy as np
import pytest

from abstractinator_jax import data, documents
from abstractinator_jax import tokenizer as tok
from abstractinator_jax.config import PAD_ID, ConfigError, data_defaults

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _cfg(**overrides):
    c = data_defaults()
    for k, v in overrides.items():
        c[k] = v
    return c


def _row_key(row: np.ndarray) -> bytes:
    return np.asarray(row, dtype=np.int32).tobytes()


def _write_corpus(path: Path, n_docs: int, seed: int = 0, seq_len: int = 16) -> list[bytes]:
    """Unique documents of varied lengths (some span several rows), joined by <|endoftext|> lines.

    Random letters, and every row of length `seq_len` (even the last, padded one) holds at least 8 of them, so all
    rows of the corpus differ (with overwhelming probability).
    """
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(8, 4 * seq_len))
        n += (seq_len - (n + 2) % seq_len) % seq_len if (n + 2) % seq_len < 10 else 0
        docs.append(rng.choice(letters, size=n).tobytes())
    path.write_bytes(b"\n<|endoftext|>\n".join(docs) + b"\n<|endoftext|>\n")
    return docs


# ---------------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------------


def test_text_documents_separator_strip_and_empty(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes(b"First story.\n<|endoftext|>\n\n  Second\nstory \xff\n<|endoftext|>\n   \n<|endoftext|>\nThird")
    docs = documents.TextDocuments(str(p), "<|endoftext|>")
    assert len(docs) == 3
    assert [docs[i] for i in range(3)] == [b"First story.", b"Second\nstory \xff", b"Third"]
    assert docs.byte_lengths().tolist() == [12, 14, 5]
    assert docs.read_span(1, 2, 5) == b"con"
    assert docs[-1] == b"Third"
    whole = documents.TextDocuments(str(p), "")
    assert len(whole) == 1 and whole[0].startswith(b"First") and whole[0].endswith(b"Third")


def test_text_documents_glob_and_comma_list(tmp_path):
    (tmp_path / "a.txt").write_text("A1<|endoftext|>A2")
    (tmp_path / "b.txt").write_text("B1")
    by_glob = documents.TextDocuments(str(tmp_path / "*.txt"))
    by_list = documents.TextDocuments(f"{tmp_path / 'a.txt'}, {tmp_path / 'b.txt'}")
    assert [by_glob[i] for i in range(3)] == [by_list[i] for i in range(3)] == [b"A1", b"A2", b"B1"]


def test_jsonl_documents(tmp_path):
    p = tmp_path / "c.jsonl"
    lines = [{"text": "héllo", "id": 1}, {"text": ""}, {"text": None}, {"text": "world 😀"}]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    docs = documents.JsonlDocuments(str(p), "text")
    assert len(docs) == 2
    assert docs[0] == "héllo".encode() and docs[1] == "world 😀".encode()
    assert docs.byte_lengths().tolist() == [6, 10]
    with pytest.raises(ConfigError, match="text_column_name"):
        documents.JsonlDocuments(str(p), "body")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        documents.JsonlDocuments(str(bad), "text")


def test_parquet_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "c.parquet"
    table = pa.table({"text": ["alpha", "", None, "βeta", "gamma"], "n": [1, 2, 3, 4, 5]})
    pq.write_table(table, p, row_group_size=2)  # several chunks
    docs = documents.ParquetDocuments(str(p), "text")
    assert [docs[i] for i in range(len(docs))] == [b"alpha", "βeta".encode(), b"gamma"]
    assert docs.byte_lengths().tolist() == [5, 5, 5]
    with pytest.raises(ConfigError, match="text_column_name"):
        documents.ParquetDocuments(str(p), "body")
    with pytest.raises(ConfigError, match="text_column_name"):
        documents.ParquetDocuments(str(p), "n")


def test_missing_unreadable_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path='.*nope\.txt' does not exist.*--config\.data\.path"):
        documents.TextDocuments(str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match=r"data\.path.*matches no file"):
        documents.TextDocuments(str(tmp_path / "*.nothing"))
    with pytest.raises(ConfigError, match="directory"):
        documents.TextDocuments(str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"data\.path"):
        documents.TextDocuments(str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"\n<|endoftext|>\n  \n<|endoftext|>\n")
    with pytest.raises(ConfigError, match=r"data\.path"):
        documents.TextDocuments(str(blank))
    with pytest.raises(ConfigError, match=r"data\.eval_path"):
        documents.make_documents(_cfg(source="text", path=str(blank), eval_path=str(tmp_path / "x.txt")), "eval")
    with pytest.raises(ConfigError, match=r"data\.path"):
        documents.make_documents(_cfg(source="jsonl", path=""), "train")


def test_offline_corpus_deterministic():
    a, b = documents.OfflineCorpus(), documents.OfflineCorpus()
    assert len(a) > 20
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    assert all(a[i] for i in range(len(a)))
    assert documents.corpus_stats(a)["bytes"] > 100_000
    tr = documents.make_documents(_cfg(source="offline"), "train")
    ev = documents.make_documents(_cfg(source="offline"), "eval")
    assert len(tr) + len(ev) == len(a) and len(ev) >= 1
    assert not set(tr.indices.tolist()) & set(ev.indices.tolist())


def test_hf_offline_fails_fast_with_actionable_message(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        documents.HFDocuments("abstractinator-tests/no-such-dataset", None, "train", "text")
    assert time.perf_counter() - t0 < 30
    msg = str(err.value)
    assert "data.source" in msg and "data.dataset_name" in msg
    assert "--config.data.source=offline" in msg and "--config.data.source=text" in msg
    with pytest.raises(ConfigError, match="data.source"):
        documents.make_documents(_cfg(source="hf", dataset_name="abstractinator-tests/no-such-dataset"), "train")


# ---------------------------------------------------------------------------------------------------------------------
# Splits and rows
# ---------------------------------------------------------------------------------------------------------------------


def test_holdout_split_disjoint_and_deterministic(tmp_path):
    p = tmp_path / "c.txt"
    docs = _write_corpus(p, 100)
    cfg = _cfg(source="text", path=str(p), eval_fraction=0.1, shuffle_seed=7)
    tr, ev = documents.make_documents(cfg, "train"), documents.make_documents(cfg, "eval")
    tr_docs = {tr[i] for i in range(len(tr))}
    ev_docs = {ev[i] for i in range(len(ev))}
    assert len(ev) == 10 and len(tr) == 90
    assert not tr_docs & ev_docs and tr_docs | ev_docs == set(docs)
    again = documents.make_documents(cfg, "eval")
    assert [again[i] for i in range(len(again))] == [ev[i] for i in range(len(ev))]
    capped = documents.make_documents(_cfg(source="text", path=str(p), eval_fraction=0.1, max_eval_documents=3), "eval")
    assert len(capped) == 3
    # An explicit eval file: train takes the whole of data.path.
    q = tmp_path / "valid.txt"
    q.write_text("held out one<|endoftext|>held out two")
    cfg2 = _cfg(source="text", path=str(p), eval_path=str(q))
    assert len(documents.make_documents(cfg2, "train")) == 100
    ev2 = documents.make_documents(cfg2, "eval")
    assert [ev2[i] for i in range(len(ev2))] == [b"held out one", b"held out two"]
    one = tmp_path / "one.txt"
    one.write_text("a single document")
    with pytest.raises(ConfigError, match="eval_path"):
        documents.make_documents(_cfg(source="text", path=str(one)), "train")


def test_row_source_matches_to_rows(tmp_path):
    p = tmp_path / "c.txt"
    docs = [b"x" * n for n in (0, 1, 6, 7, 8, 9, 23, 40)]
    docs = [d + bytes([65 + i]) for i, d in enumerate(docs)]  # unique, non-empty
    p.write_bytes(b"<|endoftext|>".join(docs))
    src = data.RowSource(documents.TextDocuments(str(p)), 8)
    expected = np.concatenate([tok.to_rows(tok.encode(d), 8) for d in docs])
    assert len(src) == len(expected)
    got = np.stack([src[i] for i in range(len(src))])
    assert np.array_equal(got, expected)
    ds = data.make_row_dataset(documents.TextDocuments(str(p)), 8)
    assert np.array_equal(ds[3], expected[3])


# ---------------------------------------------------------------------------------------------------------------------
# Training iterator
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    _write_corpus(p, 40, seed=1)
    cfg = _cfg(source="text", path=str(p), eval_fraction=0.1)
    rows = data.RowSource(documents.make_documents(cfg, "train"), 16)
    return cfg, rows


def _flat_rows(batches) -> list[bytes]:
    return [_row_key(r) for b in batches for r in b["ids"].reshape(-1, b["ids"].shape[-1])]


def test_train_iterator_shapes_and_determinism(corpus):
    cfg, _ = corpus
    it = data.make_train_iterator(cfg, 16, batch_size=4, accum_steps=2, seed=3, process_index=0, process_count=1)
    b = next(it)
    assert set(b) == {"ids", "mask"}
    assert b["ids"].shape == (2, 4, 16) and b["ids"].dtype == np.int32
    assert b["mask"].shape == (2, 4, 16) and b["mask"].dtype == np.bool_
    assert np.array_equal(b["mask"], b["ids"] == PAD_ID)
    it2 = data.make_train_iterator(cfg, 16, batch_size=4, accum_steps=2, seed=3, process_index=0, process_count=1)
    first = [b] + [next(it) for _ in range(3)]
    second = [next(it2) for _ in range(4)]
    assert all(np.array_equal(x["ids"], y["ids"]) for x, y in zip(first, second))
    it3 = data.make_train_iterator(cfg, 16, batch_size=4, accum_steps=2, seed=4, process_index=0, process_count=1)
    assert not all(np.array_equal(x["ids"], next(it3)["ids"]) for x in first)


def test_train_iterator_epochs_are_permutations(corpus):
    cfg, rows = corpus
    n = len(rows)
    everything = sorted(_row_key(rows[i]) for i in range(n))
    assert len(set(everything)) == n  # rows are unique in this corpus
    it = data.make_train_iterator(cfg, 16, batch_size=1, accum_steps=1, seed=0, process_index=0, process_count=1)
    stream = _flat_rows(next(it) for _ in range(3 * n))
    epochs = [stream[e * n : (e + 1) * n] for e in range(3)]
    for ep in epochs:
        assert sorted(ep) == everything  # each row exactly once per epoch
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # a new order every epoch


def test_train_iterator_process_slices_disjoint_and_cover(corpus):
    cfg, rows = corpus
    n = len(rows)
    everything = sorted(_row_key(rows[i]) for i in range(n))
    per_host = []
    for p in range(2):
        it = data.make_train_iterator(cfg, 16, batch_size=2, accum_steps=1, seed=5, process_index=p, process_count=2)
        per_host.append(_flat_rows(next(it) for _ in range(n)))  # n rows per process = 2 global epochs
    # Global stream position q belongs to process q % 2; the first n positions are one epoch.
    epoch0 = [per_host[q % 2][q // 2] for q in range(n)]
    assert sorted(epoch0) == everything
    assert not set(per_host[0][: n // 2]) & set(per_host[1][: n // 2])
    with pytest.raises(ConfigError, match="batch_size"):
        data.make_train_iterator(cfg, 16, batch_size=3, accum_steps=1, seed=0, process_index=0, process_count=2)


def test_train_iterator_global_batch_is_the_same_for_any_process_count(corpus):
    """The processes' blocks, in process order, are exactly the one-process batch (rows and their order), micro-batch
    by micro-batch, step by step: a run on several hosts sees the same global batches as on one."""
    cfg, _ = corpus
    kw = dict(seq_len=16, batch_size=4, accum_steps=2, seed=7)
    one = data.make_train_iterator(cfg, **kw, process_index=0, process_count=1)
    two = [data.make_train_iterator(cfg, **kw, process_index=p, process_count=2) for p in range(2)]
    for _ in range(5):
        want = next(one)["ids"]  # (2, 4, 16)
        got = np.concatenate([next(it)["ids"] for it in two], axis=1)  # (2, 2 + 2, 16)
        np.testing.assert_array_equal(got, want)


def test_train_iterator_state_restore(corpus):
    cfg, _ = corpus
    kw = dict(seq_len=16, batch_size=4, accum_steps=1, seed=11, process_index=0, process_count=1)
    it = data.make_train_iterator(cfg, **kw)
    for _ in range(3):
        next(it)
    state = it.get_state()
    batch4 = next(it)
    next(it)
    fresh = data.make_train_iterator(cfg, **kw)
    fresh.set_state(state)
    assert np.array_equal(next(fresh)["ids"], batch4["ids"])
    it.set_state(state)  # the same iterator can also rewind
    assert np.array_equal(next(it)["ids"], batch4["ids"])


# ---------------------------------------------------------------------------------------------------------------------
# Eval batches
# ---------------------------------------------------------------------------------------------------------------------


def test_eval_batches_padded_and_complete(tmp_path):
    p = tmp_path / "c.txt"
    _write_corpus(p, 60, seed=2)
    cfg = _cfg(source="text", path=str(p), eval_fraction=0.2)
    rows = data.RowSource(documents.make_documents(cfg, "eval"), 16)
    n = len(rows)
    bsz = next(b for b in range(5, 20) if n % b)
    batches = data.make_eval_batches(cfg, 16, bsz, None)
    assert len(batches) == -(-n // bsz)
    for b in batches:
        assert b["ids"].shape == (bsz, 16) and b["ids"].dtype == np.int32 and b["mask"].dtype == np.bool_
        assert np.array_equal(b["mask"], b["ids"] == PAD_ID)
    flat = np.concatenate([b["ids"] for b in batches])
    assert np.array_equal(flat[:n], np.stack([rows[i] for i in range(n)]))
    assert np.all(flat[n:] == PAD_ID) and np.all(np.concatenate([b["mask"] for b in batches])[n:])
    assert len(data.make_eval_batches(cfg, 16, bsz, 2)) == 2
    # Two processes: each gets half of every global batch, same number of batches, together the same rows.
    halves = [data.make_eval_batches(cfg, 16, 2 * bsz, None, process_index=p, process_count=2) for p in range(2)]
    assert len(halves[0]) == len(halves[1])
    joined = np.concatenate([np.concatenate([h0["ids"], h1["ids"]]) for h0, h1 in zip(*halves)])
    assert np.array_equal(joined[:n], flat[:n]) and np.all(joined[n:] == PAD_ID)
    # Train and eval never share a document.
    tr = documents.make_documents(cfg, "train")
    ev = documents.make_documents(cfg, "eval")
    assert not {tr[i] for i in range(len(tr))} & {ev[i] for i in range(len(ev))}


# ---------------------------------------------------------------------------------------------------------------------
# The shared TinyStories sample
# ---------------------------------------------------------------------------------------------------------------------


def test_tinystories_shared_file():
    path = SHARED_DATA / "tinystories_train.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    docs = documents.TextDocuments(str(path), "<|endoftext|>")
    assert len(docs) == 2084
    assert docs[0].startswith(b"One day, a little girl named Lily found a needle")
    assert all(not docs[i][:1].isspace() and not docs[i][-1:].isspace() for i in range(0, len(docs), 97))
    cfg = _cfg(source="text", path=str(path))
    it = data.make_train_iterator(cfg, 256, batch_size=8, accum_steps=1, seed=0, process_index=0, process_count=1)
    b = next(it)
    assert b["ids"].shape == (1, 8, 256)
    text = tok.decode(b["ids"][0, 0], stop_at_eos=False)
    assert text and "\ufffd" not in text[1:-1]


def test_hf_documents_from_local_files(tmp_path):
    """The success path of HFDocuments, without the network: the packaged 'json' builder on a local file."""
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["one", "", "two 😀", "three"]))
    docs = documents.HFDocuments("json", None, "train", "text", data_files=str(p), cache_dir=str(tmp_path / "cache"))
    assert [docs[i] for i in range(len(docs))] == [b"one", "two 😀".encode(), b"three"]
    assert docs.byte_lengths().tolist() == [3, 8, 5]
    with pytest.raises(ConfigError, match="text_column_name"):
        documents.HFDocuments("json", None, "train", "body", data_files=str(p), cache_dir=str(tmp_path / "cache"))


def test_iterator_state_through_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    cfg = _cfg(source="offline")
    kw = dict(seq_len=64, batch_size=4, accum_steps=1, seed=2, process_index=0, process_count=1)
    it = data.make_train_iterator(cfg, **kw)
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    batch4 = next(it)["ids"]
    fresh = data.make_train_iterator(cfg, **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert np.array_equal(next(fresh)["ids"], batch4)
