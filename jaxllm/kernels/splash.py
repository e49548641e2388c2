"""TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) behind the
kernels/xla.py signature.

Splash attention is the block-sparse flash kernel MaxText runs on TPU (Mosaic). It takes
one example at a time, head-major: q [H, T, D], k/v [H, S, D] (multi-head) or [S, D]
(multi-query), so this backend
- vmaps it over the batch, and for grouped-query attention (K < H) over the kv heads
  with the multi-query kernel on each group of H / K query heads;
- scales q by `scale` (default 1/sqrt(D)) itself: splash computes q.k without a scale;
- passes documents as its `SegmentIds` (0 = padding) and causality as its `CausalMask`
  (by token index; equal to the position rule of kernels/xla.py for packed batches,
  whose positions increase with the index inside each document);
- pads the length to a multiple of 128 (its lane width; padding gets segment id 0) and
  zeroes the rows of padding queries (splash lets padding attend to padding).
There is no ALiBi in splash (the `flash` backend on TPU has it: kernels/flash_tpu.py).
Decoding over a KV cache (T != S, positions not equal to the index) runs kernels/xla.py,
since splash's causal mask is by index.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from jaxllm.kernels import placement, tiles, xla

LANES = 128  # splash's tiles are multiples of the TPU lane width


def block_size(t: int, largest: int = 512) -> int:
    """The largest of 512, 256, 128 (<= `largest`) dividing t (t a multiple of 128)."""
    return next(b for b in (512, 256, 128) if b <= max(largest, LANES) and t % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(t: int, heads: int, causal: bool, mqa: bool, block: int, interpret: bool):
    """A splash kernel for one example; its block-mask metadata is computed once (numpy)."""
    one = sa.CausalMask((t, t)) if causal else sa.FullMask((t, t))
    blocks = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                           block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                           block_q_dq=block, block_kv_dq=block)
    make = sa.make_splash_mqa_single_device if mqa else sa.make_splash_mha_single_device
    with jax.ensure_compile_time_eval():  # concrete metadata even when first made under jit
        return make(sa.MultiHeadMask([one] * heads), block_sizes=blocks, interpret=interpret)


def attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, alibi_slopes=None, causal=True, scale=None,
              *, block: int = 512, interpret: bool | None = None, shard_axes=None):
    """Splash attention with kernels/xla.py semantics (differentiable in q, k, v).

    q [B, T, H, D]; k, v [B, S, K, D] (H a multiple of K); ids and positions [B, T].
    `block` caps the tile size (512, 256 or 128, the largest dividing the padded length);
    `interpret` defaults to the Pallas interpreter when the target platform is a CPU;
    `shard_axes` runs it per shard (placement.per_shard)."""
    if alibi_slopes is not None:
        raise ValueError("splash attention has no ALiBi; use attention backend 'flash' "
                         "(on TPU: kernels/flash_tpu.py) or 'xla'")
    tiles.check_shapes(q, k, v, "splash attention")
    (_, t, _, d), s = q.shape, k.shape[1]
    if t != s:  # decoding over a cache: splash's causal mask is by index, not position
        return xla.attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, None, causal, scale)
    interpret = placement.interpret_default(interpret)
    placement.require_tpu_or_interpret(interpret, "splash")
    tp = tiles.round_up(t, LANES)
    run = functools.partial(_padded, scale=float(d ** -0.5 if scale is None else scale),
                            causal=bool(causal), tp=tp, block=block_size(tp, block),
                            interpret=interpret)
    return placement.per_shard(lambda q, k, v, seg, *_: run(q, k, v, seg), [q, k, v, q_seg, kv_seg],
                               shard_axes, "splash")


@functools.partial(jax.jit, static_argnames=("scale", "causal", "tp", "block", "interpret"))
def _padded(q, k, v, seg, *, scale, causal, tp, block, interpret):
    """Pad to tp, go head-major, run the kernel per example (and kv head), undo."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    seg = tiles.pad_tokens(seg.astype(jnp.int32), tp)
    q = tiles.pad_tokens((q.astype(jnp.float32) * scale).astype(q.dtype), tp)
    k, v = tiles.pad_tokens(k, tp), tiles.pad_tokens(v, tp)
    qh, kh_, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, T, D]
    ids = sa.SegmentIds(q=seg, kv=seg)
    if kh == h:
        kernel = _kernel(tp, h, causal, False, block, interpret)
        out = jax.vmap(kernel)(qh, kh_, vh, ids)
    else:  # grouped: the multi-query kernel on each kv head's H/K query heads
        kernel = _kernel(tp, h // kh, causal, True, block, interpret)
        per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
        out = jax.vmap(per_head)(qh.reshape(b, kh, h // kh, tp, d), kh_, vh, ids)
        out = out.reshape(b, h, tp, d)
    out = out.transpose(0, 2, 1, 3)[:, :t]
    return jnp.where((seg[:, :t] > 0)[:, :, None, None], out, 0).astype(q.dtype)
