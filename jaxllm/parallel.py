"""Device mesh, logical-axis rules, shardings and multi-host start-up.

The mesh has axes `(data, fsdp, tensor)`, sized by `mesh.data/fsdp/tensor` (-1 = the rest),
built with `jax.make_mesh` and Auto axis types (the compiler propagates shardings between
the ones we pin). Parameters and activations carry logical names (`batch, length, embed,
heads, kv_heads, head_dim, mlp, vocab, layers`); `mesh.rules` maps each name onto mesh axes
(MaxText style). With the default rules:

- `data` replicates parameters and splits the batch (plain data parallelism);
- `fsdp` splits the batch *and* the `embed` dimension of every parameter and optimizer-state
  leaf (ZeRO-3 / FSDP: Rajbhandari et al. 2020), gathered on use by the compiler;
- `tensor` splits attention heads, the MLP width and the vocabulary (Megatron-LM tensor
  parallelism: Shoeybi et al. 2019).

Multi-host: every process runs the same program; `init_distributed` joins them
(`jax.distributed.initialize`) before any device is touched, each process feeds its own
slice of the global batch (`global_batch`), and the compiled step sees one global array.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxllm.config import ConfigError

AXES = ("data", "fsdp", "tensor")
LOGICAL = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
           "layers")
log = logging.getLogger("jaxllm")


# --------------------------------------------------------------------------- multi-host


def _slurm_tasks_on_node(env) -> int | None:
    """Tasks of this SLURM step on this node (SLURM_STEP_TASKS_PER_NODE: '4(x2),3' ...)."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node = env.get("SLURM_NODEID")
    if not spec or node is None:
        return None
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[int(node)] if int(node) < len(counts) else None


TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE",
           "MEGASCALE_COORDINATOR_ADDRESS")


def _tpu_vm(env) -> bool:
    """A Cloud TPU VM: its runtime variables, or TPU device files with libtpu installed."""
    if any(env.get(k) for k in TPU_ENV):
        return True
    return (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")) and \
        importlib.util.find_spec("libtpu") is not None


def detect_cluster(environ=None) -> str | None:
    """Which launcher started us: 'slurm', 'tpu' or None (a plain single process).

    SLURM: inside an `srun` step of more than one task (the variables JAX's own SLURM
    detection reads). TPU: any Cloud TPU VM; JAX reads the slice's workers from the TPU
    metadata, and initializing is recommended even on one host (JAX docs) and required
    on a pod for collective checkpoints.
    """
    env = os.environ if environ is None else environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if _tpu_vm(env):
        return "tpu"
    return None


def distributed_args(cfg, environ=None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for one process.

    1. Explicit: `dist.coordinator=HOST:PORT` with `dist.num_processes` and
       `dist.process_id`. Cluster auto-detection is switched off, so JAX never narrows a
       process to one GPU behind our back: each process uses every device it can see
       (launch/slurm.sbatch sets CUDA_VISIBLE_DEVICES for one-process-per-GPU runs).
    2. Auto-detected (`dist.coordinator` empty): a SLURM step of several tasks or a
       Cloud TPU VM (one host or a pod slice); JAX reads the coordinator, process count
       and id from the environment (SLURM variables; TPU metadata). `dist.num_processes`
       and `dist.process_id`, when set, override what is detected. Under SLURM, JAX
       assumes one process per GPU (it picks GPU SLURM_LOCALID); with one task on the
       node we keep all its GPUs (SLURM_GPUS_ON_NODE).
    3. Otherwise: a single process; nothing to initialize.
    """
    env = os.environ if environ is None else environ
    d = cfg.dist
    if d.coordinator:
        return {"coordinator_address": d.coordinator, "num_processes": d.num_processes,
                "process_id": d.process_id, "cluster_detection_method": "deactivate"}
    kind = detect_cluster(env)
    if kind is None:
        if d.num_processes > 1:
            raise ConfigError("dist.num_processes: more than one process needs "
                              "dist.coordinator=HOST:PORT (no SLURM or TPU pod detected)")
        return None
    args = {}
    if d.num_processes:
        args["num_processes"] = d.num_processes
    if d.process_id >= 0:
        args["process_id"] = d.process_id
    if kind == "slurm" and _slurm_tasks_on_node(env) == 1 and env.get("SLURM_GPUS_ON_NODE"):
        args["local_device_ids"] = list(range(int(env["SLURM_GPUS_ON_NODE"])))
    return args


def init_distributed(cfg) -> bool:
    """Join the processes of a multi-host run (see `distributed_args`); call before any
    other JAX call touches devices. Returns True when running as several processes.
    Calling it again (e.g. a second `train()` in the same process) is a no-op."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    args = distributed_args(cfg)
    if args is None:
        return False
    log.info("jax.distributed.initialize(%s)", args)
    jax.distributed.initialize(**args)
    return jax.process_count() > 1


# --------------------------------------------------------------------------------- mesh


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


def check_mesh(cfg, shape) -> None:
    """Divisibility rules of a (data, fsdp, tensor) mesh against the model and batch."""
    data_shards = shape[0] * shape[1]
    if cfg.train.batch_size % (data_shards * cfg.train.grad_accum):
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} must be divisible by "
                          f"mesh.data*mesh.fsdp ({data_shards}) x train.grad_accum "
                          f"({cfg.train.grad_accum})")
    kv = cfg.model.n_kv_heads or cfg.model.n_heads
    if cfg.model.n_heads % shape[2] or kv % shape[2]:
        raise ConfigError(f"mesh.tensor: {shape[2]} must divide model.n_heads "
                          f"({cfg.model.n_heads}) and n_kv_heads ({kv})")


