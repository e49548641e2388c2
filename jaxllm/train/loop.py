"""The training loop: resume, step, log, evaluate, checkpoint, stop cleanly on SIGTERM.

Fault tolerance lives beside it: `resume.py` (compatibility, restore-or-init, data
position), `guard.py` (skipped steps, spike guard, divergence stop), `preempt.py` (signals,
exit status) and `jaxllm/checkpoint.py` (Orbax, torn checkpoints).
Metrics are read one step behind (no device stall); everything a resumed run needs to
reproduce an uninterrupted one (params, optimizer state, RNG, guard window, data iterator,
sample count) is in the checkpoint, and eval/log/checkpoint cadences are functions of the
step number, so a stopped and resumed run writes the same rows (only times differ).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import time

import jax
from etils import epath
from tqdm import tqdm

from jaxllm import optim, parallel
from jaxllm.checkpoint import Checkpointer
from jaxllm.config import ConfigError, padded_vocab, validate
from jaxllm.data.pipeline import make_pipeline, split_events
from jaxllm.data.tokenizers import load_tokenizer
from jaxllm.eval.sample import continuations
from jaxllm.train import metrics as M
from jaxllm.train import resume
from jaxllm.train.guard import GUARD_KEYS, SkipTracker, TrainingDiverged
from jaxllm.train.preempt import Preemption
from jaxllm.train.resume import check_compatible
from jaxllm.train.prefetch import DevicePrefetch
from jaxllm.train.saving import Saver
from jaxllm.workdir_lock import acquire_for_run, remove_empty_tree
from jaxllm.train.step import bits_per_byte, jit_train_step, make_eval_step

log = logging.getLogger("jaxllm")


def resolve(cfg):
    """Fill derived values (vocab size and the ids in use from the tokenizer); validate;
    return the tokenizer."""
    validate(cfg)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("data.tokenizer") else
                          f"data.tokenizer: {msg}") from None
    if not cfg.model.vocab_size:
        cfg.model.vocab_size = padded_vocab(tokenizer.vocab_size)
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size}")
    if not cfg.model.vocab_used:
        cfg.model.vocab_used = tokenizer.vocab_size
    elif not tokenizer.vocab_size <= cfg.model.vocab_used <= cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_used: {cfg.model.vocab_used} must be in [the "
                          f"tokenizer's {tokenizer.vocab_size}, model.vocab_size "
                          f"{cfg.model.vocab_size}]")
    return tokenizer


def eval_batches(cfg, tokenizer) -> list:
    """The fixed held-out batches every evaluation of a run uses (this process's slice)."""
    it = make_pipeline(cfg, tokenizer, "eval", jax.process_index(), jax.process_count())
    return list(itertools.islice(it, cfg.train.eval_batches))


def _eval(eval_fn, params, batches, mesh):
    tot = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for local in batches:
        out = jax.device_get(eval_fn(params, parallel.global_batch(local, mesh)))
        for k in tot:
            tot[k] += float(out[k])
    loss = tot["nll"] / max(tot["tokens"], 1)
    return {"loss": loss, "bpb": bits_per_byte(tot["nll"], tot["bytes"]),
            "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tot["tokens"]}


def _abs(workdir) -> epath.Path:
    """The workdir as an epath: local paths made absolute, gs:// and the like kept."""
    return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))


def _with_seed(cfg, seed: int):
    c = cfg.copy_and_resolve_references()
    c.train.seed = seed
    return c


def train(cfg, workdir: str, *, nan_steps=()) -> dict:
    """Train per `cfg` in `workdir`, resuming from its newest good checkpoint.

    Returns the last train row (plus `eval`, `sample`); with `preempted` and `exit_status`
    when a signal stopped it. Raises TrainingDiverged after train.max_skips consecutive
    skipped steps, CheckpointError when checkpoints exist but none restores.
    `nan_steps` is a testing hook (see `make_train_step`)."""
    parallel.init_distributed(cfg)
    tokenizer = resolve(cfg)
    mesh = parallel.make_mesh(cfg)
    lead = jax.process_index() == 0
    wd = _abs(workdir)
    check_compatible(cfg, wd)
    created = not wd.exists()
    lock = acquire_for_run(str(wd), lead, jax.process_count())  # one run per workdir
    tx = optim.build_optimizer(cfg, guard_nonfinite=False)  # the step guards
    stop = Preemption(check_every=cfg.train.log_every)
    ckpt, ok = Checkpointer(wd / "checkpoints", cfg), False
    try:
        out = _run(cfg, wd, tokenizer, mesh, tx, ckpt, stop, lead, tuple(nan_steps))
        ok = True
        return out
    finally:
        try:
            stop.restore()
            ckpt.close()
        finally:
            if lock is not None:
                lock.release()
                if created and not ok:  # e.g. a data error: leave no empty workdir behind
                    remove_empty_tree(str(wd))


