"""tools/ablate.py + jaxllm/experiments.py: a 2x2 grid on CPU, results table and plot,
resumability (a second call reruns nothing), and the shipped grid file."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from tests.fixtures import corpus_texts, write_jsonl

from jaxllm import experiments as ex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

GRID = '''
import sys
sys.path.insert(0, {tests!r})
from tests.fixtures import tiny_eval_cfg


def get_grid(arg=None):
    c = tiny_eval_cfg()
    c.data.path = {data!r}
    c.data.eval_fraction = 0.2
    {setup}
    return {{"base": c, "axes": {axes},
            "eval": {{"max_bytes": {max_bytes}, "tasks": "builtin", "batch_size": 4}}}}
'''
POS_ACT = dict(setup="c.train.update(steps=6, log_every=2, eval_every=3)", max_bytes=3000,
               axes="""{"model.pos_encoding": ["rope", "alibi"],
                      "act": {"gelu": {"model.activation": "gelu"},
                              "swiglu": {"model.activation": "swiglu", "model.d_ff": 64}}}""")
ACT2 = dict(setup="c.optim.update(lr=3e-3, warmup_steps=1); "
                  "c.train.update(steps=3, log_every=1, eval_every=1)",
            axes='{"model.activation": ["gelu", "relu"]}', max_bytes=1000)


def test_ablation_grid_runs_tabulates_and_resumes(tmp_path, capsys, monkeypatch):
    import ablate

    data = write_jsonl(tmp_path / "corpus.jsonl", corpus_texts() * 2)
    grid = tmp_path / "grid.py"
    grid.write_text(GRID.format(tests=os.path.join(ROOT, "tests"), data=data, **POS_ACT))
    root = tmp_path / "abl"
    ablate.main([f"--grid={grid}", f"--root={root}"])
    out = capsys.readouterr().out
    names = ["pos_encoding-rope__act-gelu", "pos_encoding-rope__act-swiglu",
             "pos_encoding-alibi__act-gelu", "pos_encoding-alibi__act-swiglu"]
    rows = json.loads((root / "results.json").read_text())["runs"]
    assert sorted(r["cell"] for r in rows) == sorted(names)
    assert all(r["status"] == "trained" for r in rows)
    for r in rows:
        assert 0 < r["bpb"] < 12 and r["step"] == 6 and r["tokens"] == 6 * 8 * 32
        mc = r["tasks"]["python_syntax_mc"]
        assert r["tokens_per_s"] > 0 and 0 <= mc["acc"] <= 1
        assert mc["acc"] == pytest.approx(sum(mc["item_acc"]) / len(mc["item_acc"]))
        start = json.loads((root / r["cell"] / "metrics.jsonl").read_text().splitlines()[0])
        assert r["params"] == start["param_count"]
    # gelu: up+down of 4*32; swiglu: up+gate+down of 64 -> different parameter counts
    by = {r["cell"]: r for r in rows}
    assert by[names[0]]["params"] != by[names[1]]["params"]
    md = (root / "table.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4 and "| cell |" in md and "python_syntax_mc_acc [95% CI]" in md
    assert md.strip() in out
    for unit in ("tokens", "bytes", "flops"):
        png = (root / f"bpb_vs_{unit}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # resumable: a second call trains and evaluates nothing ...
    stamps = {n: os.path.getmtime(root / n / "checkpoints" / "6") for n in names}
    def boom(*a, **k):
        raise AssertionError("reran a finished cell")
    monkeypatch.setattr(ex, "train", boom)
    monkeypatch.setattr(ex, "evaluate", boom)
    ablate.main([f"--grid={grid}", f"--root={root}"])
    rows2 = json.loads((root / "results.json").read_text())["runs"]
    assert all(r["status"] == "cached" for r in rows2)
    assert {r["cell"]: r["bpb"] for r in rows2} == {r["cell"]: r["bpb"] for r in rows}
    assert stamps == {n: os.path.getmtime(root / n / "checkpoints" / "6") for n in names}
    # ... and a cell whose evaluation is missing is evaluated again, not retrained
    monkeypatch.undo()
    monkeypatch.setattr(ex, "train", boom)
    os.remove(root / names[3] / "ablation.json")
    rows3 = ex.run_grid(ex.load_grid(str(grid)), str(root), log=lambda *a: None)["runs"]
    assert [r["status"] for r in rows3].count("evaluated") == 1
    assert {r["cell"]: r["bpb"] for r in rows3} == pytest.approx(
        {r["cell"]: r["bpb"] for r in rows}, rel=1e-9)


def test_shipped_grid_and_errors(tmp_path, capsys):
    import ablate
    g = ex.load_grid(os.path.join(ROOT, "configs/ablations/choices.py"))
    assert len(ex.cells(g)) == 8
    g = ex.load_grid(os.path.join(ROOT, "configs/ablations/choices.py:all"))
    assert set(g["axes"]) == {"model.pos_encoding", "model.activation", "optimizer",
                              "tokenizer"}
    cells = ex.cells(g)
    assert len(cells) == 4 * 2 * 6 * 4
    seq = ex.load_grid(os.path.join(ROOT, "configs/ablations/choices.py:seq_len"))
    assert [n for n, _, _ in ex.cells(seq)] == [f"seq_len-{t}" for t in (64, 128, 256, 512)]
    toks = {"train:x:1": "byte"}
    for _name, _labels, ov in cells[:: len(cells) // 7]:
        ov = {k: ("byte" if k == "data.tokenizer" else v) for k, v in ov.items()}
        cfg = ex.cell_config(g["base"], ov, toks)
        assert cfg.train.steps == g["base"].train.steps  # same token budget everywhere
    for args, msg in [(["--only=model.pos_encoding=rope,zzz"], "has no value 'zzz'"),
                      (["--grid=nope.py"], "no such file"),
                      (["--seeds=0"], "--seeds: must be >= 1"),
                      (["--lr_sweep=1,-2"], "--lr_sweep: expected distinct positive"),
                      (["--budget=joules:3"], "--budget: expected tokens:N"),
                      (["--baseline=zzz", "--only=model.pos_encoding=rope",
                        "--only=model.activation=gelu", f"--root={tmp_path}"],
                       "--baseline: no cell 'zzz'"),
                      (["--set=train.nope=1", "--only=model.pos_encoding=rope",
                        "--only=model.activation=gelu", f"--root={tmp_path}"],
                       "unknown config key 'train.nope'")]:
        with pytest.raises(SystemExit) as e:
            ablate.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and msg in err, (args, err)


def test_grid_tokenizers_trained_once(tmp_path):
    from tests.fixtures import tiny_eval_cfg

    from jaxllm.config import ConfigError
    from jaxllm.data.tokenizers import load_tokenizer
    base = tiny_eval_cfg()
    base.data.path = write_jsonl(tmp_path / "c.jsonl", corpus_texts())
    grid = {"base": base, "eval": {},
            "axes": {"tok": {"byte": {"data.tokenizer": "byte"},
                             "bpe": {"data.tokenizer": "train:sentencepiece_bpe:400"}}}}
    toks = ex.prepare_tokenizers(grid, str(tmp_path / "root"))
    path = toks["train:sentencepiece_bpe:400"]
    assert path.endswith("tokenizers/sentencepiece_bpe-400.model")
    assert load_tokenizer(path).vocab_size == 400
    stamp = os.path.getmtime(path)
    assert ex.prepare_tokenizers(grid, str(tmp_path / "root")) == toks
    assert os.path.getmtime(path) == stamp
    cfgs = [ex.cell_config(base, ov, toks) for _, _, ov in ex.cells(grid)]
    assert [c.data.tokenizer for c in cfgs] == ["byte", path]
    grid["axes"]["tok"]["bad"] = {"data.tokenizer": "train:sentencepiece_bpe"}
    with pytest.raises(ConfigError, match="expected train:KIND:VOCAB"):
        ex.prepare_tokenizers(grid, str(tmp_path / "root"))


def test_seeds_sweep_tables_plots_and_reuse(tmp_path, capsys, monkeypatch):
    """2 cells x 2 lr multipliers, first 1 seed then 2: the second call trains only the
    four new runs; the table has intervals, the paired difference, the chosen lr."""
    import ablate

    names = ("bisect.py", "colorsys.py", "fnmatch.py", "glob.py", "shlex.py", "queue.py",
             "sched.py", "heapq.py", "bdb.py", "abc.py")  # distinct documents in each split
    data = write_jsonl(tmp_path / "corpus.jsonl", corpus_texts(names))
    grid = tmp_path / "grid.py"
    grid.write_text(GRID.format(tests=os.path.join(ROOT, "tests"), data=data, **ACT2))
    root = tmp_path / "abl"
    args = [f"--grid={grid}", f"--root={root}", "--lr_sweep=1,2",
            "--baseline=activation-relu"]
    ablate.main([*args, "--seeds=1"])
    first = json.loads((root / "results.json").read_text())
    assert len(first["runs"]) == 4 and all(r["status"] == "trained" for r in first["runs"])
    trained = []
    real = ex.train
    monkeypatch.setattr(ex, "train", lambda cfg, wd, **k: trained.append(wd) or real(cfg, wd, **k))
    ablate.main([*args, "--seeds=2"])
    out = capsys.readouterr().out
    res = json.loads((root / "results.json").read_text())
    assert sorted(os.path.basename(w) for w in trained) == [
        "activation-gelu__lr2__seed1", "activation-gelu__seed1",
        "activation-relu__lr2__seed1", "activation-relu__seed1"]
    assert sorted(r["status"] for r in res["runs"]) == ["cached"] * 4 + ["trained"] * 4
    runs = {r["run"]: r for r in res["runs"]}
    assert runs["activation-gelu__seed1"]["train_seed"] == 1
    assert runs["activation-gelu__lr2"]["lr"] == pytest.approx(6e-3)
    assert runs["activation-gelu"]["bpb"] != runs["activation-gelu__seed1"]["bpb"]
    assert all(r["valid_bpb"] > 0 and r["valid_bpb"] != r["bpb"] for r in res["runs"])
    cells = {c["cell"]: c for c in res["cells"]}
    for name, c in cells.items():
        picked = [r for r in res["runs"] if r["cell"] == name and r["lr_mult"] == c["lr_mult"]]
        valid = {m: np.mean([r["valid_bpb"] for r in res["runs"]
                             if r["cell"] == name and r["lr_mult"] == m]) for m in (1, 2)}
        assert c["lr_mult"] == min(valid, key=valid.get) and c["edge"]
        assert c["bpb"]["mean"] == pytest.approx(np.mean([r["bpb"] for r in picked]))
        assert c["bpb"]["lo"] < c["bpb"]["mean"] < c["bpb"]["hi"] and c["seeds"] == [0, 1]
        mc = c["tasks"]["python_syntax_mc_acc"]
        assert 0 <= mc["lo"] <= mc["mean"] <= mc["hi"] <= 1 and mc["n"] > 0
    assert cells["activation-relu"]["delta"] is None
    assert set(cells["activation-gelu"]["delta"]) >= {"mean", "lo", "hi", "significant"}
    md = (root / "table.md").read_text()
    assert md.strip() in out and "Δ bpb vs activation-relu" in md and "sweep too narrow" in md
    assert "| cell | x1 | x2 | chosen |" in md
    for unit in ("tokens", "bytes", "flops"):
        assert (root / f"bpb_vs_{unit}.png").read_bytes()[:4] == b"\x89PNG"
    # a finished run is never silently reused under another config
    with pytest.raises(SystemExit) as e:
        ablate.main([*args, "--seeds=1", "--set=train.z_loss=0.1"])
    assert e.value.code == 2
    assert "finished with a different config" in capsys.readouterr().err
