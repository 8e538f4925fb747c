"""The drills of RELIABILITY.md: a diverging run skips bad steps and never checkpoints them; SIGTERM checkpoints the
current step and the rerun is bit-exact; damaged checkpoints are found by their checksums and the run falls back to
the previous step; unusable directories fail before the first step with one line; a failing save stops the run."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abstractinator_jax import data as data_lib
from abstractinator_jax.build import build
from abstractinator_jax.checkpointing import CheckpointError, CheckpointManager
from abstractinator_jax.data import resolve_data_config
from abstractinator_jax.guard import TrainingDiverged, count_step, init_guard_state, step_accepted
from abstractinator_jax.preemption import Preemption
from abstractinator_jax.recovery import RunDirError, check_run_dirs, resume_intact
from abstractinator_jax.summaries import read_scalars
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


def run_config(corpus, max_steps, **changes):
    cfg = tiny_config(seq_len=48, batch_size=4)
    cfg.data.path = str(corpus)
    cfg.data.eval_fraction = 0.2
    cfg.max_steps = max_steps
    cfg.log_interval = 2
    cfg.eval_interval = 100
    cfg.eval_batches = 1
    cfg.checkpoint_interval = 2
    for k, v in changes.items():
        cfg[k] = v
    return cfg


def leaves(state):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def assert_bit_identical(a, b):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def restore(workdir, step=None):
    with CheckpointManager(workdir) as mngr:
        return mngr.restore(step)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------------------------------


def test_guard_rejects_non_finite_and_spiking_steps_and_counts_them():
    """step_accepted (decided before the update; tests/test_training.py runs it in a train step) and count_step."""
    cfg = tiny_config()
    guard, ok = init_guard_state(), {"vq_state": {"codebook": jnp.ones((4, 2))}}
    f = jnp.float32
    assert bool(step_accepted(cfg, guard, f(2.0), f(1.0), ok))
    assert not bool(step_accepted(cfg, guard, f(jnp.nan), f(1.0), ok))
    assert not bool(step_accepted(cfg, guard, f(2.0), f(jnp.inf), ok))
    assert not bool(
        step_accepted(cfg, guard, f(2.0), f(1.0), {"vq_state": {"codebook": jnp.ones((4, 2)).at[1].set(jnp.nan)}})
    )
    skipped = count_step(guard, jnp.asarray(False), f(jnp.nan))
    assert [int(skipped[k]) for k in ("skipped", "consecutive", "accepted")] == [1, 1, 0]
    assert float(skipped["loss_ema"]) == 0.0  # a skipped loss never enters the running mean
    again = count_step(skipped, jnp.asarray(False), f(2.0))
    applied = count_step(again, jnp.asarray(True), f(2.0))
    assert [int(applied[k]) for k in ("skipped", "consecutive", "accepted")] == [2, 0, 1]

    # Spike guard: off by default; with a factor, a loss far above the running mean is skipped once it has history.
    warm = guard
    for _ in range(25):
        warm = count_step(warm, jnp.asarray(True), f(1.0))
    assert bool(step_accepted(cfg, warm, f(50.0), f(1.0), ok))
    cfg.loss_spike_factor = 3.0
    assert not bool(step_accepted(cfg, warm, f(50.0), f(1.0), ok))
    assert bool(step_accepted(cfg, warm, f(2.0), f(1.0), ok))
    young = guard
    for _ in range(5):  # too little history: no spike guard yet
        young = count_step(young, jnp.asarray(True), f(1.0))
    assert bool(step_accepted(cfg, young, f(50.0), f(1.0), ok))


@pytest.mark.slow
def test_divergence_leaves_only_finite_checkpoints_and_a_resumable_run(corpus, tmp_path, caplog):
    """lr=1e4 makes the loss non-finite from step 3 on; checkpoints every 2 steps fall between log steps (every 5)."""
    cfg = run_config(corpus, 20, learning_rate=1e4, log_interval=5, max_consecutive_skipped_steps=4)
    message = r"the last 4 steps \(up to step 6\) were skipped .* the last good checkpoint is step 2"
    with pytest.raises(TrainingDiverged, match=message):
        train(cfg, tmp_path)
    with CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [2]  # nothing written during the run of skipped steps: the last good one stays
    for name, leaf in leaves(restore(tmp_path, 2)).items():
        assert leaf.dtype.kind != "f" or np.isfinite(leaf).all(), name
    assert read_scalars(tmp_path / "tensorboard")["optim/skipped_steps"] == [(5, 3.0)]

    # The same command again resumes the finite step 2 (not a NaN state) and stops the same way, with one line.
    with caplog.at_level(logging.INFO, logger="abstractinator_jax"), pytest.raises(TrainingDiverged, match=message):
        train(cfg, tmp_path)
    assert any(r.getMessage().endswith("at step 2") and "Resumed" in r.getMessage() for r in caplog.records)
    with CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [2]


# ---------------------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------------------


def test_signals_request_a_stop_and_a_second_sigint_exits_at_once():
    codes = []
    before = signal.getsignal(signal.SIGINT)
    with Preemption(exit_now=codes.append) as preemption:
        assert not preemption.requested(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.signal_name == "SIGTERM" and preemption.requested(2)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated notice changes nothing
        assert codes == []
        os.kill(os.getpid(), signal.SIGINT)
        assert codes == [130]
    assert signal.getsignal(signal.SIGINT) is before


CONFIG_FILE = """
import sys
sys.path.insert(0, {repo!r})
from tests.helpers import tiny_config

