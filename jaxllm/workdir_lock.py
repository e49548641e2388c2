"""One run per workdir: a lock file, `WORKDIR/jaxllm.lock`, held while a run writes there.

The lock holds JSON `{"pid", "host", "started", "token", "command"}` and is created
atomically (`O_CREAT | O_EXCL`), so of two runs started together exactly one gets it; the
other is refused with `WorkdirBusy` (a ConfigError: `error: ...`, exit 2) before it
touches anything. A lock left behind by a process that died (kill -9, a crashed node) is
detected on the same host (no such pid, or the pid belongs to a process started after the
lock was written) and taken over with a warning. A lock written on another host is
honoured (its process cannot be checked from here): if that run is really gone, delete
the file. In a multi-process run only process 0 (the one that writes the workdir) takes
the lock; the outcome is shared so that every process stops when it is refused.

fcntl/flock locks were not used: they vanish silently on some network file systems and
cannot say who holds the workdir, which is what a refused user needs to know.
Remote workdirs (gs://...) are not locked (no exclusive create there).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid

import numpy as np
from jax.experimental import multihost_utils

from jaxllm.config import ConfigError

LOCK_NAME = "jaxllm.lock"
log = logging.getLogger("jaxllm")


class WorkdirBusy(ConfigError):
    """Another live run holds the workdir."""


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _alive(pid: int, started: float) -> bool:
    """Is `pid` (on this host) the process that wrote a lock at time `started`?"""
    if pid == os.getpid():
        return False  # our own leftover (an earlier run in this process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    try:  # a pid reused by a process started after the lock was written is not the holder
        return os.stat(f"/proc/{pid}").st_ctime <= started + 1.0
    except OSError:
        return True


def _describe(info: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')} since {when}"


class WorkdirLock:
    """The lock of one workdir; `acquire()` takes it, `release()` gives it back."""

    def __init__(self, workdir: str):
        self.workdir = str(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.token = uuid.uuid4().hex
        self.held = False

    def acquire(self) -> WorkdirLock:
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise ConfigError(f"not a directory (--workdir={self.workdir}): it is an existing "
                              "file; choose a directory")
        os.makedirs(self.workdir, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "token": self.token, "command": " ".join(sys.argv)[:1000]}
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise WorkdirBusy(f"workdir lock could not be taken ({self.path}): it keeps "
                          "reappearing; another run is starting there, use another --workdir")

    def _clear_stale(self) -> None:
        """Remove the existing lock if its holder is gone; raise WorkdirBusy if not."""
        holder = _read(self.path)
        if holder is None:  # being written right now, or a torn file
            try:
                age = time.time() - os.stat(self.path).st_mtime
            except FileNotFoundError:
                return
            if age < 5.0:
                time.sleep(0.1)
                return
            holder = {"pid": None, "host": socket.gethostname(), "started": 0}
        if holder.get("host") != socket.gethostname():
            raise WorkdirBusy(
                f"workdir in use ({self.path}): another run holds it ({_describe(holder)}); "
                "wait for it, use another --workdir, or delete the lock file if that run is "
                "gone")
        pid = holder.get("pid")
        if isinstance(pid, int) and _alive(pid, float(holder.get("started", 0))):
            raise WorkdirBusy(
                f"workdir in use ({self.path}): another run is writing it "
                f"({_describe(holder)}); wait for it or use another --workdir")
        stale = f"{self.path}.stale-{os.getpid()}-{self.token[:8]}"
        try:
            os.rename(self.path, stale)
        except FileNotFoundError:
            return  # someone else cleared it first
        if pid != os.getpid():
            log.warning("taking over the lock of a run that is gone (%s): %s",
                        _describe(holder), self.path)
        os.remove(stale)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if (_read(self.path) or {}).get("token") == self.token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def remove_empty_tree(path: str) -> None:
    """Remove `path` and its subdirectories if they hold no files (a run that failed before
    writing anything leaves no workdir behind)."""
    for root, _dirs, _files in os.walk(path, topdown=False):
        try:
            os.rmdir(root)
        except OSError:
            return


def acquire_for_run(workdir: str, lead: bool, process_count: int) -> WorkdirLock | None:
    """Process 0 takes the lock of a local workdir; every process learns whether it did."""
    local = "://" not in str(workdir)
    lock, error = None, None
    if lead and local:
        try:
            lock = WorkdirLock(workdir).acquire()
        except WorkdirBusy as e:
            error = e
    if process_count > 1 and local:
        refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if int(refused) and error is None:
            raise WorkdirBusy(f"workdir in use ({workdir}): process 0 was refused the lock; "
                              "see its error line")
    if error is not None:
        raise error
    return lock
