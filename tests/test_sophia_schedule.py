"""Sophia-G's default (`official`) Hessian schedule, step by step, against an independent
float64 re-implementation of the authors' training loop (github.com/Liuhong99/Sophia,
train_sophiag.py + sophia.py) on softmax regression, where every gradient has a closed form.

The reference follows the torch code line by line: the gradient clipped with
`clip_grad_norm_` semantics (coefficient max_norm / (norm + 1e-6), capped at 1), decay
`θ *= 1 - lr·wd`, `m = b1·m + (1-b1)·g`, `θ -= lr·sign(m)·min(|m| / (ρ·bs·h + 1e-15), 1)`,
and after steps with t % k == k - 1: labels sampled from the model at the updated θ, their
gradient clipped the same way, `h = b2·h + (1-b2)·ĝ²` (h is ĝ² there and bs = tokens per
batch, ours is N·ĝ² against γ·h: the same ratio). The only shared code is
`jax.random.categorical` for the label draws, so both sides see the same ŷ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import optim
from jaxllm.config import defaults
from jaxllm.optim.sophia import SophiaState

B, T, D, V, STEPS, K = 2, 4, 3, 5, 23, 5
LR, WD, B1, B2, RHO, CLIP = 0.05, 0.2, 0.965, 0.99, 0.05, 0.5


def _cfg(schedule="official"):
    cfg = defaults()
    cfg.optim.update(name="sophia_g", lr=LR, weight_decay=WD, schedule="constant",
                     warmup_steps=0, hessian_every=K, clip=CLIP, hessian_schedule=schedule)
    cfg.train.steps = STEPS
    return cfg


def _data():
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(B, T, D)).astype(np.float32) * 3,
                "targets": rng.integers(0, V, size=(B, T))} for _ in range(STEPS)]
    w0 = (rng.normal(size=(D, V)) * 0.5).astype(np.float32)
    keys = [jax.random.fold_in(jax.random.key(7), s) for s in range(STEPS)]
    return batches, w0, keys


def _model_fn(params, batch):
    return batch["x"] @ params["w"], jnp.ones(batch["x"].shape[:2], jnp.float32)


def _ours(schedule):
    """The library path the train step takes: build_optimizer + hessian_extra_args."""
    cfg = _cfg(schedule)
    batches, w0, keys = _data()
    tx = optim.build_optimizer(cfg, guard_nonfinite=False)
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)

    def loss(p, b):
        logits, _ = _model_fn(p, b)
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"]).mean()

    @jax.jit
    def step(params, state, s, b, key):
        extra = optim.hessian_extra_args(cfg, s, _model_fn, params, b, key)
        updates, state = tx.update(jax.grad(loss)(params, b), state, params, **extra)
        return optax.apply_updates(params, updates), state, extra["refresh"]

    ws, hs, refreshes = [], [], []
    for s in range(STEPS):
        params, state, refresh = step(params, state, s, batches[s], keys[s])
        sophia = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, SophiaState))
                  if isinstance(x, SophiaState)][0]
        ws.append(np.asarray(params["w"], np.float64))
        hs.append(np.asarray(sophia.hessian["w"], np.float64))
        refreshes.append(bool(refresh))
    return np.stack(ws), np.stack(hs), refreshes


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _torch_clip(g, max_norm):
    return g * min(max_norm / (np.sqrt(np.sum(g * g)) + 1e-6), 1.0)


def _official(clip_sampled=True):
    """float64 re-implementation of train_sophiag.py's loop (module docstring)."""
    batches, w0, keys = _data()
    w, m, h = w0.astype(np.float64), np.zeros((D, V)), np.zeros((D, V))
    bs = B * T
    ws, hs, refreshes, norms = [], [], [], []
    for t in range(STEPS):
        x = batches[t]["x"].reshape(-1, D).astype(np.float64)
        onehot = np.eye(V)[batches[t]["targets"].reshape(-1)]
        g = _torch_clip(x.T @ (_softmax(x @ w) - onehot) / bs, CLIP)
        w = w * (1 - LR * WD)
        m = B1 * m + (1 - B1) * g
        w = w - LR * np.sign(m) * np.minimum(np.abs(m) / (RHO * bs * h + 1e-15), 1.0)
        refreshes.append(t > 0 and (t - 1) % K == K - 1)  # h used from step t on
        ws.append(w)
        hs.append(h * bs)  # the h step t used; ours stores N·ĝ²
        if t % K == K - 1 and t + 1 < STEPS:
            nxt = batches[t + 1]  # ours estimates at step t+1's start, on its batch
            xn = nxt["x"].reshape(-1, D).astype(np.float64)
            logits = jnp.asarray(nxt["x"]) @ jnp.asarray(w.astype(np.float32))
            yhat = np.asarray(jax.random.categorical(keys[t + 1], logits, axis=-1)).reshape(-1)
            ghat = xn.T @ (_softmax(xn @ w) - np.eye(V)[yhat]) / bs
            norms.append(np.sqrt(np.sum(ghat**2)))
            if clip_sampled:
                ghat = _torch_clip(ghat, CLIP)
            h = B2 * h + (1 - B2) * ghat**2
    return np.stack(ws), np.stack(hs), refreshes, norms


def test_official_schedule_step_by_step():
    ws, hs, refreshes = _ours("official")
    ref_w, ref_h, ref_refresh, norms = _official()
    assert refreshes == ref_refresh
    assert [s for s, r in enumerate(refreshes) if r] == [5, 10, 15, 20]
    assert not hs[:K].any()  # h = 0 through the first k steps ...
    assert (hs[K] > 0).all()  # ... the first refresh feeds step k
    np.testing.assert_array_equal(hs[K], hs[K + 1])  # unchanged between refreshes
    for s in range(STEPS):
        np.testing.assert_allclose(hs[s], ref_h[s], rtol=1e-4, atol=1e-9, err_msg=f"h {s}")
        np.testing.assert_allclose(ws[s], ref_w[s], rtol=1e-5, atol=1e-5, err_msg=f"w {s}")
    # the check has power: the sampled-label gradients exceed the clip, and without
    # clipping them (or with the paper's schedule) the trajectory is different
    assert min(norms) > 1.5 * CLIP
    unclipped_w, unclipped_h, _, _ = _official(clip_sampled=False)
    assert np.abs(unclipped_h[-1] - hs[-1]).max() > 0.1 * np.abs(hs[-1]).max()
    assert np.abs(unclipped_w[-1] - ws[-1]).max() > 1e-3
    paper_w, paper_h, paper_refresh = _ours("paper")
    assert [s for s, r in enumerate(paper_refresh) if r] == [0, 5, 10, 15, 20]
    assert (paper_h[0] > 0).all()
    assert np.abs(paper_w[-1] - ws[-1]).max() > 1e-3


@pytest.mark.parametrize("name", ["sophia_h", "sophia_g"])
def test_refresh_steps_of_both_schedules(name):
    cfg = _cfg()
    cfg.optim.name = name
    batches, w0, keys = _data()
    batch = {**batches[0], "x": jnp.asarray(batches[0]["x"])}
    fn = jax.jit(lambda s: optim.hessian_extra_args(cfg, s, _model_fn, {"w": w0}, batch,
                                                    keys[0])["refresh"])
    assert [s for s in range(12) if bool(fn(s))] == [5, 10]
    cfg.optim.hessian_schedule = "paper"
    fn = jax.jit(lambda s: optim.hessian_extra_args(cfg, s, _model_fn, {"w": w0}, batch,
                                                    keys[0])["refresh"])
    assert [s for s in range(12) if bool(fn(s))] == [0, 5, 10]
