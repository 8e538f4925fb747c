import numpy as np
import pytest

from abstractinator_jax import tokenizer as tok
from abstractinator_jax.config import BOS_ID, EOP_ID, EOS_ID, PAD_ID


@pytest.mark.parametrize(
    "text",
    ["", "a", "Once upon a time.", "naïve café — “quotes”", "红楼梦", "emoji 😀🎉 and 𝄞", "tab\tnew\nline\x00nul"],
)
def test_round_trip(text):
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_four_byte_emoji_bytes():
    ids = tok.encode("😀")
    assert ids.tolist() == [BOS_ID, 0xF0, 0x9F, 0x98, 0x80, EOS_ID]


def test_bytes_input_taken_as_is_and_invalid_utf8_never_raises():
    raw = b"\xff\xfe abc \xc3"
    ids = tok.encode(raw)
    assert ids[1:-1].tolist() == list(raw)
    text = tok.decode(ids)
    assert "abc" in text and "\ufffd" in text
    assert tok.decode_bytes(ids) == raw
    # A multibyte character cut in half (as at a row boundary) decodes with replacement, no exception.
    half = tok.encode("é")[:2]
    assert tok.decode(half) == "\ufffd"


def test_decode_specials_and_stop_at_eos():
    ids = [BOS_ID, ord("a"), PAD_ID, ord("b"), EOP_ID, ord("c"), EOS_ID, ord("d"), PAD_ID]
    assert tok.decode(ids) == "abc"
    assert tok.decode(ids, stop_at_eos=False) == "abcd"
    assert tok.decode(ids, skip_specials=False) == "<BOS>a<PAD>b<EOP>c"
    assert tok.decode(np.array(ids, dtype=np.int32), stop_at_eos=False, skip_specials=False).endswith("<EOS>d<PAD>")
    assert tok.decode([]) == ""
    assert tok.decode(np.array([[BOS_ID, 104], [105, EOS_ID]])) == "hi"


def test_num_rows():
    assert tok.num_rows(0, 8) == 1
    assert tok.num_rows(6, 8) == 1
    assert tok.num_rows(7, 8) == 2
    assert tok.num_rows(14, 8) == 2
    assert tok.num_rows(15, 8) == 3


@pytest.mark.parametrize("seq_len", [2, 3, 8, 64])
def test_to_rows_loses_nothing(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = {0, 1, seq_len - 2, seq_len - 1, seq_len, seq_len + 1, 2 * seq_len - 2, 5 * seq_len}
    lengths |= set(rng.integers(0, 6 * seq_len, size=20).tolist())
    for n in sorted(x for x in lengths if x >= 0):
        data = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        ids = tok.encode(data)
        rows = tok.to_rows(ids, seq_len)
        assert rows.dtype == np.int32 and rows.ndim == 2 and rows.shape[1] == seq_len
        assert rows.shape[0] == tok.num_rows(n, seq_len)
        flat = rows.reshape(-1)
        assert np.array_equal(flat[: ids.size], ids)
        assert np.all(flat[ids.size :] == PAD_ID)
        assert np.all(rows[:-1] != PAD_ID)  # only the last row is padded
        assert np.array_equal(tok.pad_mask(rows), rows == PAD_ID)
        assert tok.decode_bytes(flat) == data


def test_pad_mask_shape():
    ids = np.array([[BOS_ID, 65, EOS_ID, PAD_ID]])
    assert tok.pad_mask(ids).tolist() == [[False, False, False, True]]


def test_render_segments():
    text = "Once upon a time"
    ids = tok.encode(text)
    row = tok.to_rows(ids, 24)[0]
    ends = np.zeros(row.shape, dtype=bool)
    # Segment ends: BOS alone, then "Once", " upon", " a", " time"+EOS, then the PAD tail as its own segment.
    positions = {0, 4, 9, 11, 17, 23}
    ends[sorted(positions)] = True
    assert tok.render_segments(row, ends) == "Once| upon| a| time"
    assert tok.render_segments(row, ends, sep=" / ") == "Once /  upon /  a /  time"
    # No end marks: one segment; invalid bytes are replaced, not raised.
    assert tok.render_segments(row, np.zeros_like(ends)) == text
    bad = tok.to_rows(tok.encode(b"\xffab"), 8)[0]
    assert tok.render_segments(bad, np.array([0, 1, 0, 1, 0, 0, 0, 0], bool)) == "\ufffd|ab"
