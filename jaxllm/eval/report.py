"""Read training workdirs (metrics.jsonl, config.json) into summaries, tables and plots.

Used by tools/plot_runs.py and the ablation runner. After a resume a step can be logged
twice; the last row of a step wins. Tokens are `step * train.batch_size * data.seq_len`
(the `tokens_seen` of train rows). Plots use matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import math
import os

from jaxllm.config import ConfigError
from jaxllm.run import saved_config
from jaxllm.runfiles import read_rows


def read_metrics(workdir: str) -> dict:
    """{"train": [...], "eval": [...], "start": [...], "config": dict} of one workdir."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"{workdir}: no metrics.jsonl (not a training workdir?)")
    train, evals, start = {}, {}, []
    for row in read_rows(path):  # bad lines (torn by a killed run) skipped with a warning
        if row.get("split") == "train" and "step" in row:
            train[row["step"]] = row
        elif row.get("split") == "eval" and "step" in row:
            evals[row["step"]] = row
        elif row.get("event") == "start":
            start.append(row)
    cfg = saved_config(workdir) or {}
    per_step = 0
    try:
        per_step = cfg["train"]["batch_size"] * cfg["data"]["seq_len"] if cfg else 0
    except (KeyError, TypeError):
        raise ConfigError(f"malformed run file ({workdir}/config.json): no "
                          "train.batch_size / data.seq_len; restore it from a copy") from None
    for rows in (train, evals):
        for row in rows.values():
            row.setdefault("tokens_seen", row["step"] * per_step)
    return {"train": [train[k] for k in sorted(train)], "eval": [evals[k] for k in sorted(evals)],
            "start": start, "config": cfg}


def summarize(workdir: str, name: str | None = None) -> dict:
    """Final and best numbers of a run; tokens/s is the median over train rows after the
    first (which includes compilation)."""
    m = read_metrics(workdir)
    tr, ev = m["train"], m["eval"]
    tps = sorted(r["tokens_per_s"] for r in tr[1:]) or [r["tokens_per_s"] for r in tr]
    return {
        "run": name or os.path.basename(os.path.normpath(workdir)),
        "step": tr[-1]["step"] if tr else 0,
        "tokens": tr[-1]["tokens_seen"] if tr else 0,
        "final_loss": tr[-1]["loss"] if tr else None,
        "final_bpb": ev[-1]["bpb"] if ev else None,
        "best_bpb": min(r["bpb"] for r in ev) if ev else None,
        "tokens_per_s": tps[len(tps) // 2] if tps else None,
        "params": m["start"][-1]["param_count"] if m["start"] else None,
    }


def _fmt(v, spec=".4f"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else format(v, spec)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    def numeric(c):
        vals = [r.get(c) for r in rows if r.get(c) is not None]
        return bool(vals) and all(isinstance(v, (int, float)) for v in vals)
    out = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---:" if numeric(c) else "---" for c in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out)


def plot_runs(workdirs: list[str], out_png: str, labels: list[str] | None = None,
              title: str = "") -> str:
    """Loss and bpb against steps and tokens, tokens/s, final bpb: one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [os.path.basename(os.path.normpath(w)) for w in workdirs]
    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    finals = []
    for w, label in zip(workdirs, labels, strict=True):
        m = read_metrics(w)
        tr, ev = m["train"], m["eval"]
        for a, rows, x, y in ((ax[0, 0], tr, "step", "loss"), (ax[0, 1], ev, "step", "bpb"),
                              (ax[1, 0], tr, "tokens_seen", "loss"),
                              (ax[1, 1], ev, "tokens_seen", "bpb"),
                              (ax[0, 2], tr, "step", "tokens_per_s")):
            if rows:
                a.plot([r[x] for r in rows], [r[y] for r in rows], marker=".", label=label)
        finals.append(ev[-1]["bpb"] if ev else float("nan"))
    names = [("step", "train loss (nats/token)"), ("step", "eval bits per byte"),
             ("tokens", "train loss (nats/token)"), ("tokens", "eval bits per byte"),
             ("step", "tokens/s")]
    for a, (x, y) in zip((ax[0, 0], ax[0, 1], ax[1, 0], ax[1, 1], ax[0, 2]), names, strict=True):
        a.set_xlabel(x)
        a.set_ylabel(y)
        a.grid(alpha=0.3)
    ax[0, 0].legend(fontsize="small")
    ax[1, 2].barh(labels, finals)
    ok = [f for f in finals if math.isfinite(f)]
    if ok:  # start the axis near the smallest value so differences show
        ax[1, 2].set_xlim(min(ok) * 0.97, max(ok) * 1.01)
    ax[1, 2].set_xlabel("final eval bits per byte (training eval rows)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
