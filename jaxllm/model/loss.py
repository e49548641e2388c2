"""Forward pass -> per-token NLL, and bits per byte: the loss math train and eval share.

`forward_sums(model_def, params, batch, chunk)` is the one place a batch becomes per-token
negative log-likelihoods (as nanoGPT's `forward` returns its loss): the hidden states of
`Transformer.hidden`, then logits chunk by chunk along the sequence under
`jax.checkpoint` when `train.loss_chunk` splits it, so full-vocabulary float32 logits for
all tokens never sit in memory at once (the backward pass recomputes each chunk's logits).
Targets with `segment_ids == 0` are padding and weigh 0. The training loss, held-out
evaluation, the eval harness and length extrapolation all call it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxllm.model.transformer import mask_padding


def chunk_size(t: int, chunk: int) -> int:
    """Tokens per logits chunk: the largest divisor of `t` not above `chunk` (0 = all of t)."""
    if not chunk or chunk >= t:
        return t
    return max(c for c in range(1, chunk + 1) if t % c == 0)


def over_chunks(fn, h, targets, chunk: int, remat: bool = False):
    """`fn(h_chunk, targets_chunk) -> arrays [B, c]` run chunk after chunk (`lax.map`) along
    the sequence, each under `jax.checkpoint` with `remat`; the outputs come back as [B, T]
    arrays. One chunk (the whole sequence) is `fn(h, targets)` itself: a one-step loop and
    a recompute would only cost time (a while loop on CPU, a second logits matmul)."""
    b, t, d = h.shape
    c = chunk_size(t, chunk)
    if c == t:
        return fn(h, targets)
    fn = jax.checkpoint(fn) if remat else fn
    hs = h.reshape(b, t // c, c, d).swapaxes(0, 1)
    ts = targets.reshape(b, t // c, c).swapaxes(0, 1)
    out = jax.lax.map(lambda xs: fn(*xs), (hs, ts))
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(b, t), out)


def token_nll(model, h, targets, weights, chunk: int):
    """Sums over tokens: (nll, z^2) and per-token nll [B, T], logits chunk by chunk."""

    def one(hc, tc):
        logits = model.logits(hc)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return lse - tgt, lse

    nll, lse = over_chunks(one, h, targets, chunk, remat=True)
    return (nll * weights).sum(), (lse * lse * weights).sum(), nll


def greedy_hits(model, h, targets, vocab_limit: int, chunk: int):
    """[B, T] bool: the target is the argmax over the real vocabulary (padding ids masked)."""

    def one(hc, tc):
        return jnp.argmax(mask_padding(model.logits(hc), vocab_limit), axis=-1) == tc

    return over_chunks(one, h, targets, chunk)


def target_weights(batch):
    """1.0 for real targets, 0.0 for padding (segment id 0)."""
    return (batch["segment_ids"] > 0).astype(jnp.float32)


def hidden(model_def, params, batch):
    """(model, final hidden states [B, T, d], target weights [B, T]) of a batch."""
    model = model_def.apply(params)
    h, _ = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"])
    return model, h, target_weights(batch)


def forward_sums(model_def, params, batch, chunk: int):
    """(sum of weighted NLL, sum of weighted z^2 = logsumexp^2, per-token NLL [B, T],
    weights [B, T]) of a batch {inputs, targets, segment_ids, positions}."""
    model, h, weights = hidden(model_def, params, batch)
    nll_sum, z_sum, nll = token_nll(model, h, batch["targets"], weights, chunk)
    return nll_sum, z_sum, nll, weights


def logits_and_weights(model_def, params, batch):
    """(logits [B, T, V], weights [B, T]): the model function Sophia's estimators take."""
    model, h, weights = hidden(model_def, params, batch)
    return model.logits(h), weights


def bits_per_byte(nll_sum: float, n_bytes: float) -> float:
    """BPB = (sum of token NLL in nats) / (sum of UTF-8 bytes) / ln 2.

    Gao et al. 2020, "The Pile", sec. 3.1: comparable across tokenizers (per-token loss
    is not), summed over the whole evaluation text, not averaged per document.
    """
    return nll_sum / max(n_bytes, 1) / math.log(2)


def nll_summary(nll_sum: float, tokens: float, n_bytes: float) -> dict:
    """{loss (nats per token), bpb, perplexity} of summed NLL over `tokens` / `n_bytes`."""
    loss = nll_sum / max(tokens, 1)
    return {"loss": loss, "bpb": bits_per_byte(nll_sum, n_bytes),
            "perplexity": math.exp(min(loss, 50.0))}
