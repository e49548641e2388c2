"""The `jaxllm` model of lm-evaluation-harness (jaxllm/eval/lm_eval_model.py), offline.

lm-eval runs custom task YAMLs over local JSON Lines files (`dataset_path: json`), written
into tmp by the tests, on a tiny run trained for two steps from a large init (so the
predictions depend on the context). Its numbers are checked against an independent numpy
log-softmax over full-sequence logits, against jaxllm's own harness and against
`jaxllm-sample --temperature=0`.
"""

from __future__ import annotations

import json
import math
import os
import re

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing may be downloaded
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tests.fixtures import (  # noqa: E402
    corpus_texts,
    random_run,
    ref_continuation,
    ref_forward,
    ref_logprobs,
    tiny_eval_cfg,
    write_jsonl,
)

pytest.importorskip("lm_eval")

from jaxllm.eval import harness  # noqa: E402
from jaxllm.eval.lm_eval_model import JaxllmLM  # noqa: E402
from jaxllm.eval.scoring import Scorer  # noqa: E402

MC_ITEMS = [
    {"context": "import os\nimport", "choices": ["sys", "Sys", "9sys", "re"], "label": 0},
    {"context": "def f(x):\n    return", "choices": ["x", "xx + yy", "("], "label": 1},
    {"context": "for i in", "choices": ["range(n):", "r"], "label": 0},
    {"context": "class A:\n    def __init__(self, name):\n        self.name =",  # > 32 tokens:
     "choices": ["name", "nme", "self"], "label": 0},                      # left-truncated
    {"context": "", "choices": ["a", "é✓"], "label": 1},                   # the EOS alone
]
ROLL_TEXTS = ["x = 1\n", "def add(a, b):\n    return a + b\n" * 3,
              "The quick brown fox jumps over the lazy dog. " * 2]
PROMPTS = ["import ", "def main(", "x = [1, 2, 3]\nfor "]
MAX_GEN = 24

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: {output_type}
"""
MC = "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n" \
     "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
ROLL = "doc_to_text: ''\ndoc_to_target: text\nmetric_list:\n  - metric: bits_per_byte\n" \
       "  - metric: word_perplexity\n  - metric: byte_perplexity\n"


def write_task(folder, name, output_type, rows, body) -> str:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(TASK.format(
        name=name, data=data, cache=folder / "hf_cache", output_type=output_type) + body)
    return str(data)


def run_tasks(lm, folder, tasks, **kw) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(folder),
                                                        include_defaults=False),
        log_samples=True, **kw)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from jaxllm.train.loop import train

    root = tmp_path_factory.mktemp("lmeval")
    cfg = tiny_eval_cfg(init_std=0.3)
    cfg.data.path = write_jsonl(root / "train.jsonl", corpus_texts() * 2)
    cfg.data.eval_fraction = 0.2
    cfg.train.update(steps=2, log_every=1)
    train(cfg, str(root / "run"))
    return root / "run"


@pytest.fixture(scope="module")
def lm(workdir):
    return JaxllmLM.create_from_arg_string(f"workdir={workdir},batch_size=4",
                                           {"batch_size": 1, "device": None})


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    mc = write_task(folder, "jx_mc", "multiple_choice", MC_ITEMS, MC)
    write_task(folder, "jx_roll", "loglikelihood_rolling", [{"text": t} for t in ROLL_TEXTS],
               ROLL)
    return folder, mc


@pytest.fixture(scope="module")
def results(lm, tasks):
    return run_tasks(lm, tasks[0], ["jx_mc", "jx_roll"])


def _ref_choice(run, context: str, continuation: str, seq_len: int) -> float:
    """EOS + context + continuation (byte tokens: encoding them apart or together is the same),
    the last seq_len + 1 tokens, log-probability of the continuation in numpy."""
    tok = run.tokenizer
    ctx, cont = [tok.eos_id] + tok.encode(context), tok.encode(continuation)
    full = np.array(ctx + cont, np.int32)[-(seq_len + 1):]
    return ref_continuation(run, full, len(full) - 1 - len(cont))[0]


def _ref_rolling(run, text: str, window: int) -> float:
    """lm-eval's rolling windows spelled out: token j of [EOS] + text is predicted once, from
    the window of `window` inputs that ends where its group of predictions ends."""
    seq = np.array([run.tokenizer.eos_id] + run.tokenizer.encode(text), np.int32)
    n, total, done = len(seq) - 1, 0.0, 0
    while done < n:
        end = min(done + window, n)
        lo = max(0, end - window)
        lp = ref_logprobs(run, seq[lo:end])  # predicts seq[lo + 1:end + 1]
        rows = np.arange(done - lo, end - lo)
        total += float(lp[rows, seq[lo + 1:end + 1][rows]].sum())
        done = end
    return total


def test_loglikelihoods_equal_numpy_reference(lm, results):
    """(a): every choice's log-likelihood as lm-eval recorded it, left truncation included."""
    run, seq = lm.run, lm.max_length
    assert seq == run.cfg.data.seq_len == 32 and lm.batch_size == 4
    # padding ids of the 384-row output layer carry no probability in what is scored
    logits = np.asarray(ref_forward(run.model_def)(run.params, np.array([[258, 65]], np.int32)))
    assert logits.shape[-1] == 384 and np.isneginf(logits[..., 259:]).all()
    samples = results["samples"]["jx_mc"]
    assert len(samples) == len(MC_ITEMS)
    for s in samples:
        item = MC_ITEMS[s["doc_id"]]
        got = [r[0][0] for r in s["resps"]]
        ref = [_ref_choice(run, item["context"], " " + c, seq) for c in item["choices"]]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    rolls = results["samples"]["jx_roll"]
    for s in rolls:
        text = ROLL_TEXTS[s["doc_id"]]
        assert s["resps"][0][0] == pytest.approx(_ref_rolling(run, text, seq), rel=1e-5)
    ll = sum(_ref_rolling(run, t, seq) for t in ROLL_TEXTS)
    n_bytes = sum(len(t.encode()) for t in ROLL_TEXTS)
    r = results["results"]["jx_roll"]
    assert r["bits_per_byte,none"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)
    words = sum(len(re.split(r"\s+", t)) for t in ROLL_TEXTS)  # lm-eval's word count
    assert r["word_perplexity,none"] == pytest.approx(math.exp(-ll / words), rel=1e-5)


