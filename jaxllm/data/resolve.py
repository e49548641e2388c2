"""Resolve a config against its tokenizer: validate, load the tokenizer, fill the vocab size.

Every path that builds a model from a config (training, evaluation, HF import, the
sharding report) calls `resolve(cfg)` first, so `model.vocab_size` always means the same
thing: the tokenizer's size padded to a multiple of 64 (`config.padded_vocab`), or an
explicit value at least as large.
"""

from __future__ import annotations

from jaxllm.config import ConfigError, padded_vocab, validate
from jaxllm.data.tokenizers import load_tokenizer


def resolve(cfg):
    """Fill derived values (vocab size and the ids in use from the tokenizer); validate;
    return the tokenizer."""
    validate(cfg)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("data.tokenizer") else
                          f"data.tokenizer: {msg}") from None
    if not cfg.model.vocab_size:
        cfg.model.vocab_size = padded_vocab(tokenizer.vocab_size)
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size}")
    if not cfg.model.vocab_used:
        cfg.model.vocab_used = tokenizer.vocab_size
    elif not tokenizer.vocab_size <= cfg.model.vocab_used <= cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_used: {cfg.model.vocab_used} must be in [the "
                          f"tokenizer's {tokenizer.vocab_size}, model.vocab_size "
                          f"{cfg.model.vocab_size}]")
    return tokenizer
