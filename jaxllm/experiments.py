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

Each cell is trained `seeds` times (train.seed + 0, 1, ...: initialisation and data
order) at every learning-rate multiplier of `lr_sweep` (x the cell's peak lr), each run in
its own workdir ROOT/<cell>[__lr<m>][__seed<k>] (jaxllm.train.loop.train, in this
process), then evaluated with jaxllm.eval: bits per byte on the held-out (test) split and
downstream accuracy with per-item scores, and, when sweeping, bits per byte on the
validation split (`data.valid_fraction`, set to `data.eval_fraction` when the grid leaves
it 0), the only number the learning rate is chosen on. With a `budget` (jaxllm.budget)
each cell's steps and warmup are derived from it. A run's row goes to its
ROOT/<run>/ablation.json with a fingerprint of its config; a run whose final checkpoint,
final eval row and ablation.json (same fingerprint) exist is not rerun, so an interrupted
grid resumes, and a grid rerun with more seeds or a wider sweep only trains the new runs.
The tables, results.json and plots are written by jaxllm.ablation_report.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import logging
import os

from ml_collections import ConfigDict

from jaxllm import ablation_report
from jaxllm.budget import apply_budget, per_token, tokens_per_step
from jaxllm.config import ConfigError, set_key, unknown_key, validate
from jaxllm.data.corpus import expand_inputs
from jaxllm.data.tokenizer_training import train_tokenizer
from jaxllm.eval.evaluate import LM_EVAL_COLUMNS, evaluate
from jaxllm.eval.report import read_metrics, summarize
from jaxllm.optim import resolved_hparams
from jaxllm.run import load_run
from jaxllm.train.loop import train

log = logging.getLogger("jaxllm")



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


@dataclasses.dataclass
class Run:
    """One training run of a grid: a cell at one seed and one lr multiplier."""

    name: str  # workdir under ROOT
    cell: str
    labels: dict
    seed: int  # index 0..N-1 (train.seed = base seed + index)
    lr_mult: float
    cfg: ConfigDict
    derived: dict  # steps, warmup, budget, bytes/FLOPs per token


def fingerprint(cfg: ConfigDict) -> str:
    return hashlib.sha256(cfg.to_json(sort_keys=True).encode()).hexdigest()[:16]


def run_name(cell: str, seed: int, lr_mult: float) -> str:
    return cell + ("" if lr_mult == 1 else f"__lr{lr_mult:g}") + (f"__seed{seed}" if seed else "")


def plan_runs(grid: dict, tokenizers: dict, seeds: int = 1, lr_sweep=(1.0,),
              budget: tuple[str, float] | None = None) -> list[Run]:
    """Every run of the grid, cell by cell (budget derivations made once per cell)."""
    out, bpt = [], {}
    for name, labels, ov in cells(grid):
        cell = cell_config(grid["base"], ov, tokenizers)
        d = cell.data
        text = (d.tokenizer, d.path, d.mixture, d.eval_fraction, d.valid_fraction)
        if text not in bpt:  # tokenizing the sample once per tokenizer and data
            bpt[text] = per_token(cell, "bytes")
        units = {"bytes": bpt[text], "flops": per_token(cell, "flops")}
        derived = {"bytes_per_token": units["bytes"], "flops_per_token": units["flops"]}
        if budget:
            unit = 1.0 if budget[0] == "tokens" else units[budget[0]]
            derived.update(apply_budget(cell, *budget, unit=unit))
        derived.update(steps=cell.train.steps, warmup_steps=cell.optim.warmup_steps,
                       tokens_per_step=tokens_per_step(cell))
        peak = resolved_hparams(cell)["lr"]
        for mult in lr_sweep:
            for k in range(seeds):
                cfg = copy.deepcopy(cell)
                cfg.train.seed = cell.train.seed + k
                cfg.optim.lr = peak * mult
                out.append(Run(run_name(name, k, mult), name, labels, k, mult, validate(cfg),
                               {**derived, "lr": peak * mult}))
    return out


def _cached(workdir: str, run: Run) -> dict | None:
    path = os.path.join(workdir, "ablation.json")
    if not (_trained(workdir, run.cfg.train.steps) and os.path.exists(path)):
        return None
    try:
        with open(path) as f:
            row = json.load(f)
    except ValueError:
        row = None
    if not isinstance(row, dict):
        log.warning("%s is unreadable; evaluating the run again", path)
        return None
    if row.get("fingerprint") != fingerprint(run.cfg):
        raise ConfigError(f"{workdir}: finished with a different config than this grid's run "
                          f"{run.name}; use another --root (or delete that directory)")
    return {**row, "status": "cached"}


def run_cell(run: Run, workdir: str, ev: dict, sweep: bool = False) -> dict:
    """Train (unless finished) and evaluate (unless done) one run; returns its row."""
    cached = _cached(workdir, run)
    if cached is not None:
        return cached
    status = "evaluated"
    if not _trained(workdir, run.cfg.train.steps):
        out = train(copy.deepcopy(run.cfg), workdir)
        if out.get("preempted"):
            raise InterruptedError(f"{run.name}: stopped at step {out['step']} (SIGTERM); "
                                   "run the grid again to resume")
        status = "trained"
    loaded = load_run(workdir)
    kw = {"max_bytes": ev.get("max_bytes", 0), "batch_size": ev.get("batch_size", 8),
          "run": loaded}
    r = evaluate(workdir, tasks=ev.get("tasks", ""), lm_eval_tasks=ev.get("lm_eval_tasks", ""),
                 lm_eval_include=ev.get("lm_eval_include", ""),
                 lm_eval_limit=ev.get("lm_eval_limit", 0), **kw)
    valid = evaluate(workdir, split="valid", **kw)["bpb"] if sweep else None
    s = summarize(workdir, run.name)
    row = {"run": run.name, "cell": run.cell, **run.labels, "seed": run.seed,
           "train_seed": run.cfg.train.seed, "lr_mult": run.lr_mult, **run.derived,
           "bpb": r["bpb"], "valid_bpb": valid, "eval_loss": r["loss"], "eval_bytes": r["bytes"],
           "train_eval_bpb": s["final_bpb"], "final_loss": s["final_loss"],
           "tokens_per_s": s["tokens_per_s"], "params": s["params"], "step": s["step"],
           "tokens": s["tokens"], "fingerprint": fingerprint(run.cfg), "tasks": {}}
    for t in r["tasks"]:
        row["tasks"][t["task"]] = {k: t[k] for k in ("acc", "acc_norm", "item_acc") if k in t}
    for t in r.get("lm_eval", []):  # lm-eval keeps no per-item scores here
        row["tasks"][t["task"]] = {m: t[m] for m in LM_EVAL_COLUMNS if m in t}
    with open(os.path.join(workdir, "ablation.json"), "w") as f:
        json.dump(row, f, indent=2)
    return {**row, "status": status}


def run_grid(grid: dict, root: str, overrides: dict | None = None, *, seeds: int = 1,
             lr_sweep=(1.0,), budget: tuple[str, float] | None = None,
             baseline: str | None = None, log=print) -> dict:
    """Run every run of the grid (resuming), then write ROOT/table.md, results.json and
    the bpb plots (jaxllm.ablation_report). Returns the results dict."""
    base = copy.deepcopy(grid["base"])
    for key, value in (overrides or {}).items():
        _set(base, key, value)
    sweep = len(lr_sweep) > 1
    if sweep and not base.data.valid_fraction:
        base.data.valid_fraction = base.data.eval_fraction
    grid = {**grid, "base": base}
    names = [n for n, _, _ in cells(grid)]
    baseline = baseline or names[0]
    if baseline not in names:
        raise ConfigError(f"--baseline: no cell {baseline!r}; cells: {', '.join(names)}")
    os.makedirs(root, exist_ok=True)
    todo = plan_runs(grid, prepare_tokenizers(grid, root), seeds, lr_sweep, budget)
    rows = []
    for i, run in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {run.name}")
        rows.append(run_cell(run, os.path.join(root, run.name), grid["eval"], sweep))
        log(f"    {rows[-1]['status']}: bpb {rows[-1]['bpb']:.4f}")
    meta = {"axes": list(grid["axes"]), "seeds": seeds, "lr_sweep": list(lr_sweep),
            "budget": f"{budget[0]}:{budget[1]:g}" if budget else None, "baseline": baseline}
    return ablation_report.write(root, rows, meta)
