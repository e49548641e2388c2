"""`build_optimizer(cfg)`: one optax transformation per `optim.name`, with shared pieces.

Every optimizer is `chain(clip_by_global_norm(optim.clip), <optimizer with decoupled,
masked weight decay and the lr schedule>)`, by default wrapped (`skip_nonfinite`) so that a
step whose gradients hold a NaN/Inf returns zero updates and leaves the whole optimizer
state unchanged. The train step builds it without that wrapper: its guard
(`jaxllm/train/guard.py`) skips such steps, and loss spikes, for params and state at once.

Per-optimizer defaults for the `None` placeholders of `cfg.optim` (from the papers and nanoGPT
named in the last column):

| name     | lr   | b1    | b2    | eps   | weight_decay | other                      |
|----------|------|-------|-------|-------|--------------|----------------------------|
| adamw    | 6e-4 | 0.9   | 0.95  | 1e-8  | 0.1          | nanoGPT GPT-2 small         |
| adam8bit | 6e-4 | 0.9   | 0.95  | 1e-8  | 0.1          | same as adamw (Dettmers)    |
| lion     | 1e-4 | 0.95  | 0.98  | -     | 0.6          | lr 6x smaller, wd 6x larger |
| sophia_g | 6e-4 | 0.965 | 0.99  | 1e-12 | 0.2          | gamma 0.05, k = 10          |
| sophia_h | 6e-4 | 0.965 | 0.99  | 1e-12 | 0.2          | gamma 0.01, k = 10          |
| sgd      | 0.1  | -     | -     | -     | 0.0          | momentum 0.9, Nesterov      |

Lion: Chen et al. 2023 advise lr 3-10x smaller and wd 3-10x larger than AdamW; the same
factor 6 for both keeps lr·wd (the decay per step) equal to AdamW's. SGD: lr 0.1 with
Nesterov momentum 0.9 is the usual vision-style default; with gradients clipped to norm
1 a step moves the weights by at most ~lr/(1-momentum) = 1 in global L2 norm; no weight
decay by default (it is a baseline, known to train transformers poorly).

Weight decay mask: every leaf is decayed except those whose name (the last string key of
its path, looking through nnx.Variable's `.value`) is `scale` (norm weights), `bias` or
ends in `_bias` (q_bias, up_bias, ...), or `embedding` (token/position tables; decayed only
with `optim.decay_embeddings`). It is
decided by key paths, never by ndim: scanned layers make norm scales 2-D.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxllm.optim.adam8bit import adam8bit, all_finite
from jaxllm.optim.sophia import gauss_newton_bartlett, hutchinson, sophia

_DEFAULTS = {
    "adamw": {"lr": 6e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1},
    "lion": {"lr": 1e-4, "b1": 0.95, "b2": 0.98, "eps": None, "weight_decay": 0.6},
    "sophia_g": {"lr": 6e-4, "b1": 0.965, "b2": 0.99, "eps": 1e-12, "weight_decay": 0.2,
                 "gamma": 0.05},
    "sophia_h": {"lr": 6e-4, "b1": 0.965, "b2": 0.99, "eps": 1e-12, "weight_decay": 0.2,
                 "gamma": 0.01},
    "adam8bit": {"lr": 6e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1},
    "sgd": {"lr": 0.1, "b1": None, "b2": None, "eps": None, "weight_decay": 0.0},
}
OPTIMIZERS = tuple(_DEFAULTS)  # `optim.name`: every optimizer has a row of defaults
HESSIAN_SCHEDULES = ("official", "paper")  # `optim.hessian_schedule` (hessian_extra_args)
NO_DECAY_NAMES = ("scale", "bias")
EMBEDDING_NAMES = ("embedding",)


def _name(o):
    if o.name not in _DEFAULTS:
        raise ValueError(f"optim.name: got {o.name!r}; allowed: {', '.join(_DEFAULTS)}")
    return o.name


def resolved_hparams(cfg) -> dict:
    """The effective optimizer settings (placeholders filled with per-optimizer defaults)."""
    o = cfg.optim
    name = _name(o)
    d = _DEFAULTS[name]
    def pick(key):
        return d[key] if o.get(key) is None else float(o.get(key))
    out = {"name": name, "lr": pick("lr"), "weight_decay": pick("weight_decay"),
           "schedule": o.schedule, "warmup_steps": int(o.warmup_steps),
           "min_lr_ratio": float(o.min_lr_ratio), "steps": int(cfg.train.steps),
           "clip": float(o.clip), "decay_embeddings": bool(o.decay_embeddings)}
    if o.schedule == "wsd":
        out["wsd_decay_fraction"] = float(o.wsd_decay_fraction)
    if name == "sgd":
        out.update(momentum=float(o.momentum), nesterov=bool(o.nesterov))
        return out
    out.update(b1=pick("b1"), b2=pick("b2"))
    if name != "lion":
        out["eps"] = pick("eps")
    if name.startswith("sophia"):
        out.update(gamma=pick("gamma"), hessian_every=int(o.hessian_every),
                   hessian_schedule=o.hessian_schedule)
    if name == "adam8bit":
        out.update(block_size=int(o.block_size), min_8bit_size=int(o.min_8bit_size),
                   fp32_embedding_state=bool(o.fp32_embedding_state))
    return out


def _wsd(hp, peak, end, rest, steps):
    decay = min(max(round(hp["wsd_decay_fraction"] * steps), 1), rest)
    return optax.schedules.join_schedules(
        [optax.schedules.constant_schedule(peak),
         optax.schedules.linear_schedule(peak, end, decay)], [rest - decay])


# `optim.schedule`: the part after warmup, (hparams, peak, end lr, steps after warmup,
# total steps) -> optax schedule
SCHEDULES = {
    "cosine": lambda hp, peak, end, rest, steps: optax.schedules.cosine_decay_schedule(
        peak, rest, alpha=hp["min_lr_ratio"]),
    "linear": lambda hp, peak, end, rest, steps: optax.schedules.linear_schedule(
        peak, end, rest),
    "wsd": _wsd,
    "constant": lambda hp, peak, end, rest, steps: optax.schedules.constant_schedule(peak),
}


def lr_schedule(cfg) -> optax.Schedule:
    """Learning rate at optimizer step `count` (0-based; the value used by that update).

    Linear warmup from 0 to the peak over `optim.warmup_steps`, then until `train.steps`:
    cosine or linear decay to `min_lr_ratio`·peak; wsd (warmup-stable-decay, Hu et al.
    2024 MiniCPM) holds the peak and decays linearly to `min_lr_ratio`·peak over the last
    `wsd_decay_fraction` of the steps; constant holds the peak.
    """
    hp = resolved_hparams(cfg)
    peak, warm, steps = hp["lr"], hp["warmup_steps"], hp["steps"]
    end = peak * hp["min_lr_ratio"]
    rest = max(steps - warm, 1)
    tail = SCHEDULES[hp["schedule"]](hp, peak, end, rest, steps)
    if warm == 0:
        return tail
    return optax.schedules.join_schedules(
        [optax.schedules.linear_schedule(0.0, peak, warm), tail], [warm])


def _leaf_name(path) -> str:
    for k in reversed(path):
        if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str):
            return k.key
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name not in ("value", "raw_value"):
            return k.name
    return ""


def decay_mask(params, decay_embeddings: bool = False):
    """Pytree of bools like `params`: True where decoupled weight decay applies."""
    skip = NO_DECAY_NAMES + (() if decay_embeddings else EMBEDDING_NAMES)
    def decays(path, _):
        name = _leaf_name(path)
        return not (name in skip or name.endswith("_bias"))  # the model's q_bias, up_bias, ...
    return jax.tree_util.tree_map_with_path(decays, params)


def embedding_mask(params):
    """Pytree of bools like `params`: True for embedding tables (token and position)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) in EMBEDDING_NAMES, params)


