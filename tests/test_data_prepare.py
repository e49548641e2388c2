"""Data preparation: readers, bad-record accounting, shards, manifest, CLI errors."""

import hashlib
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxllm.data.corpus import expand_inputs, iter_texts
from jaxllm.data.prepare import PreparedData, eval_mask, prepare
from jaxllm.data.tokenizers import load_tokenizer
from tools.prepare_data import main as prepare_main

GOOD = ["first doc ✓", "中文 second", "third 😀 e\u0301", "fourth", "fifth\n\nwith blank"]


@pytest.fixture
def corpus(tmp_path):
    """Files with known good documents and known bad records."""
    (tmp_path / "a.txt").write_text(GOOD[0])
    (tmp_path / "b.txt").write_bytes(b"bad \xff\xfe utf8")  # undecodable
    (tmp_path / "blocks.txt").write_text("block one\n\n  \nblock two\nline\n\n\n")
    lines = [json.dumps({"text": GOOD[1]}), "{malformed", json.dumps({"other": "x"}),
             json.dumps({"text": "   "}), json.dumps(["not", "object"]), "",
             json.dumps({"text": GOOD[2]})]
    (tmp_path / "c.jsonl").write_bytes("\n".join(lines).encode() + b"\n{\"text\": \"\xff\"}\n")
    pq.write_table(pa.table({"text": [GOOD[3], None, "", GOOD[4]], "id": [1, 2, 3, 4]}),
                   tmp_path / "d.parquet")
    return tmp_path


def test_readers_and_bad_records(corpus):
    from jaxllm.data.corpus import BadRecords

    files = expand_inputs([str(corpus / "*.txt"), str(corpus / "c.jsonl"),
                           str(corpus / "d.parquet")])
    bad = BadRecords()
    texts = [t for _, t in iter_texts(files, bad=bad)]
    assert texts == [GOOD[0], "block one\n\n  \nblock two\nline\n\n\n", GOOD[1], GOOD[2],
                     GOOD[3], GOOD[4]]
    assert bad.counts == {"undecodable": 2, "unencodable": 0, "empty": 2, "malformed_json": 1,
                          "missing_field": 3}
    assert bad.by_file[str(corpus / "b.txt")] == {"undecodable": 1}
    assert bad.by_file[str(corpus / "d.parquet")] == {"missing_field": 1, "empty": 1}
    blocks = [t for _, t in iter_texts([str(corpus / "blocks.txt")], blank_line_docs=True)]
    assert blocks == ["block one", "block two\nline"]


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_shards_and_manifest(corpus, tmp_path_factory, workers):
    out = tmp_path_factory.mktemp("out") / "prep"
    files = expand_inputs([str(corpus / "*")])
    m = prepare(files, str(out), "byte", workers=workers, progress=False, shard_tokens=20)
    tok = load_tokenizer("byte")
    expected = [t for _, t in iter_texts(files)]
    data = PreparedData(str(out))
    assert len(data) == m["num_docs"] == len(expected) == 6
    for i, text in enumerate(expected):
        assert data.doc(i).tolist() == tok.encode(text) + [tok.eos_id]
    assert data.doc_len.tolist() == [len(t.encode()) for t in expected]
    assert len(m["shards"]) > 1 and all(s["docs"] >= 1 for s in m["shards"])
    assert m["num_tokens"] == sum(len(t.encode()) + 1 for t in expected)
    assert m["num_bytes"] == sum(len(t.encode()) for t in expected)
    assert m["bad_records"] == {"undecodable": 2, "unencodable": 0, "empty": 2, "malformed_json": 1,
                                "missing_field": 3, "total": 8}
    by_file = {s["file"]: s for s in m["sources"]}
    assert by_file[str(corpus / "b.txt")] == {"file": str(corpus / "b.txt"), "docs": 0,
                                              "bytes": 0, "bad": {"undecodable": 1}}
    assert by_file[str(corpus / "c.jsonl")]["docs"] == 2
    assert m["tokenizer"]["name"] == "byte" and m["dtype"] == "uint16"


def test_prepare_with_tokenizer_file_records_sha(tmp_path):
    from jaxllm.data.tokenizer_training import train_tokenizer

    src = tmp_path / "t.txt"
    src.write_text(json.__doc__ * 20)
    path = train_tokenizer([str(src)], "byte_bpe", 300, str(tmp_path / "tok"), progress=False)
    m = prepare([str(src)], str(tmp_path / "p"), path, workers=1, progress=False)
    sha = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    assert m["tokenizer"]["sha256"] == sha and m["tokenizer"]["kind"] == "byte_bpe"
    data = PreparedData(str(tmp_path / "p"))
    tok = load_tokenizer(path)
    data.check_tokenizer(tok)
    with pytest.raises(ValueError, match=r"data.path: .* was prepared with tokenizer byte_bpe"):
        data.check_tokenizer(load_tokenizer("byte"))
    assert tok.decode(data.doc(0)[:-1]) == json.__doc__ * 20


def test_cli_reports_and_errors(corpus, tmp_path, capsys):
    out = tmp_path / "cli_out"
    assert prepare_main(["--input", str(corpus / "*"), "--output", str(out), "--workers=1",
                         "--no_progress"]) == 0
    text = capsys.readouterr().out
    assert "6 documents" in text and "bad records skipped: 8" in text
    assert f"{corpus / 'b.txt'}: undecodable 1" in text
    # existing output is not overwritten without --overwrite
    assert prepare_main(["--input", str(corpus / "a.txt"), "--output", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert PreparedData(str(out)).manifest["num_docs"] == 6
    # missing input, unsupported file, no usable documents, missing parquet column
    cases = [([str(tmp_path / "none*.jsonl")], "error: --input: no input files match"),
             ([str(corpus / "d.parquet"), str(tmp_path)], "error: --input: no input files"),
             ([str(corpus / "b.txt")], "error: input: no usable documents"),
             ([str(corpus / "d.parquet"), "--text_field=body"],
              "error: data.text_field: column 'body' not in")]
    (tmp_path / "x.csv").write_text("a,b")
    cases.append(([str(tmp_path / "x.csv")], "unsupported file type"))
    for args, msg in cases:
        assert prepare_main(["--input", *args, "--output", str(tmp_path / "o2"),
                             "--workers=1", "--no_progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "o2").exists()


def test_eval_mask_split():
    m = eval_mask(100_000, 0.05)
    assert abs(m.mean() - 0.05) < 0.005
    assert np.array_equal(m[:1000], eval_mask(1000, 0.05))  # stable, prefix-free
    assert not eval_mask(1000, 0.0).any()