def get_config():
    cfg = tiny_config(seq_len=48, batch_size=4)
    cfg.data.path = {corpus!r}
    cfg.data.eval_fraction = 0.2
    cfg.max_steps = {max_steps}
    cfg.log_interval = 1
    cfg.eval_interval = 100
    cfg.eval_batches = 1
    cfg.checkpoint_interval = 100
    return cfg
"""


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_the_rerun_is_bit_exact(corpus, tmp_path):
    max_steps = 200  # ~10 ms a step on a CPU: the signal lands a few steps after step 3, well before the end
    config_file = tmp_path / "cfg.py"
    config_file.write_text(CONFIG_FILE.format(repo=str(REPO), corpus=str(corpus), max_steps=max_steps))
    workdir = tmp_path / "preempted"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or ""  # compiled once, for both runs
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--config", str(config_file), "--workdir", str(workdir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if re.search(r"(^|\] )step 3 ", line):  # absl's log prefix, then the loop's line for step 3
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    stderr = "".join(lines) + rest
    assert proc.returncode == 75, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at step "), last
    stopped_at = int(last.split("at step ")[1].split(":")[0])
    assert 3 <= stopped_at < max_steps
    with CheckpointManager(workdir) as mngr:
        assert mngr.all_steps() == [stopped_at]
    logged = [s for s, _ in read_scalars(workdir / "tensorboard")["train/loss"]]
    assert logged[-1] == stopped_at  # TensorBoard was flushed

    # The same run uninterrupted, and the preempted one resumed, in this process: the same final state, bit for bit.
    quiet = dict(log_interval=max_steps, checkpoint_interval=max_steps)  # logging does not change the state
    assert train(run_config(corpus, max_steps, **quiet), tmp_path / "straight")["step"] == max_steps
    assert train(run_config(corpus, max_steps, **quiet), workdir)["step"] == max_steps
    assert_bit_identical(restore(tmp_path / "straight"), restore(workdir))


# ---------------------------------------------------------------------------------------------------------------------
# Integrity
# ---------------------------------------------------------------------------------------------------------------------


def _largest_array_file(step_dir: Path) -> Path:
    return max((step_dir / "state").glob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)


def _flip_bytes(step_dir: Path) -> None:
    f = _largest_array_file(step_dir)
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def _delete_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


def _truncate_chunk(step_dir: Path) -> None:
    f = _largest_array_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.slow
def test_damaged_checkpoints_fall_back_to_the_previous_step(corpus, tmp_path, caplog):
    cfg = run_config(corpus, 6)  # max_steps=6 as in test_train_e2e: the same compiled train step
    train(cfg, tmp_path / "orig", stop_at_step=4)
    run = build(cfg)
    data_cfg = resolve_data_config(cfg.data)
    expected = restore(tmp_path / "orig", 2)
    for damage in (_flip_bytes, _delete_metadata, _truncate_chunk):
        workdir = tmp_path / damage.__name__
        shutil.copytree(tmp_path / "orig", workdir)
        damage(workdir / "checkpoints" / "4")
        it = data_lib.make_train_iterator(data_cfg, cfg.sequence_length, cfg.batch_size, 1, seed=0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="abstractinator_jax"), CheckpointManager(workdir) as mngr:
            state = resume_intact(mngr, run, cfg, it, lambda c, s: None)
            assert mngr.all_steps() == [2]
        messages = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("checkpoint step 4 under") and "is damaged: " in m for m in messages), messages
        assert any("resuming from step 2, the newest intact checkpoint" in m for m in messages), messages
        assert all("\n" not in m for m in messages)
        assert (workdir / "checkpoints.damaged" / "4").is_dir()
        assert int(state.step) == 2
        assert_bit_identical(jax.device_get(state.params), expected["params"])

    # evaluate.py refuses a damaged step and names the intact ones; train() resumes past it.
    workdir = tmp_path / "evaluated"
    shutil.copytree(tmp_path / "orig", workdir)
    _flip_bytes(workdir / "checkpoints" / "4")
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--workdir", str(workdir)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "checkpoint step 4 under" in error[0], proc.stderr
    assert "is damaged: " in error[0] and "Intact steps: [2]" in error[0], error[0]
    assert train(cfg, workdir)["step"] == 6


# ---------------------------------------------------------------------------------------------------------------------
# Unusable directories and failing saves
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["", "checkpoints", "tensorboard"])
def test_a_file_where_a_run_directory_belongs_fails_before_step_one(corpus, tmp_path, where):
    workdir = tmp_path / "run"
    blocker = workdir / where if where else workdir
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")
    with pytest.raises(RunDirError) as err:
        train(run_config(corpus, 2), workdir)
    assert str(err.value).count("\n") == 0
    assert f"{blocker} is a file, not a directory" in str(err.value)


def _as_nobody(fn):
    """Run `fn()` in a forked child with the uid of 'nobody' (root ignores permission bits); return its message."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only touches the filesystem (no JAX) and leaves with os._exit
        os.close(read)
        try:
            os.setgid(65534)
            os.setuid(65534)
            fn()
            message = "ok"
        except Exception as e:  # noqa: BLE001
            message = f"{type(e).__name__}: {e}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        message = f.read()
    os.waitpid(pid, 0)
    return message


