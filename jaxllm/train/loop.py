"""The training loop: resume, step, log, evaluate, checkpoint, stop cleanly on SIGTERM."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxllm import optim, parallel
from jaxllm.checkpoint import Checkpointer
from jaxllm.config import SHAPE_KEYS, ConfigError, padded_vocab, validate
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.tokenizers import load_tokenizer
from jaxllm.eval.sample import generate
from jaxllm.train import metrics as M
from jaxllm.train.state import abstract_state, init_state
from jaxllm.train.step import bits_per_byte, make_eval_step, make_train_step

log = logging.getLogger("jaxllm")


def resolve(cfg):
    """Fill derived values (vocab size from the tokenizer); validate; return the tokenizer."""
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
    return tokenizer


def check_compatible(cfg, workdir: str) -> None:
    """Refuse to resume a workdir whose saved config has other parameter shapes."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable saved config ({e})") from None
    bad = []
    for key in SHAPE_KEYS:
        sec, name = key.split(".")
        old = saved.get(sec, {}).get(name)
        if old is not None and old != cfg[sec][name]:
            bad.append(f"{key} (saved {old!r}, now {cfg[sec][name]!r})")
    if bad:
        raise ConfigError(f"{workdir}: config incompatible with its checkpoints: "
                          + ", ".join(bad) + "; use a new --workdir or restore the values")


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


class _Stop:
    """SIGTERM/SIGINT -> finish the current step, save, exit."""

    def __init__(self):
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM,)}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg, workdir: str) -> dict:
    """Train per `cfg` in `workdir`, resuming from its newest good checkpoint."""
    parallel.init_distributed(cfg)
    tokenizer = resolve(cfg)
    mesh = parallel.make_mesh(cfg)
    lead = jax.process_index() == 0
    check_compatible(cfg, workdir)
    os.makedirs(workdir, exist_ok=True)
    tx = optim.build_optimizer(cfg)
    ckpt = Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"), cfg)
    train_it = make_pipeline(cfg, tokenizer, "train", jax.process_index(), jax.process_count())
    model_def, abstract, shardings = abstract_state(cfg, mesh, tx)
    restored_from = None
    if ckpt.steps():
        with parallel.activate(cfg, mesh):
            restored_from, state, _ = ckpt.restore(abstract, train_it)
    else:
        model_def, state, shardings = init_state(cfg, mesh, tx)
    if lead:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))
    writer = M.MetricsWriter(workdir, cfg, enabled=lead)
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
    if restored_from is not None:
        writer.write({"event": "restored", "step": restored_from})

    batch_sh = parallel.batch_sharding(mesh)
    with parallel.activate(cfg, mesh):
        step_fn = jax.jit(make_train_step(cfg, model_def, tx), donate_argnums=0,
                          in_shardings=(shardings, batch_sh), out_shardings=(shardings, None))
        eval_fn = jax.jit(make_eval_step(cfg, model_def),
                          in_shardings=(shardings["params"], batch_sh))
    held_out = eval_batches(cfg, tokenizer)
    stop = _Stop()
    total, tok_per_step = cfg.train.steps, cfg.train.batch_size * cfg.data.seq_len
    bar = tqdm(total=total, initial=step0, disable=not (lead and cfg.log.progress),
               desc="train", unit="step", dynamic_ncols=True)
    last = {"step": step0}
    skips, window_t, window_n, pending = 0, time.perf_counter(), 0, None

    def flush(pending):
        """Read the previous step's scalars (one step behind: no stall of the device)."""
        nonlocal skips
        step, m = pending
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not m["finite"]:
            skips += 1
            writer.write({"event": "skipped_step", "step": step, "loss": m["loss"],
                          "grad_norm": m["grad_norm"], "consecutive": skips})
            if skips >= cfg.train.max_skips:
                raise FloatingPointError(
                    f"{skips} consecutive non-finite steps (last at step {step}); stopping. "
                    "Lower optim.lr, raise optim.warmup_steps or check the data")
        else:
            skips = 0
        return step, m

    with parallel.activate(cfg, mesh):
        step = step0
        while step < total and not stop.requested:
            batch = parallel.global_batch(next(train_it), mesh)
            state, m = step_fn(state, batch)
            step += 1
            window_n += 1
            if pending is not None:
                flush(pending)
            pending = (step, m)
            if step % cfg.train.log_every == 0 or step == total:
                _, mv = flush(pending)
                pending = None
                now = time.perf_counter()
                tps = window_n * tok_per_step / (now - window_t)
                row = {"split": "train", "step": step, "loss": mv["loss"], "lr": mv["lr"],
                       "grad_norm": mv["grad_norm"], "tokens_per_s": tps,
                       "tokens_per_s_per_device": tps / jax.device_count(),
                       "mfu": M.mfu(tps / jax.device_count(), fpt, peak),
                       "tokens_seen": step * tok_per_step,
                       **{k: v for k, v in mv.items()
                          if k not in ("loss", "lr", "grad_norm", "finite", "tokens")}}
                writer.write(row)
                last.update(row)
                bar.set_postfix(loss=f"{mv['loss']:.3f}", tok_s=f"{tps:,.0f}")
                window_t, window_n = time.perf_counter(), 0
            bar.update(1)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total:
                ev = _eval(eval_fn, state["params"], held_out, mesh)
                writer.write({"split": "eval", "step": step, **ev})
                bar.write(f"step {step}: eval loss {ev['loss']:.4f}  bpb {ev['bpb']:.4f}")
                window_t = time.perf_counter()
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step != total:
                ckpt.save(step, state, train_it, {"config": cfg.to_json_best_effort()})
                writer.write({"event": "checkpoint", "step": step})
        if pending is not None:
            flush(pending)
        bar.close()
        stop.restore()
        if step > step0 or restored_from is None:
            ckpt.save(step, state, train_it, {"config": cfg.to_json_best_effort()})
            writer.write({"event": "checkpoint", "step": step})
        if stop.requested:
            writer.write({"event": "preempted", "step": step})
            ckpt.close()
            writer.close()
            return {"step": step, "preempted": True}
        ev = _eval(eval_fn, state["params"], held_out, mesh)
        writer.write({"split": "eval", "step": step, **ev})
        last["eval"] = ev
        if lead:
            print(f"step {step}: eval loss {ev['loss']:.4f}  bpb {ev['bpb']:.4f}", flush=True)
        if cfg.train.sample_tokens:
            prompt = np.asarray([tokenizer.encode(cfg.train.sample_prompt)], np.int32)
            out = generate(model_def, state["params"], jnp.asarray(prompt),
                           jax.random.key(cfg.train.seed), n_new=cfg.train.sample_tokens,
                           temperature=0.8, top_k=40, vocab_limit=tokenizer.vocab_size)
            text = tokenizer.decode(np.asarray(jax.device_get(out))[0].tolist())
            last["sample"] = cfg.train.sample_prompt + text
            if lead:
                print("--- sample ---\n" + last["sample"] + "\n--------------", flush=True)
    ckpt.close()
    writer.close()
    last["step"] = step
    return last
