"""End to end: train.py's loop writes TensorBoard events and checkpoints, resumes bit for bit, refuses a mismatched
checkpoint, and the CLI rejects unknown config keys with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from abstractinator_jax.checkpointing import CheckpointError, CheckpointManager
from abstractinator_jax.summaries import read_scalars, read_texts
from abstractinator_jax.train_loop import train

from .helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]

STORIES = [
    "Once upon a time there was a little girl named Lily. She loved to play outside in the sun.",
    "Tom had a red ball. He threw it high into the sky and his dog ran after it.",
    "The old tree in the park had many birds. Every morning they sang a happy song.",
    "Sam wanted a cookie. His mom said he had to eat his dinner first, so he did.",
] * 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(f"{s} ({i})" for i, s in enumerate(STORIES)) + "\n<|endoftext|>\n")
    return path


def run_config(corpus, max_steps):
    cfg = tiny_config(seq_len=48, batch_size=4)
    cfg.data.path = str(corpus)
    cfg.data.eval_fraction = 0.2
    cfg.max_steps = max_steps
    cfg.log_interval = 2
    cfg.eval_interval = 3
    cfg.eval_batches = 2
    cfg.checkpoint_interval = 3
    return cfg


def final_state(workdir):
    with CheckpointManager(workdir) as mngr:
        state, config = mngr.restore()
    return state, config


@pytest.mark.slow
def test_train_writes_events_checkpoints_and_resumes_bit_for_bit(corpus, tmp_path):
    straight = tmp_path / "straight"
    result = train(run_config(corpus, 6), straight)
    assert result["step"] == 6
    assert np.isfinite(result["train"]["loss"])

    with CheckpointManager(straight) as mngr:
        assert mngr.all_steps() == [3, 6]
    scalars = read_scalars(straight / "tensorboard")
    for tag in (
        "train/loss",
        "train/level0/code_ce",
        "train/level0/entropy_loss",
        "train/level0/compression_ratio",
        "train/level0/segments_per_row",
        "train/level0/recon_accuracy",
        "optim/learning_rate",
        "optim/grad_norm",
        "throughput/bytes_per_s",
        "eval/level0/recon_bits_per_token_given_codes",
        "eval/level0/recon_accuracy",
        "eval/level0/input_tokens_per_segment",
    ):
        assert tag in scalars, tag
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6]
    assert [s for s, _ in scalars["eval/level0/recon_bits_per_token_given_codes"]] == [3, 6]
    texts = read_texts(straight / "tensorboard")
    segmented = texts["samples/segmented"][-1][1]
    assert "|" in segmented and len(segmented) > 20

    # The same run interrupted after step 4 (as by preemption) and resumed reaches the identical state.
    resumed = tmp_path / "resumed"
    assert train(run_config(corpus, 6), resumed, stop_at_step=4)["step"] == 4
    with CheckpointManager(resumed) as mngr:
        assert mngr.all_steps() == [3, 4]
    assert train(run_config(corpus, 6), resumed)["step"] == 6
    a, cfg_a = final_state(straight)
    b, _ = final_state(resumed)
    assert cfg_a["levels"][0]["D"] == 32
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
    assert len(flat_a) == len(flat_b)
    for path, leaf in flat_a:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_b[path]), err_msg=jax.tree_util.keystr(path))

    # A different model in the same workdir is refused, naming the difference.
    other = run_config(corpus, 9)
    other.levels[0].D = 64
    with pytest.raises(CheckpointError, match=r"levels\[0\]\.D: checkpoint 32 vs config 64"):
        train(other, resumed)


def test_cli_rejects_unknown_config_key():
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.py", "--config.levels[0].c_windw=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown config key" in proc.stderr and "c_windw" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_rejects_contradictory_config():
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/tiny.py",
            "--config.levels[0].D=100",
            "--workdir",
            "/dev/null/x",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "not divisible by levels[0].d_heads" in proc.stderr
    assert "Traceback" not in proc.stderr
