"""8-bit Adam: both moments stored as block-wise dynamically quantized 8-bit codes.

Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization"
(ICLR 2022; bitsandbytes). Per step, for every tensor with at least `min_8bit_size`
elements: dequantize `m = signed_map[code]·absmax` and `v = unsigned_map[code]·absmax`,
update m and v in float32 exactly as Adam does (with bias correction), compute the update
from those float32 values, then re-quantize each moment to the nearest entry of its map
after dividing by the block's new absmax. Smaller tensors keep float32 moments, and so do
the leaves picked by `fp32_mask` (config `optim.fp32_embedding_state`: the embedding
tables, as bitsandbytes' StableEmbedding does; the paper recommends 32-bit optimizer state
for the embedding layer of language models).

Layout (sharding-friendly). Blocks run along the LAST axis only: a parameter `[..., n]`
is viewed as `[..., n/b, b]` during the update. The stored codes keep the parameter's own
shape (uint8 `[..., n]`), so they take the parameter's PartitionSpec unchanged, and the
per-block float32 absmax has shape `[..., n/b]` (same rank). The block b is
`block_size` when it divides n, otherwise the largest divisor of n below it; when that
divisor is under `min(32, block_size)` (absmax overhead over 1/8 byte per element) the
tensor keeps float32 moments instead. `jaxllm.optim.opt_state_shardings` gives the state
the parameters' shardings (the absmax's last axis is sharded only where n/b divides).

The absmax leaves are built without the parameters' `nnx.Variable` metadata (they are
plain arrays), so an `nnx.Optimizer` never tries to shard them with the parameter's
logical axes, whose last dimension may not divide n/b; codes and float32 moments keep it.

Non-finite gradients (any NaN/Inf anywhere in the tree) are never written into the state:
the step returns zero updates and the unchanged state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256-entry dynamic quantization map (Dettmers et al. 2022, "8-bit Optimizers
    via Block-wise Quantization"; bitsandbytes `create_dynamic_map`).

    For exponent i in 0..6, the midpoints of `linspace(0.1, 1, k + 1)` scaled by 10^(i-6),
    with k = 2^i points (signed, mirrored negative) or 2^(i+1) points (unsigned); plus 0 and
    1; sorted ascending.
    """
    vals: list[float] = []
    for i in range(7):
        k = 2**i if signed else 2 ** (i + 1)
        edges = np.linspace(0.1, 1.0, k + 1)
        mids = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (i - 6)
        vals.extend(mids)
        if signed:
            vals.extend(-mids)
    vals.extend([0.0, 1.0])
    out = np.sort(np.asarray(vals, dtype=np.float32))
    assert out.shape == (256,)
    return out


SIGNED_MAP = dynamic_map(signed=True)
UNSIGNED_MAP = dynamic_map(signed=False)
_ZERO_CODE_SIGNED = int(np.flatnonzero(SIGNED_MAP == 0.0)[0])
_ZERO_CODE_UNSIGNED = int(np.flatnonzero(UNSIGNED_MAP == 0.0)[0])


def block_for(shape: tuple[int, ...], block_size: int = 256, min_8bit_size: int = 4096) -> int:
    """Quantization block along the last axis for a tensor of `shape`; 0 = keep float32."""
    if len(shape) == 0 or math.prod(shape) < min_8bit_size:
        return 0
    n = shape[-1]
    b = max(d for d in range(1, min(n, block_size) + 1) if n % d == 0)
    return b if b >= min(32, block_size) else 0


def quantize(x: jax.Array, qmap: np.ndarray) -> jax.Array:
    """Index (uint8) of the nearest entry of the sorted 256-entry `qmap` for each value of x.

    The index is the count of midpoints between neighbouring entries that lie below x,
    found by an 8-step branchless binary search (ties round down). The first step
    compares against a scalar so XLA never constant-folds a gather the size of x (as it
    does for jnp.searchsorted's scan, whose first probe index is a constant).
    """
    mids_np = (qmap[:-1] + qmap[1:]) / 2.0
    mids = jnp.asarray(mids_np)
    idx = jnp.where(x > mids_np[127], 128, 0).astype(jnp.int32)
    for step in (64, 32, 16, 8, 4, 2, 1):
        cand = idx + step
        idx = jnp.where(x > mids[cand - 1], cand, idx)
    return idx.astype(jnp.uint8)


def quantize_blockwise(x: jax.Array, block: int, qmap: np.ndarray):
    """x [..., n] -> (codes uint8 [..., n], absmax float32 [..., n/block])."""
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    absmax = jnp.max(jnp.abs(xb), axis=-1)
    scaled = xb / jnp.where(absmax > 0, absmax, 1.0)[..., None]
    return quantize(scaled, qmap).reshape(x.shape), absmax


def dequantize_blockwise(codes: jax.Array, absmax: jax.Array, qmap: np.ndarray) -> jax.Array:
    """Inverse of quantize_blockwise (up to rounding): qmap[code] · absmax of its block."""
    block = codes.shape[-1] // absmax.shape[-1]
    vals = jnp.asarray(qmap)[codes.astype(jnp.int32)]
    vals = vals.reshape(*absmax.shape, block) * absmax[..., None]
    return vals.reshape(codes.shape)


