"""Fused flash attention for TPU (Pallas Mosaic) with ALiBi, document and causal masks inside.

The TPU counterpart of kernels/flash.py (Triton), with the same semantics and the same
decisions, taken from kernels/tiles.py: which pairs are visible (`visible`), base-2 logits
with the ALiBi bias from per-token positions (`logits2`), and which (q tile, kv tile)
pairs hold no, some or only visible pairs (`tile_classes`). No T x S bias or mask exists.
FlashAttention-2 (Dao, 2023) online softmax; the forward saves the base-2 logsumexp and
the backward recomputes probabilities tile by tile. Splash attention (the JAX library's
TPU kernel) has block-sparse masks but no ALiBi, which is why this kernel exists.

Layout (Mosaic tiles are (8, 128) for 32-bit values; the lane dimension is 128 wide):
- q/k/v go head-major, [B, H, T, D]; blocks are (block, D) with D the whole head size;
- ids and positions reach the kernel twice: as columns [B, T, 128] (lane-replicated,
  tiled to the tile's width for its row dimension) and as rows [B, 8, T] (a row read for
  its column dimension), the layout and access splash attention uses; running row
  maxima and sums live lane-replicated in [block, 128] scratch, as in splash;
- the logsumexp and delta = rowsum(o * do) travel as rows [B, H, 1, T]; the forward
  writes the logsumexp lane-replicated ([B, H, T, 128] float32, transient: sliced to
  [B, H, T] at once), as splash attention does.
Grids iterate the streamed tile axis last ("arbitrary") with float32 accumulators in
VMEM scratch:
- forward and dq: (batch, q head, q tile, kv tile);
- dk/dv: (batch, kv head, kv tile, q head of its group, q tile), computing the transposed
  scores k q^T so the logsumexp rows broadcast without a transpose (GQA: q head h reads
  kv head h // (H // K); dk/dv sum over the group inside one accumulator).
Block sparsity: each grid's classes are scalar-prefetched into SMEM as one int32 per
tile pair, `4 * fetch + class`: class 0 tiles run no code, class 2 tiles compute no mask,
and `fetch` (the last live tile index, see `_plan`) is what the streamed operands' index
maps load, so a skipped tile repeats the previous block index and Pallas issues no DMA.
SMEM holds B * (T / block_q) * (S / block_k) int32 per kernel (per shard; an error names
the blocks when that exceeds half the SMEM of current TPUs).

Shapes: lengths are padded to a block multiple (segment id 0, sliced off again); blocks
are 128 * 2^k and are clamped to the padded length. Default tiles are 512 (not tuned on
hardware: no TPU was at hand; benchmark with tools/bench.py --compare_backends).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxllm.kernels import placement, tiles
from jaxllm.kernels.tiles import BlockSizes

LANES, SUBLANES = 128, 8
SMEM_BUDGET = 512 * 1024  # of the 1 MiB SMEM per core of TPU v4, v5e, v5p and v6e
DEFAULT_BLOCKS = BlockSizes(*[512] * 6)  # tiles are 128 * 2^k (LANES is the smallest)


def _plan(cls):
    """[B, m, n] classes -> int32 4 * fetch + class, where fetch is the tile to load for each
    step of the streamed axis: itself when live, else the last live one before it (the
    first live one at the start of a row; 0 if none), so dead steps re-use loaded blocks."""
    if cls.size * 4 > SMEM_BUDGET:
        raise ValueError(f"flash attention (TPU): {cls.size * 4} bytes of tile metadata "
                         f"({cls.shape[0]} rows x {cls.shape[1]} x {cls.shape[2]} tiles) exceed "
                         f"the {SMEM_BUDGET} bytes kept for SMEM; use larger blocks or "
                         "fewer rows per shard")
    n = cls.shape[2]
    idx = jnp.arange(n, dtype=jnp.int32)
    prev = lax.cummax(jnp.where(cls > 0, idx, -1), axis=2)
    first = jnp.min(jnp.where(cls > 0, idx, n), axis=2, keepdims=True) % n
    return 4 * jnp.where(prev >= 0, prev, first) + cls


def _columns(x):
    return jnp.broadcast_to(x[:, :, None], (*x.shape, LANES))


def _rows(x):
    return jnp.broadcast_to(x[:, None, :], (x.shape[0], SUBLANES, x.shape[1]))


def _lanes(x, n):
    """A lane-replicated [rows, 128] value as [rows, n] (n a multiple of 128, or below it),
    by tiling or slicing as splash attention does: no broadcast from a 1-wide lane dim."""
    return jnp.tile(x, (1, n // LANES)) if n % LANES == 0 else x[:, :n]


def _dims(n):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * 3 + ("arbitrary",) * (n - 3))


def _fwd_kernel(plan_ref, q_ref, k_ref, v_ref, ids, *refs, cfg):
    """`ids`: refs of the q tile's ids and positions as columns, the kv tile's as rows."""
    slopes_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs if cfg.alibi else (None, *refs)
    b, h, i, j = (pl.program_id(a) for a in range(4))

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, tiles.MASKED, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked):
        v, bk = v_ref[...], v_ref.shape[0]
        q_pos, kv_pos = _lanes(ids.q_pos[...], bk), ids.kv_pos[:1, :]
        slope = slopes_ref[0, h] if cfg.alibi else None
        s = tiles.logits2(tiles.dot(q_ref[...], k_ref[...], (1, 1)), cfg.scale, slope,
                          q_pos, kv_pos)
        if masked:
            mask = tiles.visible(tiles.Ids(_lanes(ids.q_seg[...], bk), ids.kv_seg[:1, :],
                                           q_pos, kv_pos), cfg.causal)
            s = jnp.where(mask, s, tiles.MASKED)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp2(s - _lanes(m_next, bk))
        if masked:
            p = jnp.where(mask, p, 0.0)
        corr = jnp.exp2(m_prev - m_next)
        l_ref[...] = l_ref[...] * corr + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        acc_ref[...] = (acc_ref[...] * _lanes(corr, acc_ref.shape[1])
                        + tiles.dot(p.astype(v.dtype), v))

    cls = plan_ref[b, i, j] & 3
    pl.when(cls == 1)(lambda: step(True))
    pl.when(cls == 2)(lambda: step(False))

    @pl.when(j == pl.num_programs(3) - 1)
    def _end():
        row_sum = l_ref[...]
        l_safe = jnp.where(row_sum > 0, row_sum, 1.0)  # rows that see no key return zeros
        o_ref[...] = (acc_ref[...] / _lanes(l_safe, acc_ref.shape[1])).astype(o_ref.dtype)
        lse_ref[...] = m_ref[...] + jnp.log2(l_safe)


def _dq_kernel(plan_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, ids, *refs, cfg):
    slopes_ref, dq_ref, acc_ref = refs if cfg.alibi else (None, *refs)
    b, h, i, j = (pl.program_id(a) for a in range(4))

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked):
        k, bk = k_ref[...], k_ref.shape[0]
        q_pos, kv_pos = _lanes(ids.q_pos[...], bk), ids.kv_pos[:1, :]
        slope = slopes_ref[0, h] if cfg.alibi else None
        s = tiles.logits2(tiles.dot(q_ref[...], k, (1, 1)), cfg.scale, slope, q_pos, kv_pos)
        p = jnp.exp2(s - jnp.expand_dims(lse_ref[0], -1))
        if masked:
            mask = tiles.visible(tiles.Ids(_lanes(ids.q_seg[...], bk), ids.kv_seg[:1, :],
                                           q_pos, kv_pos), cfg.causal)
            p = jnp.where(mask, p, 0.0)
        dp = tiles.dot(do_ref[...], v_ref[...], (1, 1))
        ds = p * (dp - jnp.expand_dims(di_ref[0], -1))
        acc_ref[...] += tiles.dot(ds.astype(k.dtype), k)

    cls = plan_ref[b, i, j] & 3
    pl.when(cls == 1)(lambda: step(True))
    pl.when(cls == 2)(lambda: step(False))

    @pl.when(j == pl.num_programs(3) - 1)
    def _end():
        dq_ref[...] = (acc_ref[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(plan_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, ids, *refs, cfg,
                group):
    """`ids`: refs of the q tile's ids and positions as rows, the kv tile's as columns."""
    slopes_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs if cfg.alibi else (None, *refs)
    b, kh, j, g, i = (pl.program_id(a) for a in range(5))

    @pl.when(jnp.logical_and(g == 0, i == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked):  # transposed tile: rows are keys, columns queries
        q, do = q_ref[...], do_ref[...]
        bq = q.shape[0]
        q_pos, kv_pos = ids.q_pos[:1, :], _lanes(ids.kv_pos[...], bq)
        slope = slopes_ref[0, kh * group + g] if cfg.alibi else None
        s = tiles.logits2(tiles.dot(k_ref[...], q, (1, 1)), cfg.scale, slope, q_pos, kv_pos)
        p = jnp.exp2(s - lse_ref[...])
        if masked:
            mask = tiles.visible(tiles.Ids(ids.q_seg[:1, :], _lanes(ids.kv_seg[...], bq),
                                           q_pos, kv_pos), cfg.causal)
            p = jnp.where(mask, p, 0.0)
        dv_acc[...] += tiles.dot(p.astype(do.dtype), do)
        ds = p * (tiles.dot(v_ref[...], do, (1, 1)) - di_ref[...])
        dk_acc[...] += tiles.dot(ds.astype(q.dtype), q)

    cls = plan_ref[b, j, i] & 3
    pl.when(cls == 1)(lambda: step(True))
    pl.when(cls == 2)(lambda: step(False))

    @pl.when(jnp.logical_and(g == group - 1, i == pl.num_programs(4) - 1))
    def _end():
        dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, cfg, name):
    spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                        out_specs=out_specs, scratch_shapes=scratch)
    return pl.pallas_call(kernel, grid_spec=spec, out_shape=out_shape, name=name,
                          compiler_params=_dims(len(grid)), interpret=cfg.interpret)


def _smem_slopes(slopes):
    """ALiBi slopes as a [1, H] float32 SMEM array (2-D: Mosaic's rank-1 block rules
    need the chip's description, which a host exporting for TPU does not have)."""
    if slopes is None:
        return [], []
    return [pl.BlockSpec(memory_space=pltpu.SMEM)], [slopes.reshape(1, -1)]


def _q_major_specs(bq, bk, d, g):
    """Blocks of the (batch, q head, q tile, kv tile) grids: q tiles, the fetched kv tile
    of q head h's kv head, and the `Ids` specs: q ids as columns, fetched kv ids as rows."""
    def fetch(b, i, j, p):
        return p[b, i, j] >> 2

    col = pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, p: (b, i, 0))
    row = pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j, p: (b, 0, fetch(b, i, j, p)))
    return (pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, p: (b, h, i, 0)),
            pl.BlockSpec((None, None, bk, d),
                         lambda b, h, i, j, p: (b, lax.div(h, g), fetch(b, i, j, p), 0)),
            tiles.Ids(col, row, col, row))


