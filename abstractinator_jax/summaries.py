"""TensorBoard summaries: a small writer over tensorboardX and readers that use TensorBoard's own loader.

``flax.metrics.tensorboard`` needs TensorFlow, which this project does not install; tensorboardX writes the same
event files. Only process 0 writes; on other processes the writer is a no-op and creates no files.

Text: TensorBoard renders text summaries as Markdown, where ``|`` starts a table and ``*``/``_`` change the font,
which garbles segmented samples such as ``Once| upon| a| time``. ``SummaryWriter.text`` therefore wraps the text in
a fenced code block (displayed verbatim) unless ``markdown=True``; ``read_texts`` removes that fence again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["SummaryWriter", "read_scalars", "read_texts"]

_TEXT_SUFFIX = "/text_summary"  # tensorboardX stores add_text(tag, ...) under '<tag>/text_summary'
_FENCE = re.compile(r"\A(`{3,})\n(.*)\n\1\Z", re.DOTALL)


def _to_float(value: Any) -> float:
    """A Python float from a Python/NumPy/JAX scalar (or size-1 array). NaN and inf are kept: they must show up."""
    arr = np.asarray(jax.device_get(value))
    if arr.size != 1:
        raise ValueError(f"a scalar summary needs a single value, got shape {arr.shape}")
    return float(arr.reshape(()))


def _code_block(text: str) -> str:
    """``text`` as a Markdown fenced code block whose fence is longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


class SummaryWriter:
    """Writes TensorBoard event files into ``logdir`` (process 0 only)."""

    def __init__(self, logdir: str | os.PathLike, flush_secs: int = 30):
        self.logdir = os.fspath(logdir)
        self.enabled = jax.process_index() == 0
        self._writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter as _TBXWriter

            self._writer = _TBXWriter(logdir=self.logdir, flush_secs=flush_secs)

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """One scalar per tag at ``step``. Accepts Python/NumPy/JAX scalars; NaN/inf are written as they are."""
        if self._writer is None:
            return
        step = int(step)
        for tag, value in values.items():
            self._writer.add_scalar(tag, _to_float(value), global_step=step)

    def scalar(self, step: int, tag: str, value: Any) -> None:
        self.scalars(step, {tag: value})

    def text(self, step: int, tag: str, text: str, markdown: bool = False) -> None:
        """A text summary; shown verbatim (code block) unless ``markdown=True``."""
        if self._writer is None:
            return
        self._writer.add_text(tag, str(text) if markdown else _code_block(str(text)), global_step=int(step))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ---------------------------------------------------------------------------------------------------------------------
# Readers (TensorBoard's own event loader, so tests prove TensorBoard can read what we write)
# ---------------------------------------------------------------------------------------------------------------------


def _accumulator(logdir: str | os.PathLike) -> Any:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(
        os.fspath(logdir),
        size_guidance={ea.SCALARS: 0, ea.TENSORS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0, ea.AUDIO: 0},
    )
    acc.Reload()
    return acc


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``logdir``'s event files: ``{tag: [(step, value), ...]}`` in file order."""
    acc = _accumulator(logdir)
    return {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_texts(logdir: str | os.PathLike, strip_code_block: bool = True) -> dict[str, list[tuple[int, str]]]:
    """Every text summary in ``logdir``: ``{tag: [(step, text), ...]}``, tags as given to ``SummaryWriter.text``.

    With ``strip_code_block`` the code fence that ``SummaryWriter.text`` adds is removed, giving back the text as
    written.
    """
    acc = _accumulator(logdir)
    out: dict[str, list[tuple[int, str]]] = {}
    for tag in acc.Tags()["tensors"]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != "text":
            continue
        name = tag[: -len(_TEXT_SUFFIX)] if tag.endswith(_TEXT_SUFFIX) else tag
        rows = []
        for event in acc.Tensors(tag):
            proto = event.tensor_proto
            text = "\n".join(s.decode("utf-8") for s in proto.string_val)
            if strip_code_block and (m := _FENCE.match(text)):
                text = m.group(2)
            rows.append((int(event.step), text))
        out[name] = rows
    return out
