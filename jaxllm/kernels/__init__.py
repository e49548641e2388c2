"""Attention backends behind one signature.

`attention(q, k, v, ...)` takes q [B, T, H, D] and k, v [B, S, K, D] (H a multiple of K),
document segment ids (0 = padding) and per-token positions (which restart per packed
document), optional ALiBi slopes [H], and a backend name:
- `xla`: the reference (kernels/xla.py), every platform;
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, GPU;
- `flash`: fused Pallas flash attention with ALiBi and document masks inside the kernel:
  Triton on GPU (kernels/flash.py), Mosaic on TPU (kernels/flash_tpu.py);
- `splash`: TPU splash attention (kernels/splash.py; no ALiBi);
- `auto`: the fastest correct backend for the platform and arguments.
The platform is `target_platform()`: the default backend, or the one named by
`lowering_for(...)` (kernels/placement.py) when exporting for hardware this host does not have.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxllm.kernels import cudnn, xla
from jaxllm.kernels.placement import lowering_for, target_platform

__all__ = ["BACKENDS", "attention", "compared_backends", "lowering_for", "resolve_backend",
           "target_platform"]
BACKENDS = ("auto", "xla", "cudnn", "flash", "splash")


def _default_positions(x, n):
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (x.shape[0], n))


def resolve_backend(backend: str, *, alibi: bool, platform: str | None = None,
                    dtype=None) -> str:
    """The backend `auto` stands for on this platform; other names pass through (checked).

    GPU: `cudnn` for bfloat16/float16 without ALiBi (cuDNN's fused kernels); `flash` with
    ALiBi (cuDNN would need a dense [B, H, T, S] bias, measured 2.2-4.4x slower on an H200)
    and for float32 (cuDNN flash attention takes only half precision); `flash` on ROCm.
    TPU: `splash` (splash attention, as MaxText) without ALiBi, `flash` (the Mosaic ALiBi
    kernel) with it. CPU and anything else: `xla`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    platform = platform or target_platform()
    if platform == "tpu":
        return "flash" if alibi else "splash"
    if platform == "rocm":  # no cuDNN; the Pallas kernel has a ROCm Triton lowering
        return "flash"
    if platform in ("gpu", "cuda"):
        half = dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        return "cudnn" if half and not alibi else "flash"
    return "xla"


def compared_backends(platform: str | None = None) -> tuple[str, ...]:
    """The backends worth timing against each other on a platform (bench --compare_backends):
    TPU: xla, splash, flash (Mosaic); elsewhere: xla, cudnn, flash (Triton)."""
    if (platform or target_platform()) == "tpu":
        return ("xla", "splash", "flash")
    return ("xla", "cudnn", "flash")


def attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, positions=None,
              kv_positions=None, alibi_slopes=None, causal=True, backend="auto", scale=None,
              shard_axes=None):
    """Masked (causal, per-document) multi-head attention; returns [B, T, H, D] in q's dtype.

    `shard_axes=(batch axes, head axes)` (mesh axis names; from the model's logical rules)
    runs the Pallas kernels (`flash`, `splash`) per shard under `jax.shard_map`; XLA
    partitions the other backends itself, so they ignore it."""
    t, s = q.shape[1], k.shape[1]
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    if kv_segment_ids is None:
        kv_segment_ids = segment_ids if s == t else jnp.ones(k.shape[:2], jnp.int32)
    if positions is None:
        positions = _default_positions(q, t) + (s - t)
    if kv_positions is None:
        kv_positions = positions if s == t else _default_positions(k, s)
    backend = resolve_backend(backend, alibi=alibi_slopes is not None, dtype=q.dtype)
    # The Pallas backends are imported when chosen: their Pallas Mosaic / Triton modules
    # take a third of a second to import and are experimental parts of JAX.
    if backend == "xla":
        fn = xla.attention
    elif backend == "cudnn":
        fn = cudnn.attention
    elif backend == "flash" and target_platform() == "tpu":
        from jaxllm.kernels import flash_tpu
        fn = flash_tpu.attention
    elif backend == "flash":
        from jaxllm.kernels import flash
        fn = flash.attention
    elif backend == "splash":
        from jaxllm.kernels import splash
        fn = splash.attention
    else:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    extra = {"shard_axes": shard_axes} if backend in ("flash", "splash") and shard_axes else {}
    return fn(q, k, v, segment_ids, kv_segment_ids, positions, kv_positions,
              alibi_slopes=alibi_slopes, causal=causal, scale=scale, **extra)