def skip_nonfinite(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Zero updates and unchanged state when any gradient leaf is NaN/Inf."""
    tx = optax.with_extra_args_support(tx)

    def update(updates, state, params=None, **extra):
        finite = all_finite(updates)
        new_updates, new_state = tx.update(updates, state, params, **extra)
        new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)),
                                   new_updates)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(tx.init, update)


def build_optimizer(cfg, *, guard_nonfinite: bool = True) -> optax.GradientTransformationExtraArgs:
    """The optimizer named by `cfg.optim.name` (see the module docstring for defaults).

    With `guard_nonfinite` (the default, for standalone optax use) the chain is wrapped in
    `skip_nonfinite`. The train step passes False: its own guard (`train/guard.py`) already
    keeps params and optimizer state on a non-finite or spiking step, so a second check
    would only cost another pass over the state. The state's structure is the same.

    Sophia variants take extra update arguments `hessian=` and `refresh=` (see
    `hessian_extra_args`); the others ignore any extra arguments.
    """
    hp = resolved_hparams(cfg)
    name, lr, wd = hp["name"], lr_schedule(cfg), hp["weight_decay"]
    def mask(params):
        return decay_mask(params, hp["decay_embeddings"])
    if name == "adamw":
        opt = optax.adamw(lr, hp["b1"], hp["b2"], hp["eps"], weight_decay=wd, mask=mask)
    elif name == "lion":
        opt = optax.lion(lr, hp["b1"], hp["b2"], weight_decay=wd, mask=mask)
    elif name in ("sophia_g", "sophia_h"):
        opt = sophia(lr, hp["b1"], hp["b2"], hp["eps"], hp["gamma"], wd, mask)
    elif name == "adam8bit":
        opt = adam8bit(lr, hp["b1"], hp["b2"], hp["eps"], wd, mask, hp["block_size"],
                       hp["min_8bit_size"],
                       embedding_mask if hp["fp32_embedding_state"] else None)
    else:  # sgd
        parts = [optax.trace(hp["momentum"], nesterov=hp["nesterov"])] if hp["momentum"] else []
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask))
        opt = optax.chain(*parts, optax.scale_by_learning_rate(lr))
    parts = [optax.clip_by_global_norm(hp["clip"])] if hp["clip"] > 0 else []
    tx = optax.with_extra_args_support(optax.chain(*parts, opt))
    return skip_nonfinite(tx) if guard_nonfinite else tx


def hessian_estimator(cfg):
    """None for non-Sophia optimizers, else `est(model_fn, params, batch, rng) -> ĥ`.

    sophia_g: Gauss-Newton-Bartlett (needs no labels); sophia_h: Hutchinson on the
    true-label loss (needs batch["targets"]). See jaxllm.optim.sophia.
    """
    return {"sophia_g": gauss_newton_bartlett, "sophia_h": hutchinson}.get(_name(cfg.optim))


def hessian_extra_args(cfg, step, model_fn, params, batch, rng) -> dict:
    """Extra keyword arguments for `tx.update` at optimizer step `step` (0-based).

    {} for non-Sophia optimizers. For Sophia, `refresh` follows `optim.hessian_schedule`
    (jaxllm.optim.sophia): `official` refreshes at steps s = k, 2k, ... (after steps
    t % k == k - 1, so steps 0..k-1 run with h = 0) with Sophia-G's sampled-label gradient
    clipped to `optim.clip`; `paper` refreshes at s % k == 0, step 0 included, unclipped.
    `hessian` is the estimate on refresh steps, zeros otherwise, chosen with `lax.cond` so
    the extra forward/backward pass only runs on refresh steps. `step` may be traced.
    """
    est = hessian_estimator(cfg)
    if est is None:
        return {}
    step = jnp.asarray(step)
    refresh = step % cfg.optim.hessian_every == 0
    if cfg.optim.hessian_schedule == "official":
        refresh = jnp.logical_and(refresh, step > 0)
        if est is gauss_newton_bartlett:
            est = functools.partial(est, clip=float(cfg.optim.clip))

    def zeros():
        return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    hhat = jax.lax.cond(refresh, lambda: est(model_fn, params, batch, rng), zeros)
    return {"hessian": hhat, "refresh": refresh}