def test_acc_and_acc_norm_equal_jaxllm_harness(lm, tasks, results):
    """(b): the same items through jaxllm's own harness (same file)."""
    own = harness.evaluate_task(Scorer(lm.run, 2), harness.load_task(tasks[1]),
                                lm.max_length)
    r = results["results"]["jx_mc"]
    assert own["n"] == len(MC_ITEMS) and own["skipped"] == 0
    assert r["acc,none"] == own["acc"] and r["acc_norm,none"] == own["acc_norm"]


def test_document_separator_is_scored(lm, tasks, monkeypatch):
    """(d): each row the model scores is [EOS] + context + continuation (untruncated items),
    and the EOS matters: without it the log-likelihood differs."""
    seen = []
    score = lm.scorer.score
    monkeypatch.setattr(lm.scorer, "score", lambda reqs, *a, **k: (
        seen.extend(r.tokens.tolist() for r in reqs), score(reqs, *a, **k))[1])
    out = run_tasks(lm, tasks[0], ["jx_mc"], limit=3)
    tok = lm.run.tokenizer
    expect = [[tok.eos_id] + tok.encode(item["context"] + " " + c)
              for item in MC_ITEMS[:3] for c in item["choices"]]
    assert sorted(seen) == sorted(expect)
    item = MC_ITEMS[0]
    with_eos = out["samples"]["jx_mc"][0]["resps"][0][0][0]
    without = ref_continuation(lm.run, np.array(tok.encode(item["context"] + " sys")),
                               len(tok.encode(item["context"])) - 1)[0]
    assert abs(with_eos - without) > 1e-3


