"""One evaluation of a workdir: bits per byte, downstream tasks, length extrapolation.

`evaluate(workdir, ...)` returns a JSON-ready dict; `format_report` renders it as markdown.
Nothing is written to the workdir (its metrics.jsonl belongs to training).
"""

from __future__ import annotations

import os
import time

from jaxllm.config import ConfigError
from jaxllm.eval import bpb, harness
from jaxllm.eval import extrapolation as ex
from jaxllm.eval.scoring import Scorer
from jaxllm.run import load_run

# lm-eval metrics shown in the table (the JSON has all of them)
LM_EVAL_COLUMNS = ("acc", "acc_norm", "perplexity", "bits_per_byte", "word_perplexity")


def evaluate(workdir: str, *, step: int | None = None, data_path: str | None = None,
             text_field: str | None = None, split: str = "eval", tokenizer: str | None = None,
             batch_size: int = 8, seq_len: int = 0, packing: bool = True, max_bytes: int = 0,
             tasks: str = "", extrapolation: bool = False, extrap_bytes: int = 65536,
             lm_eval_tasks: str = "", lm_eval_include: str = "", lm_eval_limit: int = 0,
             run=None) -> dict:
    overrides = {}
    if data_path is not None:
        overrides.update({"data.path": data_path, "data.mixture": ""})
    if text_field is not None:
        overrides["data.text_field"] = text_field
    task_files = harness.resolve_tasks(tasks)
    lm_tasks = [t.strip() for t in lm_eval_tasks.split(",") if t.strip()]
    if lm_tasks:  # find the tasks before restoring anything
        tm = _lm_eval_tasks(lm_tasks, lm_eval_include, lm_eval_limit)
    if run is None:
        run = load_run(workdir, step=step, tokenizer=tokenizer, overrides=overrides)
    train_len = run.cfg.data.seq_len
    seq_len = seq_len or train_len
    if seq_len < 1:
        raise ConfigError(f"--seq_len: must be >= 1, got {seq_len}")
    scorer = Scorer(run, batch_size)
    limit = scorer.max_length()
    if limit is not None and seq_len > limit:
        raise ConfigError(f"--seq_len: {seq_len} exceeds the learned position table ({limit})")
    for key, v in (("--max_bytes", max_bytes), ("--extrap_bytes", extrap_bytes)):
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v}")
    t0 = time.perf_counter()
    docs = bpb.eval_documents(run.cfg, run.tokenizer, split, max_bytes)
    out = {"workdir": workdir, "step": run.step, "data": run.cfg.data.path or (
        run.cfg.data.mixture or "embedded"), "split": split, "seq_len": seq_len,
           "train_seq_len": train_len, "packing": packing, "batch_size": batch_size,
           "tokenizer": run.cfg.data.tokenizer,
           **bpb.evaluate_bpb(scorer, docs, seq_len, packing)}
    out["tasks"] = [harness.evaluate_task(scorer, harness.load_task(p), seq_len)
                    for p in task_files]
    if lm_tasks:
        from jaxllm.eval.lm_eval_model import evaluate_tasks
        out["lm_eval"] = evaluate_tasks(run, lm_tasks, tm, batch_size=batch_size,
                                        max_length=seq_len, limit=lm_eval_limit)
    if extrapolation:
        ex_docs = bpb.eval_documents(run.cfg, run.tokenizer, split, extrap_bytes)
        out["extrapolation"] = ex.evaluate_lengths(scorer, ex_docs, train_len)
    out["seconds"] = time.perf_counter() - t0
    return out


def _lm_eval_tasks(names: list[str], include: str, limit: int):
    """lm-eval's task manager holding `names`; a ConfigError when lm-eval is missing, a
    task is unknown or a flag is wrong."""
    try:
        from jaxllm.eval.lm_eval_model import task_manager
    except ImportError as e:
        raise ConfigError(f"--lm_eval_tasks: needs lm-eval (pip install 'jaxllm[eval]'): {e}"
                          ) from None
    if limit < 0:
        raise ConfigError(f"--lm_eval_limit: must be >= 0, got {limit}")
    if include and not os.path.isdir(include):
        raise ConfigError(f"--lm_eval_include: {include} is not a directory")
    return task_manager(names, include)


def format_report(r: dict) -> str:

    lines = [(f"{r['workdir']} @ step {r['step']}: {r['data']} ({r['split']} split), "
             f"{r['documents']} documents, {r['bytes']:,} bytes, {r['tokens']:,} tokens, "
             f"seq_len {r['seq_len']}, packing {'on' if r['packing'] else 'off'}"),
             "", "| metric | value |", "|---|---:|",
             f"| bits per byte | {r['bpb']:.4f} |",
             f"| loss (nats/token) | {r['loss']:.4f} |",
             f"| perplexity (per token) | {r['perplexity']:.3f} |"]
    if r.get("tasks"):
        lines += ["", "| task | kind | n | skipped | acc | acc_norm | chance |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for t in r["tasks"]:
            norm = f"{t['acc_norm']:.3f}" if "acc_norm" in t else "-"
            lines.append(f"| {t['task']} | {t['kind']} | {t['n']} | {t['skipped']} | "
                         f"{t['acc']:.3f} | {norm} | "
                         f"{t['chance']:.3f} |")
    if r.get("lm_eval"):
        cols = [m for m in LM_EVAL_COLUMNS if any(m in t for t in r["lm_eval"])]
        lines += ["", "| lm-eval task | n | " + " | ".join(cols) + " |",
                  "|---|---:|" + "---:|" * len(cols)]
        for t in r["lm_eval"]:
            vals = [f"{t[m]:.4f}" if m in t else "-" for m in cols]
            lines.append(f"| {t['task']} | {t['n'] if t['n'] is not None else '-'} | "
                         + " | ".join(vals) + " |")
    if r.get("extrapolation"):
        lines += ["", ("length extrapolation (training length "
                  f"{r['train_seq_len']}, {r['extrapolation'][0]['tokens'] or 0:,} tokens):"),
                  ex.format_table(r["extrapolation"])]
    return "\n".join(lines)
