"""Shared fixtures: tiny configs and a subprocess runner for the CLIs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxllm.config import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(**model):
    """A very small float32 model for fast tests (vocab 384, byte tokenizer)."""
    c = defaults()
    c.model.update(d_model=32, n_layers=2, n_heads=4, vocab_size=384, dtype="float32",
                   init_std=0.02)
    c.model.update(**model)
    c.data.seq_len = 32
    c.train.update(steps=20, batch_size=4, log_every=5, eval_every=0, eval_batches=1,
                   sample_tokens=0)
    c.optim.update(lr=3e-3, warmup_steps=5)
    c.log.update(tensorboard=False, progress=False)
    return c


def run_cli(args, env=None, timeout=600, **kw):
    """Run `python -m ...` from the repo root; returns CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture
def cfg():
    return tiny_cfg()


# The longest tests (minutes on 2 cores) start first, so `pytest -n 2` does not end with
# one worker running a long test alone.
LONG_FIRST = ("test_adam8bit_within_2_percent_of_adamw_every_logged_step_tiny_config",
              "test_walkthrough_runs_verbatim", "test_ablation_grid_runs_tabulates_and_resumes")


def pytest_collection_modifyitems(config, items):
    del config
    items.sort(key=lambda item: item.name not in LONG_FIRST)  # stable: others keep order
