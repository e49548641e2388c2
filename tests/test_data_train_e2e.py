"""Tokenizers trained by tools/train_tokenizer.py drive a tiny training run end to end on raw
JSON Lines data (prepared on the fly), with eval bits per byte reported."""

import json
import math

import numpy as np
import pytest

from jaxllm import config
from jaxllm.data.corpus import embedded_documents
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.tokenizers import load_tokenizer
from tools.train_tokenizer import main as train_tokenizer_main


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Both runs build the same model (vocab 512): the second reuses the first's executables
    from a persistent compilation cache (compiling dominates these tiny runs on 2 cores)."""
    import jax

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(keys[1], 0.0)
    jax.config.update(keys[2], 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


@pytest.mark.parametrize("kind", ["sentencepiece_bpe", "byte_bpe"])
def test_trained_tokenizer_trains_model(tmp_path, kind, compile_cache):
    from jaxllm.train.loop import train

    assert train_tokenizer_main([f"--kind={kind}", "--vocab_size=512", "--max_bytes=200000",
                                 f"--output={tmp_path / 'tok'}", "--no_progress"]) == 0
    tok_path = str(tmp_path / ("tok.model" if kind.startswith("sentence") else "tok.json"))
    docs = [t for _, t in embedded_documents("train")][:40]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    cfg = config.defaults()
    cfg.model.update(d_model=32, n_layers=1, n_heads=2, d_ff=64, dtype="float32")
    cfg.data.update(path=str(tmp_path / "data.jsonl"), tokenizer=tok_path, seq_len=64,
                    eval_fraction=0.1)
    cfg.train.update(steps=3, batch_size=4, log_every=1, eval_every=0, eval_batches=2,
                     sample_tokens=0)
    cfg.optim.update(warmup_steps=1)
    cfg.checkpoint.update(every=0, async_save=False)
    cfg.log.update(tensorboard=False, progress=False)
    out = train(cfg, str(tmp_path / "run"))

    tok = load_tokenizer(tok_path)
    assert cfg.model.vocab_size == 512 and tok.vocab_size == 512
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    ev = [r for r in rows if r.get("split") == "eval"][-1]
    assert ev["bpb"] == out["eval"]["bpb"] and 0 < ev["bpb"] < 20
    # bpb is per UTF-8 byte of the held-out text: recompute its denominator from the data
    batches = list(make_pipeline(cfg, tok, "eval"))[:2]
    n_bytes = sum(int((b["target_bytes"] * (b["segment_ids"] > 0)).sum()) for b in batches)
    n_tok = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert ev["eval_tokens"] == n_tok
    assert math.isclose(ev["bpb"], ev["loss"] * n_tok / n_bytes / math.log(2), rel_tol=1e-4)
    assert n_bytes > n_tok  # a trained tokenizer packs more than one byte per token
    assert np.isfinite([r["loss"] for r in rows if r.get("split") == "train"]).all()
