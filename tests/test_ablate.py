"""tools/ablate.py + jaxllm/experiments.py: a 2x2 grid on CPU, results table and plot,
resumability (a second call reruns nothing), and the shipped grid file."""

from __future__ import annotations

import csv
import json
import os
import sys

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
    c.train.update(steps=6, log_every=2, eval_every=3)
    return {{"base": c,
            "axes": {{"model.pos_encoding": ["rope", "alibi"],
                      "act": {{"gelu": {{"model.activation": "gelu"}},
                               "swiglu": {{"model.activation": "swiglu", "model.d_ff": 64}}}}}},
            "eval": {{"max_bytes": 3000, "tasks": "builtin", "batch_size": 4}}}}
'''


def test_ablation_grid_runs_tabulates_and_resumes(tmp_path, capsys, monkeypatch):
    import ablate

    data = write_jsonl(tmp_path / "corpus.jsonl", corpus_texts() * 2)
    grid = tmp_path / "grid.py"
    grid.write_text(GRID.format(tests=os.path.join(ROOT, "tests"), data=data))
    root = tmp_path / "abl"
    ablate.main([f"--grid={grid}", f"--root={root}"])
    out = capsys.readouterr().out
    names = ["pos_encoding-rope__act-gelu", "pos_encoding-rope__act-swiglu",
             "pos_encoding-alibi__act-gelu", "pos_encoding-alibi__act-swiglu"]
    rows = json.loads((root / "results.json").read_text())
    assert sorted(r["cell"] for r in rows) == sorted(names)
    assert all(r["status"] == "trained" for r in rows)
    for r in rows:
        assert 0 < r["bpb"] < 12 and r["step"] == 6 and r["tokens"] == 6 * 8 * 32
        assert r["tokens_per_s"] > 0 and 0 <= r["python_syntax_mc_acc"] <= 1
        start = json.loads((root / r["cell"] / "metrics.jsonl").read_text().splitlines()[0])
        assert r["params"] == start["param_count"]
    # gelu: up+down of 4*32; swiglu: up+gate+down of 64 -> different parameter counts
    by = {r["cell"]: r for r in rows}
    assert by[names[0]]["params"] != by[names[1]]["params"]
    md = (root / "results.md").read_text()
    assert md.count("\n") == 2 + 4 and "| cell |" in md and "python_syntax_mc_acc" in md
    assert md.strip() in out
    with open(root / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    png = (root / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # resumable: a second call trains and evaluates nothing ...
    stamps = {n: os.path.getmtime(root / n / "checkpoints" / "6") for n in names}
    import jaxllm.eval.evaluate
    import jaxllm.train.loop

    def boom(*a, **k):
        raise AssertionError("reran a finished cell")
    monkeypatch.setattr(jaxllm.train.loop, "train", boom)
    monkeypatch.setattr(jaxllm.eval.evaluate, "evaluate", boom)
    ablate.main([f"--grid={grid}", f"--root={root}"])
    rows2 = json.loads((root / "results.json").read_text())
    assert all(r["status"] == "cached" for r in rows2)
    assert {r["cell"]: r["bpb"] for r in rows2} == {r["cell"]: r["bpb"] for r in rows}
    assert stamps == {n: os.path.getmtime(root / n / "checkpoints" / "6") for n in names}
    # ... and a cell whose evaluation is missing is evaluated again, not retrained
    monkeypatch.undo()
    monkeypatch.setattr(jaxllm.train.loop, "train", boom)
    os.remove(root / names[3] / "ablation.json")
    rows3 = ex.run_grid(ex.load_grid(str(grid)), str(root), log=lambda *a: None)
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
    toks = {"train:x:1": "byte"}
    for _name, _labels, ov in cells[:: len(cells) // 7]:
        ov = {k: ("byte" if k == "data.tokenizer" else v) for k, v in ov.items()}
        cfg = ex.cell_config(g["base"], ov, toks)
        assert cfg.train.steps == g["base"].train.steps  # same token budget everywhere
    for args, msg in [(["--only=model.pos_encoding=rope,zzz"], "has no value 'zzz'"),
                      (["--grid=nope.py"], "no such file"),
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
