"""Sophia: clipped diagonal-Hessian preconditioning, and its two Hessian estimators.

Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for
Language Model Pre-training" (2023). Per step:

    m <- b1·m + (1-b1)·g
    every k steps:  h <- b2·h + (1-b2)·ĥ          (ĥ a fresh diagonal-Hessian estimate)
    θ <- θ - lr·clip(m / max(γ·h, ε), -1, 1) - lr·wd·θ

When h is refreshed (`optim.hessian_schedule`, chosen in `optim.build.hessian_extra_args`):
- `official` (default): as the authors' training loop (github.com/Liuhong99/Sophia,
  train_sophiag.py) does it: after every step t with t % k == k - 1 the estimate is taken
  at the updated parameters and the EMA refreshed, so steps 0..k-1 run with h = 0 (every
  coordinate a clipped sign step, which the long warmup absorbs) and the first refresh
  feeds step k. Here that estimate is computed at the start of step t + 1 (same
  parameters, before its update), on that step's batch; the official loop draws one more
  batch for it, which changes nothing in expectation. The sampled-label gradient is
  clipped to `optim.clip` before squaring, as the official loop does. Levanter's Sophia-G
  and Sophia-H (github.com/stanford-crfm/levanter, optim/sophia.py, written with the
  authors) refresh on the same steps, so Sophia-H follows it too (its ĥ has no gradient
  to clip).
- `paper`: Algorithm 3 of the paper as printed: refresh at t mod k = 1 counting from 1,
  i.e. before the updates of steps 0, k, 2k, ...; ĝ not clipped (the schedule used here
  before; kept to reproduce older runs).

The estimate ĥ is computed by the train step (it needs the model and the batch) with one
of the estimators below and handed to the optimizer as extra arguments of `update`:
`tx.update(grads, state, params, hessian=ĥ, refresh=flag)`. With `refresh` False (or
`hessian` None) h is left as it is, so `hessian` may be zeros on non-refresh steps. A
non-finite ĥ is never written into h.

Estimators, both `est(model_fn, params, batch, rng) -> ĥ` with
`model_fn(params, batch) -> (logits [B, T, V] float32, weights [B, T] 0/1)`:

- Sophia-G, Gauss-Newton-Bartlett: sample ŷ ~ softmax(logits), ĝ = ∇ of the weighted mean
  cross-entropy on ŷ, ĥ = N·ĝ⊙ĝ with N the number of weighted tokens. E[N·ĝ⊙ĝ] is the
  Gauss-Newton diagonal of the mean loss (cross-token terms vanish in expectation because
  the sampled labels are independent with zero-mean score).
- Sophia-H, Hutchinson: ĥ = u⊙(H u) with Rademacher u and H the Hessian of the true-label
  loss (batch["targets"]), via forward-over-reverse `jax.jvp(jax.grad(loss))`.

Sharding: call the estimator inside the jitted train step on the GLOBAL batch (arrays
sharded over the data/fsdp axes, not inside shard_map). The loss is then the mean over
all tokens of all shards, so `jax.vjp`/`jax.grad` produce the globally averaged ĝ (XLA
inserts the cross-shard reduction) before it is squared, as Sophia-G requires; squaring
per-shard gradients would overestimate ĥ by the number of shards. `jax.random`
(threefry, partitionable) samples the same ŷ however the logits are sharded.

optax.contrib.sophia is not used: it computes its own Hutchinson estimate from an
`obj_fn` on a fixed internal schedule (its ratio, `m / max(γ·h, ε)` in optax 0.2.8, is the
same as here); here both variants share one update and the estimate comes from the train
step, which owns the model and the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm.optim.adam8bit import all_finite


class SophiaState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    hessian: optax.Updates  # the EMA h of the diagonal-Hessian estimates
    win_rate: jax.Array  # share of coordinates whose ratio was not clipped, last step


def scale_by_sophia(b1: float = 0.965, b2: float = 0.99, eps: float = 1e-12,
                    gamma: float = 0.05) -> optax.GradientTransformationExtraArgs:
    """The Sophia direction `clip(m / max(γ·h, ε), -1, 1)` (no learning rate, no decay).

    `update(updates, state, params=None, *, hessian=None, refresh=None)`: `hessian` is a
    pytree like the gradients holding ĥ; `refresh` a bool scalar (traced is fine), True
    when h should take ĥ; when `hessian` is given and `refresh` is None it refreshes.
    """

    def init(params):
        def zeros(p):
            return jnp.zeros(p.shape, jnp.float32)
        return SophiaState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params),
                           jax.tree.map(zeros, params), jnp.zeros((), jnp.float32))

    def update(updates, state, params=None, *, hessian=None, refresh=None, **extra):
        del params, extra
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g.astype(jnp.float32),
                          state.mu, updates)
        h = state.hessian
        if hessian is not None:
            take = jnp.asarray(True if refresh is None else refresh, bool)
            take = jnp.logical_and(take, all_finite(hessian))
            h = jax.tree.map(
                lambda h0, e: jnp.where(take, b2 * h0 + (1.0 - b2) * e.astype(jnp.float32), h0),
                h, hessian)
        ratio = jax.tree.map(lambda m, hh: m / jnp.maximum(gamma * hh, eps), mu, h)
        total = sum(r.size for r in jax.tree.leaves(ratio))
        wins = sum(jnp.sum(jnp.abs(r) < 1.0) for r in jax.tree.leaves(ratio))
        win_rate = (wins / max(total, 1)).astype(jnp.float32)
        out = jax.tree.map(lambda r, g: jnp.clip(r, -1.0, 1.0).astype(g.dtype), ratio, updates)
        return out, SophiaState(optax.safe_increment(state.count), mu, h, win_rate)

    return optax.GradientTransformationExtraArgs(init, update)


def sophia(learning_rate, b1: float = 0.965, b2: float = 0.99, eps: float = 1e-12,
           gamma: float = 0.05, weight_decay: float = 0.2, mask=None
           ) -> optax.GradientTransformationExtraArgs:
    """Sophia with decoupled (masked) weight decay: direction, + wd·θ, then × -lr."""
    parts = [scale_by_sophia(b1, b2, eps, gamma)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def _weighted_mean_ce(logits, labels, weights):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    w = weights.astype(jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def gauss_newton_bartlett(model_fn, params, batch, rng, clip: float = 0.0):
    """Sophia-G estimate ĥ = N·ĝ⊙ĝ, ĝ the mean-loss gradient on labels sampled from the model.

    One forward and one backward pass: the logits' cotangent of the weighted mean
    cross-entropy on ŷ is `w·(softmax(logits) - onehot(ŷ)) / N`, pulled back by `jax.vjp`.
    With `clip` > 0, ĝ is first clipped to that global norm, as the official loop clips
    the sampled-label gradient with the training `grad_clip` before `update_hessian`
    squares it.
    """
    (out, weights), pullback = jax.vjp(lambda p: model_fn(p, batch), params)
    logits = jax.lax.stop_gradient(out).astype(jnp.float32)
    w = jax.lax.stop_gradient(weights).astype(jnp.float32)
    yhat = jax.random.categorical(rng, logits, axis=-1)
    n = jnp.maximum(jnp.sum(w), 1.0)
    probs = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(yhat, logits.shape[-1], dtype=jnp.float32)
    dlogits = (probs - onehot) * (w / n)[..., None]
    if jnp.issubdtype(weights.dtype, jnp.floating):
        w_ct = jnp.zeros_like(weights)
    else:
        w_ct = jnp.zeros(weights.shape, jax.dtypes.float0)
    (g,) = pullback((dlogits.astype(out.dtype), w_ct))
    if clip > 0:
        g, _ = optax.clip_by_global_norm(clip).update(g, optax.EmptyState())
    return jax.tree.map(lambda x: n * jnp.square(x.astype(jnp.float32)), g)


def hutchinson(model_fn, params, batch, rng):
    """Sophia-H estimate ĥ = u⊙(H u), u Rademacher, H the Hessian of the true-label loss."""

    def loss(p):
        logits, weights = model_fn(p, batch)
        return _weighted_mean_ce(logits, batch["targets"], jax.lax.stop_gradient(weights))

    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(rng, len(leaves))
    u = [jax.random.rademacher(k, x.shape, jnp.float32).astype(x.dtype)
         for k, x in zip(keys, leaves, strict=True)]
    u = jax.tree.unflatten(treedef, u)
    _, hu = jax.jvp(jax.grad(loss), (params,), (u,))
    return jax.tree.map(lambda a, b: (a * b).astype(jnp.float32), u, hu)
