"""Building blocks (Flax NNX): parameters with logical axis names, norms, MLP, embeddings.

Every parameter carries logical axis names (`out_sharding` metadata) from
`batch, length, embed, heads, kv_heads, head_dim, mlp, vocab, layers`; `mesh.rules` in the
config maps them onto mesh axes (jaxllm/parallel.py). Parameters are created unsharded
(`eager_sharding=False`) and placed by a jitted initializer with explicit out_shardings,
so nothing is ever whole on one device first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NORMS = ("layernorm", "rmsnorm")  # `model.norm`


def param(rngs: nnx.Rngs, shape, axes, std: float | None, dtype) -> nnx.Param:
    """A parameter: normal(0, std) init (zeros if std is None, ones if std == 'ones')."""
    if std is None:
        value = jnp.zeros(shape, dtype)
    elif std == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def logical_spec(*names):
    """PartitionSpec of a value with these logical dimension names under the active rules;
    None outside a mesh. A mesh axis shards one dimension only: `embed`->fsdp yields to
    `batch`->fsdp."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None
    used, entries = set(), []
    for entry in spmd.from_sharding_rules(names, rules):
        axes = entry if isinstance(entry, tuple) else (entry,)
        if entry is None or used.intersection(axes):
            entries.append(None)
        else:
            entries.append(entry)
            used.update(axes)
    return jax.sharding.PartitionSpec(*entries)


def constrain(x, *names):
    """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
    spec = logical_spec(*names)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


class Norm(nnx.Module):
    """LayerNorm (optionally without bias, as MPT) or RMSNorm; statistics in float32."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        m = cfg.model
        pd = DTYPES[m.param_dtype]
        self.kind, self.eps, self.dtype = m.norm, m.norm_eps, DTYPES[m.dtype]
        self.scale = param(rngs, (m.d_model,), ("embed",), "ones", pd)
        self.bias = (param(rngs, (m.d_model,), ("embed",), None, pd)
                     if m.use_bias and m.norm == "layernorm" else None)

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        if self.kind == "layernorm":
            xf = xf - xf.mean(-1, keepdims=True)
        y = xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


ACT = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation (GPT-2 gelu_new)
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),  # erf form (MPT, BERT)
    "swish": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
}
# gated variants (Shazeer 2020, "GLU Variants Improve Transformer"): name -> gate activation
GATED = {"glu": "sigmoid", "reglu": "relu", "geglu": "gelu", "swiglu": "swish"}
# `model.activation`: the plain activations (sigmoid only gates GLU) and the gated ones
ACTIVATIONS = tuple(a for a in ACT if a != "sigmoid") + tuple(GATED)


def resolved_d_ff(m) -> int:
    """MLP width: explicit, else 4*d_model, or 2/3 of that rounded up to 64 when gated (the
    parameter count of the ungated MLP, as Shazeer 2020 keeps it)."""
    if m.d_ff:
        return m.d_ff
    if m.activation in GATED:
        return -(-(2 * 4 * m.d_model // 3) // 64) * 64
    return 4 * m.d_model


class MLP(nnx.Module):
    """FFN(x) = act(x W1) W2, or gated (Shazeer 2020): (act(x W) * (x V)) W2."""

    def __init__(self, cfg, d_ff: int, rngs: nnx.Rngs):
        m = cfg.model
        pd, d = DTYPES[m.param_dtype], m.d_model
        self.dtype = DTYPES[m.dtype]
        self.gated = m.activation in GATED
        self.act = ACT[GATED.get(m.activation, m.activation)]
        out_std = m.init_std / (2 * m.n_layers) ** 0.5
        self.w_up = param(rngs, (d, d_ff), ("embed", "mlp"), m.init_std, pd)
        self.w_gate = (param(rngs, (d, d_ff), ("embed", "mlp"), m.init_std, pd)
                       if self.gated else None)
        self.w_down = param(rngs, (d_ff, d), ("mlp", "embed"), out_std, pd)
        self.up_bias = param(rngs, (d_ff,), ("mlp",), None, pd) if m.use_bias else None
        self.gate_bias = (param(rngs, (d_ff,), ("mlp",), None, pd)
                          if m.use_bias and self.gated else None)
        self.down_bias = param(rngs, (d,), ("embed",), None, pd) if m.use_bias else None

    def _dense(self, x, w, b):
        y = jnp.einsum("btd,df->btf", x, w[...].astype(self.dtype))
        return y if b is None else y + b[...].astype(self.dtype)

    def __call__(self, x):
        h = self._dense(x, self.w_up, self.up_bias)
        if self.gated:
            h = self.act(self._dense(x, self.w_gate, self.gate_bias)) * h
        else:
            h = self.act(h)
        h = constrain(h, "batch", "length", "mlp")
        return self._dense(h, self.w_down, self.down_bias)


class Embed(nnx.Module):
    """Token embedding [vocab, embed]; `attend` is the tied output projection."""

    def __init__(self, num: int, d: int, axes, std: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.embedding = param(rngs, (num, d), axes, std, param_dtype)
        self.dtype, self.rows = dtype, axes[0]

    def __call__(self, ids):
        # gather from the table with its `embed` (fsdp) shards all-gathered, as FSDP does for
        # every weight: a lookup into fsdp-sharded columns would come out sharded over
        # `embed`, and moving that to batch sharding makes XLA replicate the activations
        table = constrain(self.embedding[...], self.rows, None)
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x):
        return jnp.einsum("btd,vd->btv", x, self.embedding[...].astype(self.dtype))
