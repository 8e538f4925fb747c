"""Byte-level tokenizer (docs/ARCHITECTURE.md 2): pure numpy, no JAX.

Ids 0..255 are bytes; BOS=256, EOS=257, PAD=258, EOP=259. A document becomes `[BOS] + utf8 bytes + [EOS]` and is
split into consecutive rows of a fixed length S, the last one padded with PAD: no byte is ever dropped.
Decoding never raises on invalid UTF-8 (errors="replace").
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from abstractinator_jax.config import BOS_ID, EOP_ID, EOS_ID, PAD_ID

__all__ = [
    "encode",
    "decode",
    "decode_bytes",
    "to_rows",
    "num_rows",
    "pad_mask",
    "render_segments",
]

_SPECIALS = (BOS_ID, EOS_ID, PAD_ID, EOP_ID)


def encode(text: str | bytes | bytearray | memoryview) -> np.ndarray:
    """`[BOS] + utf-8 bytes + [EOS]` as int32. Bytes input is taken as-is (it need not be valid UTF-8)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    out = np.empty(len(data) + 2, dtype=np.int32)
    out[0] = BOS_ID
    out[1:-1] = np.frombuffer(data, dtype=np.uint8)
    out[-1] = EOS_ID
    return out


_NAMES = {BOS_ID: b"<BOS>", EOS_ID: b"<EOS>", PAD_ID: b"<PAD>", EOP_ID: b"<EOP>"}


def decode_bytes(ids: Iterable[int] | np.ndarray, stop_at_eos: bool = True, skip_specials: bool = True) -> bytes:
    """The raw bytes of `ids`, stopping before the first EOS when `stop_at_eos`.

    With `skip_specials` every id outside 0..255 is dropped; otherwise specials are shown as `<BOS>`, `<EOS>`,
    `<PAD>`, `<EOP>` (and any other id as `<id=N>`), for debugging.
    """
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)
    if stop_at_eos:
        hits = np.flatnonzero(arr == EOS_ID)
        if hits.size:
            arr = arr[: hits[0]]
    is_byte = (arr >= 0) & (arr < 256)
    if skip_specials or is_byte.all():
        return arr[is_byte].astype(np.uint8).tobytes()
    out, prev = [], 0
    for pos in np.flatnonzero(~is_byte).tolist():
        out.append(arr[prev:pos].astype(np.uint8).tobytes())
        tok = int(arr[pos])
        out.append(_NAMES.get(tok, f"<id={tok}>".encode()))
        prev = pos + 1
    out.append(arr[prev:].astype(np.uint8).tobytes())
    return b"".join(out)


def decode(ids: Iterable[int] | np.ndarray, stop_at_eos: bool = True, skip_specials: bool = True) -> str:
    """Text of `ids`: BOS/PAD/EOP are dropped (shown as `<BOS>` etc. when `skip_specials=False`), and everything
    from the first EOS on is cut when `stop_at_eos`. Invalid UTF-8 becomes U+FFFD: this never raises on bytes.
    """
    return decode_bytes(ids, stop_at_eos=stop_at_eos, skip_specials=skip_specials).decode("utf-8", errors="replace")


def num_rows(doc_len_in_bytes: int, seq_len: int) -> int:
    """Rows of length `seq_len` that a document of `doc_len_in_bytes` bytes fills (BOS + bytes + EOS)."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    return -(-(int(doc_len_in_bytes) + 2) // seq_len)


def to_rows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Split an encoded document into consecutive rows (n_rows, seq_len) int32, the last padded with PAD.

    No token is dropped: concatenating the rows and removing the trailing PADs gives `ids` back.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    ids = np.asarray(ids, dtype=np.int32).reshape(-1)
    n = max(1, -(-ids.size // seq_len))
    out = np.full((n * seq_len,), PAD_ID, dtype=np.int32)
    out[: ids.size] = ids
    return out.reshape(n, seq_len)


def pad_mask(ids: np.ndarray) -> np.ndarray:
    """Boolean array of the same shape, True at PAD (the model's key_padding_mask)."""
    return np.asarray(ids) == PAD_ID


def render_segments(ids_row: np.ndarray, patch_end_mask_row: np.ndarray, sep: str = "|") -> str:
    """Show one row cut into its segments, e.g. `Once| upon| a| time`.

    `patch_end_mask_row[t]` is True on the last token of each segment. BOS/EOS/PAD/EOP are left out of the text
    (a segment made only of them disappears); each segment's bytes are decoded with errors="replace".
    """
    ids = np.asarray(ids_row).reshape(-1)
    ends = np.asarray(patch_end_mask_row, dtype=bool).reshape(-1)
    if ids.shape != ends.shape:
        raise ValueError(f"ids_row {ids.shape} and patch_end_mask_row {ends.shape} must have the same shape")
    pieces: list[str] = []
    current = bytearray()
    for tok, end in zip(ids.tolist(), ends.tolist()):
        if 0 <= tok < 256:
            current.append(tok)
        if end:
            if current:
                pieces.append(current.decode("utf-8", errors="replace"))
            current = bytearray()
    if current:
        pieces.append(current.decode("utf-8", errors="replace"))
    return sep.join(pieces)
