"""Train state: parameters (a pure dict), optimizer state, step, RNG and the step guard's
window (`train/guard.py` decides with it), created sharded. Below `train` (which steps it),
`hf` (which writes a step-0 state around imported weights) and the sizing report.

`init_state` builds the model abstractly (`nnx.eval_shape`), derives every leaf's
NamedSharding from its logical axis names, and runs the initializer under `jax.jit` with
those out_shardings, so parameters and optimizer state are born sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm import optim, parallel
from jaxllm.model.transformer import ModelDef, Transformer, abstract_model


def guard_shapes(cfg) -> dict:
    """(shape, dtype) of each leaf of the step guard's window (`train/guard.py`): a ring of
    the last `train.spike_window` accepted losses, the accepted count, the skip count."""
    return {"losses": ((cfg.train.spike_window,), jnp.float32),
            "accepted": ((), jnp.int32), "skips": ((), jnp.int32)}


def guard_init(cfg) -> dict:
    """The guard part of a fresh train state (zeros)."""
    return {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in guard_shapes(cfg).items()}


def param_shardings(cfg, mesh, abstract_params):
    return nnx.to_pure_dict(parallel.state_shardings(abstract_params, mesh, cfg))


def opt_shardings(tx, abstract_params, p_shardings, mesh):
    """Optimizer-state shardings (`optim.opt_state_shardings`): every leaf of a subtree
    shaped like the parameters takes its parameter's sharding (Adam/Lion/Sophia moments,
    Sophia's h, 8-bit codes), fitted to the leaf's shape (8-bit Adam's per-block absmax
    [..., n/b] keeps a mesh axis only where it divides); counts and scalars are replicated."""
    del mesh
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    return optim.opt_state_shardings(abstract_opt, abstract_params, p_shardings), abstract_opt


def abstract_state(cfg, mesh, tx):
    """The model definition, ShapeDtypeStructs (with shardings) of the train state, and the
    shardings: the restore target and the sizing report, nothing allocated."""
    graphdef, abstract = abstract_model(cfg)
    abstract_pure = nnx.to_pure_dict(abstract)
    p_sh = param_shardings(cfg, mesh, abstract)
    o_sh, abstract_opt = opt_shardings(tx, abstract_pure, p_sh, mesh)
    rep = parallel.replicated(mesh)
    shardings = {"step": rep, "params": p_sh, "opt_state": o_sh, "rng": rep,
                 "guard": {k: rep for k in guard_shapes(cfg)}}
    tree = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_pure,
            "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
            "guard": {k: jax.ShapeDtypeStruct(*v) for k, v in guard_shapes(cfg).items()}}
    tree = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)
    return ModelDef(graphdef, cfg), tree, shardings


def fresh_state(cfg, tx, params) -> dict:
    """Step 0 around given parameters: fresh optimizer state, RNG and step guard."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.key(cfg.train.seed + 1)),
            "guard": guard_init(cfg)}


def init_fn(cfg, tx):
    """The initializer of the train state (to run under jax.jit with out_shardings)."""
    def init():
        model = Transformer(cfg, nnx.Rngs(cfg.train.seed))
        return fresh_state(cfg, tx, nnx.to_pure_dict(nnx.split(model)[1]))
    return init


def init_state(cfg, mesh, tx):
    """A fresh train state {step, params, opt_state, rng, guard}, created sharded: each device
    computes only its own shards (sharding-invariant threefry random numbers)."""
    model_def, _, shardings = abstract_state(cfg, mesh, tx)
    with parallel.activate(cfg, mesh):
        state = jax.jit(init_fn(cfg, tx), out_shardings=shardings)()
    return model_def, state, shardings