def test_generate_until_equals_jaxllm_sample(lm, workdir, tmp_path, capsys):
    """(c): greedy generation through lm-eval, cut at its stop sequence, equals
    `jaxllm-sample --temperature=0` cut there (the window is widened: max_length=64)."""
    from jaxllm.cli.sample import main as sample_main

    texts = []
    for p in PROMPTS:
        sample_main([f"--workdir={workdir}", f"--prompt={p}", "--temperature=0",
                     f"--max_tokens={MAX_GEN}"])
        out = capsys.readouterr().out
        assert out.startswith(p) and out.endswith("\n")
        texts.append(out[len(p):-1])
    first = texts[0]  # a stop sequence that first occurs after >= 3 characters of it
    stop = next(first[k:k + 2] for k in range(3, len(first) - 1)
                if first.find(first[k:k + 2]) == k)
    gen = ("doc_to_text: prompt\ndoc_to_target: ''\ngeneration_kwargs:\n"
           f"  until: {json.dumps([stop])}\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
           "metric_list:\n  - metric: bypass\n")
    write_task(tmp_path, "jx_gen", "generate_until", [{"prompt": p} for p in PROMPTS], gen)
    wide = JaxllmLM(run=lm.run, batch_size=2, max_length=64)
    res = run_tasks(wide, tmp_path, ["jx_gen"], predict_only=True)
    got = {s["doc_id"]: s["resps"][0][0] for s in res["samples"]["jx_gen"]}
    assert [got[i] for i in range(len(PROMPTS))] == [t.split(stop)[0] for t in texts]
    assert got[0] == texts[0][:texts[0].find(stop)] and len(got[0]) >= 3


