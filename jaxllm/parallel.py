"""Device mesh, logical-axis rules, shardings and multi-host start-up.

The mesh has axes `(data, fsdp, tensor)`, sized by `mesh.data/fsdp/tensor` (-1 = the rest).
Parameters and activations carry logical names; `mesh.rules` maps them onto mesh axes.
"""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxllm.config import ConfigError

AXES = ("data", "fsdp", "tensor")


def init_distributed(cfg) -> None:
    """`jax.distributed.initialize`: explicit dist.* keys, else auto-detect (TPU pod, SLURM)."""
    d = cfg.dist
    if d.coordinator:
        jax.distributed.initialize(coordinator_address=d.coordinator,
                                   num_processes=d.num_processes, process_id=d.process_id)
    elif d.num_processes > 1 or any(k in os.environ for k in (
            "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")):
        if int(os.environ.get("SLURM_NTASKS", "2")) > 1:
            jax.distributed.initialize()


def mesh_shape(cfg, n_devices: int) -> tuple[int, int, int]:
    """Resolve -1 and check that the product is the device count."""
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh: {dict(zip(AXES, sizes, strict=True))} cannot fill "
                              f"{n_devices} devices ({n_devices} is not a multiple of {known})")
        sizes[sizes.index(-1)] = n_devices // known
    if int(np.prod(sizes)) != n_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are "
                          f"{n_devices} devices; sizes must multiply to the device count")
    return tuple(sizes)


def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    data_shards = shape[0] * shape[1]
    if cfg.train.batch_size % (data_shards * cfg.train.grad_accum):
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} must be divisible by "
                          f"mesh.data*mesh.fsdp ({data_shards}) x train.grad_accum "
                          f"({cfg.train.grad_accum})")
    kv = cfg.model.n_kv_heads or cfg.model.n_heads
    if cfg.model.n_heads % shape[2] or kv % shape[2]:
        raise ConfigError(f"mesh.tensor: {shape[2]} must divide model.n_heads "
                          f"({cfg.model.n_heads}) and n_kv_heads ({kv})")
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules(cfg) -> tuple:
    return tuple((name, tuple(v) if isinstance(v, list) else v) for name, v in cfg.mesh.rules)


@contextlib.contextmanager
def activate(cfg, mesh):
    """Mesh and logical-axis rules in effect (for tracing constraints and creating state)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules(cfg)):
        yield


def state_shardings(abstract_state, mesh, cfg):
    """NamedShardings for an nnx.State (or any tree of Variables) from their logical names."""
    with nnx.logical_axis_rules(rules(cfg)):
        specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict, mesh) -> dict:
    """Assemble each process's local slice into global arrays sharded over (data, fsdp)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}
