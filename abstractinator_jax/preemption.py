"""Preemption: SIGTERM (a scheduler's or a cloud VM's notice) and SIGINT (Ctrl-C) ask the training loop to finish the
current step, write a checkpoint and exit; a second SIGINT exits at once, without a checkpoint. `Preemption` is a
context manager that installs the handlers (main thread only; the previous handlers come back on exit), and
`requested(step)` tells the loop, after each step, whether to stop there. On several hosts every host must stop at
the same step: with JAX's preemption service (on by default under `jax.distributed.initialize`) SIGTERM is left to
the service, which tells every host, and `jax.experimental.multihost_utils.reached_preemption_sync_point` names the
common step (SIGINT on any host is turned into that same notice); without the service, the hosts agree at the
points where the loop syncs anyway (`requested(step, agree_now=True)` at log steps) by an all-gather of their
flags."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable

import jax
import numpy as np

__all__ = ["EXIT_PREEMPTED", "Preemption"]

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after writing a checkpoint; rerun the same command to resume
EXIT_SECOND_SIGINT = 130  # 128 + SIGINT, like a shell


def _exit_now(code: int) -> None:
    os._exit(code)


def _say(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode())


class Preemption:
    """Signal handling for one training run. `signal_name` is the first signal received (None before)."""

    def __init__(self, exit_now: Callable[[int], None] = _exit_now):
        self.signal_name: str | None = None
        self._exit_now = exit_now
        self._previous: dict[int, object] = {}
        self._mode = "local"
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                multihost_utils.reached_preemption_sync_point(0)
                self._mode = "jax"
            except RuntimeError:  # the preemption service is off (jax_enable_preemption_service=False)
                self._mode = "allgather"

    def __enter__(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread; the run is then not preemptible
        signals = [signal.SIGINT] if self._mode == "jax" else [signal.SIGINT, signal.SIGTERM]
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if signum == signal.SIGINT:
                _say("second SIGINT: exiting now, without writing a checkpoint")
                self._exit_now(EXIT_SECOND_SIGINT)
            return
        self.signal_name = name
        _say(f"received {name}: finishing the current step and writing a checkpoint (SIGINT again to exit at once)")
        if self._mode == "jax" and signum == signal.SIGINT:
            signal.raise_signal(signal.SIGTERM)  # JAX's preemption service takes it to every host

    def requested(self, step: int, agree_now: bool = False) -> bool:
        """Whether to stop after `step` (all hosts get the same answer). Call it after every step; `agree_now` marks
        the steps at which every host calls it together and a collective is cheap (log steps)."""
        if self._mode == "local":
            return self.signal_name is not None
        from jax.experimental import multihost_utils

        if self._mode == "jax":
            reached = bool(multihost_utils.reached_preemption_sync_point(step))
            if reached and self.signal_name is None:
                self.signal_name = "a preemption notice"  # received by another host
            return reached
        if not agree_now:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
        if np.any(flags) and self.signal_name is None:
            self.signal_name = "a signal to another host"
        return bool(np.any(flags))
