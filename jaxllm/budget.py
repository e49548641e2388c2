"""Matched compute budgets for comparing configs: tokens, text bytes or model FLOPs -> steps.

`--budget=KIND:AMOUNT` of tools/ablate.py; each cell gets its own step count:

- `tokens:N`: steps = N / (batch_size · seq_len) (every cell sees the same token count);
- `bytes:N`: steps = N / (batch_size · seq_len · bytes-per-token), bytes per token being
  the tokenizer's UTF-8 bytes per token on the training split (EOS tokens count as tokens
  with 0 bytes, as in the packed stream), so a tokenizer with longer tokens takes fewer
  steps over the same amount of text: the fair budget across tokenizers;
- `flops:N`: steps = N / (batch_size · seq_len · FLOPs-per-token), with the MFU formula
  `jaxllm.train.metrics.flops_per_token` (6·N + 12·L·d_model·T), so a longer sequence or a
  wider MLP gets fewer steps.

Steps are rounded to the nearest integer (at least 1). Warmup keeps the base config's
warmup/steps ratio and evaluation its number of eval rows, so every cell's schedule has
the same shape.
"""

from __future__ import annotations

import copy

import numpy as np
from flax import nnx

from jaxllm.config import ConfigError
from jaxllm.data.pipeline import load_split
from jaxllm.data.resolve import resolve
from jaxllm.model.transformer import abstract_model
from jaxllm.train import metrics

KINDS = ("tokens", "bytes", "flops")


def parse_budget(spec: str) -> tuple[str, float]:
    """`KIND:AMOUNT` (AMOUNT may be written 2e6) -> (kind, amount)."""
    kind, sep, amount = spec.partition(":")
    try:
        value = float(amount)
    except ValueError:
        value = -1.0
    if not sep or kind not in KINDS or not value > 0:
        raise ConfigError(f"--budget: expected tokens:N, bytes:N or flops:N with N > 0, "
                          f"got {spec!r}")
    return kind, value


def tokens_per_step(cfg) -> int:
    return int(cfg.train.batch_size) * int(cfg.data.seq_len)


def bytes_per_token(cfg, sample_bytes: int = 4_000_000) -> float:
    """UTF-8 bytes per token of the configured tokenizer on the first documents of the
    training split (at least `sample_bytes` of text, or all of it)."""
    cfg = copy.deepcopy(cfg)
    tokenizer = resolve(cfg)
    split = load_split(cfg, tokenizer, "train")
    n_bytes = n_tokens = 0
    for j in range(len(split)):
        doc = np.asarray(split.doc(j))
        n_bytes += int(tokenizer.token_bytes(doc).sum())
        n_tokens += len(doc)
        if n_bytes >= sample_bytes:
            break
    if not n_tokens:
        raise ConfigError("--budget: the training split has no documents")
    return n_bytes / n_tokens


def model_flops_per_token(cfg) -> float:
    """The MFU formula's FLOPs per token for `cfg` (parameters counted abstractly)."""
    cfg = copy.deepcopy(cfg)
    resolve(cfg)
    _, abstract = abstract_model(cfg)
    n = metrics.param_count(nnx.to_pure_dict(abstract), exclude_positions=True)
    return metrics.flops_per_token(n, cfg.model.n_layers, cfg.model.d_model, cfg.data.seq_len)


def per_token(cfg, kind: str) -> float:
    """What one token costs in the budget's unit."""
    if kind == "tokens":
        return 1.0
    return bytes_per_token(cfg) if kind == "bytes" else model_flops_per_token(cfg)


def apply_budget(cfg, kind: str, amount: float, unit: float | None = None) -> dict:
    """Set cfg.train.steps, optim.warmup_steps and train.eval_every/log_every for the
    budget (in place); returns what was derived, for the results table."""
    unit = per_token(cfg, kind) if unit is None else unit
    base_steps, t = cfg.train.steps, cfg.train
    per_step = tokens_per_step(cfg) * unit
    steps = max(1, round(amount / per_step))
    warmup = round(cfg.optim.warmup_steps * steps / base_steps)
    evals = base_steps // t.eval_every if t.eval_every else 0
    t.steps = steps
    cfg.optim.warmup_steps = min(warmup, steps)
    t.eval_every = max(1, steps // evals) if evals else 0
    t.log_every = max(1, min(t.log_every, steps // 5 or 1))
    return {"budget": f"{kind}:{amount:g}", "steps": steps,
            "warmup_steps": cfg.optim.warmup_steps, f"{kind}_per_token": unit,
            "budget_used": steps * per_step}
