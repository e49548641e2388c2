"""The decoder-only transformer (pre-norm), nanoGPT-sized in one file.

Blocks are stacked along a leading `layers` axis and run with `jax.lax.scan` (one block is
compiled once), under `jax.checkpoint` with the configured remat policy. On CPU the scan is
unrolled by default (`model.scan_unroll`): XLA:CPU runs a while loop over layers slower
than straight-line code (no fusion across iterations, a dynamic slice of every stacked
weight and residual per iteration), while the parameters keep their stacked layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.kernels import target_platform
from jaxllm.model.attention import Attention
from jaxllm.model.layers import DTYPES, MLP, Embed, Norm, constrain, param, resolved_d_ff

def scan_unroll(m, platform: str | None = None) -> int:
    """Blocks per `lax.scan` iteration: `model.scan_unroll`, or for 0 all of them on CPU and
    one elsewhere (accelerators keep the compact loop: compile time, same step speed).
    Read while tracing, for the platform the program is lowered for (`kernels.lowering_for`
    exports for TPU/GPU from a CPU host)."""
    if m.scan_unroll:
        return min(m.scan_unroll, m.n_layers)
    return m.n_layers if (platform or target_platform()) == "cpu" else 1


REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT = ("none", *REMAT_POLICIES)  # `model.remat`: none = no activation checkpointing


def position_limit(cfg) -> int | None:
    """Positions a model can take: the learned table's size; None (unbounded) otherwise."""
    m = cfg.model
    return (m.max_position or cfg.data.seq_len) if m.pos_encoding == "learned" else None


def mask_padding(logits, vocab_used: int):
    """`logits` [..., V] with ids >= vocab_used set to -inf (0 or V: unchanged)."""
    if not vocab_used or vocab_used >= logits.shape[-1]:
        return logits
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.where(ids < vocab_used, logits, -jnp.inf)


class Block(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.ln1 = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.ln2 = Norm(cfg, rngs)
        self.mlp = MLP(cfg, resolved_d_ff(cfg.model), rngs)

    def __call__(self, x, segment_ids, positions, cache=None):
        y, cache = self.attn(self.ln1(x), segment_ids, positions, cache)
        x = constrain(x + y, "batch", "length", "embed")
        x = constrain(x + self.mlp(self.ln2(x)), "batch", "length", "embed")
        return x, cache


class Transformer(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        m = cfg.model
        if not m.vocab_size:
            raise ValueError("model.vocab_size must be resolved before building the model")
        self.cfg = cfg
        self.dtype, pd = DTYPES[m.dtype], DTYPES[m.param_dtype]
        self.n_layers, self.scan, self.remat = m.n_layers, m.scan_layers, m.remat
        self.embed = Embed(m.vocab_size, m.d_model, ("vocab", "embed"), m.init_std, self.dtype,
                           pd, rngs)
        table = position_limit(cfg)
        self.pos_embed = (None if table is None else Embed(
            table, m.d_model, (None, "embed"), m.init_std, self.dtype, pd, rngs))
        if self.scan:
            @nnx.split_rngs(splits=m.n_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return Block(cfg, r)
            self.blocks = make(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(m.n_layers)])
        self.ln_f = Norm(cfg, rngs)
        self.lm_head = (None if m.tie_embeddings else
                        param(rngs, (m.d_model, m.vocab_size), ("embed", "vocab"), m.init_std, pd))

    def _body(self, graphdef):
        def body(x, layer):
            state, seg, pos, cache = layer
            x, cache = nnx.merge(graphdef, state)(x, seg, pos, cache)
            return x, cache
        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        return body

    def hidden(self, tokens, segment_ids=None, positions=None, cache=None):
        """Final-norm hidden states [B, T, d] (and the updated cache)."""
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            start = 0 if cache is None else cache["index"]
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + start, (b, t))
        x = self.embed(tokens)
        if self.pos_embed is not None:
            self._check_positions(t if cache is None else cache["k"].shape[2], positions)
            x = x + self.pos_embed(positions)
        x = constrain(x, "batch", "length", "embed")
        # the cache as per-layer inputs: stacked arrays, the write index repeated per layer
        layers = None if cache is None else {
            **cache, "index": jnp.full((self.n_layers,), cache["index"], jnp.int32)}
        if self.scan:
            graphdef, state = nnx.split(self.blocks)
            body = self._body(graphdef)

            def scan_fn(x, xs):
                state_l, cache_l = xs
                return body(x, (state_l, segment_ids, positions, cache_l))
            x, new_layers = jax.lax.scan(scan_fn, x, (state, layers),
                                         unroll=scan_unroll(self.cfg.model))
        else:
            outs = []
            for i, blk in enumerate(self.blocks):
                graphdef, state = nnx.split(blk)
                c = None if layers is None else jax.tree.map(lambda v, i=i: v[i], layers)
                x, c = self._body(graphdef)(x, (state, segment_ids, positions, c))
                outs.append(c)
            new_layers = None if cache is None else jax.tree.map(
                lambda *vs: jnp.stack(vs), *outs)
        new_cache = None if cache is None else {**new_layers, "index": new_layers["index"][0]}
        return self.ln_f(x), new_cache

    def _check_positions(self, length: int, positions) -> None:
        """ValueError when positions reach past the learned position table (an embedding
        lookup out of range would give NaN rows, not an error)."""
        table = self.pos_embed.embedding.shape[0]
        try:  # explicit positions: checked when concrete (inside jit they are traced)
            length = max(length, int(np.asarray(positions).max()) + 1)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            pass
        if length > table:
            raise ValueError(f"model: {length} positions, but the learned position table "
                             f"holds {table} (model.max_position, else data.seq_len)")

    def logits(self, h):
        """Float32 logits [..., vocab] from hidden states; padding ids (>= model.vocab_used)
        get -inf, so every distribution formed from them (loss, eval, sampling) puts exactly
        0 probability there."""
        if self.lm_head is None:
            out = self.embed.attend(h)
        else:
            out = jnp.einsum("btd,dv->btv", h, self.lm_head[...].astype(self.dtype))
        out = mask_padding(out.astype(jnp.float32), self.cfg.model.vocab_used)
        return constrain(out, "batch", "length", "vocab")

    def __call__(self, tokens, segment_ids=None, positions=None):
        return self.logits(self.hidden(tokens, segment_ids, positions)[0])

    def init_cache(self, batch: int, max_len: int):
        """An empty KV cache for `max_len` tokens (segment id 0 marks empty slots)."""
        m = self.cfg.model
        kv, hd = m.n_kv_heads or m.n_heads, m.d_model // m.n_heads
        shape = (self.n_layers, batch, max_len, kv, hd)
        return {
            "k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype),
            "segment_ids": jnp.zeros((self.n_layers, batch, max_len), jnp.int32),
            "positions": jnp.zeros((self.n_layers, batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32),
        }


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """The static half of the model: `apply(params)` rebuilds the NNX module."""

    graphdef: object
    cfg: object

    def apply(self, params) -> Transformer:
        return nnx.merge(self.graphdef, params)


def abstract_model(cfg):
    """(graphdef, abstract state) of the model: shapes and logical axes, nothing allocated."""
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(cfg.train.seed)))
    return nnx.split(model)
