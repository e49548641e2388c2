"""KV-cached autoregressive sampling: greedy, temperature, top-k and top-p (nucleus).

The prompt fills the cache in one forward pass; each new token is one cached step
(`Transformer.hidden(..., cache=...)`), inside one `lax.scan`. Greedy decoding
(temperature 0) equals decoding by full recomputation token for token
(tests/test_sample.py). Top-p follows Holtzman et al. 2020 ("The Curious Case of Neural
Text Degeneration"). Padded vocabulary ids (>= the tokenizer's size) are never produced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.model.transformer import position_limit


def filter_logits(logits, temperature: float, top_k: int, top_p: float, vocab_limit: int):
    """Mask ids >= vocab_limit (vocabulary padding), then apply temperature/top-k/top-p."""
    ids = jnp.arange(logits.shape[-1])
    logits = jnp.where(ids < vocab_limit, logits, -jnp.inf)
    logits = logits / jnp.maximum(temperature, 1e-6)
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
             top_k: int = 0, top_p: float = 1.0, vocab_limit: int):
    """prompt [B, P] int32 -> [B, n_new] new tokens. temperature == 0 means greedy."""
    model = model_def.apply(params)
    b, p = prompt.shape
    check_args(model_def.cfg, p, n_new, temperature, top_k, top_p)
    top_k = min(top_k, vocab_limit)
    cache = model.init_cache(b, p + n_new)
    h, cache = model.hidden(prompt, cache=cache)
    logits = model.logits(h[:, -1:])[:, 0]

    def pick(logits, key):
        if temperature == 0.0:
            masked = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
            return jnp.argmax(masked, axis=-1).astype(jnp.int32)
        return jax.random.categorical(
            key, filter_logits(logits, temperature, top_k, top_p, vocab_limit)).astype(jnp.int32)

    def step(carry, key):
        logits, cache = carry
        tok = pick(logits, key)
        h, cache = model.hidden(tok[:, None], cache=cache)
        return (model.logits(h)[:, 0], cache), tok

    _, toks = jax.lax.scan(step, (logits, cache), jax.random.split(rng, n_new))
    return toks.T


def continuations(model_def, params, tokenizer, prompt: str, rng, *, n_new: int, num: int = 1,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[str]:
    """`num` continuations of `prompt` (EOS-prefixed, as documents start in training), each
    cut at its first EOS. Call under the model's mesh."""
    ids = np.concatenate([[tokenizer.eos_id], tokenizer.encode_array(prompt)]).astype(np.int32)
    out = generate(model_def, params, jnp.asarray(np.tile(ids, (num, 1))), rng, n_new=n_new,
                   temperature=temperature, top_k=top_k, top_p=top_p,
                   vocab_limit=tokenizer.vocab_size)
    texts = []
    for row in np.asarray(jax.device_get(out)).tolist():
        if tokenizer.eos_id in row:
            row = row[:row.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode(row))
    return texts