@pytest.fixture
def public_tmp():
    """A directory the 'nobody' user can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="abstractinator-rw-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755) if p.is_dir() else None
    shutil.rmtree(path)


@pytest.mark.filterwarnings("ignore:os.fork")  # the child only touches the filesystem, then os._exit
def test_read_only_directories_fail_before_step_one(public_tmp):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user (as a normal user, use chmod directly)")
    workdir = public_tmp / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    workdir.chmod(0o777)
    (workdir / "checkpoints").chmod(0o555)
    message = _as_nobody(lambda: check_run_dirs(workdir))
    if message == "ok":
        pytest.skip("permission bits are not enforced here, even for an unprivileged user")
    assert message == (
        f"RunDirError: checkpoint directory {workdir / 'checkpoints'} is not writable: Permission denied; fix its "
        "permissions or pass another --workdir."
    )
    workdir.chmod(0o555)
    message = _as_nobody(lambda: check_run_dirs(workdir))
    assert message.startswith(f"RunDirError: workdir {workdir} is not writable: Permission denied")
    message = _as_nobody(lambda: check_run_dirs(workdir / "sub"))
    assert message == f"RunDirError: cannot create workdir {workdir / 'sub'}: Permission denied."


@pytest.mark.slow
def test_cli_unusable_workdir_fails_with_one_line(tmp_path):
    """train.py with a file as --workdir: one `error:` line, exit 2, before anything is built."""
    workdir = tmp_path / "run"
    workdir.write_text("")
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"error: workdir {workdir} is a file, not a directory; pass another --workdir or move the file."
    )


@pytest.mark.slow
def test_a_failing_save_stops_the_run_at_once(corpus, tmp_path, monkeypatch):
    real_save = CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 4:  # the checkpoint directory disappears under the run, a file in its place
            self.wait()
            shutil.rmtree(self.directory)
            self.directory.write_text("")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save", save)
    with pytest.raises(CheckpointError, match="saving the checkpoint for step 4 under .* failed: FileExistsError"):
        train(run_config(corpus, 6), tmp_path)


def test_checkpoint_saved_before_the_guard_restores_with_fresh_counters(tmp_path):
    """A checkpoint of an older version has no guard counters: it restores (parameters bit for bit) and its counters
    start at zero, instead of failing as 'a different model'."""
    from abstractinator_jax.recovery import restore_checked
    from abstractinator_jax.train_state import create_train_state

    cfg = tiny_config()
    run = build(cfg)
    state, _ = create_train_state(cfg, run.model, run.mesh, run.optimizer)
    fields = ("step", "params", "opt_state", "model_state", "rng", "frozen_params")
    old = {f: getattr(state, f) for f in fields}  # what an older version saved: its TrainState had no guard
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(3, old, force=True)
        ckpt.wait()
        assert "guard" not in ckpt.saved_state_keys(3)
        restored = restore_checked(ckpt, 3, run.abstract_state)
    assert {k: int(v) for k, v in jax.device_get(restored.guard).items()} == {k: 0 for k in init_guard_state()}
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored.params, state.params
    )
