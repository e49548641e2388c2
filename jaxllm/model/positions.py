"""Positional-encoding math as pure functions: RoPE and ALiBi (the one copy of each).

RoPE layout: half-split pairs `(x[i], x[i + d/2])` (GPT-NeoX / Hugging Face Llama). The
interleaved layout of the RoFormer paper and Meta's Llama checkpoints pairs
`(x[2i], x[2i+1])`; `tools/export_hf.py` converts where a format needs it.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

# `model.pos_encoding`: RoPE and ALiBi (here, applied in model/attention.py), a learned
# table (model/transformer.py), or none
POS_ENCODINGS = ("rope", "alibi", "learned", "none")


def alibi_slopes(n_heads: int) -> np.ndarray:
    """Per-head ALiBi slopes (Press et al., ICLR 2022, "Train Short, Test Long").

    For n a power of two: the geometric sequence starting at 2^(-8/n) with ratio 2^(-8/n).
    Otherwise: the slopes of the nearest lower power of two p, then the first n - p of
    every other slope of the 2p sequence.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(p)
    if p != n_heads:
        slopes += power_of_two(2 * p)[0::2][: n_heads - p]
    return np.asarray(slopes, dtype=np.float32)


def rope_frequencies(head_dim: int, base: float = 10000.0) -> jnp.ndarray:
    """theta_i = base^(-2i/d) for i in [0, d/2) (Su et al., RoFormer)."""
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x, positions, base: float = 10000.0):
    """Rotate pair i of each head by angle position * theta_i (half-split layout).

    x: [..., seq, heads, head_dim]; positions: [..., seq] (integer or float).
    Computed in float32 and returned in x's dtype.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"apply_rope needs an even head_dim, got {d}")
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(d, base)  # [..., s, d/2]
    sin = jnp.sin(angles)[..., None, :]  # broadcast over heads
    cos = jnp.cos(angles)[..., None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
