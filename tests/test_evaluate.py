"""evaluate.py: restores a run's checkpoint and config, evaluates its held-out split, prints one JSON object; bad
input gives a one-line error and exit code 2."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from abstractinator_jax.train_loop import train

from .helpers import run_script, tiny_config

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
    return run_script("evaluate.py", *args, timeout=120)


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
    held_out = ["Fish swim deep below the blue waves.", "A café serves crème brûlée.", "Lily drew a house."]
    jsonl = tmp_path / "held_out.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in held_out))
    out = tmp_path / "result.json"
    report = tmp_path / "report.html"
    proc = run_evaluate(
        "--workdir",
        str(workdir),
        "--data_path",
        str(jsonl),
        "--output",
        str(out),
        "--show_segments",
        "2",
        "--report",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert json.loads(out.read_text()) == result
    assert result["step"] == 2
    # the documents' UTF-8 bytes, each document once (BOS/EOS are not bytes)
    assert result["data"]["bytes"] == sum(len(t.encode()) for t in held_out)
    assert result["data"]["documents"] == result["data"]["rows"] == 3 and result["data"]["batches"] == 1
    # no top transformer: no code length, and the output says why; the conditional parts are there
    assert result["bits_per_byte"] is None and result["bits_per_byte_note"].startswith("null")
    assert "level0/boundary_bits_per_byte" in result["bits_per_byte_parts"]
    for key in (
        "level0/recon_bits_per_token_given_codes",
        "level0/eos_bits_given_codes",
        "level0/recon_bits_per_byte",
        "level0/boundary_bits_per_byte",
        "level0/entropy_model_bits_per_dim",
        "level0/recon_accuracy",
        "level0/input_tokens_per_segment",
        "level0/bytes_per_segment",
        "level0/segments_per_row",
        "level0/overflow_rows",
    ):
        assert math.isfinite(result[key]), key
    assert 0.0 <= result["level0/recon_accuracy"] <= 1.0
    assert result["level0/input_tokens_per_segment"] >= 1.0
    assert sum(line.startswith("--- segmented row") for line in lines) == 2
    assert "|" in proc.stdout
    # --report: one page (no quantizer, so no atlas TSV) showing the three held-out documents segment by segment
    assert result["report"] == [str(report)]
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<h2>Row ") == 3 and "Codebook atlas" not in page
    spans = [
        tuple(map(int, m))
        for m in re.findall(r'data-level="0" data-segment="\d+" data-start="(\d+)" data-end="(\d+)"', page)
    ]
    assert spans and sum(e - s for s, e in spans) == result["data"]["bytes"]  # the shown segments tile every byte

    # Unreadable eval data: one line, exit code 2 (the data is read before the model is built).
    assert_one_line_error(run_evaluate("--workdir", str(workdir), "--data_path", str(tmp_path / "missing.txt")))


def test_evaluate_missing_workdir_is_one_line_error(tmp_path):
    proc = run_evaluate("--workdir", str(tmp_path / "missing"))
    assert_one_line_error(proc)
    assert "does not exist" in proc.stderr
