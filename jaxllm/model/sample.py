"""KV-cached autoregressive sampling: greedy, temperature, top-k and top-p (nucleus).

The prompt fills the cache in one forward pass; each new token is one cached step
(`Transformer.hidden(..., cache=...)`), inside one `lax.scan`. Greedy decoding
(temperature 0) equals decoding by full recomputation token for token
(tests/test_sample.py). Top-p follows Holtzman et al. 2020 ("The Curious Case of Neural
Text Degeneration"). Padded vocabulary ids (>= the tokenizer's size) are never produced,
also by runs trained before the model masked them (`model.vocab_used`).

Prompts of different lengths share one batch left-padded (`left_pad`, `lengths=`): padding
slots get segment id 0, which attention never attends to, and each row's positions start at
0 on its first real token, so a row generates what it would alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.model.transformer import mask_padding, position_limit


def filter_logits(logits, temperature: float, top_k: int, top_p: float, vocab_limit: int):
    """Mask ids >= vocab_limit (vocabulary padding), then apply temperature/top-k/top-p."""
    logits = mask_padding(logits, vocab_limit) / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        srt = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(srt, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # always keeps the top token
        cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def check_args(cfg, prompt_len: int, n_new: int, temperature: float, top_k: int,
               top_p: float) -> None:
    """ValueError naming the argument when a request cannot be served."""
    if prompt_len < 1 or n_new < 1:
        raise ValueError(f"prompt ({prompt_len} tokens) and max_tokens ({n_new}) must be >= 1")
    limit = position_limit(cfg)
    if limit is not None and prompt_len + n_new > limit:
        raise ValueError(f"max_tokens: prompt ({prompt_len} tokens) + {n_new} new tokens "
                         f"exceed the learned position table ({limit})")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k: must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")


@functools.partial(jax.jit, static_argnames=("model_def", "n_new", "temperature", "top_k",
                                             "top_p", "vocab_limit"))
def generate(model_def, params, prompt, rng, *, n_new: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, vocab_limit: int, lengths=None):
    """prompt [B, P] int32 -> [B, n_new] new tokens. temperature == 0 means greedy.
    `lengths` [B]: the prompts are left-padded to P, row i's prompt being its last
    lengths[i] tokens (default: all P)."""
    model = model_def.apply(params)
    b, p = prompt.shape
    check_args(model_def.cfg, p, n_new, temperature, top_k, top_p)
    top_k = min(top_k, vocab_limit)
    lengths = jnp.full((b,), p, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    pad = (p - lengths)[:, None]
    col = jnp.arange(p, dtype=jnp.int32)[None]
    cache = model.init_cache(b, p + n_new)
    h, cache = model.hidden(prompt, (col >= pad).astype(jnp.int32), jnp.maximum(col - pad, 0),
                            cache=cache)
    logits = model.logits(h[:, -1:])[:, 0]

    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(mask_padding(logits, vocab_limit), axis=-1).astype(jnp.int32)
        return jax.random.categorical(
            key, filter_logits(logits, temperature, top_k, top_p, vocab_limit)).astype(jnp.int32)

    def step(carry, xs):
        logits, cache = carry
        key, i = xs
        tok = pick(logits, key)
        h, cache = model.hidden(tok[:, None], positions=(lengths + i)[:, None], cache=cache)
        return (model.logits(h)[:, 0], cache), tok

    xs = (jax.random.split(rng, n_new), jnp.arange(n_new, dtype=jnp.int32))
    _, toks = jax.lax.scan(step, (logits, cache), xs)
    return toks.T


def left_pad(prompts, width: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists (each 1..width long) -> (int32 [rows, width] left-padded, lengths [rows]);
    rows beyond the prompts repeat the last one (their output is to be ignored)."""
    out = np.zeros((rows, width), np.int32)
    lengths = np.zeros(rows, np.int32)
    for i in range(rows):
        ids = prompts[min(i, len(prompts) - 1)]
        if not 1 <= len(ids) <= width:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; allowed 1..{width}")
        out[i, width - len(ids):] = ids
        lengths[i] = len(ids)
    return out, lengths


def cut_at_eos(tokenizer, row) -> list[int]:
    """The generated ids before the first EOS (a document ends there)."""
    row = [int(t) for t in row]
    return row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row


def continuations(model_def, params, tokenizer, prompt: str, rng, *, n_new: int, num: int = 1,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[str]:
    """`num` continuations of `prompt` (EOS-prefixed, as documents start in training), each
    cut at its first EOS. Call under the model's mesh."""
    ids = np.concatenate([[tokenizer.eos_id], tokenizer.encode_array(prompt)]).astype(np.int32)
    out = generate(model_def, params, jnp.asarray(np.tile(ids, (num, 1))), rng, n_new=n_new,
                   temperature=temperature, top_k=top_k, top_p=top_p,
                   vocab_limit=tokenizer.vocab_size)
    return [tokenizer.decode(cut_at_eos(tokenizer, row))
            for row in np.asarray(jax.device_get(out))]
