"""Reference attention in plain XLA ops: always available, the yardstick for every kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mask_and_bias(q_seg, kv_seg, q_pos, kv_pos, alibi_slopes, causal):
    """[B, 1|H, T, S] boolean mask and optional float32 ALiBi bias from ids and positions."""
    mask = q_seg[:, None, :, None] == kv_seg[:, None, None, :]
    mask &= (kv_seg > 0)[:, None, None, :]
    if causal:
        mask &= kv_pos[:, None, None, :] <= q_pos[:, None, :, None]
    bias = None
    if alibi_slopes is not None:
        dist = (kv_pos[:, None, :] - q_pos[:, :, None]).astype(jnp.float32)  # j - i <= 0
        bias = alibi_slopes.astype(jnp.float32)[None, :, None, None] * dist[:, None]
    return mask, bias


def attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, alibi_slopes=None, causal=True, scale=None):
    """softmax(q k^T * scale + alibi) v with document and causal masks, in float32 softmax.

    q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K (grouped-query attention).
    Rows with no visible key (padding) return zeros.
    """
    b, t, h, d = q.shape
    kh = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, h // kh, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = s.reshape(b, h, t, k.shape[1])
    mask, bias = mask_and_bias(q_seg, kv_seg, q_pos, kv_pos, alibi_slopes, causal)
    if bias is not None:
        s = s + bias
    s = jnp.where(mask, s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask, p, 0.0).astype(v.dtype).reshape(b, kh, h // kh, t, -1)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)
