"""Checkpointer: retention, partial saves, torn/corrupt newest step -> fallback with a warning,
quarantine instead of deletion, no silent restart (issue 6, acceptance points 1 and 5)."""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures import events, rows, tiny_cfg, train_rows, use_jit_cache

_jit_cache = pytest.fixture(scope="module", autouse=True)(use_jit_cache)


def _iter():
    return iter(grain.MapDataset.range(1000).batch(2).to_iter_dataset())


def _state(s):
    return {"a": jnp.arange(64.0) + s, "step": jnp.int32(s)}


ABSTRACT = {"a": jax.ShapeDtypeStruct((64,), jnp.float32),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}


def _saved(directory, steps, keep=5, permanent=0, async_save=True):
    from jaxllm.checkpoint import Checkpointer
    cfg = tiny_cfg(**{"checkpoint.keep": keep, "checkpoint.permanent_every": permanent,
                      "checkpoint.async_save": async_save})
    ck, it = Checkpointer(directory, cfg), _iter()
    for s in steps:
        next(it)
        assert ck.save(s, _state(s), it, {"step": s})
    assert not ck.save(steps[-1], _state(0), it, {})  # the same step twice: a no-op
    ck.close()
    return cfg


def _digest(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(root).rglob("*")) if p.is_file()}


def test_retention_keeps_newest_and_permanent(tmp_path):
    from jaxllm.checkpoint import Checkpointer
    cfg = _saved(tmp_path, list(range(1, 11)), keep=2, permanent=4)
    ck = Checkpointer(tmp_path, cfg)
    assert ck.steps() == [4, 8, 9, 10]
    r = ck.restore(ABSTRACT, it := _iter())
    assert r.step == 10 and r.data_restored and not r.bad_steps
    np.testing.assert_array_equal(np.asarray(r.state["a"]), np.arange(64.0) + 10)
    np.testing.assert_array_equal(next(it), [20, 21])  # 10 batches were read at the save
    assert r.meta == {"step": 10}
    ck.close()


def test_partial_save_never_counts(tmp_path):
    from jaxllm.checkpoint import Checkpointer
    cfg = _saved(tmp_path, [1, 2], async_save=False)
    partial = tmp_path / "3.orbax-checkpoint-tmp-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text("{")
    ck = Checkpointer(tmp_path, cfg)
    assert ck.steps() == [1, 2]
    assert ck.restore(ABSTRACT, _iter()).step == 2
    ck.close()


def _largest(step_dir, sub="state"):
    files = [p for p in (step_dir / sub).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


DAMAGE = {
    "delete state/_METADATA": lambda d: (d / "state" / "_METADATA").unlink(),
    "delete data_iter json": lambda d: (d / "data_iter" / "process_0-of-1.json").unlink(),
    "truncate largest array file": lambda d: os.truncate(_largest(d), 10),
    "truncate meta": lambda d: os.truncate(d / "meta" / "metadata", 3),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_torn_newest_falls_back_and_is_quarantined(tmp_path, caplog, damage):
    from jaxllm.checkpoint import Checkpointer
    cfg = _saved(tmp_path, [1, 2, 3], keep=3)
    DAMAGE[damage](tmp_path / "3")
    ck = Checkpointer(tmp_path, cfg)
    with caplog.at_level(logging.WARNING, logger="jaxllm"):
        r = ck.restore(ABSTRACT, _iter())
    assert r.step == 2 and int(r.state["step"]) == 2
    assert [s for s, _, _ in r.bad_steps] == [3]
    assert "checkpoint step 3" in caplog.text and "unreadable" in caplog.text
    moved = pathlib.Path(r.bad_steps[0][2])
    assert moved.parent == tmp_path / "corrupt" and moved.name.startswith("3-")
    assert (moved / "meta").is_dir()  # moved aside whole, not deleted
    # good steps survive the next saves: the bad step no longer counts among the newest
    # `keep`, and the run can write step 3 again
    assert ck.steps() == [1, 2]
    it = _iter()
    for s in (3, 4):
        assert ck.save(s, _state(s), it, {"step": s})
    ck.wait()
    assert ck.steps() == [2, 3, 4]
    ck.close()


def test_nothing_restorable_is_an_error_and_moves_nothing(tmp_path):
    from jaxllm.checkpoint import Checkpointer, CheckpointError
    from jaxllm.config import ConfigError
    cfg = _saved(tmp_path, [1, 2])
    for s in (1, 2):
        (tmp_path / str(s) / "state" / "_METADATA").unlink()
    before = _digest(tmp_path)
    ck = Checkpointer(tmp_path, cfg)
    with pytest.raises(CheckpointError, match=r"no checkpoint could be restored.*step 2.*step 1"):
        ck.restore(ABSTRACT, _iter())
    assert issubclass(CheckpointError, ConfigError)  # CLI: `error: ...`, exit 2
    ck.close()
    assert _digest(tmp_path) == before


def test_train_resumes_from_previous_good_step(tmp_path, caplog):
    """A run whose newest checkpoint is torn resumes from the one before, with a warning,
    and replays the lost steps bitwise; with every step torn it stops with the error
    contract and leaves the workdir as it was."""
    from jaxllm.checkpoint import CheckpointError
    from jaxllm.train.loop import train
    cfg = tiny_cfg(**{"train.steps": 8, "checkpoint.every": 4, "train.eval_every": 0})
    train(cfg, tmp_path)
    first = train_rows(tmp_path)
    os.truncate(_largest(tmp_path / "checkpoints" / "8"), 100)
    with caplog.at_level(logging.WARNING, logger="jaxllm"):
        out = train(cfg, tmp_path)
    assert out["step"] == 8
    assert "checkpoint step 8" in caplog.text
    restored = events(tmp_path, "restored")[-1]
    assert restored["step"] == 4 and restored["skipped_unreadable"][0]["step"] == 8
    assert events(tmp_path, "start")[-1]["step"] == 4
    steps = [r["step"] for r in rows(tmp_path) if r.get("split") == "train"]
    assert steps == [*range(1, 9), *range(5, 9)]
    redo = train_rows(tmp_path)
    for s in range(5, 9):  # the replayed steps equal the first run's, bitwise
        assert redo[s]["loss"] == first[s]["loss"]
        assert redo[s]["grad_norm"] == first[s]["grad_norm"]

    for s in os.listdir(tmp_path / "checkpoints"):
        if s.isdigit():
            (tmp_path / "checkpoints" / s / "state" / "_METADATA").unlink()
    before = _digest(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint could be restored"):
        train(tiny_cfg(**{"train.steps": 12, "checkpoint.every": 4}), tmp_path)
    assert _digest(tmp_path) == before
