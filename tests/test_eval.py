"""jaxllm-eval: bits per byte, downstream harness, length extrapolation, CLI errors.

One tiny model is trained for a few steps on a small corpus (module fixture); evaluation
runs on a *different* JSON Lines file than the one it trained on.
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from tests.fixtures import (
    corpus_texts,
    random_run,
    ref_continuation,
    ref_forward,
    ref_logprobs,
    train_tiny,
    write_jsonl,
)

from jaxllm.eval import bpb, extrapolation, harness
from jaxllm.run import load_run
from jaxllm.eval.scoring import Scorer

EVAL_TEXTS = [
    "héllo wörld — ünïcode ✓ 日本語 and emoji 🎉\n",
    "def f(x):\n    return x + 1\n" * 5,
    "x",
] + corpus_texts(("textwrap.py", "struct.py"), limit=700)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    data = write_jsonl(root / "train.jsonl", corpus_texts() * 2)
    train_tiny(root / "run", data)
    eval_file = write_jsonl(root / "other.jsonl", EVAL_TEXTS)
    run = load_run(str(root / "run"), overrides={"data.path": eval_file, "data.mixture": ""})
    return root, run, eval_file


def _ref_bpb(run, texts, seq_len):
    """Independent: documents one at a time, unpacked, no segment ids; log-softmax and sums in
    numpy; bytes from the raw text. Shared with the engine: the model forward pass and the
    document convention ([EOS] + doc + [EOS] cut into pieces of seq_len targets)."""
    tok, nll, n_bytes = run.tokenizer, 0.0, 0
    for text in texts:
        seg = np.array([tok.eos_id] + tok.encode(text) + [tok.eos_id], np.int32)
        for a in range(0, len(seg) - 1, seq_len):
            piece = seg[a:a + seq_len + 1]
            lp = ref_logprobs(run, piece[:-1])
            nll -= lp[np.arange(len(piece) - 1), piece[1:]].sum()
        n_bytes += len(text.encode("utf-8"))
    return nll / n_bytes / math.log(2)


def test_bpb_invariant_to_batch_and_packing_and_matches_reference(trained):
    _, run, _ = trained
    docs = bpb.eval_documents(run.cfg, run.tokenizer, "all")
    assert len(docs) == len(EVAL_TEXTS)
    seq = run.cfg.data.seq_len
    lim = bpb.eval_documents(run.cfg, run.tokenizer, "all", max_bytes=60)  # whole documents
    nb = [int(run.tokenizer.token_bytes(d).sum()) for d in lim]
    assert 0 < len(lim) < len(docs) and sum(nb[:-1]) < 60 <= sum(nb)
    assert all((a == b).all() for a, b in zip(lim, docs, strict=False))
    results = [bpb.evaluate_bpb(Scorer(run, bs), docs, seq, packing)
               for bs in (1, 5) for packing in (True, False)]
    ref = _ref_bpb(run, EVAL_TEXTS, seq)
    n_bytes = sum(len(t.encode("utf-8")) for t in EVAL_TEXTS)
    for r in results:
        assert r["bytes"] == n_bytes
        assert r["tokens"] == n_bytes + len(EVAL_TEXTS)  # byte tokens + one EOS per document
        assert r["bpb"] == pytest.approx(ref, rel=1e-6)
        assert r["loss"] == pytest.approx(r["bpb"] * math.log(2) * n_bytes / r["tokens"],
                                          rel=1e-9)
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
    # a longer eval length is a different (still exact) quantity
    r64 = bpb.evaluate_bpb(Scorer(run, 2), docs, 64, True)
    assert r64["bpb"] == pytest.approx(_ref_bpb(run, EVAL_TEXTS, 64), rel=1e-6)


@pytest.mark.parametrize("kind", ["sentencepiece_bpe", "byte_bpe"])
def test_bpb_exact_under_subword_tokenizers(tmp_path, kind):
    """Bytes are counted from the raw text in the reference, from token_bytes in the engine."""
    from jaxllm.data.tokenizer_training import train_tokenizer
    train = write_jsonl(tmp_path / "train.jsonl", corpus_texts())
    path = train_tokenizer([train], kind, 400, str(tmp_path / "tok"), progress=False)
    run = random_run(tokenizer=path, init_std=0.1)
    run.cfg.data.path = write_jsonl(tmp_path / "eval.jsonl", EVAL_TEXTS)
    docs = bpb.eval_documents(run.cfg, run.tokenizer, "all")
    n_tokens = sum(len(run.tokenizer.encode(t)) + 1 for t in EVAL_TEXTS)
    ref = _ref_bpb(run, EVAL_TEXTS, 32)
    for bs, packing in ((1, False), (4, True)):
        r = bpb.evaluate_bpb(Scorer(run, bs), docs, 32, packing)
        assert r["tokens"] == n_tokens < sum(len(t.encode()) for t in EVAL_TEXTS)
        assert r["bytes"] == sum(len(t.encode()) for t in EVAL_TEXTS)
        assert r["bpb"] == pytest.approx(ref, rel=1e-6)


def test_packing_puts_several_documents_in_a_row():
    from jaxllm.eval.scoring import pack_rows
    assert pack_rows([3, 4, 5, 2, 8], 8, True) == [[0, 1], [2, 3], [4]]
    assert pack_rows([3, 4, 5], 8, False) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="more than the row length"):
        pack_rows([9], 8, True)


MC_ITEMS = [
    {"context": "import os\nimport", "choices": ["sys", "Sys", "9sys", "re"], "label": 0},
    {"context": "def f(x):\n    return", "choices": ["x", "xx + yy", "("], "label": 1},
    {"context": "for i in", "choices": ["range(n):", "r"], "label": 0},
    {"context": "x" * 60, "choices": ["y", "xxxx", "xx\n"], "label": 2},  # truncated context
    {"context": "", "choices": ["a", "é✓"], "label": 1},
]


def test_multiple_choice_matches_numpy_loglikelihood(trained, tmp_path):
    _, run, _ = trained
    path = tmp_path / "mc.jsonl"
    too_long = {"context": "a", "choices": ["b", "y" * 40], "label": 0}  # > seq_len: skipped
    path.write_text("".join(json.dumps(x) + "\n" for x in MC_ITEMS + [too_long]))
    task = harness.load_task(str(path))
    seq = run.cfg.data.seq_len
    scores = harness.item_scores(Scorer(run, 3), task, seq)
    tok = run.tokenizer
    k, acc, acc_norm = 0, 0, 0
    for item in MC_ITEMS:
        ref = []
        for c in item["choices"]:
            ctx = [tok.eos_id] + tok.encode(item["context"])
            cont = tok.encode(" " + c)
            full = np.array(ctx + cont, np.int32)[-(seq + 1):]  # keep the last seq_len targets
            ref.append(ref_continuation(run, full, len(full) - 1 - len(cont))[0])
        ref = np.array(ref)
        np.testing.assert_allclose(scores[k:k + len(ref)], ref, rtol=1e-5, atol=1e-5)
        acc += int(np.argmax(ref) == item["label"])
        lens = np.array([len(c) for c in item["choices"]])
        acc_norm += int(np.argmax(ref / lens) == item["label"])
        k += len(ref)
    res = harness.evaluate_task(Scorer(run, 8), task, seq)
    assert res["n"] == len(MC_ITEMS) and res["skipped"] == 1
    assert res["acc"] == acc / len(MC_ITEMS)
    assert res["acc_norm"] == acc_norm / len(MC_ITEMS)
    assert res["chance"] == pytest.approx(np.mean([1 / len(x["choices"]) for x in MC_ITEMS]))


def test_last_word_greedy_matches_numpy(tmp_path):
    # a random model with an untied head whose column for " " copies (x1.01) the column of its
    # most frequent greedy byte, so some contexts greedily continue with a space
    run = random_run(tie_embeddings=False)
    head = np.array(run.params["lm_head"])
    head[:, ord(" ")] = 1.01 * head[:, ord("n")]
    run.params["lm_head"] = jnp.asarray(head)
    tok = run.tokenizer
    # items that are correct by construction, found with the reference forward pass: short
    # contexts after which the greedy byte is a space, then a letter or digit
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789_.(:=", np.uint8)
    ctxs = rng.choice(alphabet, size=(6000, 3)).astype(np.int32)
    seqs = np.concatenate([np.full((6000, 1), tok.eos_id, np.int32), ctxs], 1)
    fwd = ref_forward(run.model_def)
    g1 = np.asarray(fwd(run.params, seqs))[:, -1, :tok.vocab_size].argmax(-1)
    cand = seqs[g1 == ord(" ")]
    cand = np.concatenate([cand, np.full((len(cand), 1), ord(" "), np.int32)], 1)
    g2 = np.asarray(fwd(run.params, cand))[:, -1, :tok.vocab_size].argmax(-1)
    texts = [bytes(c[1:].tolist()).decode() + chr(g) for c, g in zip(cand, g2, strict=False)
             if g < 128 and chr(g).isalnum()][:6]
    expect = [True] * len(texts)
    assert len(texts) >= 2, "too few greedy-constructed items"
    texts += ["import zzqqxv", "x = QQQQQQ"]
    path = tmp_path / "lw.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    task = harness.load_task(str(path))
    assert task.kind == "last_word"
    flags = []
    for t in texts:
        cut = t.rfind(" ")
        full = np.array([tok.eos_id] + tok.encode(t[:cut]) + tok.encode(t[cut:]), np.int32)
        flags.append(ref_continuation(run, full, len(tok.encode(t[:cut])))[1])
    assert flags[:len(expect)] == expect
    res = harness.evaluate_task(Scorer(run, 2), task, run.cfg.data.seq_len)
    assert res["acc"] == pytest.approx(np.mean(flags))


@pytest.mark.parametrize("line, msg", [
    ('{"context": "a", "choices": ["x"], "label": 0}', "at least|>= 2"),
    ('{"context": "a", "choices": ["x", "y"], "label": 2}', r"label.*\[0, 2\)"),
    ('{"text": "oneword"}', "context and a last word"),
    ('{"foo": 1}', "context/choices/label"),
    ("not json", "not valid JSON"),
])
def test_task_file_errors_name_file_and_line(tmp_path, line, msg):
    from jaxllm.config import ConfigError
    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "a", "choices": ["x", "y"], "label": 0}\n' + line + "\n")
    with pytest.raises(ConfigError, match=msg) as e:
        harness.load_task(str(path))
    assert f"{path}:2" in str(e.value)


def test_builtin_tasks_load():
    paths = harness.resolve_tasks("builtin")
    kinds = {harness.load_task(p).kind for p in paths}
    assert kinds == {"multiple_choice", "last_word"}
    assert all(len(harness.load_task(p).items) >= 30 for p in paths)


def test_sliding_windows_score_every_token_once():
    doc = np.arange(1, 42, dtype=np.int32)  # 41 tokens incl. its "EOS"; 41 targets
    for window, stride in ((8, 8), (16, 8), (32, 8), (64, 8)):
        reqs = extrapolation.sliding_requests([doc], 0, window, stride)
        seen = []
        for r in reqs:
            n = len(r.tokens) - 1
            assert n <= window
            # tokens are a contiguous slice of [EOS] + doc; scored targets are its tail
            first = int(r.tokens[0])
            seen.extend(range(first + r.start, first + n))
        assert seen == list(range(41))
        assert all(len(r.tokens) - 1 - r.start <= stride for r in reqs[1:])
        assert all(r.start == len(r.tokens) - 1 - stride for r in reqs[1:-1])


def test_extrapolation_rows_and_learned_positions(trained, tmp_path):
    _, run, _ = trained
    docs = bpb.eval_documents(run.cfg, run.tokenizer, "all")
    seq = run.cfg.data.seq_len
    rows = extrapolation.evaluate_lengths(Scorer(run, 4), docs, seq, factors=(1, 2))
    base = bpb.evaluate_bpb(Scorer(run, 4), docs, seq)
    assert rows[0]["nonoverlap_bpb"] == pytest.approx(base["bpb"], rel=1e-6)
    assert rows[0]["sliding_bpb"] == pytest.approx(base["bpb"], rel=1e-6)
    assert rows[1]["length"] == 2 * seq and rows[1]["tokens"] == base["tokens"]
    assert rows[1]["nonoverlap_bpb"] == pytest.approx(_ref_bpb(run, EVAL_TEXTS, 2 * seq),
                                                      rel=1e-6)
    # a learned-position model cannot go past its table: n/a with the reason
    learned = random_run(pos_encoding="learned")
    rows = extrapolation.evaluate_lengths(Scorer(learned, 4), docs[:2], seq, factors=(1, 2, 8))
    assert rows[0]["nonoverlap_bpb"] is not None
    for r in rows[1:]:
        assert r["nonoverlap_bpb"] is None and r["sliding_bpb"] is None
        assert "n/a: learned positions end at 32" in r["note"]
    assert "n/a" in extrapolation.format_table(rows)


def test_cli_eval_table_json_and_errors(trained, tmp_path, capsys):
    from jaxllm.cli.eval import main
    root, _, eval_file = trained
    out = tmp_path / "r.json"
    main([f"--workdir={root / 'run'}", f"--data.path={eval_file}", "--split=all",
          "--tasks=builtin", "--batch_size=4", "--packing=off", f"--out={out}"])
    text = capsys.readouterr().out
    assert "| bits per byte |" in text and "python_syntax_mc" in text
    r = json.loads(out.read_text())
    assert r["step"] == 12 and r["documents"] == len(EVAL_TEXTS) and not r["packing"]
    assert {t["task"] for t in r["tasks"]} == {"python_syntax_mc", "python_last_word"}
    assert r["bpb"] == pytest.approx(bpb.evaluate_bpb(Scorer(trained[1], 8), bpb.eval_documents(
        trained[1].cfg, trained[1].tokenizer, "all"), 32)["bpb"], rel=1e-6)
    metrics = (root / "run" / "metrics.jsonl").read_text()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((root / "run" / "config.json").read_text())
    for args, msg in [
        ([f"--workdir={tmp_path / 'missing'}"], "is not a directory"),
        ([f"--workdir={tmp_path}"], "config.json: not found"),
        ([f"--workdir={tmp_path / 'empty'}"], "no checkpoints in"),
        ([f"--workdir={root / 'run'}", "--step=7"], "--step: 7 is not among the checkpoints"),
        ([f"--workdir={root / 'run'}", "--tasks=nope.jsonl"], "--tasks: nope.jsonl"),
        ([f"--workdir={root / 'run'}", "--packing=maybe"], "--packing"),
        ([f"--workdir={root / 'run'}", "--batch_size=0"], "--batch_size"),
        ([f"--workdir={root / 'run'}", f"--data.path={tmp_path}/*.nope"], "data.path"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, (args, err)
    assert (root / "run" / "metrics.jsonl").read_text() == metrics  # the workdir is untouched


def test_cli_sample(trained, capsys):
    from jaxllm.cli.sample import main
    root = trained[0]
    main([f"--workdir={root / 'run'}", "--prompt=def ", "--max_tokens=12", "--temperature=0",
          "--num=2"])
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2
    s1, s2 = [b.split("\n", 1)[1].rstrip("\n") for b in out.split("--- sample")[1:]]
    assert s1 == s2 and s1.startswith("def ")  # greedy: both samples agree
    for args, msg in [(["--top_p=1.5"], "top_p"), (["--max_tokens=0"], "max_tokens"),
                      (["--num=0"], "--num")]:
        with pytest.raises(SystemExit) as e:
            main([f"--workdir={root / 'run'}", "--prompt=x", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and msg in err, (args, err)


def test_plot_runs_table_and_png(trained, tmp_path, capsys):
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import plot_runs
    run_dir = trained[0] / "run"
    # a resumed run logs a step twice: the last row wins; a torn line is skipped
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    train_rows = [r for r in rows if r.get("split") == "train"]
    copy = tmp_path / "resumed"
    copy.mkdir()
    (copy / "config.json").write_text((run_dir / "config.json").read_text())
    dup = dict(train_rows[-1], loss=0.123)
    (copy / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(dup), '{"split": "tr']))
    png, md = tmp_path / "p.png", tmp_path / "p.md"
    plot_runs.main([str(run_dir), str(copy), "--labels=a,b", f"--out={png}", f"--md={md}"])
    table = md.read_text().splitlines()
    assert table[0].startswith("| run | step | tokens | final_loss | final_bpb |")
    a, b = (line.split(" | ") for line in table[2:4])
    assert a[1] == "12" and a[2] == f"{12 * 8 * 32:,}"
    assert a[3] == f"{train_rows[-1]['loss']:.4f}" and b[3] == "0.1230"
    assert a[4] == f"{[r for r in rows if r.get('split') == 'eval'][-1]['bpb']:.4f}"
    tps = sorted(r["tokens_per_s"] for r in train_rows[1:])[len(train_rows[1:]) // 2]
    assert float(a[6].replace(",", "")) == pytest.approx(tps, abs=0.51)
    assert a[7] == f"{rows[0]['param_count']:,} |"
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as e:
        plot_runs.main([str(run_dir), "--labels=a,b"])
    assert e.value.code == 2 and "--labels: 2 names for 1 workdirs" in capsys.readouterr().err
