"""evaluate.py: restores a run's checkpoint and config, evaluates its held-out split, prints one JSON object; bad
input gives a one-line error and exit code 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from abstractinator_jax.train_loop import train

from .helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "The cat sat on the warm mat and slept.",
    "A dog ran in the park after a red ball.",
    "Birds sing in the tall trees at dawn.",
    "Fish swim deep below the blue waves.",
    "Lily drew a small house with a green door.",
    "Tom ate his soup and asked for more bread.",
] * 6


def run_evaluate(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # Reuse this session's compilation cache (conftest.py): the model was compiled by train() already.
        "JAX_COMPILATION_CACHE_DIR": str(jax.config.jax_compilation_cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
    return subprocess.run(
        [sys.executable, "evaluate.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    corpus = root / "sentences.txt"
    corpus.write_text("\n<|endoftext|>\n".join(f"{s} ({i})" for i, s in enumerate(SENTENCES)))
    cfg = tiny_config(seq_len=48, batch_size=4)
    cfg.data.path = str(corpus)
    cfg.data.eval_fraction = 0.2
    cfg.max_steps = 2
    cfg.eval_interval = 2
    cfg.checkpoint_interval = 2
    cfg.log_interval = 1
    assert train(cfg, root / "run")["step"] == 2
    return root / "run"


def assert_one_line_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_evaluate_prints_metrics_and_segments(workdir, tmp_path):
    proc = run_evaluate("--workdir", str(workdir), "--show_segments", "2", "--max_batches", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["step"] == 2
    assert result["data"]["batches"] == 2 and result["data"]["tokens"] > 0
    for key in (
        "loss",
        "level0/code_ce",
        "level0/code_bits_per_byte",
        "level0/entropy_loss",
        "level0/recon_accuracy",
        "level0/compression_ratio",
        "level0/segments_per_row",
    ):
        assert math.isfinite(result[key]), key
    assert math.isclose(result["level0/code_bits_per_byte"], result["level0/code_ce"] / math.log(2), rel_tol=1e-9)
    assert 0.0 <= result["level0/recon_accuracy"] <= 1.0
    assert result["level0/compression_ratio"] >= 1.0
    assert sum(line.startswith("--- segmented row") for line in lines) == 2
    assert "|" in proc.stdout

    # Unreadable eval data: one line, exit code 2 (the data is read before the model is built).
    assert_one_line_error(run_evaluate("--workdir", str(workdir), "--data_path", str(tmp_path / "missing.txt")))


def test_evaluate_missing_workdir_is_one_line_error(tmp_path):
    proc = run_evaluate("--workdir", str(tmp_path / "missing"))
    assert_one_line_error(proc)
    assert "does not exist" in proc.stderr
