"""Pure step functions: `train_step(state, batch) -> (state, metrics)` and `eval_step`.

The loss is the token-weighted mean cross-entropy over non-padding targets (optionally
plus z-loss). Logits are produced in chunks along the sequence under `jax.checkpoint`, so
full-vocabulary float32 logits for all tokens never sit in memory at once. Gradient
accumulation scans over micro-batches and normalises by the token count of the whole
batch, so it equals the single-batch step. A non-finite loss or gradient, an update that
would blow the parameters up, or a loss spike, skips the update (parameters and optimizer
state unchanged; `train/guard.py`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jaxllm import optim, parallel
from jaxllm.train import guard


def chunk_size(t: int, chunk: int) -> int:
    """Tokens per logits chunk: the largest divisor of `t` not above `chunk` (0 = all of t)."""
    if not chunk or chunk >= t:
        return t
    return max(c for c in range(1, chunk + 1) if t % c == 0)


def token_nll(model, h, targets, weights, chunk: int):
    """Sums over tokens: (nll, z^2) and per-token nll, computing logits chunk by chunk.

    Chunks run one after another (`lax.map`) under `jax.checkpoint`, so the backward pass
    recomputes each chunk's logits instead of keeping [B, T, vocab] float32 for all tokens.
    One chunk (the whole sequence) is computed directly: a one-step loop and a recompute
    would only cost time (a while loop on CPU, a second logits matmul).
    """
    b, t, d = h.shape
    chunk = chunk_size(t, chunk)
    n = t // chunk

    def one(hc, tc):
        logits = model.logits(hc)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return lse - tgt, lse

    if n == 1:
        nll, lse = one(h, targets)
        return (nll * weights).sum(), (lse * lse * weights).sum(), nll
    one = jax.checkpoint(one)
    hs = h.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    nll, lse = jax.lax.map(lambda xs: one(*xs), (hs, ts))
    nll = nll.swapaxes(0, 1).reshape(b, t)
    lse = lse.swapaxes(0, 1).reshape(b, t)
    return (nll * weights).sum(), (lse * lse * weights).sum(), nll


def forward_sums(model_def, params, batch, chunk):
    model = model_def.apply(params)
    weights = (batch["segment_ids"] > 0).astype(jnp.float32)
    h, _ = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"])
    nll_sum, z_sum, nll = token_nll(model, h, batch["targets"], weights, chunk)
    return nll_sum, z_sum, nll, weights


def make_train_step(cfg, model_def, tx, *, nan_steps=()):
    """The pure train step. `nan_steps` (a testing hook, not a config key): reported step
    numbers (1-based, as in metrics.jsonl) whose gradients are replaced by NaN."""
    z_coef, accum, chunk = cfg.train.z_loss, cfg.train.grad_accum, cfg.train.loss_chunk
    schedule = optim.lr_schedule(cfg)

    def loss_fn(params, micro, n_tokens):
        nll_sum, z_sum, _, _ = forward_sums(model_def, params, micro, chunk)
        return (nll_sum + z_coef * z_sum) / n_tokens, nll_sum

    def model_fn(params, batch):
        model = model_def.apply(params)
        h, _ = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"])
        return model.logits(h), (batch["segment_ids"] > 0).astype(jnp.float32)

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


def bits_per_byte(nll_sum: float, n_bytes: float) -> float:
    """BPB = (sum of token NLL in nats) / (sum of UTF-8 bytes) / ln 2.

    Gao et al. 2020, "The Pile", sec. 3.1: comparable across tokenizers.
    """
    return nll_sum / max(n_bytes, 1) / math.log(2)
