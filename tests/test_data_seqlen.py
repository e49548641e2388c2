"""Sequence-length report: numbers against a direct computation, CLI output and errors."""

import json

import numpy as np

from jaxllm.data import seqlen
from jaxllm.data.prepare import prepare
from tools.seqlen_report import main


def test_length_table_matches_direct_loop():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(1, 600, 500), rng.integers(500, 40000, 40)])
    budget = 1e7
    rows = seqlen.length_table(lengths, budget)
    assert [r["seq_len"] for r in rows] == [512, 1024, 2048, 4096, 8192, 16384, 32768]
    total = sum(int(x) for x in lengths)
    for r in rows:
        L = r["seq_len"]
        long = [int(x) for x in lengths if x >= L]
        assert r["docs"] == len(long)
        assert r["token_share"] == sum(long) / total
        avail = sum((x // L) * L for x in long)
        assert r["available_tokens"] == avail
        assert r["repeats"] == (budget / avail if avail else float("inf"))
    info = seqlen.summary(lengths)
    for p in seqlen.PERCENTILES:
        assert info["percentiles"][str(p)] == float(np.percentile(lengths, p))
    assert (info["min"], info["max"], info["docs"]) == (lengths.min(), lengths.max(), 540)


def test_report_cli(tmp_path, capsys):
    docs = ["x" * n for n in (10, 600, 1100, 3000, 5000)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([str(src)], str(tmp_path / "p"), "byte", workers=1, progress=False)
    png = tmp_path / "h.png"
    assert main(["--data", str(tmp_path / "p"), "--budget", "1e6", "--png", str(png),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_len = {r["seq_len"]: r for r in out["lengths"]}
    assert by_len[1024]["docs"] == 3 and by_len[1024]["available_tokens"] == 1024 * (1 + 2 + 4)
    assert by_len[1024]["token_share"] == (1100 + 3000 + 5000) / sum(len(d) for d in docs)
    assert by_len[8192]["docs"] == 0 and by_len[8192]["repeats"] == float("inf")
    assert out["summary"]["docs"] == 5 and out["summary"]["max"] == 5000
    assert main(["--data", str(tmp_path / "p"), "--budget", "1e6", "--png", str(png)]) == 0
    assert "p50" in capsys.readouterr().out
    assert main(["--data", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: --data: ")
    assert main(["--data", str(tmp_path / "p"), "--budget", "0"]) == 2
    assert "error: --budget: must be > 0" in capsys.readouterr().err
