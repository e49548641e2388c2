"""Preemption: SIGTERM/SIGINT -> finish the current step, save, write `preempted`, exit.

Single process: a Python signal handler sets a flag that the loop checks after every step
(after that step's eval, if one is due). Multi-process: all processes must stop at the same
step, so the decision is collective: JAX's preemption sync manager (started by
`jax.distributed.initialize`, which owns SIGTERM then) answers
`reached_preemption_sync_point(step)` identically on every process; a local SIGINT (or
SIGTERM where that manager is absent) is combined across processes every `check_every`
steps with an all-gather. A second SIGINT interrupts at once (KeyboardInterrupt).

Exit status of a preempted run (`jaxllm-train`): 128 + signal number (143 for SIGTERM,
130 for SIGINT), the shell convention for "terminated by signal", so schedulers and
wrappers treat the run as unfinished; rerunning the same command resumes it.

Test hook: env `JAXLLM_TEST_WAIT_AT_STEP=K` makes the loop wait after step K (up to 120 s)
until a signal arrives, so a test can send a real SIGTERM at a known step.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


def _sync_manager() -> bool:
    """Whether JAX's preemption sync manager runs: `jax.distributed.initialize` starts it
    when the `jax_enable_preemption_service` option is on (its default)."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class Preemption:
    def __init__(self, check_every: int = 1):
        self.signum = None
        self.check_every = max(check_every, 1)
        self.multi = jax.process_count() > 1
        self.sync = self.multi and _sync_manager()
        self.test_step = int(os.environ.get("JAXLLM_TEST_WAIT_AT_STEP", "0") or 0)
        sigs = [signal.SIGINT] + ([] if self.sync else [signal.SIGTERM])
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in sigs}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def should_stop(self, step: int) -> bool:
        """Call once per step on every process, with the step just completed."""
        if self.test_step and step == self.test_step:
            deadline = time.monotonic() + 120
            while self.signum is None and time.monotonic() < deadline:
                time.sleep(0.02)
        if not self.multi:
            return self.signum is not None
        if self.sync:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
                return True
        if step % self.check_every == 0:
            flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
            if np.any(flags):
                self.signum = self.signum or int(np.max(flags))
                return True
        return False

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum or signal.SIGTERM)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
