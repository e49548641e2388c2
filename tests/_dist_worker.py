"""Subprocess side of the distributed tests (needs XLA_FLAGS set before JAX starts).

    python tests/_dist_worker.py meshes OPTIMIZER   -> JSON {mesh: [loss per step]}
    python tests/_dist_worker.py shardings          -> JSON of specs and shard shapes
    python tests/_dist_worker.py restore DIR...     -> JSON of restored params checks
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from tests.fixtures import tiny_cfg
from jaxllm import optim, parallel

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2), (2, 1, 4)]
STEPS = 10


def mesh_cfg(mesh=(1, 1, 1), opt="adamw"):
    """The test model (fixtures.tiny_cfg: 2 layers, d 32, 4 heads, SwiGLU, bytes, float32)
    on `mesh`, with 8-bit Adam on every matrix (blocks of 32 along the last axis)."""
    return tiny_cfg(**{"model.dtype": "float32", "train.batch_size": 8, "train.steps": STEPS,
                       "optim.name": opt, "optim.block_size": 32, "optim.min_8bit_size": 1024,
                       "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})


def build(cfg, n_devices):
    from jaxllm.data.resolve import resolve
    from jaxllm.state import init_state
    resolve(cfg)
    mesh = parallel.make_mesh(cfg, jax.devices()[:n_devices])
    tx = optim.build_optimizer(cfg)
    model_def, state, shardings = init_state(cfg, mesh, tx)
    return mesh, tx, model_def, state, shardings


def train_losses(cfg, batches, n_devices):
    from jaxllm.train.step import make_train_step
    mesh, tx, model_def, state, sh = build(cfg, n_devices)
    with parallel.activate(cfg, mesh):
        step = jax.jit(make_train_step(cfg, model_def, tx), donate_argnums=0,
                       in_shardings=(sh, parallel.batch_sharding(mesh)),
                       out_shardings=(sh, None))
        losses = []
        for b in batches:
            state, m = step(state, parallel.global_batch(b, mesh))
            losses.append(float(m["loss"]))
    return losses


def meshes(opt):
    from jaxllm.data.pipeline import make_pipeline
    from jaxllm.data.resolve import resolve
    base = mesh_cfg(opt=opt)
    tok = resolve(base)
    batches = list(itertools.islice(make_pipeline(base, tok, "train"), STEPS))
    out = {"1,1,1": train_losses(base, batches, 1)}
    for mesh in MESHES:
        out[",".join(map(str, mesh))] = train_losses(mesh_cfg(mesh, opt), batches, 8)
    return out


def _spec(x):
    return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def shardings():
    """Specs and per-device shard shapes of params and optimizer state on (1,4,2), plus
    activation constraints traced under the mesh and the init's per-device memory."""
    from jaxllm.model.layers import constrain
    out = {}
    for opt in ("adamw", "adam8bit", "sophia_g"):
        _, _, _, state, _ = build(mesh_cfg((1, 4, 2), opt), 8)
        leaves = {}
        for path, x in jax.tree_util.tree_leaves_with_path(state):
            key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                           for k in path)
            leaves[key] = {"shape": list(x.shape), "spec": _spec(x),
                           "shard": list(x.addressable_shards[0].data.shape),
                           "dtype": str(x.dtype)}
        out[opt] = leaves
    cfg = mesh_cfg((2, 2, 2))
    mesh = parallel.make_mesh(cfg)
    with parallel.activate(cfg, mesh):
        f = jax.jit(lambda x, h: (constrain(x, "batch", "length", "embed"),
                                  constrain(h, "batch", "length", "heads", "head_dim")))
        a, b = f(np.zeros((8, 32, 32), np.float32), np.zeros((8, 32, 4, 8), np.float32))
    out["activations"] = {"residual": _spec(a), "heads": _spec(b)}
    out["init_memory"] = init_memory()
    return out


def init_memory():
    """The compiled (partitioned) initializer on fsdp=8: the largest array any device
    touches, against the largest parameter and its shard; and per-device output bytes."""
    import re

    from jaxllm.data.resolve import resolve
    from jaxllm.state import abstract_state, init_fn
    cfg = mesh_cfg((1, 8, 1))
    cfg.model.update(d_model=256, n_heads=8, n_layers=2, d_ff=1024)
    resolve(cfg)
    mesh = parallel.make_mesh(cfg)
    tx = optim.build_optimizer(cfg)
    _, tree, sh = abstract_state(cfg, mesh, tx)
    with parallel.activate(cfg, mesh):
        compiled = jax.jit(init_fn(cfg, tx), out_shardings=sh).lower().compile()
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
             for dims in re.findall(r"\b(?:f32|u32|s32|u8|bf16)\[([0-9,]*)\]",
                                    compiled.as_text())]
    params = jax.tree.leaves(tree["params"])
    largest = max(params, key=lambda x: x.size)
    return {"max_hlo_elements": max(sizes), "largest_param_elements": int(largest.size),
            "largest_shard_elements": int(np.prod(largest.sharding.shard_shape(largest.shape))),
            "output_bytes": int(compiled.memory_analysis().output_size_in_bytes),
            "whole_state_bytes": sum(int(x.size) * x.dtype.itemsize
                                     for x in jax.tree.leaves(tree))}


def restore(dirs):
    """Restore the `state` item of each workdir's newest checkpoint into one process on a
    (8,1,1) mesh (another layout than it was saved with); report step and param diffs."""
    import orbax.checkpoint as ocp

    from jaxllm.data.resolve import resolve
    from jaxllm.state import abstract_state
    cfg = mesh_cfg((8, 1, 1))
    resolve(cfg)
    mesh = parallel.make_mesh(cfg)
    _, tree, _ = abstract_state(cfg, mesh, optim.build_optimizer(cfg))
    states = []
    for d in dirs:
        mngr = ocp.CheckpointManager(os.path.join(d, "checkpoints"),
                                     item_names=("state", "data_iter", "meta"))
        step = mngr.latest_step()
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(tree)))
        states.append(out["state"])
        mngr.close()
    a, b = states
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                         a["params"], b["params"])
    sharding = a["params"]["embed"]["embedding"].sharding
    return {"steps": [int(s["step"]) for s in states],
            "max_param_diff": max(jax.tree.leaves(diffs)),
            "max_param_abs": float(max(np.max(np.abs(np.asarray(x)))
                                       for x in jax.tree.leaves(a["params"]))),
            "mesh": dict(sharding.mesh.shape), "devices": len(sharding.mesh.devices.flat)}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "meshes":
        result = meshes(sys.argv[2])
    elif mode == "shardings":
        result = shardings()
    else:
        result = restore(sys.argv[2:])
    print("RESULT " + json.dumps(result))
