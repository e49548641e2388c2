"""Ablation grids: one training run per cell of a grid of config overrides, then one table.

A grid file (configs/ablations/*.py) defines `get_grid(arg) -> dict` with
- `base`: a ConfigDict every cell starts from (same data, steps, batch and sequence length,
  so every cell gets the same token budget);
- `axes`: {axis: {label: {config key: value, ...}}} (or {axis: [values]} when the axis name
  is itself a config key); the grid is their Cartesian product;
- `eval` (optional): {"max_bytes": held-out bytes scored per cell, "tasks": "builtin",
  "lm_eval_tasks": "arc_easy,piqa" (lm-evaluation-harness tasks), "lm_eval_include": DIR,
  "lm_eval_limit": N}.

`data.tokenizer` values of the form `train:KIND:VOCAB` (KIND: sentencepiece_bpe,
sentencepiece_unigram, byte_bpe) are trained once on the first `eval.tokenizer_bytes`
(default 4 MB) of the base data's text (`data.path`, or the embedded corpus; this text is
not split, so it can include held-out documents) and stored under ROOT/tokenizers/.

Each cell trains in ROOT/<cell> (jaxllm.train.loop.train, in this process) and is then
evaluated with jaxllm.eval (tokenizer-independent bits per byte on the held-out split and
downstream accuracy); its row goes to ROOT/<cell>/ablation.json. A cell whose final
checkpoint, final eval row and ablation.json exist is not rerun, so an interrupted grid
resumes where it stopped. Results: ROOT/results.{md,csv,json} and ROOT/ablation.png.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import itertools
import json
import logging
import os

from ml_collections import ConfigDict

from jaxllm.config import ConfigError, set_key, unknown_key, validate
from jaxllm.data.corpus import expand_inputs
from jaxllm.data.tokenizer_training import train_tokenizer
from jaxllm.eval import report
from jaxllm.eval.evaluate import LM_EVAL_COLUMNS, evaluate
from jaxllm.eval.report import markdown_table, read_metrics, summarize
from jaxllm.train.loop import train

log = logging.getLogger("jaxllm")

COLUMNS = ["cell", "bpb", "train_eval_bpb", "final_loss", "tokens_per_s", "params", "step",
           "tokens"]


def load_grid(spec: str) -> dict:
    """`path.py[:arg]` -> the grid dict, with axes normalized to {axis: {label: overrides}}."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--grid: {path}: no such file")
    module_spec = importlib.util.spec_from_file_location("jaxllm_grid", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        grid = module.get_grid(arg or None)
    except (AttributeError, ImportError, SyntaxError, TypeError, ValueError) as e:
        raise ConfigError(f"--grid: {spec}: {type(e).__name__}: {e}") from None
    if not isinstance(grid, dict) or "base" not in grid or "axes" not in grid:
        raise ConfigError(f"--grid: {spec}: get_grid must return dict(base=..., axes=...)")
    axes = {}
    for axis, values in grid["axes"].items():
        if isinstance(values, (list, tuple)):
            values = {str(v): {axis: v} for v in values}
        if not values:
            raise ConfigError(f"--grid: axis {axis} has no values")
        axes[axis] = dict(values)
    return {"base": grid["base"], "axes": axes, "eval": dict(grid.get("eval", {}))}


def restrict(grid: dict, only: dict[str, list[str]]) -> dict:
    """Keep only the named labels of some axes ({axis: [label, ...]})."""
    for axis, labels in only.items():
        if axis not in grid["axes"]:
            raise ConfigError(f"--only: unknown axis {axis!r}; axes: {', '.join(grid['axes'])}")
        bad = [lab for lab in labels if lab not in grid["axes"][axis]]
        if bad:
            raise ConfigError(f"--only: {axis} has no value {bad[0]!r}; allowed: "
                              f"{', '.join(grid['axes'][axis])}")
        grid["axes"][axis] = {lab: grid["axes"][axis][lab] for lab in labels}
    return grid


def _set(cfg: ConfigDict, key: str, value) -> None:
    msg = unknown_key(cfg, key)
    if msg:
        raise ConfigError(f"grid: unknown config key {key!r} ({msg.split('; ', 1)[1]})")
    set_key(cfg, key, value)


def cells(grid: dict) -> list[tuple[str, dict, dict]]:
    """[(name, {axis: label}, {key: value})] for the Cartesian product of the axes."""
    out = []
    names = list(grid["axes"])
    for labels in itertools.product(*(grid["axes"][a] for a in names)):
        overrides = {}
        for axis, label in zip(names, labels, strict=True):
            overrides.update(grid["axes"][axis][label])
        name = "__".join(f"{a.split('.')[-1]}-{lab}" for a, lab in zip(names, labels, strict=True))
        out.append((name, dict(zip(names, labels, strict=True)), overrides))
    return out


def cell_config(base: ConfigDict, overrides: dict, tokenizers: dict) -> ConfigDict:
    cfg = copy.deepcopy(base)
    for key, value in overrides.items():
        if key == "data.tokenizer" and str(value).startswith("train:"):
            value = tokenizers[value]
        _set(cfg, key, value)
    return validate(cfg)


def prepare_tokenizers(grid: dict, root: str) -> dict:
    """Train every `train:KIND:VOCAB` tokenizer of the grid once (kept under ROOT)."""

    specs = {v for vals in grid["axes"].values() for ov in vals.values()
             for k, v in ov.items() if k == "data.tokenizer" and str(v).startswith("train:")}
    out = {}
    for spec in sorted(specs):
        try:
            _, kind, vocab = spec.split(":")
            vocab = int(vocab)
        except ValueError:
            raise ConfigError(f"grid: tokenizer {spec!r}: expected train:KIND:VOCAB") from None
        ext = ".json" if kind == "byte_bpe" else ".model"
        path = os.path.join(root, "tokenizers", f"{kind}-{vocab}{ext}")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            files = expand_inputs([grid["base"].data.path or "embedded"])
            path = train_tokenizer(files, kind, vocab, path, progress=False,
                                   text_field=grid["base"].data.text_field,
                                   max_bytes=grid["eval"].get("tokenizer_bytes", 4_000_000))
        out[spec] = path
    return out


def _trained(workdir: str, steps: int) -> bool:
    if not os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
        return False
    try:
        return any(r["step"] == steps for r in read_metrics(workdir)["eval"])
    except ConfigError:
        return False


def run_cell(name: str, labels: dict, cfg: ConfigDict, workdir: str, ev: dict) -> dict:
    """Train (unless finished) and evaluate (unless done) one cell; returns its row."""

    result_path = os.path.join(workdir, "ablation.json")
    steps = cfg.train.steps
    if _trained(workdir, steps) and os.path.exists(result_path):
        try:
            with open(result_path) as f:
                cached = json.load(f)
        except ValueError:
            cached = None
        if isinstance(cached, dict):
            return {**cached, "status": "cached"}
        log.warning("%s is unreadable; evaluating the cell again", result_path)
    status = "evaluated"
    if not _trained(workdir, steps):
        out = train(cfg, workdir)
        if out.get("preempted"):
            raise InterruptedError(f"{name}: stopped at step {out['step']} (SIGTERM); "
                                   "run the grid again to resume")
        status = "trained"
    r = evaluate(workdir, max_bytes=ev.get("max_bytes", 0), tasks=ev.get("tasks", ""),
                 batch_size=ev.get("batch_size", 8), lm_eval_tasks=ev.get("lm_eval_tasks", ""),
                 lm_eval_include=ev.get("lm_eval_include", ""),
                 lm_eval_limit=ev.get("lm_eval_limit", 0))
    s = summarize(workdir, name)
    row = {"cell": name, **labels, "bpb": r["bpb"], "eval_loss": r["loss"],
           "eval_bytes": r["bytes"], "train_eval_bpb": s["final_bpb"],
           "final_loss": s["final_loss"], "tokens_per_s": s["tokens_per_s"],
           "params": s["params"], "step": s["step"], "tokens": s["tokens"]}
    for t in r["tasks"]:
        row[f"{t['task']}_acc"] = t["acc"]
        if "acc_norm" in t:
            row[f"{t['task']}_acc_norm"] = t["acc_norm"]
    for t in r.get("lm_eval", []):
        row.update({f"{t['task']}_{m}": t[m] for m in LM_EVAL_COLUMNS if m in t})
    with open(result_path, "w") as f:
        json.dump(row, f, indent=2)
    return {**row, "status": status}


def run_grid(grid: dict, root: str, overrides: dict | None = None, log=print) -> list[dict]:
    """Run every cell (resuming), then write ROOT/results.{md,csv,json} and ablation.png."""

    base = copy.deepcopy(grid["base"])
    for key, value in (overrides or {}).items():
        _set(base, key, value)
    grid = {**grid, "base": base}
    os.makedirs(root, exist_ok=True)
    tokenizers = prepare_tokenizers(grid, root)
    todo = [(n, lab, cell_config(base, ov, tokenizers)) for n, lab, ov in cells(grid)]
    rows = []
    for i, (name, labels, cfg) in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {name}")
        rows.append(run_cell(name, labels, cfg, os.path.join(root, name), grid["eval"]))
        log(f"    {rows[-1]['status']}: bpb {rows[-1]['bpb']:.4f}")
    write_results(rows, root, list(grid["axes"]))
    report.plot_runs([os.path.join(root, r["cell"]) for r in rows],
                     os.path.join(root, "ablation.png"), [r["cell"] for r in rows],
                     title=f"ablation: {' x '.join(grid['axes'])}")
    return rows


def write_results(rows: list[dict], root: str, axes: list[str]) -> str:

    metrics = tuple(f"_{m}" for m in LM_EVAL_COLUMNS)  # includes _acc, _acc_norm
    extra = sorted({k for r in rows for k in r if k.endswith(metrics)})
    cols = ["cell", *axes, "bpb", *extra, *COLUMNS[2:]]
    table = markdown_table(sorted(rows, key=lambda r: r["bpb"]), cols)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(root, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["status"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return table
