"""KV-cached generation (jaxllm/model/sample.py): equals full recomputation, masks padding."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from tests.fixtures import random_run, ref_forward

from jaxllm.model.sample import filter_logits, generate, left_pad


def _greedy_by_recomputation(run, prompt, n_new, vocab_limit):
    """Greedy decoding without a cache: each step runs the model on the whole sequence so far
    (padded to one fixed length; causal attention makes the padding invisible)."""
    fwd = ref_forward(run.model_def)
    b, p = prompt.shape
    seq = np.zeros((b, p + n_new), np.int32)
    seq[:, :p] = prompt
    for t in range(p, p + n_new):
        logits = np.asarray(fwd(run.params, seq))[:, t - 1, :vocab_limit]
        top2 = np.sort(logits, -1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0] > 1e-4).all(), "near-tie: the test would be fragile"
        seq[:, t] = logits.argmax(-1)
    return seq[:, p:]


@pytest.mark.parametrize("pos", ["rope", "alibi", "learned"])
def test_kv_cached_greedy_equals_full_recomputation(pos):
    run = random_run(pos_encoding=pos, tie_embeddings=False, init_std=0.3)
    prompt = np.array([[258, 100, 101, 102, 32], [258, 40, 41, 42, 43]], np.int32)
    n_new = 20  # 25 tokens: within the learned table of 32
    out = np.asarray(generate(run.model_def, run.params, prompt, jax.random.key(0),
                              n_new=n_new, temperature=0.0, vocab_limit=259))
    ref = _greedy_by_recomputation(run, prompt, n_new, 259)
    np.testing.assert_array_equal(out, ref)
    if pos != "rope":
        return
    # a smaller vocabulary limit: padded ids are never produced, greedy or sampled
    out = np.asarray(generate(run.model_def, run.params, prompt, jax.random.key(0),
                              n_new=n_new, temperature=0.0, vocab_limit=60))
    np.testing.assert_array_equal(out, _greedy_by_recomputation(run, prompt, n_new, 60))
    out = np.asarray(generate(run.model_def, run.params, prompt, jax.random.key(1),
                              n_new=n_new, temperature=5.0, vocab_limit=60))
    assert out.max() < 60 and len(np.unique(out)) > 5


@pytest.mark.parametrize("pos", ["rope", "alibi", "learned"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(pos):
    """Prompts of 2, 5 and 9 tokens in one left-padded batch (plus a filler row): each row's
    greedy output equals generating from that prompt alone, unpadded."""
    run = random_run(pos_encoding=pos, tie_embeddings=False, init_std=0.3)
    prompts = [[258, 65], [258, 100, 101, 102, 32], [258, 40, 41, 42, 43, 44, 45, 46, 47]]
    batch, lengths = left_pad(prompts, 12, 4)
    assert lengths.tolist() == [2, 5, 9, 9] and (batch[0, :10] == 0).all()
    out = np.asarray(generate(run.model_def, run.params, batch, jax.random.key(0), n_new=16,
                              temperature=0.0, vocab_limit=259, lengths=lengths))
    for i, ids in enumerate(prompts):
        alone = generate(run.model_def, run.params, np.array([ids], np.int32),
                         jax.random.key(0), n_new=16, temperature=0.0, vocab_limit=259)
        np.testing.assert_array_equal(out[i], np.asarray(alone)[0])
    with pytest.raises(ValueError, match="13 tokens; allowed 1..12"):
        left_pad([[1] * 13], 12, 1)


def test_sampling_filters_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 20)).astype(np.float32) * 3
    logits[:, 15:] += 100.0  # "padded" ids with huge logits
    out = np.asarray(filter_logits(logits, 1.0, 0, 1.0, 15))
    assert np.isneginf(out[:, 15:]).all() and np.isfinite(out[:, :15]).all()
    np.testing.assert_allclose(out[:, :15], logits[:, :15], rtol=1e-6)
    out = np.asarray(filter_logits(logits, 2.0, 4, 1.0, 15))
    for r in range(3):
        keep = np.argsort(-logits[r, :15])[:4]
        assert set(np.flatnonzero(np.isfinite(out[r]))) == set(keep)
        np.testing.assert_allclose(out[r, keep], logits[r, keep] / 2.0, rtol=1e-6)
    out = np.asarray(filter_logits(logits, 1.0, 0, 0.7, 15))
    for r in range(3):
        x = logits[r, :15].astype(np.float64)
        order = np.argsort(-x)
        p = np.exp(x[order] - x.max())
        p /= p.sum()
        n_keep = int(np.searchsorted(np.cumsum(p), 0.7) + 1)  # smallest set with mass >= 0.7
        assert set(np.flatnonzero(np.isfinite(out[r]))) == set(order[:n_keep])


def test_top_k_one_and_tiny_top_p_are_greedy():
    run = random_run(tie_embeddings=False, init_std=0.3)
    prompt = np.array([[258, 100, 101]], np.int32)
    greedy = np.asarray(generate(run.model_def, run.params, prompt, jax.random.key(0),
                                 n_new=8, temperature=0.0, vocab_limit=259))
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        out = np.asarray(generate(run.model_def, run.params, prompt, jax.random.key(3),
                                  n_new=8, temperature=1.0, vocab_limit=259, **kw))
        np.testing.assert_array_equal(out, greedy)


@pytest.fixture(scope="module")
def learned_run():
    return random_run(pos_encoding="learned")


@pytest.mark.parametrize("kw, msg", [
    ({"n_new": 40}, "exceed the learned position table"),
    ({"n_new": 4, "temperature": -1.0}, "temperature"),
    ({"n_new": 4, "top_p": 0.0}, "top_p"),
    ({"n_new": 4, "top_k": -2}, "top_k"),
])
def test_generate_argument_errors(learned_run, kw, msg):
    run = learned_run
    prompt = np.zeros((1, 3), np.int32)
    with pytest.raises(ValueError, match=msg):
        generate(run.model_def, run.params, prompt, jax.random.key(0), vocab_limit=259, **kw)
