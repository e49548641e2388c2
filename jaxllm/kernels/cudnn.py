"""cuDNN fused attention through `jax.nn.dot_product_attention(implementation="cudnn")`.

cuDNN's flash-attention kernels (GPU only, bfloat16/float16, head size a multiple of 8)
take causality and trailing padding natively (`is_causal`, `query_seq_lengths`,
`key_value_seq_lengths`): no T x S tensor is built. Anything else must arrive as a dense
tensor, which JAX folds into one additive bias:
- packed documents (several segment ids per row) need the boolean mask [B, 1, T, S];
- ALiBi needs an explicit bias [B, H, T, S] in the input dtype. Measured on an H200
  this costs 2.2x (T=1024) to 4.4x (T=8192) the time of plain
  causal attention, which is why `auto` sends ALiBi to the fused `flash` kernel instead.

`segments` picks how segment ids reach cuDNN:
- "mask" (default, exact for any ids): the dense document mask;
- "lengths": each row is ONE document followed by padding (segment 0); sent as lengths;
- "none": segment ids are ignored apart from zeroing padding rows (one document per row).
With `causal`, "mask" also passes `is_causal` when T == S so cuDNN skips the upper triangle:
this assumes positions increase with the index inside each document, as packed batches and
default positions do (the flash and xla backends need no such assumption).

The cuDNN call itself runs only on a GPU. `implementation="xla"` (or None) sends exactly
the same mask, bias and lengths through JAX's XLA path; tests use it on CPU to check the
argument plumbing against kernels/xla.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.kernels import xla

SEGMENT_MODES = ("mask", "lengths", "none")


def cudnn_arguments(q_seg, kv_seg, q_pos, kv_pos, alibi_slopes, causal, *, segments="mask",
                    dtype=jnp.bfloat16):
    """Keyword arguments for `jax.nn.dot_product_attention` and the [B, T] rows that see a key.

    Returns (kwargs, valid_rows); rows that are not valid are zeroed afterwards, as the
    reference does (softmax over no visible key is otherwise an average of v).
    """
    if segments not in SEGMENT_MODES:
        raise ValueError(f"cudnn attention: segments={segments!r}; allowed: "
                         f"{', '.join(SEGMENT_MODES)}")
    t, s = q_seg.shape[1], kv_seg.shape[1]
    kwargs = {"bias": None, "mask": None, "is_causal": False,
              "query_seq_lengths": None, "key_value_seq_lengths": None}
    valid = q_seg > 0
    if segments == "mask":
        mask, _ = xla.mask_and_bias(q_seg, kv_seg, q_pos, kv_pos, None, causal)
        kwargs["mask"] = mask
        kwargs["is_causal"] = bool(causal) and t == s
        valid = jnp.any(mask[:, 0], axis=-1)
    else:
        kwargs["is_causal"] = bool(causal)
        if segments == "lengths":
            kwargs["query_seq_lengths"] = jnp.sum(q_seg > 0, axis=1, dtype=jnp.int32)
            kwargs["key_value_seq_lengths"] = jnp.sum(kv_seg > 0, axis=1, dtype=jnp.int32)
    if alibi_slopes is not None:
        _, bias = xla.mask_and_bias(q_seg, kv_seg, q_pos, kv_pos, alibi_slopes, causal)
        kwargs["bias"] = jax.lax.stop_gradient(bias.astype(dtype))  # slopes are constants
    return kwargs, valid


def attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, alibi_slopes=None, causal=True, scale=None,
              *, segments="mask", implementation="cudnn"):
    """kernels/xla.py semantics through cuDNN; `implementation=None|"xla"` for CPU checks."""
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"cudnn attention needs bfloat16 or float16 inputs, got {q.dtype}; "
                         "use backend 'flash' or 'xla' for float32")
    kwargs, valid = cudnn_arguments(q_seg, kv_seg, q_pos, kv_pos, alibi_slopes, causal,
                                    segments=segments, dtype=q.dtype)
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation,
                                       **kwargs)
    return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)
