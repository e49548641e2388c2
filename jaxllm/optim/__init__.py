"""Optimizers as optax chains: `build_optimizer(cfg)` (AdamW for now; see the optimizer issue)."""

from __future__ import annotations

import jax
import optax


def lr_schedule(cfg):
    o = cfg.optim
    peak = o.lr if o.lr is not None else 6e-4
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(o.warmup_steps, 1),
                                              max(cfg.train.steps, o.warmup_steps + 1),
                                              end_value=peak * o.min_lr_ratio)


def decay_mask(params):
    def keep(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name in ("scale", "bias", "embedding") or name.endswith("_bias"))
    return jax.tree_util.tree_map_with_path(keep, params)


def build_optimizer(cfg):
    o = cfg.optim
    wd = o.weight_decay if o.weight_decay is not None else 0.1
    parts = [optax.clip_by_global_norm(o.clip)] if o.clip else []
    parts.append(optax.adamw(lr_schedule(cfg), b1=o.b1 or 0.9, b2=o.b2 or 0.95, eps=o.eps,
                             weight_decay=wd, mask=decay_mask))
    return optax.with_extra_args_support(optax.chain(*parts))


def hessian_estimator(cfg):
    return None


def optimizer_metrics(opt_state) -> dict:
    return {}


def opt_state_bytes(opt_state) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)))
