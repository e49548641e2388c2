"""Three-way document split (train / valid / eval) for learning-rate selection: disjoint,
eval unchanged by adding a validation split, and the two-way split exactly as before when
`data.valid_fraction` is 0."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from jaxllm import config
from jaxllm.data.corpus import split_of, stdlib_files, stdlib_root
from jaxllm.data.pipeline import load_split, make_pipeline
from jaxllm.data.prepare import doc_buckets, eval_mask, prepare, split_mask
from jaxllm.data.tokenizers import load_tokenizer

BYTE = load_tokenizer("byte")


def test_split_mask_partitions_and_keeps_eval():
    n = 50_000
    for e, v in ((0.05, 0.0), (0.05, 0.1), (0.2, 0.05), (0.0, 0.1)):
        masks = {s: split_mask(n, s, e, v) for s in ("train", "valid", "eval")}
        assert (sum(m.astype(int) for m in masks.values()) == 1).all()  # a partition
        np.testing.assert_array_equal(masks["eval"], eval_mask(n, e))  # eval unchanged
        assert masks["eval"].mean() == pytest.approx(e, abs=0.005)
        assert masks["valid"].mean() == pytest.approx(v, abs=0.005)
        # valid documents come only out of what was train
        assert not (masks["valid"] & eval_mask(n, e)).any()
    np.testing.assert_array_equal(split_mask(n, "train", 0.05), ~eval_mask(n, 0.05))
    assert doc_buckets(10).dtype == np.uint64 and doc_buckets(10).max() < 10_000


def test_embedded_split_by_name_matches_the_two_way_rule():
    root = stdlib_root()
    names = [p.relative_to(root).as_posix() for p in stdlib_files()]
    for e in (0.05, 0.2):
        old = {n for n in names if zlib.crc32(n.encode()) % 10_000 < e * 10_000}
        assert {n for n in names if split_of(n, e) == "eval"} == old
        assert not any(split_of(n, e) == "valid" for n in names)
        valid = {n for n in names if split_of(n, e, 0.1) == "valid"}
        assert {n for n in names if split_of(n, e, 0.1) == "eval"} == old
        assert valid and not valid & old
        assert len(valid) == pytest.approx(0.1 * len(names), rel=0.25)


def test_pipeline_reads_each_split_of_prepared_data(tmp_path):
    docs = [f"document number {i} " * (1 + i % 7) for i in range(400)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([str(src)], str(tmp_path / "p"), "byte", workers=1, progress=False)
    cfg = config.defaults()
    cfg.data.update(path=str(tmp_path / "p"), seq_len=16, eval_fraction=0.1,
                    valid_fraction=0.15, prefetch=0)
    cfg.train.batch_size = 4

    def texts(split):
        s = load_split(cfg, BYTE, split)
        return {bytes(s.doc(j)[:-1].astype(np.uint8)).decode() for j in range(len(s))}

    got = {s: texts(s) for s in ("train", "valid", "eval")}
    assert sum(len(t) for t in got.values()) == len(set(docs))
    assert not got["train"] & got["valid"] and not got["valid"] & got["eval"]
    cfg2 = config.defaults()
    cfg2.data.update(path=cfg.data.path, eval_fraction=0.1)
    s = load_split(cfg2, BYTE, "eval")
    assert {bytes(s.doc(j)[:-1].astype(np.uint8)).decode() for j in range(len(s))} == got["eval"]
    # the valid split is read like eval: finite, deterministic, only its documents
    rows = [r for b in make_pipeline(cfg, BYTE, "valid") for r in b["inputs"]]
    text = "".join(bytes(r[(r >= 0) & (r < 256)].astype(np.uint8)).decode("utf-8", "replace")
                   for r in rows)
    assert any(d.strip() in text for d in got["valid"])
    assert not any(d.strip() in text for d in got["eval"] if len(d) > 40)
    with pytest.raises(config.ConfigError, match="allowed: train, valid, eval"):
        make_pipeline(cfg, BYTE, "test")
    bad = cfg.copy_and_resolve_references()
    bad.data.valid_fraction = 0.7
    with pytest.raises(config.ConfigError, match="data.valid_fraction"):
        config.validate(bad)
