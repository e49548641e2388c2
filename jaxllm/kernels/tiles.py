"""What the fused attention kernels (GPU and TPU) share: arguments, masking rules, tiles.

These are the decisions every flash kernel here makes, written once and independent of
any Pallas backend:
- `dot`: tile matmuls with float32 accumulation;
- `Ids`: the four per-token arrays (query and key segment ids and positions), passed
  around as one value in one order: the order of every backend's `attention`;
- `BlockSizes`: a kernel's tile sizes, checked and clamped to the lengths (`fit`);
- `Cfg`: the static settings of one call; `check_shapes`: the q/k/v shapes every kernel takes;
- `visible`: which (query, key) pairs attend: same document (equal segment ids), key not
  padding (id 0) and, when causal, `kv_pos <= q_pos`;
- `logits2`: base-2 logits `(q.k * scale + slope * (kv_pos - q_pos)) * log2(e)` (ALiBi,
  Press et al., ICLR 2022, computed from per-token positions: no T x S bias exists);
- `tile_classes`: for every (q tile, kv tile) pair, whether no pair, some pairs or all
  pairs are visible, from per-tile min/max of ids and positions (block sparsity: kernels
  skip class 0 tiles and drop the mask on class 2 tiles);
- `pad_tokens`: lengths padded to a block multiple as padding (segment id 0).

All functions broadcast, so a kernel passes ids as a column and a row in whichever
orientation it computes scores (q rows x kv columns, or the transpose).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)
MASKED = -1e30  # finite "minus infinity": keeps exp2(m_old - m_new) free of inf - inf


class Ids(NamedTuple):
    """Segment ids (0 = padding) and positions of the queries [B, T] and the keys [B, S]
    (or any broadcastable or blocked layout of them: a kernel's refs, a tile's rows and
    columns). A pytree, so it passes through `jax.jit`, `jax.custom_vjp` and
    `pl.pallas_call` (as one argument with one BlockSpec per field) as a single value."""

    q_seg: Any
    kv_seg: Any
    q_pos: Any
    kv_pos: Any

    def map(self, q, kv) -> Ids:
        """`q` applied to the query side (q_seg, q_pos), `kv` to the key side."""
        return Ids(q(self.q_seg), kv(self.kv_seg), q(self.q_pos), kv(self.kv_pos))

    def padded(self, t: int, s: int) -> Ids:
        """int32, query side padded to length t and key side to s (segment id 0)."""
        return self.map(lambda x: pad_tokens(x.astype(jnp.int32), t),
                        lambda x: pad_tokens(x.astype(jnp.int32), s))


def pow2_at_least(n: int, smallest: int) -> int:
    """The smallest power of two >= max(n, smallest), for `smallest` a power of two."""
    return smallest << max(0, -(-n // smallest) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of a flash kernel: `block_q` x `block_k` in the forward kernel, `*_dq`
    and `*_dkv` in the backward kernels (dq, and dk/dv). Fields left None take the
    kernel's defaults (kernels/flash.py: by head size and dtype; kernels/flash_tpu.py:
    512). Each kernel allows powers of two from its smallest tile up (16 for Triton's
    matmuls, 128 for TPU lanes)."""

    block_q: int | None = None
    block_k: int | None = None
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None

    def fit(self, defaults: BlockSizes, t: int, s: int, smallest: int,
            name: str) -> tuple[BlockSizes, int, int]:
        """(sizes, padded t, padded s): unset fields from `defaults`; each checked to be a
        power of two >= `smallest` and clamped to the query (block_q*) or key (block_k*)
        length rounded up to one; lengths padded to a multiple of all their tiles."""
        sizes = {}
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            val = getattr(defaults, f.name) if val is None else val
            if not isinstance(val, int) or val < smallest or val & (val - 1):
                raise ValueError(f"{name}: {f.name}={val!r} must be a power of two >= "
                                 f"{smallest}")
            n = t if f.name.startswith("block_q") else s
            sizes[f.name] = min(val, pow2_at_least(n, smallest))
        c = BlockSizes(**sizes)
        qmult = max(c.block_q, c.block_q_dq, c.block_q_dkv)
        kmult = max(c.block_k, c.block_k_dq, c.block_k_dkv)
        return c, round_up(t, qmult), round_up(s, kmult)


@dataclasses.dataclass(frozen=True)
class Cfg:
    """Static settings of one flash attention call (hashable: a jit / custom_vjp static)."""

    scale: float
    causal: bool
    alibi: bool
    blocks: BlockSizes
    interpret: bool

    @classmethod
    def of(cls, q, scale, causal, alibi_slopes, blocks, interpret, **extra) -> Cfg:
        """Settings for q [B, T, H, D]: scale 1/sqrt(D) unless given; `extra` a subclass's."""
        return cls(scale=float(q.shape[3] ** -0.5 if scale is None else scale),
                   causal=bool(causal), alibi=alibi_slopes is not None, blocks=blocks,
                   interpret=bool(interpret), **extra)