def test_model_args_errors(lm, workdir, tmp_path):
    from jaxllm.config import ConfigError
    for args, msg in [
        (f"workdir={tmp_path / 'missing'}", "is not a directory"),
        ("step=1", "workdir=DIR"),
        (f"workdir={workdir},step=7", "--step: 7 is not among the checkpoints"),
        (f"workdir={workdir},colour=red", "unknown argument 'colour'"),
        (f"workdir={workdir},batch_size=auto", "batch_size auto"),
        (f"workdir={workdir},max_length=1", "max_length=1"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            JaxllmLM.create_from_arg_string(args)
    learned = random_run(pos_encoding="learned")  # a window no longer than its table
    assert JaxllmLM(run=learned).max_length == 32
    with pytest.raises(ConfigError, match=r"max_length=64: exceeds the learned position table"):
        JaxllmLM(run=learned, max_length=64)


@pytest.fixture
def local_tasks_only(monkeypatch):
    """lm-eval's task index without its thousands of built-in YAMLs (they take a while to
    index and none is used here)."""
    import lm_eval.tasks

    class Local(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kw):
            super().__init__(*args, **{**kw, "include_defaults": False})
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Local)


def test_jaxllm_eval_reports_lm_eval_metrics_with_bpb(workdir, tasks, results, tmp_path,
                                                      capsys, local_tasks_only):
    from jaxllm.cli.eval import main
    out = tmp_path / "r.json"
    main([f"--workdir={workdir}", "--max_bytes=500", "--batch_size=4",
          "--lm_eval_tasks=jx_mc,jx_roll", f"--lm_eval_include={tasks[0]}", f"--out={out}"])
    text = capsys.readouterr().out
    assert "| bits per byte |" in text and "| lm-eval task | n | acc | acc_norm |" in text
    r = json.loads(out.read_text())
    rows = {t["task"]: t for t in r["lm_eval"]}
    assert r["bpb"] > 0 and rows["jx_mc"]["n"] == len(MC_ITEMS)
    assert rows["jx_mc"]["acc"] == results["results"]["jx_mc"]["acc,none"]
    assert rows["jx_mc"]["acc_norm"] == results["results"]["jx_mc"]["acc_norm,none"]
    assert rows["jx_roll"]["bits_per_byte"] == pytest.approx(
        results["results"]["jx_roll"]["bits_per_byte,none"], rel=1e-6)
    for args, msg in [
        (["--lm_eval_tasks=jx_mc,nope"], "--lm_eval_tasks: unknown task 'nope'"),
        (["--lm_eval_tasks=jx_mc", f"--lm_eval_include={tmp_path / 'none'}"],
         "--lm_eval_include:"),
        (["--lm_eval_tasks=jx_mc", "--lm_eval_limit=-1"], "--lm_eval_limit"),
    ]:
        with pytest.raises(SystemExit) as e:
            main([f"--workdir={workdir}", f"--lm_eval_include={tasks[0]}", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and msg in err, (args, err)
        assert err.count("\n") == 1


def test_ablation_rows_carry_lm_eval_metrics(workdir, tasks, results, tmp_path):
    from jaxllm import ablation_report, experiments
    from jaxllm.run import read_config

    cfg = read_config(str(workdir))
    ev = {"max_bytes": 500, "batch_size": 4, "lm_eval_tasks": "jx_mc,jx_roll",
          "lm_eval_include": str(tasks[0])}
    derived = {"steps": cfg.train.steps, "warmup_steps": 0, "tokens_per_step": 1,
               "bytes_per_token": 1.0, "flops_per_token": 1.0, "lr": 1e-3}
    run = experiments.Run("cell", "cell", {}, 0, 1.0, cfg, derived)
    row = experiments.run_cell(run, str(workdir), ev)
    assert row["status"] == "evaluated"
    assert row["tasks"]["jx_mc"]["acc"] == results["results"]["jx_mc"]["acc,none"]
    assert row["tasks"]["jx_roll"]["bits_per_byte"] == pytest.approx(
        results["results"]["jx_roll"]["bits_per_byte,none"], rel=1e-6)
    meta = {"axes": [], "seeds": 1, "lr_sweep": [1.0], "budget": None, "baseline": "cell"}
    summary = ablation_report.summarize_cells([row], "cell")
    header = ablation_report.cell_table(summary, meta).splitlines()[0]
    assert "jx_mc_acc_norm" in header and "jx_roll_bits_per_byte" in header
    assert summary[0]["tasks"]["jx_mc_acc"]["mean"] == row["tasks"]["jx_mc"]["acc"]


def test_jaxllm_lm_eval_command(workdir, tasks, results, capsys, local_tasks_only):
    """lm-eval's own command line with `--model jaxllm`; bad model args exit 2, one line."""
    from jaxllm.cli.lm_eval_cli import main
    main(["--model", "jaxllm", "--model_args", f"workdir={workdir},batch_size=4",
          "--tasks", "jx_mc", "--include_path", str(tasks[0])])
    out = capsys.readouterr().out
    acc = results["results"]["jx_mc"]["acc,none"]
    assert "jaxllm" in out and any("jx_mc" in ln and f"{acc:.4f}" in ln
                                   for ln in out.splitlines()), out
    with pytest.raises(SystemExit) as e:
        main(["--model", "jaxllm", "--model_args", "workdir=/nonexistent", "--tasks", "jx_mc",
              "--include_path", str(tasks[0])])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --workdir: /nonexistent is not a directory" in err


def test_subword_tokenizer_pairs_and_windows_equal_numpy(tmp_path):
    """A byte-level BPE run: lm-eval's pair encoding (context and context + continuation
    encoded, the continuation being the difference; trailing spaces move to it) and rolling
    windows over ids above 256, against the numpy reference."""
    from lm_eval.api.instance import Instance

    from jaxllm.data.tokenizer_training import train_tokenizer

    path = train_tokenizer([write_jsonl(tmp_path / "t.jsonl", corpus_texts())], "byte_bpe",
                           400, str(tmp_path / "tok"), progress=False)
    run = random_run(tokenizer=path, init_std=0.1)
    lm = JaxllmLM(run=run, batch_size=3, max_length=16)
    tok = run.tokenizer
    pairs = [("import os\nimport ", "sys"), ("def f(x):\n    return", " x + 1"),
             ("", "while True:"), ("class A(object):\n    def __init__(self):", " pass")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (context, continuation), (logprob, _) in zip(pairs, got, strict=True):
        n_sp = len(context) - len(context.rstrip())
        ctx = [tok.eos_id] + tok.encode(context[:len(context) - n_sp])
        whole = [tok.eos_id] + tok.encode(context + continuation)
        assert whole[:len(ctx)] == ctx and max(whole) >= 256
        full = np.array(whole, np.int32)[-17:]
        ref = ref_continuation(run, full, len(full) - 1 - (len(whole) - len(ctx)))[0]
        assert logprob == pytest.approx(ref, rel=1e-5, abs=1e-4)
    text = corpus_texts(("keyword.py",), limit=300)[0]
    roll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert len(tok.encode(text)) > 3 * 16
    assert roll[0] == pytest.approx(_ref_rolling(run, text, 16), rel=1e-5)
