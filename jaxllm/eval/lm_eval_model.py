"""A jaxllm run as a model of EleutherAI's lm-evaluation-harness (`lm-eval` 0.4.x).

Importing this module registers the model name `jaxllm` in lm-eval's model registry:

    lm = JaxllmLM(workdir="runs/base", batch_size=16)        # or run=jaxllm.run.load_run(...)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

`jaxllm-lm-eval --model jaxllm --model_args workdir=DIR ...` (jaxllm/cli/lm_eval_cli.py) is
lm-eval's own command line with this module imported first: lm-eval 0.4 looks models up
only in its registry, filled by modules that are imported (no plugin entry points).

How requests become model inputs (the conventions of lm-eval's own `hf` model):
- The text is encoded with the run's tokenizer and every context starts with EOS, the
  document separator the run was trained with (each training document follows an EOS).
  Context and continuation are encoded together and split (`TemplateLM._encode_pair`: a
  context's trailing spaces move to the continuation); an empty context is the EOS alone.
- A context + continuation longer than `max_length + 1` tokens keeps its last tokens (left
  truncation). `max_length` defaults to the training sequence length; RoPE, ALiBi and
  no-position models accept a longer one, learned positions at most their table.
- `loglikelihood_rolling` scores a document in lm-eval's disjoint windows of `max_length`
  (`lm_eval.utils.get_rolling_token_windows`), the first one after the EOS.
- Requests are grouped by row length (powers of two from 16 to `max_length`), so the
  jitted forward pass compiles once per length, and scored by `scoring.Scorer` (each
  request its own padded row). Log-probabilities are those of the model's softmax, as in
  training and bits per byte: padding ids of the embedding table (`model.vocab_used` and
  up) have -inf logits there, so they carry no probability; `is_greedy` takes the argmax
  over the tokenizer's real vocabulary (also for runs recorded before that mask).
- `generate_until` runs the KV-cached sampler (`jaxllm.model.sample.generate`) on
  left-padded batches of prompts (widths again powers of two), greedy unless a task sets
  `do_sample`/`temperature`; all `max_gen_toks` tokens are generated, then the text is cut at the
  first EOS and at lm-eval's stop sequences (`until`). Padding ids are never produced.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import jax
import lm_eval
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from jaxllm import parallel
from jaxllm.config import ConfigError
from jaxllm.eval.harness import bucket_length
from jaxllm.model.sample import cut_at_eos, generate, left_pad
from jaxllm.eval.scoring import Request, Scorer, continuation_request
from jaxllm.run import load_run

log = logging.getLogger("jaxllm")
IGNORED_ARGS = ("device", "max_batch_size")  # lm-eval's CLI passes these to every model
SAMPLING = ("do_sample", "temperature", "top_k", "top_p")


def _int_arg(name: str, value, low: int = 1) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--model_args {name}={value}: must be an integer >= {low}") from None
    if out < low or isinstance(value, bool) or (isinstance(value, float) and value != out):
        raise ConfigError(f"--model_args {name}={value}: must be an integer >= {low}")
    return out


@register_model("jaxllm")
class JaxllmLM(TemplateLM):
    """lm-eval's `LM` API over a restored jaxllm run (see the module docstring)."""

    def __init__(self, workdir: str | None = None, step: int | None = None, batch_size=8,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 tokenizer: str | None = None, run=None, **kwargs):
        super().__init__()
        unknown = sorted(set(kwargs) - set(IGNORED_ARGS))
        if unknown:
            raise ConfigError(f"--model_args: unknown argument {unknown[0]!r}; allowed: "
                              "workdir, step, batch_size, max_length, max_gen_toks, tokenizer")
        bs, self.max_gen_toks = self._batch_size(batch_size), _int_arg("max_gen_toks",
                                                                        max_gen_toks)
        if run is None:
            if not workdir:
                raise ConfigError("--model_args: workdir=DIR (a jaxllm training workdir) "
                                  "is required")
            run = load_run(str(workdir), step=None if step is None else _int_arg("step", step, 0),
                           tokenizer=tokenizer)
        self.run = run
        self.scorer = Scorer(run, bs)
        self.batch_size = self.scorer.batch_size
        self._max_length = self._window(max_length)

    @staticmethod
    def _batch_size(value) -> int:
        """An integer, rounded up to a multiple of the device count (rows are split evenly
        over the devices). lm-eval's `auto` search is not offered."""
        if isinstance(value, str) and value.startswith("auto"):
            raise ConfigError("--batch_size auto: not supported by the jaxllm model; give an "
                              "integer (rows per forward pass)")
        bs, n_dev = _int_arg("batch_size", value), jax.device_count()
        return -(-bs // n_dev) * n_dev

    def _window(self, value) -> int:
        limit = self.scorer.max_length()
        if value is None:
            return min(self.run.cfg.data.seq_len, limit or self.run.cfg.data.seq_len)
        out = _int_arg("max_length", value, 2)
        if limit is not None and out > limit:
            raise ConfigError(f"--model_args max_length={out}: exceeds the learned position "
                              f"table of this run ({limit})")
        return out

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """`--model_args` values win over lm-eval's own flags (its CLI always passes
        `--batch_size`, default 1, so `batch_size=` in `--model_args` must take precedence)."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                       additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self.run.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        """Token ids of `string` after the document separator (EOS); without it when
        `add_special_tokens` is False."""
        ids = [int(i) for i in self.run.tokenizer.encode(string)]
        return ids if add_special_tokens is False else [self.eot_token_id, *ids]

    def get_model_info(self) -> dict:
        """Recorded in lm-eval's results["config"]."""
        c = self.run.cfg
        return {"jaxllm_workdir": self.run.workdir, "jaxllm_step": self.run.step,
                "max_length": self.max_length, "tokenizer": c.data.tokenizer,
                "pos_encoding": c.model.pos_encoding}

    def _score(self, requests: list[Request], desc: str = "loglikelihood",
               disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(summed log-probability, all tokens greedy) per request, in the given order;
        scored in groups of one row length, longest first."""
        groups = defaultdict(list)
        for i, r in enumerate(requests):
            groups[bucket_length(len(r.tokens) - 1, self.max_length)].append(i)
        out: list = [None] * len(requests)
        step = self.batch_size * 16  # requests per progress update
        with tqdm(total=len(requests), desc=desc, disable=disable_tqdm) as bar:
            for length in sorted(groups, reverse=True):
                idx = sorted(groups[length], key=lambda i: -len(requests[i].tokens))
                for lo in range(0, len(idx), step):
                    part = idx[lo:lo + step]
                    s = self.scorer.score([requests[i] for i in part], length, greedy=True)
                    for k, i in enumerate(part):
                        out[i] = (-float(s.nll[k]), bool(s.greedy[k]))
                    bar.update(len(part))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        reqs = []
        for (context, continuation), ctx, cont in requests:
            r = continuation_request(ctx, cont, self.max_length)
            if r is None:
                raise ValueError(f"continuation {continuation[:40]!r} ({len(cont)} tokens) "
                                 f"does not fit max_length={self.max_length} (context "
                                 f"{context[-40:]!r}); raise max_length")
            reqs.append(r)
        out = self._score(reqs, disable_tqdm=disable_tqdm)
        for (args, _, _), res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for j, (string,) in enumerate(req.args for req in requests):
            for ctx, pred in map(lm_utils.make_disjoint_window,
                                 lm_utils.get_rolling_token_windows(
                                     token_list=self.tok_encode(string, False),
                                     prefix_token=self.prefix_token_id,
                                     max_seq_len=self.max_length, context_len=1)):
                windows.append(Request(np.asarray(ctx + pred, np.int32), len(ctx) - 1))
                owner.append(j)
        totals = [0.0] * len(requests)
        scores = self._score(windows, "loglikelihood_rolling windows", disable_tqdm)
        for (logprob, _), j in zip(scores, owner, strict=True):
            totals[j] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = defaultdict(list)  # one generation setting per batch
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: list = [None] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for idx in groups.values():
                texts = self._generate([requests[i].args[0] for i in idx],
                                       requests[idx[0]].args[1], bar)
                for i, text in zip(idx, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict, bar) -> list[str]:
        """Generate for contexts sharing one setting: batches of similar prompt lengths."""
        kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until, n_new = kw.pop("until"), kw.pop("max_gen_toks")
        ignored = sorted(set(kw) - set(SAMPLING))
        if ignored:
            log.warning("generate_until: ignoring generation arguments %s", ", ".join(ignored))
        max_ctx = self.max_length - n_new
        if max_ctx < 1:
            raise ValueError(f"max_gen_toks={n_new} leaves no room for a prompt in "
                             f"max_length={self.max_length}; raise max_length")
        prompts = [self.tok_encode(c)[-max_ctx:] for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list = [None] * len(prompts)
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo:lo + self.batch_size]
            rows = self._generate_batch([prompts[i] for i in chunk], n_new, kw, lo)
            for i, row in zip(chunk, rows, strict=False):
                text = self.run.tokenizer.decode(cut_at_eos(self.run.tokenizer, row))
                out[i] = postprocess_generated_text(text, until, None)
            bar.update(len(chunk))
        return out

    def _generate_batch(self, prompts: list[list[int]], n_new: int, kw: dict, seed: int):
        width = bucket_length(max(map(len, prompts)), self.max_length - n_new)
        batch, lengths = left_pad(prompts, width, self.batch_size)
        temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
        with parallel.activate(self.run.cfg, self.run.mesh):
            toks = generate(self.run.model_def, self.run.params, batch, jax.random.key(seed),
                            n_new=n_new, temperature=temperature, top_k=int(kw.get("top_k") or 0),
                            top_p=float(kw.get("top_p") or 1.0),
                            vocab_limit=self.run.tokenizer.vocab_size, lengths=lengths)
        return np.asarray(jax.device_get(toks))


def task_manager(names: list[str], include_path: str = ""):
    """lm-eval's TaskManager for `names`: the `include_path` folder alone when it defines
    them all (indexing lm-eval's thousands of built-in YAMLs takes a while), else the
    built-in tasks plus that folder. Unknown names are a ConfigError."""
    from lm_eval.tasks import TaskManager  # 1-2 s to import; only task runs need it

    tm = None
    if include_path:
        tm = TaskManager(include_path=include_path, include_defaults=False)
    if tm is None or not set(names) <= set(tm.all_tasks):
        tm = TaskManager(include_path=include_path or None)
    missing = [n for n in names if n not in tm.all_tasks]
    if missing:
        where = f" or in {include_path}" if include_path else ""
        raise ConfigError(f"--lm_eval_tasks: unknown task {missing[0]!r} (not in lm-eval "
                          f"{lm_eval_version()}'s tasks{where}; `lm-eval ls tasks` lists them)")
    return tm


def lm_eval_version() -> str:
    return lm_eval.__version__


def evaluate_tasks(run, names: list[str], tm=None, *, batch_size: int = 8,
                   max_length: int | None = None, limit: int = 0) -> list[dict]:
    """Run lm-eval tasks (or groups) on a restored run: one row per task with lm-eval's
    metrics (filter `none`; other filters as `metric,filter`) and `n`, the documents scored;
    `limit` > 0 scores only the first documents of each task. `tm`: a `task_manager`."""
    tm = tm or task_manager(names)
    lm = JaxllmLM(run=run, batch_size=batch_size, max_length=max_length)
    res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm,
                                  limit=limit or None)
    rows = []
    for task, metrics in res["results"].items():
        row = {"task": task, "n": res.get("n-samples", {}).get(task, {}).get("effective")}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if "," in key and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                row[metric if filt == "none" else key] = float(value)
        rows.append(row)
    return rows
