"""train/prefetch.py: device prefetch order, look-ahead, checkpointed data position, and
exact resume through it."""

from __future__ import annotations

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.train.prefetch import DevicePrefetch
from tests.fixtures import train_rows


def _host_iter(n=50):
    ds = grain.MapDataset.range(n).map(lambda i: {"x": np.full((2, 3), i, np.int32)})
    return iter(ds.to_iter_dataset())


def test_device_prefetch_order_lookahead_and_checkpoint_state(tmp_path):
    puts = []

    def put(local):
        puts.append(int(local["x"][0, 0]))
        return {k: jnp.asarray(x) for k, x in local.items()}

    it = DevicePrefetch(_host_iter(), put, size=1)
    got = [int(next(it)["x"][0, 0]) for _ in range(3)]
    assert got == [0, 1, 2] and puts == [0, 1, 2, 3]  # batch 3 already on device
    assert isinstance(next(iter([it])), grain.DatasetIterator)
    # checkpoint through grain's Orbax handler: the saved state is "after batch 2"
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(tmp_path, args=grain.checkpoint.CheckpointSave(it))
    fresh = DevicePrefetch(_host_iter(), put, size=2)
    handler.restore(tmp_path, args=grain.checkpoint.CheckpointRestore(fresh))
    assert [int(next(fresh)["x"][0, 0]) for _ in range(3)] == [3, 4, 5]
    plain = _host_iter()
    plain.set_state(it.get_state())
    assert int(next(plain)["x"][0, 0]) == 3
    # set_state drops what was queued ahead; size 0 transfers on demand only
    it.set_state(fresh.get_state())
    assert int(next(it)["x"][0, 0]) == 6
    puts.clear()
    lazy = DevicePrefetch(_host_iter(4), put, size=0)
    assert [int(b["x"][0, 0]) for b in lazy] == [0, 1, 2, 3] and puts == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="prefetch size must be >= 0"):
        DevicePrefetch(_host_iter(), put, size=-1)


def test_resume_through_device_prefetch_matches_uninterrupted(tmp_path):
    """The loop prefetches the next batch to the device; a checkpoint still records the data
    position of the last batch trained on, so stop + resume gives the same losses."""
    from tests.fixtures import tiny_model_cfg

    from jaxllm.train.loop import train

    def cfg(steps):
        c = tiny_model_cfg()
        c.model.vocab_size = 0
        c.optim.schedule = "constant"  # the lr must not depend on train.steps here
        c.train.update(steps=steps, log_every=1, eval_every=0)
        c.checkpoint.every = 0
        return c

    def losses(wd):
        return {s: r["loss"] for s, r in train_rows(wd).items()}

    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg(8), str(a))
    train(cfg(4), str(b))
    train(cfg(8), str(b))
    la, lb = losses(a), losses(b)
    assert sorted(lb) == list(range(1, 9))
    assert [la[s] for s in range(1, 9)] == [lb[s] for s in range(1, 9)]
