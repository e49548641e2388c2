"""Helpers of the distributed tests: subprocess environment with simulated CPU devices."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_dist_worker.py"
# fast CPU compiles (the same flags on every run, so results stay comparable)
FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def env(devices: int = 8) -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST}")
    e.pop("JAX_NUM_CPU_DEVICES", None)
    return e


def run_worker(*args, timeout=900) -> dict:
    p = subprocess.run([sys.executable, str(WORKER), *args], env=env(), cwd=ROOT, check=False,
                       capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])
