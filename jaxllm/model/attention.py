"""Multi-head attention with grouped-query heads, RoPE or ALiBi, packed documents, KV cache."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxllm import kernels
from jaxllm.model.layers import DTYPES, constrain, logical_spec, param
from jaxllm.model.positions import alibi_slopes, apply_rope


class Attention(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        m = cfg.model
        pd, d = DTYPES[m.param_dtype], m.d_model
        self.h, self.kv = m.n_heads, (m.n_kv_heads or m.n_heads)
        self.hd = d // m.n_heads
        self.dtype = DTYPES[m.dtype]
        self.pos_encoding, self.rope_base = m.pos_encoding, m.rope_base
        self.backend = m.attention_backend
        std, out_std = m.init_std, m.init_std / (2 * m.n_layers) ** 0.5
        self.wq = param(rngs, (d, self.h, self.hd), ("embed", "heads", "head_dim"), std, pd)
        self.wk = param(rngs, (d, self.kv, self.hd), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wv = param(rngs, (d, self.kv, self.hd), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wo = param(rngs, (self.h, self.hd, d), ("heads", "head_dim", "embed"), out_std, pd)
        if m.use_bias or m.qkv_bias:  # qkv_bias: on q/k/v only (Qwen2)
            self.q_bias = param(rngs, (self.h, self.hd), ("heads", "head_dim"), None, pd)
            self.k_bias = param(rngs, (self.kv, self.hd), ("kv_heads", "head_dim"), None, pd)
            self.v_bias = param(rngs, (self.kv, self.hd), ("kv_heads", "head_dim"), None, pd)
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.o_bias = param(rngs, (d,), ("embed",), None, pd) if m.use_bias else None

    def _proj(self, x, w, b):
        y = jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype))
        return y if b is None else y + b[...].astype(self.dtype)

    def __call__(self, x, segment_ids, positions, cache=None):
        """x [B, T, d]; segment_ids/positions [B, T]. With `cache` (dict of k, v [B, S, K, D],
        index: slots already filled), new keys are written at `index` and attention runs
        over the filled slots; returns (y, new_cache)."""
        names = ("batch", "length", "heads", "head_dim")
        kv_names = ("batch", "length", "kv_heads", "head_dim")
        q = constrain(self._proj(x, self.wq, self.q_bias), *names)
        k = constrain(self._proj(x, self.wk, self.k_bias), *kv_names)
        v = constrain(self._proj(x, self.wv, self.v_bias), *kv_names)
        if self.pos_encoding == "rope":
            q = apply_rope(q, positions, self.rope_base)
            k = apply_rope(k, positions, self.rope_base)
        slopes = jnp.asarray(alibi_slopes(self.h)) if self.pos_encoding == "alibi" else None
        kv_seg, kv_pos = segment_ids, positions
        if cache is not None:
            idx = cache["index"]
            k = jax_update(cache["k"], k, idx)
            v = jax_update(cache["v"], v, idx)
            kv_seg = jax_update(cache["segment_ids"], segment_ids, idx)
            kv_pos = jax_update(cache["positions"], positions, idx)
            cache = {"k": k, "v": v, "segment_ids": kv_seg, "positions": kv_pos,
                         "index": idx + x.shape[1]}
        y = kernels.attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_seg,
                              positions=positions, kv_positions=kv_pos, alibi_slopes=slopes,
                              causal=True, backend=self.backend,
                              shard_axes=shard_axes(q, k, names, kv_names))
        y = constrain(y, "batch", "length", "heads", "head_dim")
        out = jnp.einsum("bthk,hkd->btd", y, self.wo[...].astype(self.dtype))
        if self.o_bias is not None:
            out = out + self.o_bias[...].astype(self.dtype)
        return out, cache


def shard_axes(q, k, names, kv_names):
    """(batch axes, head axes) of q under the active mesh and rules, for kernels that run
    per shard (the Pallas flash kernel has no SPMD rule of its own); None on one device.
    An axis the mesh does not divide (a one-prompt sampling batch, q's and k/v's heads
    mapped differently) stays whole per shard."""
    spec, kv_spec = logical_spec(*names), logical_spec(*kv_names)
    mesh = jax.sharding.get_abstract_mesh()
    if spec is None or mesh.size == 1:
        return None

    def fits(axes, *dims):
        size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        return axes if all(n % size == 0 for n in dims) else None
    batch = None if spec[0] is None else fits(spec[0], q.shape[0])
    heads = None if spec[2] is None or spec[2] != kv_spec[2] else fits(spec[2], q.shape[2],
                                                                       k.shape[2])
    return (batch, heads) if batch or heads else None


def jax_update(buf, new, idx):
    """Write `new` into `buf` along axis 1 starting at `idx`."""
    start = (0, idx) + (0,) * (buf.ndim - 2)
    return lax.dynamic_update_slice(buf, new.astype(buf.dtype), start)
