"""Train state: parameters (a pure dict), optimizer state, step, RNG and the step guard's
window (`train/guard.py`), created sharded.

`init_state` builds the model abstractly (`nnx.eval_shape`), derives every leaf's
NamedSharding from its logical axis names, and runs the initializer under `jax.jit` with
those out_shardings, so parameters and optimizer state are born sharded.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm import parallel
from jaxllm.model.transformer import Transformer
from jaxllm.train import guard


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """The static half of the model: `apply(params)` rebuilds the NNX module."""

    graphdef: object
    cfg: object

    def apply(self, params) -> Transformer:
        return nnx.merge(self.graphdef, params)


def abstract_model(cfg):
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(cfg.train.seed)))
    return nnx.split(model)


def param_shardings(cfg, mesh, abstract_params):
    return nnx.to_pure_dict(parallel.state_shardings(abstract_params, mesh, cfg))


def opt_shardings(tx, abstract_params, p_shardings, mesh):
    """Optimizer-state shardings: a leaf that mirrors a parameter (same key path tail) gets
    that parameter's sharding (a blocked [..., n/bs, bs] leaf adds an unsharded axis);
    everything else (counts, scalars) is replicated."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    def pick(path, leaf):
        return _match(path, leaf, abstract_params, p_shardings, mesh)
    return jax.tree_util.tree_map_with_path(pick, abstract_opt), abstract_opt


def _match(path, leaf, params, shardings, mesh):
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    # find the longest suffix of the path that addresses a parameter
    for start in range(len(keys)):
        node, snode, ok = params, shardings, True
        for k in keys[start:]:
            if isinstance(node, dict) and k in node:
                node, snode = node[k], snode[k]
            else:
                ok = False
                break
        if ok and hasattr(node, "shape"):
            if tuple(node.shape) == tuple(leaf.shape):
                return snode
            spec = snode.spec
            if len(leaf.shape) == len(node.shape) + 1:  # blocked layout [..., n/bs, bs]
                return NamedSharding(mesh, PartitionSpec(*spec, None))
    return NamedSharding(mesh, PartitionSpec())


def abstract_state(cfg, mesh, tx):
    """The model definition, ShapeDtypeStructs (with shardings) of the train state, and the
    shardings: the restore target and the sizing report, nothing allocated."""
    graphdef, abstract = abstract_model(cfg)
    abstract_pure = nnx.to_pure_dict(abstract)
    p_sh = param_shardings(cfg, mesh, abstract)
    o_sh, abstract_opt = opt_shardings(tx, abstract_pure, p_sh, mesh)
    rep = parallel.replicated(mesh)
    shardings = {"step": rep, "params": p_sh, "opt_state": o_sh, "rng": rep,
                 "guard": {k: rep for k in guard.shapes(cfg)}}
    tree = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_pure,
            "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
            "guard": {k: jax.ShapeDtypeStruct(*v) for k, v in guard.shapes(cfg).items()}}
    tree = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)
    return ModelDef(graphdef, cfg), tree, shardings


def init_state(cfg, mesh, tx):
    """A fresh train state {step, params, opt_state, rng, guard}, created sharded."""
    model_def, _, shardings = abstract_state(cfg, mesh, tx)

    def init():
        model = Transformer(cfg, nnx.Rngs(cfg.train.seed))
        params = nnx.to_pure_dict(nnx.split(model)[1])
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": tx.init(params),
                "rng": jax.random.key_data(jax.random.key(cfg.train.seed + 1)),
                "guard": guard.init(cfg)}

    with parallel.activate(cfg, mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return model_def, state, shardings
