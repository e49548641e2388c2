"""Padding ids (the vocabulary rounded up to a multiple of 128, `model.vocab_used` and up)
get exactly zero probability in the training loss, evaluation (bits per byte) and sampling,
so bpb compares tokenizers fairly; runs recorded before the mask keep none."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.fixtures import tiny_model_cfg
from flax import nnx

from jaxllm import parallel
from jaxllm.config import ConfigError
from jaxllm.data.tokenizers import ByteTokenizer
from jaxllm.eval.bpb import eval_documents, evaluate_bpb
from jaxllm.run import Run, read_config
from jaxllm.model.sample import generate
from jaxllm.eval.scoring import Scorer
from jaxllm.data.resolve import resolve
from jaxllm.train.resume import check_compatible
from jaxllm.model.transformer import ModelDef, abstract_model
from jaxllm.model.loss import forward_sums

REAL = 259  # the byte tokenizer's ids; tiny_model_cfg pads the vocabulary to 384


def model_cfg(vocab_size=384, vocab_used=0):
    cfg = tiny_model_cfg(pos_encoding="rope", activation="swiglu", norm="rmsnorm", use_bias=False,
                   tie_embeddings=False, vocab_size=vocab_size, vocab_used=vocab_used)
    cfg.data.seq_len = 16
    return cfg


@pytest.fixture(scope="module")
def params():
    """Random parameters of the padded (384-id) model, large enough that the padding ids
    would take a good share of the probability if nothing masked them."""
    rng = np.random.RandomState(0)
    abstract = nnx.to_pure_dict(abstract_model(model_cfg())[1])
    return jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32),
                        abstract)


def model_def(cfg):
    return ModelDef(abstract_model(cfg)[0], cfg)


def batch(seed=0):
    x = np.random.RandomState(seed).randint(0, REAL, (2, 17)).astype(np.int32)
    return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
            "segment_ids": jnp.ones((2, 16), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))}


def test_resolve_records_the_tokenizers_size_and_refuses_a_bad_one():
    cfg = model_cfg()
    resolve(cfg)
    assert (cfg.model.vocab_size, cfg.model.vocab_used) == (384, REAL)
    assert json.loads(cfg.to_json_best_effort())["model"]["vocab_used"] == REAL
    with pytest.raises(ConfigError, match=r"model.vocab_used: 200 must be in \[the "
                       r"tokenizer's 259, model.vocab_size 384\]"):
        resolve(model_cfg(vocab_used=200))


def test_padding_ids_get_zero_probability_in_loss_and_sampling(params):
    masked, plain = model_cfg(vocab_used=REAL), model_cfg()
    b = batch()
    logits = np.asarray(model_def(masked).apply(params)(b["inputs"]))
    leak = np.asarray(model_def(plain).apply(params)(b["inputs"]))
    p = jax.nn.softmax(logits, axis=-1)
    assert np.all(logits[..., REAL:] == -np.inf) and float(p[..., REAL:].sum()) == 0.0
    assert float(jax.nn.softmax(leak, axis=-1)[..., REAL:].sum(-1).min()) > 0.05  # teeth
    np.testing.assert_array_equal(logits[..., :REAL], leak[..., :REAL])
    # the training loss normalizes over the real ids only (float64 reference)
    _, _, nll, _ = forward_sums(model_def(masked), params, b, 0)
    ref = leak[..., :REAL].astype(np.float64)
    ref = np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1)) + ref.max(-1) - \
        np.take_along_axis(ref, np.asarray(b["targets"])[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(nll), ref, rtol=1e-5)
    assert float(forward_sums(model_def(plain), params, b, 0)[0]) > float(nll.sum()) + 1.0
    # sampling at temperature 1 with no mask of its own (vocab_limit = all 384 ids)
    prompt = b["inputs"][:, :4]
    for cfg, hits in ((masked, False), (plain, True)):
        out = np.asarray(generate(model_def(cfg), params, prompt, jax.random.key(1),
                                  n_new=48, temperature=1.0, vocab_limit=384))
        assert bool((out >= REAL).any()) is hits


def _bpb(cfg, params):
    tok = ByteTokenizer()
    cfg = copy.deepcopy(cfg)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = parallel.make_mesh(cfg, jax.devices()[:1])
    run = Run("", cfg, tok, model_def(cfg), params, 0, mesh)
    docs = eval_documents(cfg, tok, "eval", max_bytes=3000)
    return evaluate_bpb(Scorer(run, batch_size=2), docs, 16)["bpb"]


def test_bpb_of_the_masked_model_equals_the_model_without_padding_ids(params):
    """The mask changes nothing for a model that puts no mass on padding ids (here: one
    that has none, the same weights cut to the tokenizer's 259 ids)."""
    trimmed = {**params, "embed": {"embedding": params["embed"]["embedding"][:REAL]},
               "lm_head": params["lm_head"][:, :REAL]}
    masked = _bpb(model_cfg(vocab_used=REAL), params)
    assert masked == pytest.approx(_bpb(model_cfg(vocab_size=REAL), trimmed), rel=1e-6)
    assert _bpb(model_cfg(), params) > masked + 0.05  # the leak the mask removes


def test_runs_recorded_before_the_mask_keep_none(tmp_path):
    saved = json.loads(model_cfg().to_json_best_effort())
    del saved["model"]["vocab_used"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert read_config(str(tmp_path)).model.vocab_used == 384  # = vocab_size: no mask
    resumed = model_cfg()
    resolve(resumed)
    check_compatible(resumed, str(tmp_path))  # training resumes it without the mask too
    assert resumed.model.vocab_used == 384
    saved["model"]["vocab_used"] = REAL
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert read_config(str(tmp_path)).model.vocab_used == REAL
