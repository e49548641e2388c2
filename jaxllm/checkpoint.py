"""Orbax checkpoints: train state + data-iterator state + resolved config, one step a folder.

Saves are asynchronous; a step counts only once Orbax has finalized it (unfinished saves
live in temporary folders and are never listed). Restoring walks from the newest step
down: a torn or corrupt step is reported and skipped, never deleted, and a run never
silently restarts from step 0 while any checkpoint exists.
"""

from __future__ import annotations

import json
import logging

import grain
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger("jaxllm")


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored."""


class Checkpointer:
    def __init__(self, directory, cfg):
        ck = cfg.checkpoint
        policy = ocp.checkpoint_managers.LatestN(ck.keep)
        if ck.permanent_every:
            policy = ocp.checkpoint_managers.AnyPreservationPolicy(
                [policy, ocp.checkpoint_managers.EveryNSteps(ck.permanent_every)])
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=ck.async_save, preservation_policy=policy,
            create=True)
        self.directory = epath.Path(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data_iter", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iter, meta: dict, force: bool = True) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state, data_iter, step: int | None = None):
        """Restore the newest good step (or `step`); returns (step, state, meta)."""
        candidates = [step] if step is not None else list(reversed(self.steps()))
        errors = []
        for s in candidates:
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data_iter=grain.checkpoint.CheckpointRestore(data_iter),
                    meta=ocp.args.JsonRestore()))
                return s, out["state"], dict(out["meta"])
            except Exception as e:  # a torn step: report it, fall back to the previous one
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.warning("checkpoint step %d in %s is unreadable (%s); trying an older one",
                            s, self.directory, msg)
                errors.append((s, msg))
        raise CheckpointError(
            f"no checkpoint in {self.directory} could be restored: "
            + "; ".join(f"step {s}: {m}" for s, m in errors))

    def read_meta(self, step: int) -> dict:
        path = self.directory / str(step) / "meta" / "metadata"
        return json.loads(path.read_text())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
