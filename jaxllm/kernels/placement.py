"""Where attention kernels run: the target platform, and per-shard execution on a mesh.

`target_platform()` is the platform backends are chosen and kernels lowered for: the
default JAX backend, unless code is traced inside `lowering_for("tpu")` (or "cuda",
"rocm"). That lets a CPU-only host export a program for hardware it does not have
(`jax.export.export(..., platforms=["tpu"])`): `auto` then resolves as on that platform
and Pallas kernels lower to Mosaic or Triton instead of running in the interpreter. The
choice is read while tracing: a function jitted inside the context keeps it in its cache.

`per_shard` runs a kernel under `jax.shard_map`: a `pallas_call` has no SPMD partitioning
rule, so under a multi-device `jax.jit` XLA would gather its operands onto every device.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET = contextvars.ContextVar("jaxllm_kernel_target", default=(None, None))
GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def target_platform() -> str:
    return _TARGET.get()[0] or jax.default_backend()


@contextlib.contextmanager
def lowering_for(platform: str, *, interpret: bool = False):
    """Trace attention (backend choice, kernel lowering) for `platform` on any host.
    `interpret=True` runs that platform's Pallas kernels in the interpreter instead, so a
    CPU host can execute the program exactly as chosen for `platform` (tests)."""
    token = _TARGET.set((platform, interpret))
    try:
        yield
    finally:
        _TARGET.reset(token)


def interpret_default(interpret: bool | None) -> bool:
    """Pallas interpreter on CPU hosts (tests), compiled kernels on accelerators, unless
    `lowering_for(..., interpret=True)` or the caller says otherwise."""
    if interpret is not None:
        return bool(interpret)
    platform, forced = _TARGET.get()
    return bool(forced) if platform else jax.default_backend() == "cpu"


def require_tpu_or_interpret(interpret: bool, name: str) -> None:
    """TPU (Mosaic) kernels compile only for a TPU; elsewhere they need the interpreter."""
    platform = target_platform()
    if not interpret and platform != "tpu":
        raise ValueError(f"{name} attention is a TPU (Mosaic) kernel and the platform is "
                         f"{platform}; use backend 'flash' or 'cudnn' there (or interpret=True)")


def per_shard(run, args, shard_axes, name: str):
    """run(q, k, v, q_seg, kv_seg, q_pos, kv_pos[, slopes]) per shard of `shard_axes`.

    `shard_axes=(batch_axes, head_axes)`: mesh axis names (or tuples, or None) that q/k/v
    [B, T, H|K, D] are split over along batch and heads; ids [B, T] follow the batch, ALiBi
    slopes [H] the heads. Sequence axes stay whole (attention needs every key). The mesh is
    the one set with `jax.set_mesh`; None runs `run` directly.
    """
    if shard_axes is None:
        return run(*args)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(f"{name} attention: shard_axes needs a mesh set with jax.set_mesh")
    P = jax.sharding.PartitionSpec  # noqa: N806
    batch, heads = shard_axes
    x, ids = P(batch, None, heads, None), P(batch, None)
    specs = (x, x, x, ids, ids, ids, ids, P(heads))[:len(args)]
    return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=x, check_vma=False)(*args)
