"""Device prefetch: the next batch is put on the devices while the current step runs.

`DevicePrefetch(it, put)` wraps the host iterator of per-process batches and hands out
device (global, sharded) batches, keeping `size` of them transferred ahead (as
`flax.jax_utils.prefetch_to_device` does). It is a grain `DatasetIterator`, so Orbax saves
it in place of the host iterator, and it stays exact across a checkpoint: `get_state()` is
the host iterator's state just after the last batch handed out, not after the ones queued
ahead, and `set_state()` drops the queue.
"""

from __future__ import annotations

import collections
import copy

import grain


class DevicePrefetch(grain.DatasetIterator):
    def __init__(self, inner, put, size: int = 1):
        super().__init__(inner if isinstance(inner, grain.DatasetIterator) else ())
        if size < 0:
            raise ValueError(f"prefetch size must be >= 0, got {size}")
        self._inner, self._put, self._size = inner, put, size
        self._queue = collections.deque()  # (host state before the batch, device batch)

    def _pull(self) -> bool:
        before = copy.deepcopy(self._inner.get_state())
        try:
            local = next(self._inner)
        except StopIteration:
            return False
        self._queue.append((before, self._put(local)))
        return True

    def __next__(self):
        if not self._queue and not self._pull():
            raise StopIteration
        _, batch = self._queue.popleft()
        while len(self._queue) < self._size and self._pull():
            pass
        return batch

    def get_state(self):
        return copy.deepcopy(self._queue[0][0]) if self._queue else self._inner.get_state()

    def set_state(self, state) -> None:
        self._queue.clear()
        self._inner.set_state(state)
