"""Orbax checkpoints: train state + data-iterator state + resolved config, one step a folder.

Layout: `DIR/<step>/{state, data_iter, meta}` (Orbax CheckpointManager items): `state` is the
train state (params, optimizer state, step, RNG, step-guard window) as sharded arrays,
`data_iter` the grain iterator state (one JSON per process), `meta` a JSON dict with the
resolved config and the data position (`process_count`, `global_batch`, `samples_seen`).
`DIR` may be any path Orbax/etils supports (local, gs://...).

- Saves are asynchronous (`checkpoint.async_save`): the call returns once the arrays are
  copied off the device; a step counts only once Orbax has finalized it (unfinished saves
  live in `<step>.orbax-checkpoint-tmp-*` folders and are never listed or restored), and
  `finished()` reports a step only then (the loop's `checkpoint` events).
- Retention: the newest `checkpoint.keep` steps, plus every `checkpoint.permanent_every`-th
  step forever.
- Restoring walks from the newest step down: an unreadable step (a file missing or
  truncated) is reported with a warning and the previous one is tried. Once an older step
  restores, the unreadable newer ones are moved to `DIR/corrupt/<step>-<time>` (never
  deleted), so they can neither collide with the step numbers the run writes next nor
  count among the newest `keep` (which would let Orbax garbage-collect good steps). When
  no step restores, `CheckpointError` is raised and nothing is moved or written.
- The restore target carries the shardings of the current mesh, so a checkpoint restores
  onto any mesh shape or device count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxllm.config import ConfigError, get_key

log = logging.getLogger("jaxllm")


class CheckpointError(ConfigError):
    """No checkpoint in the directory could be restored (CLI: `error: ...`, exit 2)."""


# How storage failures read once Orbax/TensorStore have wrapped them (ValueError/RuntimeError)
_IO_FAILURES = ("RESOURCE_EXHAUSTED", "No space left", "PERMISSION_DENIED",
                "Permission denied", "Read-only file system", "Disk quota")


class CheckpointWriteError(ConfigError):
    """A save failed for lack of space or permission (CLI: `error: ...`, exit 2)."""


@dataclasses.dataclass
class Restored:
    step: int
    state: dict
    meta: dict
    data_restored: bool  # the iterator state was restored (else: the caller repositions)
    bad_steps: list  # [(step, reason, moved_to)] newer steps that could not be read


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


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
        self.last_saved = None
        self.pending: dict[int, float] = {}  # started saves -> seconds the call blocked

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iter, meta: dict) -> bool:
        """Start saving `step` (async); False when this step is already saved."""
        if step == self.last_saved or step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta))
        t = time.perf_counter()
        with self._storage():  # also reports a failure of the previous async save
            self.manager.save(step, args=args, force=True)
        self.last_saved = step
        self.pending[step] = time.perf_counter() - t
        return True

    def finished(self, wait: bool = False) -> list[tuple[int, float]]:
        """Started saves that Orbax has finalized since the last call, as (step, seconds
        the save call blocked); with `wait`, wait for the ones in flight first. A save that
        failed never appears."""
        if wait:
            self.wait()
        # Orbax lists a step in all_steps() from the start of its save; finalized means
        # DIR/<step> renamed from its temporary name (or, on GCS, with commit_success.txt)
        done = {s for s in self.pending if (self.directory / str(s)).exists()
                and ocp.utils.is_checkpoint_finalized(self.directory / str(s))}
        out = [(s, t) for s, t in sorted(self.pending.items()) if s in done]
        if wait or not self.manager.is_saving_in_progress():
            self.pending = {}  # what is not listed now failed
        else:
            self.pending = {s: t for s, t in self.pending.items() if s not in done}
        return out

    def read_meta(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def _newest_readable(self, candidates, read, hint: str = ""):
        """(step, read(step), [(bad step, reason)]): the first of `candidates` (newest
        first) that `read` restores; an unreadable step is reported and the next tried."""
        bad = []
        for s in candidates:
            try:
                return s, read(s), bad
            except Exception as e:  # noqa: BLE001 - a torn step: warn, try the previous one
                log.warning("checkpoint step %d in %s is unreadable (%s); trying an older one",
                            s, self.directory, _reason(e))
                bad.append((s, _reason(e)))
        raise CheckpointError(
            f"{self.directory}: no checkpoint could be restored ("
            + "; ".join(f"step {s}: {m}" for s, m in bad) + ")" + hint)

    def restore(self, abstract_state, data_iter, data_ok=lambda meta: True) -> Restored:
        """Restore the newest readable step. The iterator state is restored into `data_iter`
        only where `data_ok(meta)` (same data layout); otherwise the caller repositions it.
        Unreadable newer steps are moved aside once an older one restores."""
        def read(s):
            meta = self.read_meta(s)
            use_data = bool(data_ok(meta))
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if use_data:
                items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
            return meta, use_data, self.manager.restore(s, args=ocp.args.Composite(**items))

        s, (meta, use_data, out), bad = self._newest_readable(
            reversed(self.steps()), read, "; nothing was changed. Move the checkpoints away "
            "to start from scratch, or use another --workdir")
        moved = self._quarantine([b for b, _ in bad]) if bad else {}
        return Restored(s, out["state"], meta, use_data,
                        [(b, r, moved.get(b)) for b, r in bad])

    def restore_params(self, abstract_params, step: int | None = None):
        """(step, params) of `step` or the newest readable step: only the parameters are
        read (no optimizer state, no data iterator), onto the shardings `abstract_params`
        carries. Read-only: unreadable steps are reported, never moved."""
        target = {"params": abstract_params}
        args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
        candidates = [step] if step is not None else list(reversed(self.steps()))
        s, out, _ = self._newest_readable(
            candidates, lambda s: self.manager.restore(s, args=args))
        return s, out["state"]["params"]

    def _quarantine(self, steps: list[int]) -> dict:
        """Move unreadable steps to DIR/corrupt/ (process 0), out of Orbax's view."""
        moved = {}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for s in steps:
            dest = self.directory / "corrupt" / f"{s}-{stamp}"
            moved[s] = str(dest)
            if jax.process_index() == 0:
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    (self.directory / str(s)).rename(dest)
                except OSError as e:
                    raise CheckpointError(
                        f"{self.directory / str(s)}: unreadable checkpoint could not be moved "
                        f"aside ({e}); move or delete it by hand, then rerun") from None
                log.warning("moved unreadable checkpoint step %d to %s", s, dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxllm_checkpoint_quarantine")
        self.manager.reload()
        return moved

    @contextlib.contextmanager
    def _storage(self):
        """Turn a save that failed for lack of space or permission into CheckpointWriteError
        (what to do, and which finished steps are kept); anything else propagates."""
        try:
            yield
        except Exception as e:
            text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            if not (isinstance(e, OSError) or any(m in str(e) for m in _IO_FAILURES)):
                raise
            kept = ", ".join(map(str, self.steps())) or "none"
            raise CheckpointWriteError(
                f"checkpoint could not be written ({self.directory}: {text}): free "
                f"disk space or fix permissions, then rerun the same command; finished "
                f"checkpoints (steps {kept}) are kept and the run resumes from the newest"
                ) from None

    def wait(self) -> None:
        with self._storage():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


# what a checkpoint's `meta` records of the data layout; resuming with all of them unchanged
# restores the data iterator exactly (`train/resume.py`)
LAYOUT_KEYS = ("data.seq_len", "data.packing", "data.path", "data.mixture")


def data_meta(cfg, samples_seen: int) -> dict:
    """What a checkpoint records about the data position, besides the iterator state."""
    return {"process_count": jax.process_count(), "global_batch": cfg.train.batch_size,
            "samples_seen": int(samples_seen),
            **{k: get_key(cfg, k) for k in LAYOUT_KEYS}}
