"""Fused flash attention in Pallas with ALiBi, document and causal masks inside the kernel.

FlashAttention (Dao et al., NeurIPS 2022) and FlashAttention-2 (Dao, 2023): tiles of q
stay on chip while k/v tiles stream past; an online softmax keeps a running row max `m`
and row sum `l`, and the forward pass saves only the logsumexp (here in base 2) for the
backward pass, which recomputes the probabilities tile by tile. ALiBi (Press et al.,
ICLR 2022) adds `slope_h * (kv_pos - q_pos)` to each score; here that bias, the document
mask (equal segment ids, 0 = padding) and the causal mask (`kv_pos <= q_pos`) are all
computed from per-token ids and positions inside the kernel: no T x S bias or mask tensor
exists in memory and there is no bias gradient (ALiBi slopes are constants).

Kernels (Triton lowering on GPU; `interpret=True`, chosen automatically on CPU):
- forward, grid (batch, q head, q block): loops over kv blocks;
- dq, grid (batch, q head, q block): loops over kv blocks;
- dk/dv, grid (batch, kv head, kv block): loops over the q heads of its group (GQA: q head
  h reads kv head h // (H // K)) and over q blocks, so no cross-program reduction is needed.
Block sparsity: before each kernel, `tiles.tile_classes` sorts every (q tile, kv tile) pair from
per-tile min/max of segment ids and positions into "nothing visible" (skipped: the loop
only runs over each row's first to last live tile and branches past dead ones inside, so
their k/v tiles are never loaded), "all visible" (no mask is computed) and "some visible"
(masked). This covers the causal upper triangle, the cross-document tiles of packed rows
and padding, and holds for any ids and positions (no assumption that positions follow the
index order).

Shapes: sequence lengths are padded here to a multiple of the block sizes (padding gets
segment id 0, so it is masked and sliced off again; this costs one copy of q/k/v, so
prefer lengths that are multiples of the blocks). Head sizes that are not a power of two
>= 16 are zero-padded likewise (Triton tiles must be powers of two). Block sizes must be
powers of two >= 16 (Triton's smallest matmul tile); each is clamped to the padded
length.
"""

from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxllm.kernels import placement, tiles
from jaxllm.kernels.tiles import BlockSizes

SMALLEST_BLOCK = 16  # Triton's smallest matmul tile


def default_blocks(head_dim: int, dtype) -> BlockSizes:
    """Tiles that compile without register spills for sm_90 (Triton 3.9, ptxas -v) at the
    default warps (4 for half precision and head size <= 64, else 8). Not tuned by
    timing: benchmark on the target GPU and pass your own."""
    if jnp.dtype(dtype).itemsize >= 4:  # float32: IEEE dots on CUDA cores
        return BlockSizes(32, 32, 32, 32, 32 if head_dim <= 64 else 16, 32)
    return BlockSizes(128, 64, 64, 64, 64 if head_dim <= 64 else 32, 64)


def default_num_warps(head_dim: int, dtype) -> int:
    return 4 if jnp.dtype(dtype).itemsize < 4 and head_dim <= 64 else 8


@dataclasses.dataclass(frozen=True)
class _Cfg(tiles.Cfg):
    num_warps: int
    num_stages: int


def _plan(cls):
    """[B, m, n] classes -> [B, m, n + 2]: each row's classes, then its [lo, hi) tile range."""
    idx = jnp.arange(cls.shape[2], dtype=jnp.int32)
    lo = jnp.min(jnp.where(cls > 0, idx, cls.shape[2]), axis=2, keepdims=True)
    hi = jnp.max(jnp.where(cls > 0, idx + 1, 0), axis=2, keepdims=True)
    return jnp.concatenate([cls, lo, hi], axis=2)


def _tile_loop(plan_ref, visit, carry):
    """fori over tiles plan[n]..plan[n + 1]: visit(j, carry, masked) by class, 0 skipped."""
    n = plan_ref.shape[0] - 2

    def body(j, carry):
        branches = [lambda c: c, functools.partial(visit, j, masked=True),
                    functools.partial(visit, j, masked=False)]
        return lax.switch(plan_ref[j], branches, carry)

    return lax.fori_loop(plan_ref[n], plan_ref[n + 1], body, carry)