def check_shapes(q, k, v, name: str) -> None:
    """q [B, T, H, D] and k, v [B, S, K, D] with H a multiple of K, or a ValueError."""
    b, _, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"{name}: expected q [B,T,H,D], k/v [B,S,K,D] with H % K == 0; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")


def dot(a, b, contract=(1, 0)):
    """a @ b contracting a's dim contract[0] with b's dim contract[1], float32 accumulation;
    float32 inputs at full precision (TPUs otherwise multiply them in bfloat16 passes, GPUs
    in TF32), half-precision inputs natively."""
    full = a.dtype == jnp.float32
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=lax.Precision.HIGHEST if full else None,
                           preferred_element_type=jnp.float32)


def visible(ids: Ids, causal: bool):
    """Broadcast visibility: same document, key not padding, and (causal) kv_pos <= q_pos."""
    mask = jnp.logical_and(ids.q_seg == ids.kv_seg, ids.kv_seg > 0)
    if causal:
        mask = jnp.logical_and(mask, ids.kv_pos <= ids.q_pos)
    return mask


def logits2(qk, scale: float, slope, q_pos, kv_pos):
    """Base-2 logits from raw float32 q.k products; ALiBi bias when `slope` is not None."""
    s = qk * (scale * LOG2E)
    if slope is not None:
        s = s + (slope * LOG2E) * (kv_pos - q_pos).astype(jnp.float32)
    return s


def tile_classes(ids: Ids, block_q, block_k, causal):
    """[B, nq, nk] int32 class of each (q tile, kv tile) pair.

    0: no pair can be visible (skipped); 2: every pair is visible (no mask computed);
    1: otherwise (masked). Decided from per-tile min/max of ids and positions, so classes 0
    and 2 are certain and 1 is "maybe": correct for any ids and positions, O(T/bq * S/bk).
    """
    big = jnp.iinfo(jnp.int32).max

    def stats(seg, pos, blk, kv):
        """Per tile: min/max segment id and position over real tokens (id > 0), raw min id."""
        seg, pos = seg.reshape(seg.shape[0], -1, blk), pos.reshape(pos.shape[0], -1, blk)
        real = seg > 0
        out = (jnp.min(jnp.where(real, seg, big), -1), jnp.max(seg, -1), jnp.min(seg, -1),
               jnp.min(jnp.where(real, pos, big), -1), jnp.max(jnp.where(real, pos, -big), -1))
        return [x[:, None, :] if kv else x[:, :, None] for x in out]

    qs_lo, qs_hi, qs_raw, qp_lo, qp_hi = stats(ids.q_seg, ids.q_pos, block_q, False)
    ks_lo, ks_hi, ks_raw, kp_lo, kp_hi = stats(ids.kv_seg, ids.kv_pos, block_k, True)
    maybe = (qs_lo <= ks_hi) & (ks_lo <= qs_hi)  # some equal real id (false if none real)
    full = (qs_raw == qs_hi) & (ks_raw == ks_hi) & (qs_hi == ks_hi) & (ks_raw > 0)
    if causal:
        maybe &= kp_lo <= qp_hi
        full &= kp_hi <= qp_lo
    return jnp.where(full, 2, maybe.astype(jnp.int32))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_tokens(x, n: int, value=0):
    """Pad axis 1 (tokens) of `x` to length `n` with `value` (segment id 0 = padding)."""
    if x.shape[1] == n:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, n - x.shape[1])
    return jnp.pad(x, widths, constant_values=value)


def with_flash_vjp(forward, backward):
    """The differentiable attention of a flash kernel pair (the Triton and the Mosaic one):
    `forward(q, k, v, ids, slopes, cfg) -> (out, lse)` and
    `backward(q, k, v, ids, slopes, out, lse, do, cfg) -> (dq, dk, dv)` under
    `jax.custom_vjp`; ids (an `Ids`) and slopes get no gradient, `cfg` is static."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def flash(q, k, v, ids, slopes, cfg):
        return forward(q, k, v, ids, slopes, cfg)[0]

    def fwd(q, k, v, ids, slopes, cfg):
        out, lse = forward(q, k, v, ids, slopes, cfg)
        return out, (q, k, v, ids, slopes, out, lse)

    def bwd(cfg, res, do):
        dq, dk, dv = backward(*res, do, cfg)
        return dq, dk, dv, None, None

    flash.defvjp(fwd, bwd)
    return flash
