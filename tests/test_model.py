"""Model behaviour: packing isolates documents, causality, every pos x activation trains."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tests.fixtures import tiny_model_cfg
from flax import nnx

from jaxllm import kernels
from jaxllm.model.layers import ACTIVATIONS, resolved_d_ff
from jaxllm.model.positions import POS_ENCODINGS
from jaxllm.model.transformer import Transformer


def build(**model):
    cfg = tiny_model_cfg(**model)
    return cfg, Transformer(cfg, nnx.Rngs(0))


@pytest.mark.parametrize("pos", POS_ENCODINGS)
def test_packed_batch_equals_each_document_alone(pos):
    _cfg, model = build(pos_encoding=pos)
    rng = np.random.default_rng(0)
    lengths = [7, 12, 9]  # three documents packed into one row of 32 (4 padding tokens)
    docs = [rng.integers(0, 256, n) for n in lengths]
    tokens = np.zeros(32, np.int32)
    seg = np.zeros(32, np.int32)
    pos_ids = np.zeros(32, np.int32)
    at = 0
    for i, d in enumerate(docs):
        tokens[at:at + len(d)] = d
        seg[at:at + len(d)] = i + 1
        pos_ids[at:at + len(d)] = np.arange(len(d))
        at += len(d)
    packed = model(jnp.asarray(tokens[None]), jnp.asarray(seg[None]), jnp.asarray(pos_ids[None]))
    at = 0
    for d in docs:
        alone = model(jnp.asarray(d[None].astype(np.int32)))
        diff = np.abs(np.asarray(packed[0, at:at + len(d)]) - np.asarray(alone[0])).max()
        assert diff <= 1e-5, (pos, diff)
        at += len(d)


@pytest.mark.parametrize("pos", POS_ENCODINGS)
def test_causality(pos):
    _, model = build(pos_encoding=pos)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (1, 32)).astype(np.int32)
    base = np.asarray(model(jnp.asarray(x)))
    for t in (0, 10, 30):
        y = x.copy()
        y[0, t + 1:] = (y[0, t + 1:] + 17) % 256
        out = np.asarray(model(jnp.asarray(y)))
        np.testing.assert_array_equal(out[0, :t + 1], base[0, :t + 1])
        assert np.abs(out[0, t + 1:] - base[0, t + 1:]).max() > 0


def test_scan_and_loop_layers_agree():
    _, scanned = build(scan_layers=True)
    _, looped = build(scan_layers=False)
    stacked = nnx.to_pure_dict(nnx.split(scanned)[1])
    pure = nnx.to_pure_dict(nnx.split(looped)[1])
    pure.update({k: v for k, v in stacked.items() if k != "blocks"})
    pure["blocks"] = {i: jax.tree.map(lambda a, i=i: a[i], stacked["blocks"]) for i in range(2)}
    looped = nnx.merge(nnx.split(looped)[0], pure)
    x = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 32)), jnp.int32)
    np.testing.assert_allclose(np.asarray(scanned(x)), np.asarray(looped(x)), atol=1e-5)


def test_gated_d_ff_rounding_and_gqa_shapes():
    cfg = tiny_model_cfg(d_model=96, activation="swiglu", n_heads=4, n_kv_heads=2)
    assert resolved_d_ff(cfg.model) == 256  # 2/3 * 4 * 96 = 256, already a multiple of 64
    cfg.model.d_model = 100
    assert resolved_d_ff(cfg.model) == 320  # 266.67 -> 320
    cfg.model.activation = "gelu"
    assert resolved_d_ff(cfg.model) == 400
    _, model = build(n_kv_heads=2)
    assert model.blocks.attn.wk.shape == (2, 32, 2, 8)
    assert model.blocks.attn.wq.shape == (2, 32, 4, 8)


def _train_losses(cfg, steps):
    from jaxllm.model.transformer import ModelDef
    from jaxllm.model.loss import forward_sums
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    model_def = ModelDef(graphdef, cfg)
    tx = optax.adam(3e-3)
    opt = tx.init(params)
    rng = np.random.default_rng(0)
    # a learnable signal: a repeating random pattern of period 8
    pattern = rng.integers(0, 256, 8)
    seq = np.tile(pattern, 5)[:33]
    tokens = np.stack([np.roll(seq, -i)[:33] for i in range(4)]).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "segment_ids": np.ones((4, 32), np.int32),
             "positions": np.tile(np.arange(32, dtype=np.int32), (4, 1))}

    @jax.jit
    def step(params, opt):
        def loss(p):
            s, _, _, w = forward_sums(model_def, p, batch, 0)
            return s / w.sum()
        val, g = jax.value_and_grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, val
    losses = []
    for _ in range(steps):
        params, opt, val = step(params, opt)
        losses.append(float(val))
    return losses


@pytest.mark.parametrize("pos,act", list(itertools.product(POS_ENCODINGS, ACTIVATIONS)))
def test_every_combination_trains(pos, act):
    cfg = tiny_model_cfg(pos_encoding=pos, activation=act, n_layers=1)
    losses = _train_losses(cfg, 20)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_scan_unroll_keeps_parameters_loss_and_gradients():
    """`model.scan_unroll` only changes how XLA runs the stacked blocks: the parameter tree
    (so checkpoints) is the same, and loss and gradients agree with the rolled loop (1),
    a partial unroll (2 of 4) and the CPU default (0 = all 4 blocks)."""
    from jaxllm.model.transformer import scan_unroll
    x = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 32)), jnp.int32)
    out, trees = {}, {}
    for unroll in (1, 2, 0):
        cfg, model = build(n_layers=4, scan_unroll=unroll)
        assert scan_unroll(cfg.model) == {1: 1, 2: 2, 0: 4}[unroll]  # this test runs on CPU
        graphdef, state = nnx.split(model)
        trees[unroll] = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(state))

        def loss(p, graphdef=graphdef):
            logits = nnx.merge(graphdef, p)(x[:, :-1])
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, 1:, None], -1).mean()
        out[unroll] = jax.jit(jax.value_and_grad(loss))(nnx.to_pure_dict(state))
    assert trees[1] == trees[2] == trees[0]
    for unroll in (2, 0):
        np.testing.assert_allclose(out[unroll][0], out[1][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(out[unroll][1]), jax.tree.leaves(out[1][1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    cfg = tiny_model_cfg(n_layers=12)
    assert [scan_unroll(cfg.model, p) for p in ("cpu", "gpu", "tpu")] == [12, 1, 1]
    with kernels.lowering_for("tpu"):  # exporting for a TPU from this CPU host
        assert scan_unroll(cfg.model) == 1
    cfg.model.scan_unroll = 3
    assert [scan_unroll(cfg.model, p) for p in ("cpu", "gpu")] == [3, 3]


def test_learned_positions_past_the_table_raise():
    """Through the Python API a learned-position model refuses positions past its table
    (the embedding lookup would return NaN rows): too many tokens, explicit positions, or
    a KV cache longer than the table."""
    _, model = build(pos_encoding="learned")  # table = data.seq_len = 32
    assert np.isfinite(np.asarray(model(jnp.zeros((1, 32), jnp.int32)))).all()
    with pytest.raises(ValueError, match="33 positions, but the learned position table "
                       "holds 32"):
        model(jnp.zeros((1, 33), jnp.int32))
    with pytest.raises(ValueError, match="40 positions"):
        model(jnp.zeros((1, 4), jnp.int32), positions=jnp.full((1, 4), 39, jnp.int32))
    with pytest.raises(ValueError, match="64 positions"):
        model.hidden(jnp.zeros((1, 4), jnp.int32), cache=model.init_cache(1, 64))
    _, rope = build(pos_encoding="rope")  # no table: any length
    assert np.isfinite(np.asarray(rope(jnp.zeros((1, 40), jnp.int32)))).all()
