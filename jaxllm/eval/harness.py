"""Downstream tasks by log-likelihood, read from local JSON Lines files (nothing downloaded).

Two task kinds, one JSON object per line (a file holds one kind; blank lines are skipped):

- multiple choice: `{"context": str, "choices": [str, ...], "label": int}`. Each choice is
  scored as the continuation `" " + choice` after the context; `acc` takes the argmax of the
  summed log-probability, `acc_norm` the argmax of that sum divided by the choice's length
  in characters (`len(choice)`) (Brown et al. 2020, sec. 2.4; the
  lm-evaluation-harness convention). Conversions: HellaSwag `context = ctx`,
  `choices = endings`, `label = int(label)`; PIQA `context = "Question: " + goal +
  "\\nAnswer:"`, `choices = [sol1, sol2]`; ARC `context = "Question: " + question +
  "\\nAnswer:"`, `choices = choices.text`, `label = choices.label.index(answerKey)`.
- last word (LAMBADA, Paperno et al. 2016): `{"text": str}`. The context is the text up to
  its last whitespace character; the target is that character (a space in LAMBADA, so
  `" " + last word`) followed by the last word; correct when every target token is the
  greedy argmax over the real vocabulary. LAMBADA's `text` field converts directly.

Built-in tasks (`--tasks=builtin`, jaxllm/eval/tasks/, written for this project to fit a
model trained on the Python standard library, the embedded corpus): `python_syntax_mc`
(40 items: which continuation of a stdlib-style line is well-formed Python, e.g.
`import os\nimport` -> `sys` vs `9sys`; 4 choices, labels rotated, chance 0.25) and
`python_last_word` (30 snippets whose last word follows from the code, e.g.
`self.name = name`). They are smoke tests of the pipeline and of early learning, not
benchmarks.

Context and continuation are encoded separately (so the continuation's tokens do not
depend on the context) and joined after the document-start EOS; a context longer than the
model's `seq_len` keeps its last tokens; an item whose continuation alone is longer is
left out and counted as `skipped`. Requests are batched at one fixed row length
(`scoring.Scorer`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources

import numpy as np

from jaxllm.config import ConfigError
from jaxllm.eval.scoring import Request, continuation_request

KINDS = ("multiple_choice", "last_word")


@dataclasses.dataclass
class Task:
    name: str
    kind: str
    items: list


def builtin_tasks() -> list[str]:
    """Paths of the task files shipped with jaxllm (jaxllm/eval/tasks/*.jsonl)."""
    folder = resources.files("jaxllm.eval") / "tasks"
    return sorted(str(p) for p in folder.iterdir() if p.name.endswith(".jsonl"))


def resolve_tasks(spec: str) -> list[str]:
    """`builtin`, or comma-separated .jsonl paths (and/or `builtin`); '' = none."""
    out = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        if part == "builtin":
            out.extend(builtin_tasks())
        elif not os.path.isfile(part):
            raise ConfigError(f"--tasks: {part}: no such file (give .jsonl task files or "
                              "'builtin')")
        else:
            out.append(part)
    return out


def _item(obj, where: str):
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    if "choices" in obj or "context" in obj:
        ctx, choices, label = obj.get("context"), obj.get("choices"), obj.get("label")
        if not isinstance(ctx, str):
            raise ConfigError(f"{where}: 'context' must be a string")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)):
            raise ConfigError(f"{where}: 'choices' must be a list of >= 2 non-empty strings")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(
                choices):
            raise ConfigError(f"{where}: 'label' must be an integer in [0, {len(choices)})")
        return "multiple_choice", (ctx, choices, label)
    text = obj.get("text")
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected keys context/choices/label (multiple choice) "
                          "or text (last word)")
    body = text.rstrip()
    cut = max(body.rfind(c) for c in (" ", "\n", "\t"))
    if cut <= 0:
        raise ConfigError(f"{where}: 'text' needs a context and a last word")
    return "last_word", (body[:cut], body[cut:])


def load_task(path: str) -> Task:
    """Read and check a task file; errors name the file and line."""
    items, kind = [], None
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--tasks: {path}: unreadable ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        k, item = _item(obj, f"{path}:{n}")
        if kind not in (None, k):
            raise ConfigError(f"{path}:{n}: mixes {kind} and {k} items; one kind per file")
        kind = k
        items.append(item)
    if not items:
        raise ConfigError(f"--tasks: {path}: no items")
    name = os.path.basename(path).rsplit(".", 1)[0]
    return Task(name, kind, items)


def _request(tok, context: str, continuation: str, seq_len: int) -> Request | None:
    """None when the continuation alone does not fit in `seq_len` targets."""
    ctx = np.concatenate([[tok.eos_id], tok.encode_array(context)])
    return continuation_request(ctx, tok.encode_array(continuation), seq_len)


def task_requests(task: Task, tok, seq_len: int) -> tuple[list, list[Request]]:
    """(items that fit, their requests: one per choice, or one per last-word item). Items
    with a continuation longer than `seq_len` tokens are left out (reported as skipped)."""
    items, reqs = [], []
    for item in task.items:
        if task.kind == "multiple_choice":
            rs = [_request(tok, item[0], " " + c, seq_len) for c in item[1]]
        else:
            rs = [_request(tok, item[0], item[1], seq_len)]
        if all(r is not None for r in rs):
            items.append(item)
            reqs.extend(rs)
    if not items:
        raise ConfigError(f"task {task.name}: no item fits in seq_len {seq_len} tokens")
    return items, reqs


def bucket_length(n: int, cap: int) -> int:
    """The next power of two >= n (at least 16), at most `cap`: few distinct row shapes."""
    return min(cap, max(16, 1 << (n - 1).bit_length()))


def row_length(reqs, seq_len: int) -> int:
    """The one row length of a task: the bucket of its longest request, at most seq_len, so
    short tasks do not pay for full-length rows."""
    return bucket_length(max(len(r.tokens) - 1 for r in reqs), seq_len)


def evaluate_task(scorer, task: Task, seq_len: int) -> dict:
    """{task, kind, n, acc[, acc_norm][, mean_logprob], chance, item_acc}; `item_acc` is
    each scored item's 0/1 correctness (for bootstrap intervals over items)."""
    items, reqs = task_requests(task, scorer.run.tokenizer, seq_len)
    greedy = task.kind == "last_word"
    s = scorer.score(reqs, row_length(reqs, seq_len), packing=False, greedy=greedy)
    logprob = -s.nll
    n = len(items)
    head = {"task": task.name, "kind": task.kind, "n": n, "skipped": len(task.items) - n}
    if greedy:
        return {**head, "acc": float(s.greedy.mean()), "mean_logprob": float(logprob.mean()),
                "chance": 0.0, "item_acc": [int(g) for g in s.greedy]}
    correct, correct_norm, k, chance = [], 0, 0, 0.0
    for _ctx, choices, label in items:
        lp = logprob[k:k + len(choices)]
        lens = np.array([len(c) for c in choices], np.float64)
        correct.append(int(np.argmax(lp) == label))
        correct_norm += int(np.argmax(lp / lens) == label)
        chance += 1.0 / len(choices)
        k += len(choices)
    return {**head, "acc": sum(correct) / n, "acc_norm": correct_norm / n,
            "chance": chance / n, "item_acc": correct}


def item_scores(scorer, task: Task, seq_len: int) -> np.ndarray:
    """Per-request summed log-probabilities (for inspection and tests)."""
    _, reqs = task_requests(task, scorer.run.tokenizer, seq_len)
    return -scorer.score(reqs, row_length(reqs, seq_len)).nll
