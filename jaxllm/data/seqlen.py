"""Sequence-length report over a prepared dataset: what training length can the data feed?

For each candidate length L, long-context training wants sequences drawn from documents of
at least L tokens (a packed row of short documents teaches nothing about long range). The
report gives, per L: the share of all tokens that sit in documents of >= L tokens, how many
such documents there are, the tokens available as non-overlapping L-token sequences inside
them (sum of floor(len / L) * L), and how many times that supply would be repeated to fill
a token budget (budget / available; inf when there is none).
"""

from __future__ import annotations

import numpy as np

PERCENTILES = (50, 90, 95, 99, 99.9)
DEFAULT_LENGTHS = tuple(512 * 2**i for i in range(7))  # 512 ... 32768


def length_table(lengths: np.ndarray, budget: float,
                 candidates=DEFAULT_LENGTHS) -> list[dict]:
    lengths = np.asarray(lengths, np.int64)
    total = max(int(lengths.sum()), 1)
    rows = []
    for L in candidates:
        long = lengths[lengths >= L]
        available = int((long // L).sum() * L)
        rows.append({"seq_len": int(L), "token_share": float(long.sum() / total),
                     "docs": len(long), "available_tokens": available,
                     "repeats": float(budget / available) if available else float("inf")})
    return rows


def summary(lengths: np.ndarray) -> dict:
    lengths = np.asarray(lengths, np.int64)
    pct = np.percentile(lengths, PERCENTILES) if len(lengths) else [0] * len(PERCENTILES)
    return {"docs": len(lengths), "tokens": int(lengths.sum()),
            "mean": float(lengths.mean()) if len(lengths) else 0.0,
            "min": int(lengths.min()) if len(lengths) else 0,
            "max": int(lengths.max()) if len(lengths) else 0,
            "percentiles": {str(p): float(v) for p, v in zip(PERCENTILES, pct)}}


def histogram_png(lengths: np.ndarray, path: str, title: str = "") -> None:
    """Document-length histograms on log-spaced bins (documents, and tokens they hold), with
    the candidate lengths marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = np.maximum(np.asarray(lengths, np.int64), 1)
    lo, hi = np.log10(lengths.min()), np.log10(max(lengths.max(), 2))
    bins = np.logspace(lo - 0.05, hi + 0.05, 50)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, weights, label in ((axes[0], None, "documents"),
                               (axes[1], lengths, "tokens in these documents")):
        ax.hist(lengths, bins=bins, weights=weights, color="#4477aa")
        for L in DEFAULT_LENGTHS:
            ax.axvline(L, color="#cc6677", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("document length in tokens (dashed: 512 ... 32768)")
        ax.set_ylabel(label)
    fig.suptitle(title or "document lengths")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_report(info: dict, rows: list[dict], budget: float) -> str:
    p = info["percentiles"]
    lines = [(f"documents {info['docs']:,}  tokens {info['tokens']:,}  mean {info['mean']:.1f}  "
             f"min {info['min']}  max {info['max']:,}"),
             "percentiles: " + "  ".join(f"p{k} {v:,.0f}" for k, v in p.items()),
             f"budget {budget:,.0f} tokens",
             (f"{'seq_len':>8} {'token share':>12} {'docs >= L':>10} {'avail tokens':>14} "
             f"{'repeats':>10}")]
    for r in rows:
        lines.append(f"{r['seq_len']:>8} {100 * r['token_share']:>11.2f}% {r['docs']:>10,} "
                     f"{r['available_tokens']:>14,} {r['repeats']:>10.2f}")
    return "\n".join(lines)
