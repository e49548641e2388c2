"""Skipped steps: NaN gradients, loss spikes, consecutive-skip stop (issue 6, point 6)."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.fixtures import ROOT, env, events, flags, tiny_cfg, train_rows, use_jit_cache

_jit_cache = pytest.fixture(scope="module", autouse=True)(use_jit_cache)


def _setup(**overrides):
    from jaxllm import optim, parallel
    from jaxllm.data.pipeline import make_pipeline
    from jaxllm.data.tokenizers import load_tokenizer
    from jaxllm.data.resolve import resolve
    from jaxllm.state import init_state
    cfg = tiny_cfg(**{"train.steps": 20, **overrides})
    resolve(cfg)
    mesh = parallel.make_mesh(cfg)
    tx = optim.build_optimizer(cfg)
    model_def, state, _ = init_state(cfg, mesh, tx)
    it = make_pipeline(cfg, load_tokenizer("byte"))
    return cfg, mesh, tx, model_def, state, it


def _host(tree):
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def _same(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(x, y) for x, y in pairs)


def test_nan_gradients_skip_the_update_exactly():
    from jaxllm import parallel
    from jaxllm.train.step import make_train_step
    cfg, mesh, tx, model_def, state, it = _setup()
    with parallel.activate(cfg, mesh):
        step = jax.jit(make_train_step(cfg, model_def, tx, nan_steps=(2, 3)))
        flags = []
        for k in range(1, 5):
            before = _host(state)
            state, m = step(state, parallel.global_batch(next(it), mesh))
            m, after = _host(m), _host(state)
            flags.append((int(m["nonfinite"]), int(m["consecutive_skips"])))
            assert int(after["step"]) == k
            if k in (2, 3):  # NaN gradients: params, optimizer state, window unchanged
                assert np.isfinite(m["loss"]) and not np.isfinite(m["grad_norm"])
                assert _same(after["params"], before["params"])
                assert _same(after["opt_state"], before["opt_state"])
                assert _same(after["guard"]["losses"], before["guard"]["losses"])
                assert int(after["guard"]["accepted"]) == int(before["guard"]["accepted"])
            else:  # (lr is 0 at step 1: warmup starts at 0; the moments still move)
                assert not _same(after["opt_state"], before["opt_state"])
                assert k == 1 or not _same(after["params"], before["params"])
                assert int(after["guard"]["accepted"]) == int(before["guard"]["accepted"]) + 1
            assert all(np.isfinite(x).all() for x in jax.tree.leaves(after["params"]))
    assert flags == [(0, 0), (1, 1), (1, 2), (0, 0)]


def _reference(losses, window, k, forced=()):
    """numpy reference of the spike guard over a sequence of losses; `forced`: indices
    skipped for another reason (non-finite gradients)."""
    acc, out = [], []
    for i, x in enumerate(losses):
        w = np.asarray(acc[-window:], np.float32)
        spike = k > 0 and len(acc) >= window and x > w.mean() + k * w.std()
        out.append(not spike and i not in forced)
        if out[-1]:
            acc.append(x)
    return out


def test_spike_guard_matches_numpy_reference():
    from jaxllm.state import guard_init
    from jaxllm.train import guard
    cfg = tiny_cfg(**{"train.spike_window": 4, "train.spike_sigmas": 2.0})
    rng = np.random.default_rng(0)
    losses = 3.0 + 0.1 * rng.standard_normal(40)
    losses[[6, 7, 15, 30]] += [1.0, 0.9, 0.5, 2.0]  # spikes (two in a row at 6, 7)
    g, got, skips = guard_init(cfg), [], 0
    for x in losses:
        accept, flags, g = guard.decide(cfg, g, np.float32(x), np.float32(1.0))
        got.append(bool(accept))
        skips = 0 if accept else skips + 1
        assert int(flags["consecutive_skips"]) == skips
        assert int(flags["spike"]) == (not accept) and int(flags["nonfinite"]) == 0
    assert got == _reference(losses.astype(np.float32), 4, 2.0)
    assert not got[6] and not got[7] and not got[15] and not got[30]
    # skipped losses never enter the window: it holds the last 4 accepted losses
    kept = losses[np.asarray(got)].astype(np.float32)
    np.testing.assert_array_equal(np.sort(np.asarray(g["losses"])), np.sort(kept[-4:]))
    # non-finite loss: skipped even with the window not yet full; spike test off at k=0
    off = tiny_cfg(**{"train.spike_window": 4, "train.spike_sigmas": 0.0})
    accept, flags, _ = guard.decide(off, guard_init(off), np.float32(np.nan), np.float32(1))
    assert not bool(accept) and int(flags["nonfinite"]) == 1
    g = guard_init(off)
    for x in (1.0, 1.0, 1.0, 1.0, 100.0):
        accept, _, g = guard.decide(off, g, np.float32(x), np.float32(1.0))
        assert bool(accept)


def test_training_continues_after_nan_and_spike_skips(tmp_path):
    """In the loop: NaN gradients at step 3 and a tight spike guard (k=0.1, window 2):
    every skip is reported with its reason, exactly where the numpy reference over the
    logged losses skips, and training goes on to the last step."""
    from jaxllm.train.loop import train
    cfg = tiny_cfg(**{"train.steps": 12, "train.eval_every": 0, "train.spike_sigmas": 0.1,
                      "train.spike_window": 2, "train.max_skips": 12})
    out = train(cfg, tmp_path, nan_steps=(3,))
    assert out["step"] == 12
    rows = train_rows(tmp_path)
    assert sorted(rows) == list(range(1, 13))
    losses = np.asarray([rows[s]["loss"] for s in range(1, 13)], np.float32)
    accepted = _reference(losses, 2, 0.1, forced=(2,))
    skipped = {e["step"]: e for e in events(tmp_path, "skipped_step")}
    assert sorted(skipped) == [s for s in range(1, 13) if not accepted[s - 1]]
    assert skipped[3]["reason"] == "nonfinite"
    assert any(e["reason"] == "spike" for e in skipped.values())


_CLI_WITH_NAN = """
import functools, sys
from jaxllm.train import loop
loop.train = functools.partial(loop.train, nan_steps=range(3, 99))  # the test hook
sys.argv = ["jaxllm-train"] + sys.argv[1:]
from jaxllm.cli.train import main
main()
"""


def test_consecutive_skips_stop_cleanly_with_exit_status_3(tmp_path):
    """The real CLI (in a subprocess, NaN gradients from step 3 on): three skipped steps,
    then `error: ...` on stderr, exit status 3, a `diverged` event, and only the periodic
    checkpoints from before the streak (none inside it, none for the stop)."""
    from jaxllm.checkpoint import Checkpointer
    argv = [f"--workdir={tmp_path}",
            *flags({"train.steps": 20, "train.max_skips": 3, "checkpoint.every": 2})]
    p = subprocess.run([sys.executable, "-c", _CLI_WITH_NAN, *argv], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 3, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 consecutive skipped steps (last at step 5, nonfinite)")
    assert "train.max_skips=3" in last
    skipped = events(tmp_path, "skipped_step")
    assert [(e["step"], e["consecutive"]) for e in skipped] == [(3, 1), (4, 2), (5, 3)]
    assert all(e["reason"] == "nonfinite" for e in skipped)
    assert events(tmp_path, "diverged")[0]["step"] in (5, 6)  # read one step behind
    ck = Checkpointer(tmp_path / "checkpoints", tiny_cfg())
    assert ck.steps() == [2]  # step 4 fell inside the streak: deferred, not saved
    ck.close()
    assert [e["step"] for e in events(tmp_path, "checkpoint_deferred")] == [4]
    assert [e["step"] for e in events(tmp_path, "checkpoint")] == [2]


def test_preemption_signals_and_exit_status():
    """One process: SIGTERM/SIGINT set the flag the loop checks after each step; the exit
    status is 128 + signal; a second SIGINT interrupts at once; handlers are restored."""
    import os
    import signal

    from jaxllm.train.preempt import Preemption
    old = signal.getsignal(signal.SIGTERM)
    p = Preemption()
    try:
        assert not p.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.should_stop(2) and p.exit_status == 143
    finally:
        p.restore()
    assert signal.getsignal(signal.SIGTERM) is old
    p = Preemption()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert p.should_stop(1) and p.exit_status == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        p.restore()