def _forward(q, k, v, ids, slopes, cfg):
    """q [B, H, T, D], k/v [B, K, S, D] -> out [B, H, T, D], base-2 logsumexp [B, H, T]."""
    b, h, t, d = q.shape
    g, bq, bk = h // k.shape[1], cfg.blocks.block_q, cfg.blocks.block_k
    plan = _plan(tiles.tile_classes(ids, bq, bk, cfg.causal))
    q_blk, kv_blk, ids_specs = _q_major_specs(bq, bk, d, g)
    sl_specs, sl_args = _smem_slopes(slopes)
    lse_blk = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, p: (b, h, i, 0))
    out, lse = _call(
        functools.partial(_fwd_kernel, cfg=cfg), (b, h, t // bq, ids.kv_seg.shape[1] // bk),
        [q_blk, kv_blk, kv_blk, ids_specs, *sl_specs], [q_blk, lse_blk],
        [jax.ShapeDtypeStruct(q.shape, q.dtype),
         jax.ShapeDtypeStruct((b, h, t, LANES), jnp.float32)],
        [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
         pltpu.VMEM((bq, d), jnp.float32)], cfg, "flash_alibi_tpu_fwd",
    )(plan, q, k, v, ids.map(_columns, _rows), *sl_args)
    return out, lse[..., 0]


def _backward(q, k, v, ids, slopes, out, lse, do, cfg):
    b, h, t, d = q.shape
    kh, s = k.shape[1], k.shape[2]
    g = h // kh
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    lse, delta = lse[:, :, None, :], delta[:, :, None, :]  # rows [B, H, 1, T]
    sl_specs, sl_args = _smem_slopes(slopes)
    # dq: (batch, q head, q tile, kv tile)
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    plan = _plan(tiles.tile_classes(ids, bq, bk, cfg.causal))
    q_blk, kv_blk, ids_specs = _q_major_specs(bq, bk, d, g)
    lse_row = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, p: (b, h, 0, i))
    dq = _call(
        functools.partial(_dq_kernel, cfg=cfg), (b, h, t // bq, s // bk),
        [q_blk, kv_blk, kv_blk, q_blk, lse_row, lse_row, ids_specs, *sl_specs], q_blk,
        jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((bq, d), jnp.float32)], cfg,
        "flash_alibi_tpu_dq",
    )(plan, q, k, v, do, lse, delta, ids.map(_columns, _rows), *sl_args)
    # dk, dv: (batch, kv head, kv tile, q head of the group, q tile)
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    cls = tiles.tile_classes(ids, bq, bk, cfg.causal)
    plan = _plan(cls.swapaxes(1, 2))
    q_blk = pl.BlockSpec((None, None, bq, d),
                         lambda b, kh, j, gi, i, p: (b, kh * g + gi, p[b, j, i] >> 2, 0))
    kv_blk = pl.BlockSpec((None, None, bk, d), lambda b, kh, j, gi, i, p: (b, kh, j, 0))
    lse_row = pl.BlockSpec((None, None, 1, bq),
                           lambda b, kh, j, gi, i, p: (b, kh * g + gi, 0, p[b, j, i] >> 2))
    row = pl.BlockSpec((None, SUBLANES, bq), lambda b, kh, j, gi, i, p: (b, 0, p[b, j, i] >> 2))
    col = pl.BlockSpec((None, bk, LANES), lambda b, kh, j, gi, i, p: (b, j, 0))
    dk, dv = _call(
        functools.partial(_dkv_kernel, cfg=cfg, group=g), (b, kh, s // bk, g, t // bq),
        [q_blk, kv_blk, kv_blk, q_blk, lse_row, lse_row, tiles.Ids(row, col, row, col),
         *sl_specs],
        [kv_blk, kv_blk], [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        [pltpu.VMEM((bk, d), jnp.float32)] * 2, cfg, "flash_alibi_tpu_dkv",
    )(plan, q, k, v, do, lse, delta, ids.map(_rows, _columns), *sl_args)
    return dq, dk, dv


_flash = tiles.with_flash_vjp(_forward, _backward)


def attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, alibi_slopes=None, causal=True, scale=None,
              *, block_sizes: BlockSizes | None = None, interpret: bool | None = None,
              shard_axes=None):
    """Flash attention on TPU with the kernels/xla.py signature and semantics
    (differentiable in q, k, v). q [B, T, H, D]; k, v [B, S, K, D] (H a multiple of K);
    segment ids and positions [B, T] / [B, S]; alibi_slopes [H] or None; `block_sizes`
    fields left None are 512 (DEFAULT_BLOCKS). `interpret` defaults to the Pallas
    interpreter when the target platform is a CPU (tests); `shard_axes` runs it per shard
    (placement.per_shard)."""
    tiles.check_shapes(q, k, v, "flash attention (TPU)")
    (_, t, h, _), s = q.shape, k.shape[1]
    blocks, tp, sp = (block_sizes or BlockSizes()).fit(DEFAULT_BLOCKS, t, s, LANES,
                                                       "flash attention (TPU)")
    interpret = placement.interpret_default(interpret)
    placement.require_tpu_or_interpret(interpret, "flash (TPU)")
    cfg = tiles.Cfg.of(q, scale, causal, alibi_slopes, blocks, interpret)

    def run(q, k, v, q_seg, kv_seg, q_pos, kv_pos, slopes=None):
        ids = tiles.Ids(q_seg, kv_seg, q_pos, kv_pos)
        return _padded(q, k, v, ids, slopes, cfg=cfg, tp=tp, sp=sp)

    args = [q, k, v, q_seg, kv_seg, q_pos, kv_pos]
    if alibi_slopes is not None:
        args.append(jnp.asarray(alibi_slopes, jnp.float32).reshape(h))
    return placement.per_shard(run, args, shard_axes, "flash (TPU)")


@functools.partial(jax.jit, static_argnames=("cfg", "tp", "sp"))
def _padded(q, k, v, ids, slopes, *, cfg, tp, sp):
    """Pad lengths to tp / sp (segment id 0), go head-major, run, undo."""
    t = q.shape[1]
    qh, kh, vh = (tiles.pad_tokens(x, n).transpose(0, 2, 1, 3)
                  for x, n in ((q, tp), (k, sp), (v, sp)))
    out = _flash(qh, kh, vh, ids.padded(tp, sp), slopes, cfg)
    return out.transpose(0, 2, 1, 3)[:, :t]
