"""Per-device memory of a config on a mesh, computed without devices (sizing a pod).

Parameters and optimizer state: the train state is built abstractly (`jax.eval_shape`,
the same `abstract_state` the trainer restores into) on a device-less
`jax.sharding.AbstractMesh`; each leaf's PartitionSpec gives its per-device shape
(every sharded dimension divided by the product of its mesh axes, rounded up as XLA
pads). Gradients have the parameters' shapes, dtypes and shardings.

Activations (an estimate; the compiler may fuse or keep more). Per layer and token, with
d = d_model, f = d_ff, H heads, KV = kv_heads·head_dim, T = seq_len, tp = mesh.tensor,
g = 1 for gated MLPs (GLU family) else 0, and P = H·T attention probabilities for the
`xla`/`auto` backends (0 for `flash`/`cudnn`, which keep only a logsumexp), the saved
elements per layer and token are:

    none           4d + (d + 2KV)/tp + P/tp + d/tp + (2 + g)·f/tp
                   (block input, both norm outputs, mid-block residual, q/k/v, attention
                   probabilities, attention output, MLP pre-activation(s) and product)
    full           d                                  (only the block input)
    dots           3d + (d + 2KV)/tp + P/tp + d/tp + (1 + g)·f/tp
                   (block input + every matmul output: q/k/v, scores, attention·V,
                   output and down projections, up/gate projections)
    dots_no_batch  3d + (d + 2KV)/tp + (1 + g)·f/tp
                   (as dots without the batched attention matmuls)

times bytes of model.dtype. Total = L · that · tokens per device (batch_size / grad_accum
/ (data·fsdp) · T), plus, with remat, one layer's `none` activations being recomputed,
plus the loss: a logits chunk (`train.loss_chunk` or the whole sequence) of
vocab/tp float32 values per token, twice (logits and their gradient).
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
derive the same per-layer accounting for Megatron's layer.)
"""

from __future__ import annotations

import math

import jax
import numpy as np

from jaxllm import optim, parallel
from jaxllm.model.layers import resolved_d_ff
from jaxllm.state import abstract_state

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying NamedShardings
    (the largest shard: dimensions divided by their mesh-axis product, rounded up)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        mesh, spec = leaf.sharding.mesh, leaf.sharding.spec
        shape = list(leaf.shape)
        for i, axes in enumerate(list(spec)[: len(shape)]):
            names = axes if isinstance(axes, tuple) else () if axes is None else (axes,)
            shape[i] = -(-shape[i] // math.prod(mesh.shape[a] for a in names))
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def global_bytes(tree) -> int:
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def saved_per_token(cfg, tp: int) -> float:
    """Activation elements saved per layer and token under `model.remat` (module docstring)."""
    m = cfg.model
    d, f, hd = m.d_model, resolved_d_ff(m), m.d_model // m.n_heads
    kv = (m.n_kv_heads or m.n_heads) * hd
    g = 1 if m.activation in ("glu", "reglu", "geglu", "swiglu") else 0
    probs = m.n_heads * cfg.data.seq_len if m.attention_backend in ("xla", "auto") else 0
    qkv = (d + 2 * kv) / tp
    return {
        "none": 4 * d + qkv + probs / tp + d / tp + (2 + g) * f / tp,
        "full": d,
        "dots": 3 * d + qkv + probs / tp + d / tp + (1 + g) * f / tp,
        "dots_no_batch": 3 * d + qkv + (1 + g) * f / tp,
    }[m.remat]


def activation_bytes(cfg, mesh_shape) -> dict:
    """Estimated activation bytes per device (module docstring) and its parts."""
    data, fsdp, tp = mesh_shape
    m, t = cfg.model, cfg.train
    a = DTYPE_BYTES[m.dtype]
    seqs = t.batch_size // t.grad_accum / (data * fsdp)
    tokens = seqs * cfg.data.seq_len
    layers = m.n_layers * saved_per_token(cfg, tp) * tokens * a
    if m.remat != "none":
        none_cfg = cfg.copy_and_resolve_references()
        none_cfg.model.remat = "none"
        layers += saved_per_token(none_cfg, tp) * tokens * a
    chunk = t.loss_chunk if t.loss_chunk and cfg.data.seq_len % t.loss_chunk == 0 else \
        cfg.data.seq_len
    logits = 2 * seqs * chunk * math.ceil(m.vocab_size / tp) * 4
    return {"layers": int(layers), "logits": int(logits), "total": int(layers + logits),
            "tokens_per_device": tokens}


def report(cfg, n_devices: int) -> dict:
    """Per-device and global bytes of parameters, gradients, optimizer state and estimated
    activations of `cfg` (vocab_size resolved) on `n_devices` devices, nothing allocated."""

    mesh = parallel.abstract_mesh(cfg, n_devices)
    shape = tuple(mesh.axis_sizes)
    tx = optim.build_optimizer(cfg)
    _, tree, _ = abstract_state(cfg, mesh, tx)
    params, opt = tree["params"], tree["opt_state"]
    act = activation_bytes(cfg, shape)
    per = {"params": per_device_bytes(params), "grads": per_device_bytes(params),
           "opt_state": per_device_bytes(opt), "activations": act["total"]}
    per["total"] = sum(per.values())
    return {
        "mesh": dict(zip(parallel.AXES, shape, strict=True)), "devices": n_devices,
        "param_count": int(sum(math.prod(x.shape) for x in jax.tree.leaves(params))),
        "per_device": per,
        "global": {"params": global_bytes(params), "opt_state": global_bytes(opt)},
        "activation_parts": act, "remat": cfg.model.remat, "optimizer": cfg.optim.name,
    }


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_report(r: dict) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    p, a = r["per_device"], r["activation_parts"]
    lines = [
        (f"mesh {mesh} ({r['devices']} devices); {r['param_count']:,} parameters; "
         f"optimizer {r['optimizer']}; remat {r['remat']}"),
        f"{'per device':<24}{'bytes':>16}  human",
    ]
    for k in ("params", "grads", "opt_state", "activations", "total"):
        lines.append(f"{k:<24}{p[k]:>16,}  {human(p[k])}")
    lines.append(f"activations = layers {human(a['layers'])} + logits {human(a['logits'])} "
                 f"for {a['tokens_per_device']:,.0f} tokens per device (estimate; see "
                 "jaxllm/sizing.py)")
    g = r["global"]
    lines.append(f"global: params {human(g['params'])}, optimizer state "
                 f"{human(g['opt_state'])}")
    return "\n".join(lines)