def make_mesh(cfg, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) device mesh (all devices of all processes by default)."""
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    check_mesh(cfg, shape)
    n_proc = jax.process_count()
    if cfg.train.batch_size % n_proc:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} must be divisible by "
                          f"the process count ({n_proc})")
    if (shape[0] * shape[1]) % n_proc:
        raise ConfigError(f"mesh: data*fsdp ({shape[0] * shape[1]}) must be a multiple of the "
                          f"process count ({n_proc}): each process feeds its own batch rows")
    rules(cfg)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def abstract_mesh(cfg, n_devices: int) -> jax.sharding.AbstractMesh:
    """The same mesh without devices (shapes and shardings only: sizing a pod)."""
    shape = mesh_shape(cfg, n_devices)
    check_mesh(cfg, shape)
    return jax.sharding.AbstractMesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)


def rules(cfg) -> tuple:
    """`mesh.rules` as ((logical name, mesh axis | (axes...) | None), ...), checked; a
    logical name the rules leave out is replicated (mapped to None)."""
    out = []
    for entry in cfg.mesh.rules:
        if len(entry) != 2 or entry[0] not in LOGICAL:
            raise ConfigError(f"mesh.rules: bad entry {entry!r}; each is (name, mesh axes) "
                              f"with name one of {', '.join(LOGICAL)}")
        name, v = entry
        v = tuple(v) if isinstance(v, (list, tuple)) else v
        for axis in (v if isinstance(v, tuple) else (v,)):
            if axis is not None and axis not in AXES:
                raise ConfigError(f"mesh.rules: {name!r} -> {axis!r} is not a mesh axis; "
                                  f"allowed: {', '.join(AXES)} or None")
        out.append((name, v))
    given = {name for name, _ in out}
    return tuple(out) + tuple((name, None) for name in LOGICAL if name not in given)


@contextlib.contextmanager
def activate(cfg, mesh):
    """Mesh and logical-axis rules in effect (for tracing constraints and creating state)."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules(cfg)):
        yield


# ---------------------------------------------------------------------------- shardings


def state_shardings(abstract_state, mesh, cfg):
    """NamedShardings for an nnx.State (or any tree of Variables) from their logical names."""
    with nnx.logical_axis_rules(rules(cfg)):
        specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh) -> NamedSharding:
    """Batches are split over (data, fsdp) along their leading axis, replicated on tensor."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict, mesh) -> dict:
    """Assemble each process's local slice ([batch_size / process_count, ...]) into global
    arrays [batch_size, ...] sharded over (data, fsdp). Rows of process p are the p-th
    block of the global batch (the mesh orders devices process by process)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}

