"""SummaryWriter writes TensorBoard event files that TensorBoard's own EventAccumulator reads back."""

import math

import jax.numpy as jnp
import numpy as np

from abstractinator_jax.summaries import SummaryWriter, read_scalars, read_texts


def test_scalars_and_texts_round_trip(tmp_path):
    logdir = tmp_path / "tb"
    sample = "Once| upon| a| time"
    with SummaryWriter(logdir) as writer:
        writer.scalars(1, {"train/loss": 2.5, "train/lr": np.float32(1e-3)})
        writer.scalars(2, {"train/loss": jnp.asarray(1.25), "train/lr": jnp.float32(5e-4)})
        writer.scalars(3, {"train/loss": float("nan")})  # NaN must be visible, not dropped
        writer.text(2, "samples/decoded", sample)
        writer.text(4, "samples/decoded", "with ``` fences | and *stars*")
        writer.text(4, "notes", "**bold** markdown", markdown=True)
        writer.flush()

    scalars = read_scalars(logdir)
    assert set(scalars) == {"train/loss", "train/lr"}
    loss = scalars["train/loss"]
    assert [s for s, _ in loss] == [1, 2, 3]
    assert loss[0][1] == 2.5 and loss[1][1] == 1.25 and math.isnan(loss[2][1])
    assert scalars["train/lr"] == [(1, float(np.float32(1e-3))), (2, float(np.float32(5e-4)))]

    texts = read_texts(logdir)
    assert texts["samples/decoded"] == [(2, sample), (4, "with ``` fences | and *stars*")]
    assert texts["notes"] == [(4, "**bold** markdown")]

    # What TensorBoard displays: the segmented sample sits in a fenced code block, so its pipes are not a table.
    raw = read_texts(logdir, strip_code_block=False)["samples/decoded"]
    assert raw[0] == (2, f"```\n{sample}\n```")
    assert raw[1][1].startswith("````\n") and raw[1][1].endswith("\n````")


def test_empty_logdir_reads_nothing(tmp_path):
    with SummaryWriter(tmp_path) as writer:
        writer.flush()
    assert read_scalars(tmp_path) == {}
    assert read_texts(tmp_path) == {}
