"""Bits per byte, per-token loss and perplexity of a checkpoint on held-out documents.

BPB = (sum of token NLL in nats) / (sum of UTF-8 bytes of the text) / ln 2, summed over the
whole evaluation text (Gao et al. 2020, "The Pile", sec. 3.1). It is
comparable across tokenizers; per-token loss is not.

What is scored: every document of the split as the segment [EOS] + doc + [EOS] (the EOS
before it is the document start the model was trained with), cut into pieces of at most
`seq_len` targets that are scored independently from position 0. Every token of the
document and the final EOS is a target (the EOS carries 0 bytes; its NLL counts, as in
training). Bytes come from `tokenizer.token_bytes`, which sum to the UTF-8 length of the
text under every supported tokenizer. Because each piece is its own segment, the result is
the same with `packing` on (pieces packed into rows) or off (one piece per row, padded)
and for every batch size, up to float rounding. (The training loop's eval rows use the
training windows instead, so they differ slightly from this number.)
"""

from __future__ import annotations

import numpy as np

from jaxllm.config import ConfigError
from jaxllm.data.pipeline import load_split, parse_mixture, whole_if_token_split
from jaxllm.eval.scoring import Request
from jaxllm.model.loss import nll_summary

SPLITS = ("eval", "valid", "train", "all")


def eval_documents(cfg, tokenizer, split: str = "eval", max_bytes: int = 0) -> list[np.ndarray]:
    """Token arrays (each ending with EOS) of the documents of `split` of the configured data
    (`data.path`, else each `data.mixture` member, else the embedded corpus), in a fixed
    order; with `max_bytes`, only the first whole documents holding at least that many bytes
    (the cut is by bytes, so runs with different tokenizers see the same text)."""

    if split not in SPLITS:
        raise ConfigError(f"--split: got {split!r}; allowed: {', '.join(SPLITS)}")
    parts = (split,)
    if split == "all":
        parts = ("eval", "valid", "train") if cfg.data.valid_fraction else ("eval", "train")
    sources = [(None, "data.path")]
    if cfg.data.mixture and not cfg.data.path:
        sources = [(p, "data.mixture") for p, _ in parse_mixture(cfg.data.mixture)]
    docs, total = [], 0
    try:
        for path, key in sources:
            whole = whole_if_token_split(cfg, tokenizer, path, key) if split == "all" else None
            for s in [whole] if whole is not None else (
                    load_split(cfg, tokenizer, part, path, key) for part in parts):
                for j in range(len(s)):
                    if max_bytes and total >= max_bytes:
                        return docs
                    docs.append(np.asarray(s.doc(j), np.int32))
                    total += int(tokenizer.token_bytes(docs[-1]).sum())
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if not docs:
        raise ConfigError(f"--split: the {split} split of {cfg.data.path or 'the data'} has no "
                          "documents (data.eval_fraction too small?); try --split=all")
    return docs


def document_requests(docs, eos_id: int, length: int) -> list[Request]:
    """[EOS] + doc (doc ends with EOS) cut into pieces of at most `length` targets."""
    reqs = []
    for d in docs:
        seg = np.concatenate([[eos_id], d]).astype(np.int32)
        n = len(seg) - 1
        for a in range(0, n, length):
            reqs.append(Request(seg[a:min(a + length, n) + 1], 0))
    return reqs


def summarize(nll: float, tokens: int, n_bytes: int) -> dict:
    return {**nll_summary(nll, tokens, n_bytes), "tokens": int(tokens), "bytes": int(n_bytes)}


def evaluate_bpb(scorer, docs, seq_len: int, packing: bool = True) -> dict:
    """{bpb, loss (nats/token), perplexity, tokens, bytes, documents} over `docs`."""
    reqs = document_requests(docs, scorer.run.tokenizer.eos_id, seq_len)
    s = scorer.score(reqs, seq_len, packing=packing)
    return {**summarize(float(s.nll.sum()), int(s.tokens.sum()), int(s.bytes.sum())),
            "documents": len(docs)}
