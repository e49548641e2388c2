"""Optimizer-state helpers: memory size, logged metrics, and shardings from the params'.

Layout contract: every optimizer here keeps per-parameter state in trees with the same
structure as the parameters (optax's convention), with leaves of the parameter's shape
(AdamW/Lion/Sophia moments, SGD momentum, 8-bit codes) or, for 8-bit Adam's per-block
absmax, the parameter's shape with the last axis divided by the block. So shardings
follow the parameters: `opt_state_shardings` gives each state leaf its parameter's
sharding (dropping a mesh axis from a dimension it does not divide) and replicates
scalars such as step counts. Under `jax.jit` without explicit shardings, propagation
from the sharded parameters gives the same result for the param-shaped leaves.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.optim.sophia import SophiaState


def _unwrap(x):  # nnx.Variable -> its value, without importing flax
    return x.get_value() if hasattr(x, "get_metadata") and hasattr(x, "get_value") else x


def opt_state_bytes(opt_state) -> int:
    """Total bytes of all array leaves (arrays or jax.ShapeDtypeStruct from jax.eval_shape)."""
    total = 0
    for leaf in jax.tree.leaves(opt_state):
        leaf = _unwrap(leaf)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def optimizer_metrics(opt_state) -> dict:
    """Scalars worth logging from the state: {"sophia_win_rate": x} for Sophia, else {}."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SophiaState))
             if isinstance(s, SophiaState)]
    if not found:
        return {}
    return {"sophia_win_rate": _unwrap(found[0].win_rate)}


def _fit_spec(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
    """`spec` padded/cut to len(shape), each entry kept only where it divides the dim."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for dim, axes in zip(shape, entries[: len(shape)], strict=True):
        names = axes if isinstance(axes, tuple) else (axes,) if axes is not None else ()
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if size and dim % size == 0 else None)
    return PartitionSpec(*out)


def opt_state_shardings(opt_state, params, param_shardings):
    """NamedSharding tree for `opt_state` (arrays or ShapeDtypeStructs, e.g. from
    `jax.eval_shape(tx.init, params)`) given the parameters and their NamedShardings.

    Each subtree of the state with the parameters' tree structure takes the parameters'
    specs leaf by leaf (fitted to the leaf's rank and dimensions); other leaves (counts,
    the Sophia win rate) are replicated.
    """
    p_def = jax.tree.structure(params)
    s_leaves = jax.tree.leaves(param_shardings)
    mesh = s_leaves[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())

    def is_param_tree(x):
        return jax.tree.structure(x) == p_def and len(s_leaves) == p_def.num_leaves

    def assign(sub):
        if not is_param_tree(sub):
            return jax.tree.map(lambda _: replicated, sub)
        leaves = jax.tree.leaves(sub)
        out = [NamedSharding(mesh, _fit_spec(s.spec, _unwrap(x).shape, mesh))
               for x, s in zip(leaves, s_leaves, strict=True)]
        return jax.tree.unflatten(p_def, out)

    return jax.tree.map(assign, opt_state, is_leaf=is_param_tree)
