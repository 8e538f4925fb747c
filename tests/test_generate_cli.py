"""generate.py on a run trained for a few steps: prints text, --json fields, one-line errors; and training's
`samples/generated` text in TensorBoard."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from abstractinator_jax.summaries import read_texts
from abstractinator_jax.train_loop import train

from .helpers import run_script, tiny_config

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 16  # training's sample_max_bytes too: the CLI finds the sample's compiled program in the cache

SENTENCES = [
    "The cat sat on the warm mat and slept.",
    "A dog ran in the park after a red ball.",
    "Birds sing in the tall trees at dawn.",
    "Lily drew a small house with a green door.",
] * 6


def run_generate(*args: str) -> subprocess.CompletedProcess:
    return run_script("generate.py", *args, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One level with a logit entropy model and a continuous top, trained for 2 steps (one evaluation)."""
    root = tmp_path_factory.mktemp("gen")
    corpus = root / "sentences.txt"
    corpus.write_text("\n<|endoftext|>\n".join(f"{s} ({i})" for i, s in enumerate(SENTENCES)))
    cfg = tiny_config(seq_len=48, batch_size=2)
    cfg.levels[0].c_entropy_model = "logit"
    cfg.use_top_code_lm = True
    t = cfg.top_transformer_config
    t.embed_dim, t.dim, t.num_layers, t.num_heads, t.continuous = 32, 32, 1, 2, True
    cfg.data.path = str(corpus)
    cfg.max_steps = 2
    cfg.eval_interval = 2
    cfg.eval_batches = 1
    cfg.checkpoint_interval = 2
    cfg.log_interval = 1
    cfg.sample_text = "Once upon a time"
    cfg.sample_max_bytes = MAX_BYTES
    assert train(cfg, root / "run")["step"] == 2
    return root / "run"


@pytest.mark.slow
def test_generate_cli_text_json_errors_and_training_sample(workdir):
    texts = read_texts(workdir / "tensorboard")
    assert "samples/generated" in texts, sorted(texts)
    step, sample = texts["samples/generated"][-1]
    assert step == 2 and sample.startswith("Once upon a time") and "from the top transformer" in sample

    r = run_generate("--workdir", str(workdir), "--prompt", "Once upon a time", "--max_bytes", str(MAX_BYTES))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")

    r = run_generate(
        "--workdir", str(workdir), "--prompt", "Once upon a time", "--max_bytes", str(MAX_BYTES), "--json",
        "--num_samples", "2", "--greedy",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and rows[0] == {**rows[1], "seconds": rows[0]["seconds"]}  # greedy: twice the same
    assert set(rows[0]) == {"prompt", "continuation", "bytes", "stop", "seconds"}
    assert rows[0]["prompt"] == "Once upon a time" and 0 <= rows[0]["bytes"] <= MAX_BYTES
    assert rows[0]["stop"] in ("eos", "max_bytes")

    for args, words in [
        (("--workdir", str(workdir / "nope")), "does not exist"),
        (("--workdir", str(workdir), "--temperature", "-1"), "temperature"),
    ]:
        r = run_generate(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (args, r.stderr)
    r = run_generate("--workdir", str(workdir), "--config.levels[0].gen_max_segment_len=0")
    assert r.returncode == 2 and "gen_max_segment_len" in r.stderr and "Traceback" not in r.stderr