class Adam8bitState(NamedTuple):
    """mu/nu: uint8 codes (param shape) or float32 moments for small tensors;
    mu_absmax/nu_absmax: float32 [..., n/b] per block, or a 0-d placeholder for float32 leaves."""

    count: jax.Array
    mu: optax.Updates
    mu_absmax: optax.Updates
    nu: optax.Updates
    nu_absmax: optax.Updates


def _is_variable(x) -> bool:  # an nnx.Variable, recognised without importing flax
    return hasattr(x, "get_metadata") and hasattr(x, "get_value")


def _shape(x) -> tuple[int, ...]:
    return tuple(x.get_value().shape if _is_variable(x) else x.shape)


def all_finite(tree) -> jax.Array:
    """True when every leaf of `tree` is free of NaN and Inf."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _fp32_flags(fp32_mask, tree) -> list[bool]:
    """One Python bool per array leaf of `tree`: True where `fp32_mask` keeps float32."""
    n = len(jax.tree.leaves(tree))
    if fp32_mask is None:
        return [False] * n
    flags = [bool(f) for f in jax.tree.leaves(fp32_mask(tree))]
    if len(flags) != n:
        raise ValueError(f"fp32_mask gave {len(flags)} flags for {n} leaves")
    return flags


def _leaf_update(g, b: int, moments, hp, c1, c2):
    """One leaf's Adam step on dequantized moments: (update, mu codes, mu absmax, nu codes,
    nu absmax); block size `b` 0 = float32 moments (absmax unused)."""
    (mq, ma, vq, va), (b1, b2, eps) = moments, hp
    g32 = g.astype(jnp.float32)
    m = dequantize_blockwise(mq, ma, SIGNED_MAP) if b else mq
    v = dequantize_blockwise(vq, va, UNSIGNED_MAP) if b else vq
    m = b1 * m + (1.0 - b1) * g32
    v = b2 * v + (1.0 - b2) * g32 * g32
    out = ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype)
    if b:
        return (out, *quantize_blockwise(m, b, SIGNED_MAP), *quantize_blockwise(v, b, UNSIGNED_MAP))
    return out, m, ma, v, va


def scale_by_adam8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                      block_size: int = 256, min_8bit_size: int = 4096, fp32_mask=None
                      ) -> optax.GradientTransformation:
    """Adam's update direction (no learning rate) with 8-bit block-wise quantized moments.

    `fp32_mask(tree)` (optional) returns a tree of Python bools shaped like the parameters
    (or gradients); leaves marked True keep float32 moments."""
    def blk(shape, fp32=False):
        return 0 if fp32 else block_for(shape, block_size, min_8bit_size)

    def init(params):
        leaves, treedef = jax.tree.flatten(params, is_leaf=_is_variable)
        flags = _fp32_flags(fp32_mask, params)

        def moment(p, zero_code, fp32):
            b = blk(_shape(p), fp32)
            if _is_variable(p):  # codes/moments keep the parameter's Variable metadata
                return jax.tree.map(lambda x: moment(x, zero_code, fp32), p)
            if b:
                return jnp.full(p.shape, zero_code, jnp.uint8)
            return jnp.zeros(p.shape, jnp.float32)

        def absmax(p, fp32):  # plain array, no Variable metadata (see module docstring)
            shape = _shape(p)
            b = blk(shape, fp32)
            return jnp.zeros((*shape[:-1], shape[-1] // b) if b else (), jnp.float32)

        def tree(f, *args):
            return jax.tree.unflatten(treedef, [f(p, *args, k) for p, k in zip(leaves, flags,
                                                                                strict=True)])
        return Adam8bitState(
            count=jnp.zeros((), jnp.int32),
            mu=tree(moment, _ZERO_CODE_SIGNED), mu_absmax=tree(absmax),
            nu=tree(moment, _ZERO_CODE_UNSIGNED), nu_absmax=tree(absmax),
        )

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        c1 = 1.0 - b1 ** count.astype(jnp.float32)
        c2 = 1.0 - b2 ** count.astype(jnp.float32)
        g_leaves, g_def = jax.tree.flatten(updates)
        flags = _fp32_flags(fp32_mask, updates)
        fields = [jax.tree.leaves(f) for f in state[1:]]
        per_leaf = [_leaf_update(g, blk(g.shape, fp32), (mq, ma, vq, va), (b1, b2, eps), c1, c2)
                    for g, fp32, mq, ma, vq, va in zip(g_leaves, flags, *fields, strict=True)]
        outs, *moments = zip(*per_leaf, strict=True)
        new_fields = [jax.tree.unflatten(jax.tree.structure(f), list(x))
                      for f, x in zip(state[1:], moments, strict=True)]
        new_state = Adam8bitState(count, *new_fields)
        finite = all_finite(updates)
        def keep(new, old):
            return jnp.where(finite, new, old)
        new_state = jax.tree.map(keep, new_state, state)
        outs = [jnp.where(finite, u, jnp.zeros_like(u)) for u in outs]
        return jax.tree.unflatten(g_def, outs), new_state

    return optax.GradientTransformation(init, update)


def adam8bit(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
             weight_decay: float = 0.0, mask=None, block_size: int = 256,
             min_8bit_size: int = 4096, fp32_mask=None) -> optax.GradientTransformationExtraArgs:
    """8-bit AdamW: scale_by_adam8bit, decoupled weight decay (masked), then -learning_rate."""
    parts = [scale_by_adam8bit(b1, b2, eps, block_size, min_8bit_size, fp32_mask)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
