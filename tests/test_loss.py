"""model/loss.py: logits chunked along the sequence (sizes, equality with the unchunked loss,
memory)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import tiny
from jaxllm.model.loss import chunk_size, forward_sums
from jaxllm.model.transformer import ModelDef, Transformer


def test_chunk_size():
    assert [chunk_size(64, c) for c in (0, 16, 24, 64, 100, 1)] == [64, 16, 16, 64, 64, 1]
    assert chunk_size(1000, 384) == 250 and chunk_size(97, 10) == 1


def test_chunked_cross_entropy_equals_unchunked_and_saves_memory():
    """Loss and gradients (with z-loss) agree within float32 tolerance, and the chunked
    backward pass never holds the [B, T, V] float32 logits: XLA's temporary memory for it
    is below the size of those logits, while the unchunked one's is above."""
    cfg = tiny()
    cfg.model.update(d_model=16, n_layers=1, n_heads=2, vocab_size=4096, dtype="float32")
    b, t, v = 2, 128, 4096
    cfg.data.seq_len = t
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    md, params = ModelDef(graphdef, cfg), nnx.to_pure_dict(params)
    rng = np.random.default_rng(0)
    seg = np.ones((b, t), np.int32)
    seg[1, 100:] = 0  # padding: excluded by the weights
    batch = {"inputs": jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
             "segment_ids": jnp.asarray(seg),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}

    def loss(p, chunk):
        nll, z, _, w = forward_sums(md, p, batch, chunk)
        return (nll + 1e-2 * z) / w.sum()

    out, temp = {}, {}
    for chunk in (0, 16):
        f = jax.jit(jax.value_and_grad(lambda p, c=chunk: loss(p, c)))
        compiled = f.lower(params).compile()
        temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
        out[chunk] = compiled(params)
    (l0, g0), (l1, g1) = out[0], out[16]
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-7)
    logits_bytes = b * t * v * 4
    assert temp[16] < logits_bytes < temp[0], (temp, logits_bytes)
