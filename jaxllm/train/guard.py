"""Step guards: skip non-finite and loss-spike updates inside the jitted step.

A step whose loss or gradient norm is not finite, whose update would blow the parameters up
(`exploded`: non-finite, or larger than `train.max_update_ratio` times their norm), or (with
`train.spike_sigmas` k > 0) whose loss exceeds mean + k·std of the last `train.spike_window`
accepted losses, is skipped: the train step keeps the old parameters and optimizer state
(`jnp.where` on the `accept` flag), so a skipped update is never applied. The window lives
in the train state (`state["guard"]`, laid out by `jaxllm.state.guard_shapes`: a ring of
accepted losses, the accepted count and the consecutive-skip count), so skipped losses never
enter its statistics and a resumed run continues with the same window. The spike test is
active once the window is full (like the loss-spike skipping of PaLM, Chowdhery et al. 2022,
§5.1, but automatic).

On the host, `SkipTracker` turns each step's flags into `skipped_step` events and stops the
run with `TrainingDiverged` (exit status 3) after `train.max_skips` consecutive skips.
"""

from __future__ import annotations

import jax.numpy as jnp

EXIT_DIVERGED = 3  # CLI exit status after train.max_skips consecutive skipped steps


class TrainingDiverged(RuntimeError):
    """Too many consecutive skipped (non-finite or spiking) steps."""

    exit_status = EXIT_DIVERGED


def exploded(cfg, update_norm, param_norm, new_param_norm):
    """An update that would blow the parameters up: non-finite parameters after it, or
    (with `train.max_update_ratio` r > 0) ||update|| > r * ||params||. A healthy step moves
    the parameters by a small fraction of their norm (about lr * sqrt(n) / ||params||, well
    below 1 for Adam-like optimizers); a huge learning rate moves them by many times their
    norm while the loss can stay finite, so the loss guard alone lets it through."""
    bad = ~jnp.isfinite(new_param_norm) | ~jnp.isfinite(update_norm)
    r = cfg.train.max_update_ratio
    if r > 0:
        bad = bad | ~(update_norm <= r * param_norm)
    return bad


def decide(cfg, guard: dict, loss, grad_norm, blown=None):
    """Accept this step's update? Returns (accept, flags, new_guard); jit-safe.

    `blown`: the update would explode the parameters (`exploded`). flags: `nonfinite`,
    `spike` and `exploded` (int32 0/1) and `consecutive_skips` after this step.
    """
    k, window = cfg.train.spike_sigmas, cfg.train.spike_window
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    blown = finite & (jnp.zeros((), bool) if blown is None else blown)
    losses, accepted = guard["losses"], guard["accepted"]
    spike = jnp.zeros((), bool)
    if k > 0:
        mean, std = losses.mean(), losses.std()
        spike = finite & (accepted >= window) & (loss > mean + k * std)
    accept = finite & ~spike & ~blown
    ring = losses.at[accepted % window].set(jnp.where(finite, loss, 0.0).astype(jnp.float32))
    skips = jnp.where(accept, 0, guard["skips"] + 1)
    new = {"losses": jnp.where(accept, ring, losses),
           "accepted": accepted + accept.astype(jnp.int32), "skips": skips}
    flags = {"nonfinite": (~finite).astype(jnp.int32), "spike": spike.astype(jnp.int32),
             "exploded": blown.astype(jnp.int32), "consecutive_skips": skips}
    return accept, flags, new


GUARD_KEYS = ("nonfinite", "spike", "exploded", "consecutive_skips", "finite")


class SkipTracker:
    """Host side: `skipped_step` events and the consecutive-skip stop (one step behind)."""

    def __init__(self, cfg, write):
        self.max_skips, self.write = cfg.train.max_skips, write

    def __call__(self, step: int, m: dict) -> None:
        reason = next((r for r in ("nonfinite", "exploded", "spike") if m.get(r)), None)
        if reason is None:
            return
        n = int(m["consecutive_skips"])
        self.write({"event": "skipped_step", "step": step, "reason": reason,
                    "loss": m["loss"], "grad_norm": m["grad_norm"],
                    "update_norm": m.get("update_norm"), "param_norm": m.get("param_norm"),
                    "consecutive": n})
        if n >= self.max_skips:
            raise TrainingDiverged(
                f"{n} consecutive skipped steps (last at step {step}, {reason}); stopping "
                f"(train.max_skips={self.max_skips}). No checkpoint was written during the "
                "skips, so the newest one predates them; lower optim.lr or raise "
                "optim.warmup_steps (or check the data) and rerun: it resumes from there")