def _scores(q, k, q_pos, kv_pos, slope, cfg):
    """Base-2 logits of a [bq, bk] tile (tiles.logits2)."""
    return tiles.logits2(tiles.dot(q, k, (1, 1)), cfg.scale, slope if cfg.alibi else None,
                         q_pos[:, None], kv_pos[None, :])


def _tile_mask(q_seg, kv_seg, q_pos, kv_pos, causal):
    """Visibility of a [bq, bk] tile from the q tile's and the kv tile's ids and positions."""
    return tiles.visible(tiles.Ids(q_seg[:, None], kv_seg[None, :], q_pos[:, None],
                                   kv_pos[None, :]), causal)


def _fwd_kernel(q_ref, k_ref, v_ref, ids, plan_ref, *refs, cfg, block_k):
    """`ids`: refs of the q tile's ids and positions and of all kv ids and positions."""
    slopes_ref, o_ref, lse_ref = refs if cfg.alibi else (None, *refs)
    slope = slopes_ref[pl.program_id(1)] if cfg.alibi else None
    q, q_seg, q_pos = q_ref[...], ids.q_seg[...], ids.q_pos[...]
    bq, dp = q.shape

    def visit(j, carry, masked):
        acc, m, row_sum = carry
        sl = pl.ds(j * block_k, block_k)
        kv_pos, v = ids.kv_pos[sl], v_ref[sl, :]
        s = _scores(q, k_ref[sl, :], q_pos, kv_pos, slope, cfg)
        if masked:
            mask = _tile_mask(q_seg, ids.kv_seg[sl], q_pos, kv_pos, cfg.causal)
            s = jnp.where(mask, s, tiles.MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_new[:, None])
        if masked:
            p = jnp.where(mask, p, 0.0)
        corr = jnp.exp2(m - m_new)
        acc = acc * corr[:, None] + tiles.dot(p.astype(v.dtype), v)
        return acc, m_new, row_sum * corr + jnp.sum(p, axis=1)

    init = (jnp.zeros((bq, dp), jnp.float32), jnp.full((bq,), tiles.MASKED, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, row_sum = _tile_loop(plan_ref, visit, init)
    l_safe = jnp.where(row_sum > 0, row_sum, 1.0)  # rows that see no key (padding) return zeros
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l_safe)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids, plan_ref, *refs, cfg,
               block_k):
    slopes_ref, dq_ref = refs if cfg.alibi else (None, *refs)
    slope = slopes_ref[pl.program_id(1)] if cfg.alibi else None
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg, q_pos = ids.q_seg[...], ids.q_pos[...]

    def visit(j, dq, masked):
        sl = pl.ds(j * block_k, block_k)
        k, v, kv_pos = k_ref[sl, :], v_ref[sl, :], ids.kv_pos[sl]
        p = jnp.exp2(_scores(q, k, q_pos, kv_pos, slope, cfg) - lse[:, None])
        if masked:
            p = jnp.where(_tile_mask(q_seg, ids.kv_seg[sl], q_pos, kv_pos, cfg.causal), p, 0.0)
        ds = p * (tiles.dot(do, v, (1, 1)) - delta[:, None])
        return dq + tiles.dot(ds.astype(k.dtype), k)

    dq = _tile_loop(plan_ref, visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids, plan_ref, *refs, cfg,
                block_q):
    slopes_ref, dk_ref, dv_ref = refs if cfg.alibi else (None, *refs)
    k, v, kv_seg, kv_pos = k_ref[...], v_ref[...], ids.kv_seg[...], ids.kv_pos[...]

    def head(g, carry):
        slope = slopes_ref[g] if cfg.alibi else None

        def visit(i, carry, masked):
            dk, dv = carry
            sl = pl.ds(i * block_q, block_q)
            q, do, q_pos = q_ref[sl, g, :], do_ref[sl, g, :], ids.q_pos[sl]
            p = jnp.exp2(_scores(q, k, q_pos, kv_pos, slope, cfg) - lse_ref[g, sl][:, None])
            if masked:
                p = jnp.where(_tile_mask(ids.q_seg[sl], kv_seg, q_pos, kv_pos, cfg.causal), p,
                              0.0)
            dv = dv + tiles.dot(p.astype(do.dtype), do, (0, 0))
            ds = p * (tiles.dot(do, v, (1, 1)) - delta_ref[g, sl][:, None])
            return dk + tiles.dot(ds.astype(q.dtype), q, (0, 0)), dv

        return _tile_loop(plan_ref, visit, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_ref.shape[1], head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg, name):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=cfg.interpret, name=name,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages))


