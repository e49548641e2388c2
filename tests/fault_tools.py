"""Shared helpers of the checkpoint/resume/fault tests: tiny configs, CLI subprocesses."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One persistent compilation cache for every subprocess of the session (tiny programs; the
# cache only skips recompiling identical HLO, it does not change results).
JIT_CACHE = os.path.join(tempfile.gettempdir(), f"jaxllm-test-jit-cache-{os.getuid()}")

TINY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "data.seq_len": 32,
        "train.batch_size": 4, "train.log_every": 1, "train.eval_every": 4,
        "train.eval_batches": 1, "train.sample_tokens": 0, "optim.warmup_steps": 2,
        "log.progress": False, "log.tensorboard": False, "data.prefetch": 0}


def flags(overrides: dict) -> list[str]:
    out = []
    for k, v in {**TINY, **overrides}.items():
        v = str(v).lower() if isinstance(v, bool) else v
        out.append(f"--config.{k}={v}")
    return out


def env(devices: int = 1, **extra) -> dict:
    e = dict(os.environ)
    e.update({"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
              "JAX_COMPILATION_CACHE_DIR": JIT_CACHE,
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_cli(workdir, overrides: dict, devices: int = 1, timeout: int = 300, **extra_env):
    """`python -m jaxllm.train --workdir=... --config.K=V ...` in a subprocess."""
    cmd = [sys.executable, "-m", "jaxllm.train", f"--workdir={workdir}", *flags(overrides)]
    return subprocess.run(cmd, cwd=ROOT, env=env(devices, **extra_env), capture_output=True,
                          text=True, timeout=timeout, check=False)


def run_tool(script: str, *args: str, timeout: int = 300):
    """`python tools/SCRIPT ARGS...` (or `-m MODULE` when script starts with "-m ") in a
    subprocess with the test environment."""
    cmd = script.split() if script.startswith("-m ") else [str(ROOT / "tools" / script)]
    return subprocess.run([sys.executable, *cmd, *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def run_py(code: str, devices: int = 1, timeout: int = 300):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(devices),
                          capture_output=True, text=True, timeout=timeout, check=False)


def rows(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_rows(workdir, split: str = "train") -> dict:
    """{step: row} of one split (the last row wins where a step repeats)."""
    return {r["step"]: r for r in rows(workdir) if r.get("split") == split}


def events(workdir, name: str) -> list[dict]:
    return [r for r in rows(workdir) if r.get("event") == name]


def tiny_cfg(**overrides):
    """The tiny config as a ConfigDict for in-process `train()` calls."""
    from jaxllm.config import set_key, tiny
    cfg = tiny()
    for k, v in {**TINY, **overrides}.items():
        set_key(cfg, k, v)
    return cfg


def use_jit_cache():
    """Generator for a module-scoped autouse fixture: the persistent compilation cache for
    in-process `train()` calls (each builds new jitted closures), restored afterwards."""
    import jax
    from jax._src import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    for k, v in zip(keys, (JIT_CACHE, 0.0, 0), strict=True):
        jax.config.update(k, v)
    cc.reset_cache()
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()
