"""Length extrapolation: bits per byte at 1x, 2x, 4x, 8x the training length.

Press, Smith and Lewis (ICLR 2022, "Train Short, Test Long") evaluate a model trained at
length L on longer inputs, two ways, both here:

- non-overlapping: every document ([EOS] + doc + [EOS]) is cut into pieces of the eval
  length, each scored in full from position 0 (as `bpb.evaluate_bpb`);
- sliding window: windows of the eval length start every training length (the stride);
  the first window of a document scores all its tokens, every later window only the tokens
  no earlier window scored (its last `stride`), so each scored token past the first window
  sees at least eval_length - stride tokens of context. At 1x both ways are the same.

Both score exactly the same tokens at every length, so the numbers are comparable down a
column: falling bpb means the model uses the longer context, rising bpb that it breaks
beyond its training length. Learned position tables cannot go past their size: those
lengths are reported as n/a with the reason.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxllm.eval.bpb import document_requests, summarize
from jaxllm.eval.scoring import Request

FACTORS = (1, 2, 4, 8)


def sliding_requests(docs, eos_id: int, window: int, stride: int) -> list[Request]:
    """Windows of at most `window` targets starting every `stride` targets, each scoring
    only the targets no earlier window scored (the Hugging Face perplexity recipe)."""
    reqs = []
    for d in docs:
        seg = np.concatenate([[eos_id], d]).astype(np.int32)
        n, done = len(seg) - 1, 0
        for begin in range(0, n, stride):
            end = min(begin + window, n)
            reqs.append(Request(seg[begin:end + 1], done - begin))
            done = end
            if end == n:
                break
    return reqs


def evaluate_lengths(scorer, docs, train_len: int, factors=FACTORS,
                     tokens_per_batch: int | None = None) -> list[dict]:
    """One row per factor: {factor, length, nonoverlap_bpb, sliding_bpb, tokens, note}.

    Batches hold about `tokens_per_batch` tokens (default: batch_size * train_len), so
    longer rows use fewer of them; the batch size stays a multiple of the device count.
    """

    eos = scorer.run.tokenizer.eos_id
    limit = scorer.max_length()
    budget = tokens_per_batch or scorer.batch_size * train_len
    n_dev = jax.device_count()
    rows = []
    for f in factors:
        length = f * train_len
        row = {"factor": f, "length": length, "nonoverlap_bpb": None, "sliding_bpb": None,
               "tokens": None, "note": ""}
        if limit is not None and length > limit:
            row["note"] = (f"n/a: learned positions end at {limit} "
                           f"(model.max_position table), cannot score length {length}")
            rows.append(row)
            continue
        bs = max(n_dev, (budget // length) // n_dev * n_dev)
        s = scorer.score(document_requests(docs, eos, length), length, packing=True,
                         batch_size=bs)
        non = summarize(float(s.nll.sum()), int(s.tokens.sum()), int(s.bytes.sum()))
        s = scorer.score(sliding_requests(docs, eos, length, train_len), length,
                         packing=False, batch_size=bs)
        sl = summarize(float(s.nll.sum()), int(s.tokens.sum()), int(s.bytes.sum()))
        assert sl["tokens"] == non["tokens"] and sl["bytes"] == non["bytes"]
        row.update(nonoverlap_bpb=non["bpb"], sliding_bpb=sl["bpb"], tokens=non["tokens"])
        rows.append(row)
    return rows


def format_table(rows) -> str:
    """Markdown table of `evaluate_lengths` rows."""
    out = ["| length | x train | bpb non-overlapping | bpb sliding (stride = train) | note |",
           "|---:|---:|---:|---:|---|"]
    for r in rows:
        def fmt(v):
            return ("n/a" if v is None else f"{v:.4f}")
        out.append(f"| {r['length']} | {r['factor']} | {fmt(r['nonoverlap_bpb'])} | "
                   f"{fmt(r['sliding_bpb'])} | {r['note']} |")
    return "\n".join(out)
