"""Several hosts: two CPU processes joined by `jax.distributed` on localhost train together (each reads its share
of every global batch, gradients are reduced across them) and reach the state one process reaches on the same
global batches; the checkpoint they write together restores in one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from .helpers import xla_flags

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    process_id, num_processes, port, workdir, corpus = sys.argv[1:6]
    if int(num_processes) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", num_processes=int(num_processes), process_id=int(process_id))
    from abstractinator_jax.train_loop import train
    from tests.helpers import tiny_config
    cfg = tiny_config(seq_len=48, batch_size=4)
    cfg.levels[0].c_vq_K = 16  # quantizer state (EMA sums over the global batch) must agree too
    cfg.levels[0].c_vq_d_c = 8
    cfg.levels[0].c_vq_buffer_size = 32
    cfg.levels[0].c_vq_vectors_per_step = 8
    cfg.data.path = corpus
    cfg.data.eval_fraction = 0.25
    cfg.max_steps = 2
    cfg.log_interval = 1
    cfg.eval_interval = 2
    cfg.eval_batches = 2
    cfg.checkpoint_interval = 2
    result = train(cfg, workdir)
    print("RESULT " + json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                                  "step": result["step"], "eval": result["eval"]}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(n: int, workdir: Path, corpus: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "XLA_FLAGS": xla_flags()}
    port = str(_free_port())
    return [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), str(n), port, str(workdir), str(corpus)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]


def _results(procs) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
        out.append(json.loads(line[len("RESULT ") :]))
    return out


def _restore_params(workdir: Path, step: int) -> dict:
    """The state as evaluate.py restores it here: the saved config's model and mesh (this process's one device)."""
    from abstractinator_jax.build import build
    from abstractinator_jax.checkpointing import CheckpointManager
    from abstractinator_jax.config import from_dict

    with CheckpointManager(workdir) as ckpt:
        run = build(from_dict(ckpt.restore_config(step)))
        state, _ = ckpt.restore(step, abstract_state=run.abstract_state)
    state = {"params": state.params, "model_state": state.model_state}
    flat = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        else:
            flat[path] = np.asarray(node)

    walk(state, "")
    return flat


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n<|endoftext|>\n".join(f"Story {i}: the cat and the dog played in the sun, number {i}." for i in range(24))
    )
    two = _launch(2, tmp_path / "two", corpus)
    one = _launch(1, tmp_path / "one", corpus)
    res_two, res_one = _results(two), _results(one)[0]
    assert [r["count"] for r in res_two] == [2, 2] and res_one["count"] == 1
    assert all(r["step"] == 2 for r in res_two) and res_one["step"] == 2
    # the evaluation over the two processes' shares equals the evaluation in one process
    for key, value in res_one["eval"].items():
        np.testing.assert_allclose(res_two[0]["eval"][key], value, rtol=2e-5, atol=1e-6, err_msg=key)
    # the checkpoint the two processes wrote together restores in this (single) process, equal to the 1-process one
    p2, p1 = _restore_params(tmp_path / "two", 2), _restore_params(tmp_path / "one", 2)
    assert p2.keys() == p1.keys() and len(p1) > 10
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=1e-4, atol=1e-5, err_msg=k)
