"""Pure step functions: `train_step(state, batch) -> (state, metrics)` and `eval_step`.

The loss is the token-weighted mean cross-entropy over non-padding targets (optionally
plus z-loss), from `model.loss.forward_sums` (logits chunked along the sequence). Gradient
accumulation scans over micro-batches and normalises by the token count of the whole
batch, so it equals the single-batch step. A non-finite loss or gradient, an update that
would blow the parameters up, or a loss spike, skips the update (parameters and optimizer
state unchanged; `train/guard.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxllm import optim, parallel
from jaxllm.model.loss import forward_sums, logits_and_weights
from jaxllm.train import guard


def make_train_step(cfg, model_def, tx, *, nan_steps=()):
    """The pure train step. `nan_steps` (a testing hook, not a config key): reported step
    numbers (1-based, as in metrics.jsonl) whose gradients are replaced by NaN."""
    z_coef, accum, chunk = cfg.train.z_loss, cfg.train.grad_accum, cfg.train.loss_chunk
    schedule = optim.lr_schedule(cfg)

    def loss_fn(params, micro, n_tokens):
        nll_sum, z_sum, _, _ = forward_sums(model_def, params, micro, chunk)
        return (nll_sum + z_coef * z_sum) / n_tokens, nll_sum

    def model_fn(params, batch):
        return logits_and_weights(model_def, params, batch)

    def train_step(state, batch):
        params, opt_state = state["params"], state["opt_state"]
        n_tokens = jnp.maximum((batch["segment_ids"] > 0).sum(), 1).astype(jnp.float32)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum == 1:
            (_, nll_sum), grads = grad_fn(params, batch, n_tokens)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

            def acc(carry, mb):
                (_, s), g = grad_fn(params, mb, n_tokens)
                return jax.tree.map(jnp.add, carry, (s, g)), None
            zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
            (nll_sum, grads), _ = jax.lax.scan(acc, zero, micro)
        loss = nll_sum / n_tokens
        if nan_steps:
            hit = jnp.isin(state["step"] + 1, jnp.asarray(nan_steps, jnp.int32))
            grads = jax.tree.map(lambda g: jnp.where(hit, jnp.nan, g), grads)
        grad_norm = optax.tree.norm(grads)
        rng, sub = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        extra = optim.hessian_extra_args(cfg, state["step"], model_fn, params, batch, sub)
        updates, new_opt = tx.update(grads, opt_state, params, **extra)
        new_params = optax.apply_updates(params, updates)
        norms = {"param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates)}
        blown = guard.exploded(cfg, norms["update_norm"], norms["param_norm"],
                               optax.tree.norm(new_params))
        accept, flags, new_guard = guard.decide(cfg, state["guard"], loss, grad_norm, blown)
        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, old)
        new_state = {"step": state["step"] + 1, "params": keep(new_params, params),
                     "opt_state": keep(new_opt, opt_state), "rng": jax.random.key_data(rng),
                     "guard": new_guard}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "tokens": n_tokens, "finite": 1 - flags["nonfinite"], **flags, **norms,
                   **optim.optimizer_metrics(new_opt)}
        return new_state, metrics

    return train_step


def jit_train_step(cfg, model_def, tx, shardings, mesh, *, nan_steps=()):
    """The train step under `jax.jit` with explicit shardings and the state donated (its
    buffers are reused for the new state): the one construction the loop and the benchmark
    share. Call (or lower) it under `parallel.activate(cfg, mesh)`."""
    return jax.jit(make_train_step(cfg, model_def, tx, nan_steps=nan_steps), donate_argnums=0,
                   in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, None))


def make_eval_step(cfg, model_def):
    chunk = cfg.train.loss_chunk

    def eval_step(params, batch):
        nll_sum, _, _, weights = forward_sums(model_def, params, batch, chunk)
        return {"nll": nll_sum, "tokens": weights.sum(),
                "bytes": (batch["target_bytes"] * weights).sum()}
    return eval_step

