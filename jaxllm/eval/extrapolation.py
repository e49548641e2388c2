"""Length extrapolation: bits per byte at 1x, 2x, 4x, 8x the training length.

Press, Smith and Lewis (ICLR 2022, "Train Short, Test Long") evaluate a model trained at
length L on longer inputs, two ways, both here:

- non-overlapping: every document ([EOS] + doc + [EOS]) is cut into pieces of the eval
  length, each scored in full from position 0 (as `bpb.evaluate_bpb`);
- sliding window: windows of the eval length advance by the training length (the stride);
  the first window of a document scores all its tokens, every later window only its last
  `stride` (new) tokens, so each scored token sees at least eval_length - stride tokens of
  context when the document has them.

Both score exactly the same tokens at every length, so the numbers are comparable down a
column: falling bpb means the model uses the longer context, rising bpb that it breaks
beyond its training length. Learned position tables cannot go past their size: those
lengths are reported as n/a with the reason.
"""

from __future__ import annotations

import numpy as np

from jaxllm.eval.bpb import document_requests, summarize
from jaxllm.eval.scoring import Request

FACTORS = (1, 2, 4, 8)


def sliding_requests(docs, eos_id: int, window: int, stride: int) -> list[Request]:
    """Windows of `window` targets every `stride`, scoring only the new targets."""
    reqs = []
    for d in docs:
        seg = np.concatenate([[eos_id], d]).astype(np.int32)
        n = len(seg) - 1
        end = min(window, n)
        reqs.append(Request(seg[:end + 1], 0))
        while end < n:
            new_end = min(end + stride, n)
            a = max(0, new_end - window)
            reqs.append(Request(seg[a:new_end + 1], end - a))
            end = new_end
    return reqs


def evaluate_lengths(scorer, docs, train_len: int, factors=FACTORS,
                     tokens_per_batch: int | None = None) -> list[dict]:
    """One row per factor: {factor, length, nonoverlap_bpb, sliding_bpb, tokens, note}.

    Batches hold about `tokens_per_batch` tokens (default: batch_size * train_len), so
    longer rows use fewer of them; the batch size stays a multiple of the device count.
    """
    import jax

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
        fmt = (lambda v: "n/a" if v is None else f"{v:.4f}")
        out.append(f"| {r['length']} | {r['factor']} | {fmt(r['nonoverlap_bpb'])} | "
                   f"{fmt(r['sliding_bpb'])} | {r['note']} |")
    return "\n".join(out)
