"""The loop's checkpoint saves: only healthy states, and `checkpoint` events only for saves
that finished.

- A save is deferred (a `checkpoint_deferred` event instead) while the run is inside a
  skip streak (`state["guard"]["skips"] > 0`, see guard.py) or when the parameters are
  not finite. Skipped updates are never applied, so every saved step is a state the guard
  accepted: rotation (`checkpoint.keep`) only ever replaces good checkpoints with newer
  good ones, and the newest checkpoint from before a divergence is still there when the
  run stops with exit status 3.
- Saves are asynchronous; a `checkpoint` event is written once Orbax has finalized the
  step (`Checkpointer.finished`), so metrics.jsonl never names a step that is not on disk.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from jaxllm.checkpoint import data_meta


class Saver:
    def __init__(self, cfg, ckpt, write):
        self.cfg, self.ckpt, self.write = cfg, ckpt, write

    def healthy(self, step: int, state) -> bool:
        skips = int(jax.device_get(state["guard"]["skips"]))
        norm = float(jax.device_get(optax.tree.norm(state["params"])))
        if skips or not np.isfinite(norm):
            self.write({"event": "checkpoint_deferred", "step": step,
                        "consecutive_skips": skips, "param_norm": norm,
                        "reason": "inside a skip streak" if skips else "non-finite parameters"})
            return False
        return True

    def save(self, step: int, state, data_iter, samples: int) -> None:
        """Start saving `step` (asynchronously) if the state is healthy."""
        if not self.healthy(step, state):
            return
        meta = {"config": self.cfg.to_json_best_effort(), **data_meta(self.cfg, samples)}
        try:
            self.ckpt.save(step, state, data_iter, meta)
        finally:  # also when an earlier async save failed: report the ones that finished
            self.report()

    def report(self, wait: bool = False) -> None:
        """`checkpoint` events for the saves finished so far (all of them with `wait`)."""
        for step, seconds in self.ckpt.finished(wait):
            self.write({"event": "checkpoint", "step": step, "save_s": seconds})