def _forward(q, k, v, ids, slopes, cfg):
    b, t, h, dp = q.shape
    s, kh = k.shape[1], k.shape[2]
    g, bq = h // kh, cfg.blocks.block_q
    q_blk = pl.BlockSpec((None, bq, None, dp), lambda bi, hi, i: (bi, i, hi, 0))
    kv_all = pl.BlockSpec((None, s, None, dp), lambda bi, hi, i: (bi, 0, hi // g, 0))
    ids_q = pl.BlockSpec((None, bq), lambda bi, hi, i: (bi, i))
    ids_kv = pl.BlockSpec((None, s), lambda bi, hi, i: (bi, 0))
    bk = cfg.blocks.block_k
    plan = _plan(tiles.tile_classes(ids, bq, bk, cfg.causal))
    plan_spec = pl.BlockSpec((None, None, plan.shape[2]), lambda bi, hi, i: (bi, i, 0))
    in_specs = [q_blk, kv_all, kv_all, tiles.Ids(ids_q, ids_kv, ids_q, ids_kv), plan_spec]
    args = [q, k, v, ids, plan]
    if cfg.alibi:
        in_specs.append(pl.BlockSpec((h,), lambda bi, hi, i: (0,)))
        args.append(slopes)
    out, lse = _call(
        functools.partial(_fwd_kernel, cfg=cfg, block_k=cfg.blocks.block_k), (b, h, t // bq),
        in_specs, [q_blk, pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        cfg, "flash_alibi_fwd")(*args)
    return out, lse


def _backward(q, k, v, ids, slopes, out, lse, do, cfg):
    b, t, h, dp = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    # dq: one program per (batch, q head, q block), looping over kv blocks.
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    q_blk = pl.BlockSpec((None, bq, None, dp), lambda bi, hi, i: (bi, i, hi, 0))
    kv_all = pl.BlockSpec((None, s, None, dp), lambda bi, hi, i: (bi, 0, hi // g, 0))
    row_blk = pl.BlockSpec((None, None, bq), lambda bi, hi, i: (bi, hi, i))
    ids_q = pl.BlockSpec((None, bq), lambda bi, hi, i: (bi, i))
    ids_kv = pl.BlockSpec((None, s), lambda bi, hi, i: (bi, 0))
    plan = _plan(tiles.tile_classes(ids, bq, bk, cfg.causal))
    plan_spec = pl.BlockSpec((None, None, plan.shape[2]), lambda bi, hi, i: (bi, i, 0))
    in_specs = [q_blk, kv_all, kv_all, q_blk, row_blk, row_blk,
                tiles.Ids(ids_q, ids_kv, ids_q, ids_kv), plan_spec]
    args = [q, k, v, do, lse, delta, ids, plan]
    if cfg.alibi:
        in_specs.append(pl.BlockSpec((h,), lambda bi, hi, i: (0,)))
        args.append(slopes)
    dq = _call(functools.partial(_dq_kernel, cfg=cfg, block_k=bk), (b, h, t // bq), in_specs,
               q_blk, jax.ShapeDtypeStruct(q.shape, q.dtype), cfg, "flash_alibi_dq")(*args)
    # dk, dv: one program per (batch, kv head, kv block), looping over its q heads and blocks.
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    q_grp = pl.BlockSpec((None, t, None, g, dp), lambda bi, ki, j: (bi, 0, ki, 0, 0))
    kv_blk = pl.BlockSpec((None, bk, None, dp), lambda bi, ki, j: (bi, j, ki, 0))
    row_grp = pl.BlockSpec((None, None, g, t), lambda bi, ki, j: (bi, ki, 0, 0))
    ids_q = pl.BlockSpec((None, t), lambda bi, ki, j: (bi, 0))
    ids_kv = pl.BlockSpec((None, bk), lambda bi, ki, j: (bi, j))
    cls = tiles.tile_classes(ids, bq, bk, cfg.causal)
    plan = _plan(cls.swapaxes(1, 2))
    plan_spec = pl.BlockSpec((None, None, plan.shape[2]), lambda bi, ki, j: (bi, j, 0))
    in_specs = [q_grp, kv_blk, kv_blk, q_grp, row_grp, row_grp,
                tiles.Ids(ids_q, ids_kv, ids_q, ids_kv), plan_spec]
    grp = (b, t, kh, g, dp)
    args = [q.reshape(grp), k, v, do.reshape(grp), lse.reshape(b, kh, g, t),
            delta.reshape(b, kh, g, t), ids, plan]
    if cfg.alibi:
        in_specs.append(pl.BlockSpec((None, g), lambda bi, ki, j: (ki, 0)))
        args.append(slopes.reshape(kh, g))
    dk, dv = _call(functools.partial(_dkv_kernel, cfg=cfg, block_q=bq), (b, kh, s // bk),
                   in_specs, [kv_blk, kv_blk],
                   [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                   cfg, "flash_alibi_dkv")(*args)
    return dq, dk, dv


_flash = tiles.with_flash_vjp(_forward, _backward)


def attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, alibi_slopes=None, causal=True, scale=None,
              *, block_sizes: BlockSizes | None = None, interpret: bool | None = None,
              num_warps: int | None = None, num_stages: int = 2, shard_axes=None):
    """Flash attention with the kernels/xla.py signature and semantics (differentiable in q, k, v).

    q: [B, T, H, D]; k, v: [B, S, K, D] (H a multiple of K); segment ids [B, T] / [B, S]
    (0 = padding); positions [B, T] / [B, S]; alibi_slopes [H] or None. `interpret` defaults
    to True on CPU (Pallas interpreter; slow, for tests) and False on GPU (Triton).
    `block_sizes` (fields left None) and `num_warps` default by head size and dtype
    (default_blocks, default_num_warps).

    `shard_axes=(batch_axes, head_axes)` runs it per shard (placement.per_shard); K (kv
    heads) must divide by the head axes' size.
    """
    tiles.check_shapes(q, k, v, "flash attention")
    (_, t, h, d), s = q.shape, k.shape[1]
    if placement.target_platform() == "tpu" and not placement.interpret_default(interpret):
        raise ValueError("flash attention: this Pallas kernel lowers to Triton (GPU); on TPU "
                         "kernels.attention runs kernels/flash_tpu.py (or pass interpret=True)")
    interpret = placement.interpret_default(interpret)
    dp = tiles.pow2_at_least(d, SMALLEST_BLOCK)
    blocks, tp, sp = (block_sizes or BlockSizes()).fit(default_blocks(dp, q.dtype), t, s,
                                                       SMALLEST_BLOCK, "flash attention")
    cfg = _Cfg.of(q, scale, causal, alibi_slopes, blocks, interpret,
                  num_warps=num_warps or default_num_warps(dp, q.dtype), num_stages=num_stages)

    def run(q, k, v, q_seg, kv_seg, q_pos, kv_pos, slopes=None):
        ids = tiles.Ids(q_seg, kv_seg, q_pos, kv_pos)
        return _padded(q, k, v, ids, slopes, cfg=cfg, tp=tp, sp=sp, dp=dp)

    args = [q, k, v, q_seg, kv_seg, q_pos, kv_pos]
    if alibi_slopes is not None:
        args.append(jnp.asarray(alibi_slopes, jnp.float32).reshape(h))
    return placement.per_shard(run, args, shard_axes, "flash")


@functools.partial(jax.jit, static_argnames=("cfg", "tp", "sp", "dp"))
def _padded(q, k, v, ids, slopes, *, cfg, tp, sp, dp):
    """Pad lengths to tp / sp (segment id 0) and head size to dp (zeros), run, slice back."""
    t, s, d = q.shape[1], k.shape[1], q.shape[3]

    def pad(x, n, axis_len):
        if n == axis_len and dp == d:
            return x
        return jnp.pad(x, [(0, 0), (0, n - axis_len), (0, 0), (0, dp - d)])

    out = _flash(pad(q, tp, t), pad(k, sp, s), pad(v, sp, s), ids.padded(tp, sp), slopes, cfg)
    return out[:, :t, :, :d]
