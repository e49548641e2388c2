"""What an ablation grid reports: ROOT/table.md, ROOT/results.json and bpb plots.

Per cell: the learning-rate multiplier chosen on the validation split (lowest mean
validation bpb over seeds; flagged when it is the smallest or largest of the sweep: the
sweep was too narrow), then on the held-out test split with that multiplier: mean, std
and 95% Student-t interval of bpb over seeds, the paired difference to the baseline cell
over seeds (same seed = same initialisation and data order) with its interval, marked `*`
when the interval excludes 0, and downstream accuracies with percentile-bootstrap
intervals over items (jaxllm.stats; other task metrics: t intervals over seeds). Plots:
eval bpb (the training loop's eval rows) against tokens, text bytes and model FLOPs, mean
over seeds with a ±1 std band.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from jaxllm import stats
from jaxllm.eval.report import read_metrics

UNITS = {"tokens": None, "bytes": "bytes_per_token", "flops": "flops_per_token"}


def choose_lr(runs: list[dict]) -> dict:
    """The multiplier with the lowest mean validation bpb over seeds (never test bpb)."""
    mults = sorted({r["lr_mult"] for r in runs})
    if len(mults) == 1:
        return {"lr_mult": mults[0], "edge": False, "valid_bpb": {}}
    valid = {m: float(np.mean([r["valid_bpb"] for r in runs if r["lr_mult"] == m]))
             for m in mults}
    best = min(mults, key=lambda m: valid[m])
    return {"lr_mult": best, "edge": best in (mults[0], mults[-1]), "valid_bpb": valid}


def _tasks(runs: list[dict]) -> dict:
    """{TASK_METRIC: interval} over the runs (seeds) of a cell: accuracy with per-item
    scores gets a bootstrap over items; other metrics (acc_norm, lm-eval's) a t interval
    over seeds."""
    out = {}
    for task in runs[0]["tasks"]:
        res = [r["tasks"].get(task, {}) for r in runs]
        for metric in [m for m in res[0] if m != "item_acc"]:
            if metric == "acc" and all("item_acc" in t for t in res):
                items = np.array([t["item_acc"] for t in res], np.float64)
                out[f"{task}_acc"] = stats.bootstrap_interval(items)
            else:
                out[f"{task}_{metric}"] = stats.t_interval([t.get(metric, math.nan)
                                                            for t in res])
    return out


def summarize_cells(rows: list[dict], baseline: str) -> list[dict]:
    """One summary per cell, in grid order (module docstring)."""
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    by_cell = {c: [r for r in rows if r["cell"] == c] for c in cells}
    choice = {c: choose_lr(by_cell[c]) for c in cells}
    picked = {c: sorted((r for r in by_cell[c] if r["lr_mult"] == choice[c]["lr_mult"]),
                        key=lambda r: r["seed"]) for c in cells}
    base = {r["seed"]: r["bpb"] for r in picked[baseline]}
    out = []
    for c in cells:
        runs, first = picked[c], picked[c][0]
        tokens = first["steps"] * first["tokens_per_step"]
        row = {"cell": c, **choice[c], "lr": first["lr"], "steps": first["steps"],
               "warmup_steps": first["warmup_steps"], "tokens": tokens,
               "bytes": tokens * first["bytes_per_token"],
               "flops": tokens * first["flops_per_token"], "budget": first.get("budget"),
               "seeds": [r["seed"] for r in runs], "bpb": stats.t_interval(
                   [r["bpb"] for r in runs]), "tasks": _tasks(runs), "delta": None}
        common = [r for r in runs if r["seed"] in base]
        if c != baseline and common:
            row["delta"] = stats.paired_difference([r["bpb"] for r in common],
                                                   [base[r["seed"]] for r in common])
        out.append(row)
    return out


def _num(v, spec=".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _ci(d: dict, spec=".4f") -> str:
    return f"[{_num(d['lo'], spec)}, {_num(d['hi'], spec)}]"


def _lr(c: dict) -> str:
    text = f"{c['lr']:.3g}"
    if c["valid_bpb"]:
        text += f" (x{c['lr_mult']:g}" + (", edge: sweep too narrow)" if c["edge"] else ")")
    return text


def _delta(c: dict) -> str:
    d = c["delta"]
    if d is None:
        return "baseline" if c.get("is_baseline") else "-"
    return f"{d['mean']:+.4f} {_ci(d, '+.4f')}" + (" *" if d["significant"] else "")


def cell_table(summary: list[dict], meta: dict) -> str:
    tasks = sorted({t for c in summary for t in c["tasks"]})
    head = ["cell", "lr", "steps (warmup)", "tokens", "text bytes", "FLOPs", "seeds",
            "test bpb", "std", "95% CI", f"Δ bpb vs {meta['baseline']} [95% CI]",
            *[f"{t} [95% CI]" for t in tasks]]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for c in sorted(summary, key=lambda c: c["bpb"]["mean"]):
        c = {**c, "is_baseline": c["cell"] == meta["baseline"]}
        accs = [f"{c['tasks'][t]['mean']:.3f} {_ci(c['tasks'][t], '.3f')}"
                if t in c["tasks"] else "-" for t in tasks]
        lines.append("| " + " | ".join([
            c["cell"], _lr(c), f"{c['steps']} ({c['warmup_steps']})", f"{c['tokens']:,.0f}",
            f"{c['bytes']:,.0f}", f"{c['flops']:.3g}", str(len(c["seeds"])),
            _num(c["bpb"]["mean"]), _num(c["bpb"]["std"]), _ci(c["bpb"]), _delta(c),
            *accs]) + " |")
    return "\n".join(lines)


def sweep_table(summary: list[dict]) -> str:
    mults = sorted({m for c in summary for m in c["valid_bpb"]})
    lines = ["| cell | " + " | ".join(f"x{m:g}" for m in mults) + " | chosen |",
             "|---|" + "---:|" * len(mults) + "---|"]
    for c in summary:
        vals = [("**" + _num(c["valid_bpb"][m]) + "**" if m == c["lr_mult"] else
                 _num(c["valid_bpb"].get(m))) for m in mults]
        flag = " (edge: sweep too narrow)" if c["edge"] else ""
        lines.append(f"| {c['cell']} | " + " | ".join(vals) + f" | x{c['lr_mult']:g}{flag} |")
    return "\n".join(lines)


def markdown(summary: list[dict], meta: dict) -> str:
    budget = meta["budget"] or "the grid's steps (same tokens per cell when shapes agree)"
    text = [f"Grid {' x '.join(meta['axes'])}; {meta['seeds']} seed(s) per cell; budget "
            f"{budget}; lr sweep x{', x'.join(f'{m:g}' for m in meta['lr_sweep'])}.",
            "test bpb: held-out split, mean over seeds, sample std, 95% Student-t interval; "
            f"Δ: paired over seeds vs {meta['baseline']}, * = its 95% interval excludes 0; "
            "task accuracies: 95% percentile bootstrap over items (other task metrics: t over "
            "seeds).", "", cell_table(summary, meta)]
    if len(meta["lr_sweep"]) > 1:
        text += ["", "Validation bpb (mean over seeds) per lr multiplier; the chosen one in "
                 "bold (the test split plays no part in the choice):", "",
                 sweep_table(summary)]
    return "\n".join(text) + "\n"


def plot(root: str, summary: list[dict], rows: list[dict], unit: str) -> str:
    """Eval bpb against tokens / bytes / FLOPs: mean over seeds with a ±1 std band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for c in summary:
        runs = [r for r in rows if r["cell"] == c["cell"] and r["lr_mult"] == c["lr_mult"]]
        curves = [{e["step"]: e for e in read_metrics(os.path.join(root, r["run"]))["eval"]}
                  for r in runs]
        steps = sorted(set.intersection(*(set(k) for k in curves)))
        factor = 1.0 if UNITS[unit] is None else runs[0][UNITS[unit]]
        x = np.array([curves[0][s]["tokens_seen"] * factor for s in steps])
        y = np.array([[cur[s]["bpb"] for s in steps] for cur in curves])
        ax.plot(x, y.mean(0), marker=".", label=c["cell"])
        if len(y) > 1:
            ax.fill_between(x, y.mean(0) - y.std(0, ddof=1), y.mean(0) + y.std(0, ddof=1),
                            alpha=0.2)
    ax.set_xlabel({"tokens": "tokens", "bytes": "text bytes", "flops": "model FLOPs"}[unit])
    ax.set_ylabel("eval bits per byte (mean over seeds, band ±1 std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path = os.path.join(root, f"bpb_vs_{unit}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _json_safe(x):
    """NaN (a std of one seed) -> null; float dict keys (lr multipliers) -> strings."""
    if isinstance(x, dict):
        return {(f"{k:g}" if isinstance(k, float) else k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def write(root: str, rows: list[dict], meta: dict) -> dict:
    """ROOT/table.md, ROOT/results.json and ROOT/bpb_vs_{tokens,bytes,flops}.png."""
    summary = summarize_cells(rows, meta["baseline"])
    table = markdown(summary, meta)
    with open(os.path.join(root, "table.md"), "w") as f:
        f.write(table)
    results = {"meta": meta, "cells": summary, "runs": rows, "table": table}
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(_json_safe(results), f, indent=2, allow_nan=False)
    results["plots"] = [plot(root, summary, rows, u) for u in UNITS]
    return results
