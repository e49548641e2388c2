"""Run one measurement in a fresh Python subprocess and read back its row.

Used by the benchmark so that each configuration has its own peak device memory and an
out-of-memory configuration becomes a row instead of a crash. Protocol: the child prints
one line `ROW_PREFIX + json` on stdout (`emit_row`); the parent (`run_row`) returns that
row, or None and the most telling line of the child's stderr.

Accelerator memory: a parent that only plans and collects rows must not preallocate
device memory its children need (`keep_parent_light`, called before JAX starts); children
get the caller's original `XLA_PYTHON_CLIENT_PREALLOCATE` back (`child_env`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROW_PREFIX = "BENCH_ROW "
_PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"
_parent_env: dict = {}


def keep_parent_light() -> None:
    """Call before JAX starts when configurations run in subprocesses: the parent only plans
    and collects rows, so it must not preallocate accelerator memory (JAX takes 75% of a GPU
    by default) that the children need. Children get the caller's original setting."""
    if not _parent_env:
        _parent_env[_PREALLOCATE] = os.environ.get(_PREALLOCATE)
        os.environ[_PREALLOCATE] = "false"


def child_env() -> dict:
    """The environment of a child: this checkout first on PYTHONPATH, the caller's own
    preallocation setting."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where jaxllm is
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    if _parent_env:
        env.pop(_PREALLOCATE, None)
        if _parent_env[_PREALLOCATE] is not None:
            env[_PREALLOCATE] = _parent_env[_PREALLOCATE]
    return env


def run_row(module: str, arg: str) -> tuple[dict | None, str]:
    """`python -m module arg` in a fresh process: (its row, "") or (None, an error line)."""
    proc = subprocess.run([sys.executable, "-m", module, arg], check=False,
                          capture_output=True, text=True, env=child_env())
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_PREFIX):
            return json.loads(line[len(ROW_PREFIX):]), ""
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return None, next((ln for ln in reversed(tail) if "Error" in ln or "RESOURCE" in ln),
                      tail[-1] if tail else f"exit status {proc.returncode}")


def emit_row(row: dict) -> None:
    """The child's half of the protocol: print the row for `run_row`."""
    print(ROW_PREFIX + json.dumps(row), flush=True)
