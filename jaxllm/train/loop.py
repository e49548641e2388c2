"""The training loop: resume, step, then the periodic actions (`hooks.py`: log, evaluate,
checkpoint, stop cleanly on SIGTERM, sample at the end).

Fault tolerance lives beside it: `resume.py` (compatibility, restore-or-init, data
position), `guard.py` (skipped steps, spike guard, divergence stop), `preempt.py` (signals,
exit status) and `jaxllm/checkpoint.py` (Orbax, torn checkpoints).
Metrics are read one step behind (no device stall); everything a resumed run needs to
reproduce an uninterrupted one (params, optimizer state, RNG, guard window, data iterator,
sample count) is in the checkpoint, and eval/log/checkpoint cadences are functions of the
step number, so a stopped and resumed run writes the same rows (only times differ).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys

import jax
from tqdm import tqdm

from jaxllm import optim, parallel
from jaxllm.checkpoint import Checkpointer
from jaxllm.data.pipeline import make_pipeline, split_events
from jaxllm.data.resolve import resolve
from jaxllm.run import workdir_path
from jaxllm.train import hooks, resume
from jaxllm.train import metrics as M
from jaxllm.train.guard import TrainingDiverged
from jaxllm.train.preempt import Preemption
from jaxllm.train.prefetch import DevicePrefetch
from jaxllm.train.resume import check_compatible
from jaxllm.train.saving import Saver
from jaxllm.train.step import jit_train_step, make_eval_step
from jaxllm.workdir_lock import acquire_for_run, remove_empty_tree


def eval_batches(cfg, tokenizer) -> list:
    """The fixed held-out batches every evaluation of a run uses (this process's slice)."""
    it = make_pipeline(cfg, tokenizer, "eval", jax.process_index(), jax.process_count())
    return list(itertools.islice(it, cfg.train.eval_batches))


def _with_seed(cfg, seed: int):
    c = cfg.copy_and_resolve_references()
    c.train.seed = seed
    return c


@dataclasses.dataclass
class Loop:
    """What the hooks share: the run's context and the loop's running values."""

    cfg: object
    mesh: object
    lead: bool
    writer: M.MetricsWriter
    ckpt: Checkpointer
    saver: Saver
    train_it: object
    samples: int
    bar: object = None
    metrics: dict | None = None  # the last step's metrics (device arrays)
    last: dict = dataclasses.field(default_factory=dict)  # the last train row, eval, sample
    preempted: bool = False


def train(cfg, workdir: str, *, nan_steps=()) -> dict:
    """Train per `cfg` in `workdir`, resuming from its newest good checkpoint.

    Returns the last train row (plus `eval`, `sample`); with `preempted` and `exit_status`
    when a signal stopped it. Raises TrainingDiverged after train.max_skips consecutive
    skipped steps, CheckpointError when checkpoints exist but none restores.
    `nan_steps` is a testing hook (see `make_train_step`)."""
    parallel.init_distributed(cfg)
    tokenizer = resolve(cfg)
    mesh = parallel.make_mesh(cfg)
    wd = workdir_path(workdir)
    check_compatible(cfg, wd)
    created = not wd.exists()
    lock = acquire_for_run(str(wd), jax.process_index() == 0, jax.process_count())
    tx = optim.build_optimizer(cfg, guard_nonfinite=False)  # the step guards
    stop = Preemption(check_every=cfg.train.log_every)
    ckpt, ok = Checkpointer(wd / "checkpoints", cfg), False
    try:
        out = _run(cfg, wd, tokenizer, mesh, tx, ckpt, stop, tuple(nan_steps))
        ok = True
        return out
    finally:
        try:
            stop.restore()
            ckpt.close()
        finally:
            if lock is not None:  # one run per workdir
                lock.release()
                if created and not ok:  # e.g. a data error: leave no empty workdir behind
                    remove_empty_tree(str(wd))


def _start(cfg, wd, tokenizer, mesh, tx, ckpt):
    """Restore or initialise; read the held-out batches (data errors before anything is
    written); write config.json and the `start` row. Returns (loop, model_def, state,
    shardings, step0, flops per token, held-out batches)."""
    def make_iter(seed):
        c = cfg if seed == cfg.train.seed else _with_seed(cfg, seed)
        host = make_pipeline(c, tokenizer, "train", jax.process_index(), jax.process_count())
        # device batches: the next one is transferred while the current step runs
        return DevicePrefetch(host, lambda local: parallel.global_batch(local, mesh))

    model_def, state, shardings, train_it, restored_from, samples, events = resume.start(
        cfg, mesh, tx, ckpt, make_iter)
    held_out = eval_batches(cfg, tokenizer)
    lead = jax.process_index() == 0
    if lead:
        (wd / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    writer = M.MetricsWriter(str(wd), cfg, enabled=lead)
    n_no_pos = M.param_count(state["params"], exclude_positions=True)
    fpt = M.flops_per_token(n_no_pos, cfg.model.n_layers, cfg.model.d_model, cfg.data.seq_len)
    step0 = int(jax.device_get(state["step"]))
    writer.write({"event": "start", "step": step0, "param_count": M.param_count(state["params"]),
                  "opt_state_bytes": optim.opt_state_bytes(state["opt_state"]),
                  "devices": jax.device_count(), "processes": jax.process_count(),
                  "mesh": dict(mesh.shape), "device_kind": jax.devices()[0].device_kind,
                  "flops_per_token": fpt, "resumed_from": restored_from})
    for ev in events + split_events(cfg, tokenizer):
        writer.write(ev)
    if step0 and step0 >= cfg.train.steps:
        _nothing_to_train(writer, step0, cfg.train.steps, lead)
    loop = Loop(cfg, mesh, lead, writer, ckpt, Saver(cfg, ckpt, writer.write), train_it,
                samples, last={"step": step0})
    return loop, model_def, state, shardings, step0, fpt, held_out


def _nothing_to_train(writer, step0: int, steps: int, lead: bool) -> None:
    """A rerun whose train.steps is not above the trained step: say so (event + stderr)."""
    writer.write({"event": "nothing_to_train", "step": step0, "train_steps": steps})
    if lead:
        print(f"note: the workdir is already trained to step {step0} and train.steps={steps}: "
              "no steps to run (evaluating only); raise --config.train.steps to train "
              "further", file=sys.stderr, flush=True)


def default_hooks(cfg, loop, model_def, tokenizer, eval_fn, held_out, step0, fpt,
                  stop) -> list:
    """The periodic actions, in the order they run after each step and at the end."""
    log_train = hooks.LogTrain(cfg, fpt, M.peak_flops(), loop.writer)
    return [log_train, hooks.Evaluate(cfg, eval_fn, held_out, log_train),
            hooks.Checkpoint(cfg, step0), hooks.Preempt(stop),
            hooks.Sample(cfg, model_def, tokenizer)]


def _run(cfg, wd, tokenizer, mesh, tx, ckpt, stop, nan_steps) -> dict:
    loop, model_def, state, shardings, step0, fpt, held_out = _start(
        cfg, wd, tokenizer, mesh, tx, ckpt)
    with parallel.activate(cfg, mesh):
        step_fn = jit_train_step(cfg, model_def, tx, shardings, mesh, nan_steps=nan_steps)
        eval_fn = jax.jit(make_eval_step(cfg, model_def),
                          in_shardings=(shardings["params"], parallel.batch_sharding(mesh)))
    actions = default_hooks(cfg, loop, model_def, tokenizer, eval_fn, held_out, step0, fpt,
                            stop)
    loop.bar = tqdm(total=cfg.train.steps, initial=step0, desc="train", unit="step",
                    disable=not (loop.lead and cfg.log.progress), dynamic_ncols=True)
    step = step0
    try:
        with parallel.activate(cfg, mesh):
            while step < cfg.train.steps and not loop.preempted:
                state, loop.metrics = step_fn(state, next(loop.train_it))
                if step == step0:  # the first call compiled synchronously: not in tokens/s
                    actions[0].started()
                step, loop.samples = step + 1, loop.samples + cfg.train.batch_size
                for h in actions:
                    loop.preempted = bool(h.on_step(loop, step, state)) or loop.preempted
            actions[0].on_end(loop, step, state)
    except TrainingDiverged as e:
        loop.bar.close()
        loop.saver.report(wait=True)
        loop.writer.write({"event": "diverged", "step": step, "message": str(e)})
        loop.writer.close()
        raise
    loop.bar.close()
    for h in sorted(actions[1:], key=lambda h: h.end_rank):
        h.on_end(loop, step, state)
    loop.saver.report(wait=True)  # `checkpoint` events of the saves still in flight
    loop.writer.close()
    if loop.preempted:
        return {**loop.last, "step": step, "preempted": True, "exit_status": stop.exit_status}
    loop.last["step"] = step
    return loop.last
