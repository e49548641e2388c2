"""Periodic actions of the training loop, one small object each (as Levanter's hooks).

The loop (`train/loop.py`) runs the step and then calls every hook's `on_step(loop, step,
state)` in order; a hook returning True stops the loop (preemption). After the loop each
hook's `on_end(loop, step, state)` runs, by `end_rank` (final log flush, final checkpoint,
the preemption report, final eval, the end-of-training sample). Adding a periodic action
is one class here and one entry in `loop.default_hooks`. Cadences are functions of the
step number only, so a resumed run calls the hooks at the same steps as an uninterrupted
one.

`loop` is the loop's shared context (`loop.Loop`): config, mesh, metrics writer, progress
bar, checkpointer, train iterator, the last train row (`loop.last`), the step's metrics
(`loop.metrics`, device arrays) and `loop.preempted`.
"""

from __future__ import annotations

import time

import jax

from jaxllm import parallel
from jaxllm.model.loss import nll_summary
from jaxllm.model.sample import continuations
from jaxllm.model.transformer import position_limit
from jaxllm.train import metrics as M
from jaxllm.train.guard import GUARD_KEYS, SkipTracker


class Hook:
    end_rank = 0  # on_end runs by rank, then in list order (the final save comes first)

    def on_step(self, loop, step: int, state) -> bool | None:
        """After step `step` (1-based, as in metrics.jsonl); True stops the loop."""

    def on_end(self, loop, step: int, state) -> None:
        """After the loop (also when preempted: check `loop.preempted`)."""


class LogTrain(Hook):
    """Train rows every `train.log_every` steps: loss, lr, grad norm, tokens/s, MFU.

    Each step's metrics are read one step late (no device stall) and passed to the skip
    tracker (skipped-step events, divergence stop). Tokens/s windows start after the first
    (compiling) step and exclude time the loop reports with `exclude` (evaluation)."""

    def __init__(self, cfg, fpt: float, peak, writer):
        self.cfg, self.fpt, self.peak = cfg, fpt, peak
        self.track = SkipTracker(cfg, writer.write)
        self.pending, self.window_t, self.window_n = None, time.perf_counter(), 0

    def started(self) -> None:
        """The first step compiled synchronously: its time is not in tokens/s."""
        self.window_t = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        self.window_t += seconds

    def _flush(self) -> dict:
        step, m = self.pending
        self.pending = None
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        self.track(step, m)
        return m

    def on_step(self, loop, step, state):
        self.window_n += 1
        if self.pending is not None:
            self._flush()
        self.pending = (step, loop.metrics)
        if step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps:
            self._row(loop, step)
        loop.bar.update(1)

    def _row(self, loop, step) -> None:
        mv = self._flush()
        gb, seq = self.cfg.train.batch_size, self.cfg.data.seq_len
        tps = self.window_n * gb * seq / (time.perf_counter() - self.window_t)
        n_dev = jax.device_count()
        row = {"split": "train", "step": step, "loss": mv["loss"], "lr": mv["lr"],
               "grad_norm": mv["grad_norm"], "tokens_per_s": tps,
               "tokens_per_s_per_device": tps / n_dev,
               "mfu": M.mfu(tps / n_dev, self.fpt, self.peak),
               "tokens_seen": loop.samples * seq,
               **{k: v for k, v in mv.items() if k not in GUARD_KEYS
                  and k not in ("loss", "lr", "grad_norm", "tokens")}}
        loop.writer.write(row)
        loop.last.update(row)
        loop.bar.set_postfix(loss=f"{mv['loss']:.3f}", tok_s=f"{tps:,.0f}")
        self.window_t, self.window_n = time.perf_counter(), 0

    def on_end(self, loop, step, state):
        if self.pending is not None:
            self._flush()


class Evaluate(Hook):
    """Held-out loss and bits per byte every `train.eval_every` steps and at the end (not
    when preempted); the same fixed batches every time."""

    def __init__(self, cfg, eval_fn, held_out, log_train: LogTrain):
        self.cfg, self.eval_fn, self.held_out, self.log_train = cfg, eval_fn, held_out, log_train

    def evaluate(self, loop, step, state, echo) -> dict:
        tot = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
        for local in self.held_out:
            out = jax.device_get(self.eval_fn(state["params"],
                                              parallel.global_batch(local, loop.mesh)))
            for k in tot:
                tot[k] += float(out[k])
        ev = {**nll_summary(tot["nll"], tot["tokens"], tot["bytes"]),
              "eval_tokens": tot["tokens"]}
        loop.writer.write({"split": "eval", "step": step, **ev})
        echo(f"step {step}: eval loss {ev['loss']:.4f}  bpb {ev['bpb']:.4f}")
        return ev

    def on_step(self, loop, step, state):
        every = self.cfg.train.eval_every
        if every and step % every == 0 and step != self.cfg.train.steps:
            t = time.perf_counter()
            self.evaluate(loop, step, state, loop.bar.write)
            self.log_train.exclude(time.perf_counter() - t)  # eval time is not train time

    def on_end(self, loop, step, state):
        if loop.preempted:
            return
        with parallel.activate(self.cfg, loop.mesh):
            loop.last["eval"] = self.evaluate(
                loop, step, state, lambda s: print(s, flush=True) if loop.lead else None)


class Checkpoint(Hook):
    """A checkpoint every `checkpoint.every` steps and at the end (if any step ran), through
    `loop.saver` (`saving.Saver`: healthy states only, events for finished saves)."""

    end_rank = -2  # the final save starts before the final eval and sample (async)

    def __init__(self, cfg, step0: int):
        self.cfg, self.step0 = cfg, step0

    def on_step(self, loop, step, state):
        every = self.cfg.checkpoint.every
        if every and step % every == 0 and step != self.cfg.train.steps:
            loop.saver.save(step, state, loop.train_it, loop.samples)

    def on_end(self, loop, step, state):
        if step > self.step0:
            loop.saver.save(step, state, loop.train_it, loop.samples)


class Preempt(Hook):
    """Stop after the step a SIGTERM/SIGINT arrived (agreed across processes); the
    checkpoint hook then saves and the loop reports `preempted` with the exit status."""

    end_rank = -1

    def __init__(self, stop):
        self.stop = stop

    def on_step(self, loop, step, state):
        return self.stop.should_stop(step)

    def on_end(self, loop, step, state):
        if loop.preempted:
            loop.saver.report(wait=True)
            loop.writer.write({"event": "preempted", "step": step, "signal": self.stop.signum,
                               "exit_status": self.stop.exit_status})


class Sample(Hook):
    """A sample of `train.sample_tokens` after `train.sample_prompt` at the end (not when
    preempted), kept inside a learned position table."""

    def __init__(self, cfg, model_def, tokenizer):
        self.cfg, self.model_def, self.tokenizer = cfg, model_def, tokenizer

    def on_end(self, loop, step, state):
        cfg = self.cfg
        if loop.preempted:
            return
        n_new = cfg.train.sample_tokens
        table = position_limit(cfg)
        if table is not None:
            n_new = min(n_new, table - 1 - len(self.tokenizer.encode(cfg.train.sample_prompt)))
        if n_new <= 0:
            return
        with parallel.activate(cfg, loop.mesh):
            text = continuations(self.model_def, state["params"], self.tokenizer,
                                 cfg.train.sample_prompt, jax.random.key(cfg.train.seed),
                                 n_new=n_new, temperature=0.8, top_k=40)[0]
        loop.last["sample"] = cfg.train.sample_prompt + text
        if loop.lead:
            print("--- sample ---\n" + loop.last["sample"] + "\n--------------", flush=True)