def _run(cfg, wd, tokenizer, mesh, tx, ckpt, stop, lead, nan_steps) -> dict:
    def make_iter(seed):
        c = cfg if seed == cfg.train.seed else _with_seed(cfg, seed)
        host = make_pipeline(c, tokenizer, "train", jax.process_index(), jax.process_count())
        # device batches: the next one is transferred while the current step runs
        return DevicePrefetch(host, lambda local: parallel.global_batch(local, mesh))

    model_def, state, shardings, train_it, restored_from, samples, events = resume.start(
        cfg, mesh, tx, ckpt, make_iter)
    held_out = eval_batches(cfg, tokenizer)  # data errors before anything is written
    if lead:
        (wd / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    writer = M.MetricsWriter(str(wd), cfg, enabled=lead)
    n_params = M.param_count(state["params"])
    n_no_pos = M.param_count(state["params"], exclude_positions=True)
    fpt = M.flops_per_token(n_no_pos, cfg.model.n_layers, cfg.model.d_model, cfg.data.seq_len)
    peak = M.peak_flops()
    step0 = int(jax.device_get(state["step"]))
    writer.write({"event": "start", "step": step0, "param_count": n_params,
                  "opt_state_bytes": optim.opt_state_bytes(state["opt_state"]),
                  "devices": jax.device_count(), "processes": jax.process_count(),
                  "mesh": dict(mesh.shape), "device_kind": jax.devices()[0].device_kind,
                  "flops_per_token": fpt, "resumed_from": restored_from})
    for ev in events + split_events(cfg, tokenizer):
        writer.write(ev)
    if step0 and step0 >= cfg.train.steps:
        _nothing_to_train(writer, step0, cfg.train.steps, lead)
    saver = Saver(cfg, ckpt, writer.write)

    batch_sh = parallel.batch_sharding(mesh)
    with parallel.activate(cfg, mesh):
        step_fn = jit_train_step(cfg, model_def, tx, shardings, mesh, nan_steps=nan_steps)
        eval_fn = jax.jit(make_eval_step(cfg, model_def),
                          in_shardings=(shardings["params"], batch_sh))
    total, gb, seq = cfg.train.steps, cfg.train.batch_size, cfg.data.seq_len
    bar = tqdm(total=total, initial=step0, disable=not (lead and cfg.log.progress),
               desc="train", unit="step", dynamic_ncols=True)
    last = {"step": step0}
    track = SkipTracker(cfg, writer.write)
    window_t, window_n, pending = time.perf_counter(), 0, None

    def flush(pending):
        """Read a step's scalars one step late (no device stall); skip events, stop."""
        step, m = pending
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        track(step, m)
        return m

    step, preempted = step0, False
    try:
        with parallel.activate(cfg, mesh):
            while step < total:
                state, m = step_fn(state, next(train_it))
                if step == step0:  # the first call compiled synchronously: not in tokens/s
                    window_t = time.perf_counter()
                step, samples, window_n = step + 1, samples + gb, window_n + 1
                if pending is not None:
                    flush(pending)
                pending = (step, m)
                if step % cfg.train.log_every == 0 or step == total:
                    mv, pending = flush(pending), None
                    tps = window_n * gb * seq / (time.perf_counter() - window_t)
                    row = {"split": "train", "step": step, "loss": mv["loss"], "lr": mv["lr"],
                           "grad_norm": mv["grad_norm"], "tokens_per_s": tps,
                           "tokens_per_s_per_device": tps / jax.device_count(),
                           "mfu": M.mfu(tps / jax.device_count(), fpt, peak),
                           "tokens_seen": samples * seq,
                           **{k: v for k, v in mv.items() if k not in GUARD_KEYS
                              and k not in ("loss", "lr", "grad_norm", "tokens")}}
                    writer.write(row)
                    last.update(row)
                    bar.set_postfix(loss=f"{mv['loss']:.3f}", tok_s=f"{tps:,.0f}")
                    window_t, window_n = time.perf_counter(), 0
                bar.update(1)
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total:
                    t_eval = time.perf_counter()
                    ev = _eval(eval_fn, state["params"], held_out, mesh)
                    writer.write({"split": "eval", "step": step, **ev})
                    bar.write(f"step {step}: eval loss {ev['loss']:.4f}  bpb {ev['bpb']:.4f}")
                    window_t += time.perf_counter() - t_eval  # eval time is not train time
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != total:
                    saver.save(step, state, train_it, samples)
                if stop.should_stop(step):
                    preempted = True
                    break
            if pending is not None:
                flush(pending)
    except TrainingDiverged as e:
        bar.close()
        saver.report(wait=True)
        writer.write({"event": "diverged", "step": step, "message": str(e)})
        writer.close()
        raise
    bar.close()
    if step > step0:
        saver.save(step, state, train_it, samples)
    if preempted:
        saver.report(wait=True)
        writer.write({"event": "preempted", "step": step, "signal": stop.signum,
                      "exit_status": stop.exit_status})
        writer.close()
        return {**last, "step": step, "preempted": True, "exit_status": stop.exit_status}
    with parallel.activate(cfg, mesh):
        ev = _eval(eval_fn, state["params"], held_out, mesh)
        writer.write({"split": "eval", "step": step, **ev})
        last["eval"] = ev
        if lead:
            print(f"step {step}: eval loss {ev['loss']:.4f}  bpb {ev['bpb']:.4f}", flush=True)
        n_new = cfg.train.sample_tokens
        if cfg.model.pos_encoding == "learned":  # stay inside the position table
            table = cfg.model.max_position or cfg.data.seq_len
            n_new = min(n_new, table - 1 - len(tokenizer.encode(cfg.train.sample_prompt)))
        if n_new > 0:
            text = continuations(model_def, state["params"], tokenizer, cfg.train.sample_prompt,
                                 jax.random.key(cfg.train.seed), n_new=n_new,
                                 temperature=0.8, top_k=40)[0]
            last["sample"] = cfg.train.sample_prompt + text
            if lead:
                print("--- sample ---\n" + last["sample"] + "\n--------------", flush=True)
    saver.report(wait=True)
    writer.close()
    last["step"] = step
    return last


def _nothing_to_train(writer, step0: int, steps: int, lead: bool) -> None:
    """A rerun whose train.steps is not above the trained step: say so (event + stderr)."""
    writer.write({"event": "nothing_to_train", "step": step0, "train_steps": steps})
    if lead:
        print(f"note: the workdir is already trained to step {step0} and train.steps={steps}: "
              "no steps to run (evaluating only); raise --config.train.steps to train "
              "further", file=sys.stderr, flush=True)
