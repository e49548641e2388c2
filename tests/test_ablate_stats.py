"""The numbers behind an ablation verdict, without training: intervals against scipy /
numpy, the learning rate chosen on validation only, and the three budgets' step counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as sps

from jaxllm import ablation_report, budget, stats
from jaxllm.config import ConfigError, defaults, validate


def test_t_interval_and_paired_difference_match_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        x = 3.0 + rng.normal(size=n) * 0.05
        y = x + 0.01 + rng.normal(size=n) * 0.004
        got = stats.t_interval(x)
        ci = sps.ttest_1samp(x, 0.0).confidence_interval(0.95)
        assert got["mean"] == pytest.approx(np.mean(x), rel=1e-12)
        assert got["std"] == pytest.approx(np.std(x, ddof=1), rel=1e-12)
        assert (got["lo"], got["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
        d = stats.paired_difference(y, x)
        ci = sps.ttest_rel(y, x).confidence_interval(0.95)
        assert (d["lo"], d["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
        assert d["mean"] == pytest.approx(0.01, abs=0.01)
        assert d["significant"] == bool(ci.low > 0 or ci.high < 0)
    # pairing matters: the unpaired interval of the same data straddles 0, the paired not
    x = np.array([3.10, 3.30, 2.95])
    y = x + np.array([0.011, 0.012, 0.010])
    assert stats.paired_difference(y, x)["significant"]
    assert sps.ttest_ind(y, x).confidence_interval(0.95).low < 0
    one = stats.t_interval([2.5])
    assert one["mean"] == 2.5 and np.isnan(one["std"]) and np.isnan(one["lo"])
    assert not stats.paired_difference([1.0], [2.0])["significant"]
    with pytest.raises(ValueError, match="pair by seed"):
        stats.paired_difference([1.0, 2.0], [1.0])


def test_bootstrap_over_items_matches_numpy_and_scipy():
    rng = np.random.default_rng(1)
    items = (rng.random(200) < 0.35).astype(float)
    got = stats.bootstrap_interval(items, n_resamples=4000, seed=3)
    # the same percentile bootstrap written out directly
    idx = np.random.default_rng(3).integers(0, 200, size=(4000, 200))
    means = items[idx].mean(1)
    assert (got["lo"], got["hi"]) == pytest.approx(
        tuple(np.quantile(means, [0.025, 0.975])), abs=1e-12)
    assert got["mean"] == items.mean() and got["n"] == 200
    # and scipy's percentile bootstrap agrees up to Monte-Carlo error
    ref = sps.bootstrap((items,), np.mean, n_resamples=4000, method="percentile",
                        random_state=np.random.default_rng(9)).confidence_interval
    assert got["lo"] == pytest.approx(ref.low, abs=0.012)
    assert got["hi"] == pytest.approx(ref.high, abs=0.012)
    # with seeds: an item's score is its mean over seeds
    two = np.stack([items, 1 - items])
    assert stats.bootstrap_interval(two)["mean"] == 0.5
    assert stats.bootstrap_interval(two)["lo"] == stats.bootstrap_interval(two)["hi"] == 0.5


def _row(cell, seed, mult, valid, test, acc):
    return {"run": f"{cell}-{seed}-{mult}", "cell": cell, "seed": seed, "lr_mult": mult,
            "lr": 1e-3 * mult, "valid_bpb": valid, "bpb": test, "steps": 10,
            "warmup_steps": 2, "tokens_per_step": 100, "bytes_per_token": 1.0,
            "flops_per_token": 1e4, "tasks": {"mc": {"acc": np.mean(acc), "item_acc": acc}}}


def test_lr_is_chosen_on_validation_not_test():
    """Cell `b`: x0.5 is best on validation, x2 best on test; x0.5 must be picked and the
    table must report x0.5's test numbers. Cell `a`: best at the sweep's edge."""
    rows = []
    for seed in range(3):
        e = 0.01 * seed
        rows += [_row("a", seed, 0.5, 3.3 + e, 3.30 + e, [1, 0]),
                 _row("a", seed, 1.0, 3.2 + e, 3.20 + e, [1, 0]),
                 _row("a", seed, 2.0, 3.1 + e, 3.10 + e, [1, 1]),
                 _row("b", seed, 0.5, 3.0 + e, 3.15 + e, [0, 1]),
                 _row("b", seed, 1.0, 3.1 + e, 3.05 + e, [0, 1]),
                 _row("b", seed, 2.0, 3.2 + e, 2.90 + e, [0, 0])]
    summary = {c["cell"]: c for c in ablation_report.summarize_cells(rows, "a")}
    b = summary["b"]
    assert b["lr_mult"] == 0.5 and b["edge"]  # (0.5 is also the sweep's low edge)
    assert b["bpb"]["mean"] == pytest.approx(3.16)  # x0.5's test bpb, not x2's 2.91
    assert b["valid_bpb"] == pytest.approx({0.5: 3.01, 1.0: 3.11, 2.0: 3.21})
    assert summary["a"]["lr_mult"] == 2.0 and summary["a"]["edge"]
    # paired over seeds against a's chosen runs (x2): b - a = 3.15 - 3.10 every seed
    assert b["delta"]["mean"] == pytest.approx(0.05) and b["delta"]["std"] < 1e-9
    assert summary["a"]["delta"] is None
    rows_mid = [r for r in rows if r["cell"] == "b"] + [
        _row("b", s, 4.0, 3.5, 2.5, [1, 1]) for s in range(3)] + [
        _row("b", s, 0.25, 3.6, 2.4, [1, 1]) for s in range(3)]
    mid = ablation_report.choose_lr(rows_mid)
    assert mid["lr_mult"] == 0.5 and not mid["edge"]
    meta = {"axes": ["x"], "seeds": 3, "lr_sweep": [0.5, 1.0, 2.0], "budget": None,
            "baseline": "a"}
    md = ablation_report.markdown(list(summary.values()), meta)
    assert "x2, edge: sweep too narrow" in md and "**3.0100**" in md
    assert "+0.0500" in md and "baseline" in md


def _cfg(**kw):
    c = defaults()
    c.model.update(d_model=32, n_layers=2, n_heads=4, dtype="float32")
    c.data.seq_len = 32
    c.train.update(steps=100, batch_size=4, eval_every=25, log_every=10)
    c.optim.warmup_steps = 20
    for k, v in kw.items():
        node, key = k.split(".")
        c[node][key] = v
    return validate(c)


def _param_count_no_pos(cfg):
    from flax import nnx

    from jaxllm.model.transformer import Transformer
    from jaxllm.data.resolve import resolve
    resolve(cfg)
    model = Transformer(cfg, nnx.Rngs(0))
    total = 0
    for path, x in jax_leaves(nnx.state(model, nnx.Param)):
        if "pos_embed" not in [str(getattr(k, "key", k)) for k in path]:
            total += x.size
    return total


def jax_leaves(state):
    import jax
    return jax.tree_util.tree_leaves_with_path(state)


def test_budget_steps_for_tokens_bytes_and_flops(tmp_path):
    assert budget.parse_budget("bytes:2e6") == ("bytes", 2e6)
    for bad in ("bytes", "watts:5", "flops:-1", "tokens:x"):
        with pytest.raises(ConfigError, match="--budget"):
            budget.parse_budget(bad)
    # tokens: N / (batch · seq_len); warmup and eval rows keep the base's ratios
    cfg = _cfg()
    d = budget.apply_budget(cfg, "tokens", 64_000)
    assert cfg.train.steps == d["steps"] == 500 and cfg.optim.warmup_steps == 100
    assert cfg.train.eval_every == 125 and d["budget_used"] == 64_000
    # bytes: the byte tokenizer's bytes per token on the train split = bytes/(bytes+EOS)
    docs = [("héllo wörld " * (i % 9 + 1)) for i in range(60)]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = _cfg(**{"data.path": str(path), "data.eval_fraction": 0.2})
    from jaxllm.data.prepare import split_mask
    train = [t for t, m in zip(docs, split_mask(60, "train", 0.2), strict=True) if m]
    n_bytes = sum(len(t.encode()) for t in train)
    bpt = n_bytes / (n_bytes + len(train))
    assert budget.bytes_per_token(cfg) == pytest.approx(bpt, rel=1e-12)
    d = budget.apply_budget(cfg, "bytes", 1_000_000)
    assert d["steps"] == round(1_000_000 / (4 * 32 * bpt)) and d["bytes_per_token"] == bpt
    # flops: 6N + 12·L·d·T per token, N without the learned position table; doubling the
    # sequence length costs more per token, so fewer steps
    for pos in ("rope", "learned"):
        steps = []
        for seq in (32, 64):
            cfg = _cfg(**{"model.pos_encoding": pos, "data.seq_len": seq})
            fpt = 6 * _param_count_no_pos(cfg) + 12 * 2 * 32 * seq
            assert budget.model_flops_per_token(cfg) == pytest.approx(fpt, rel=1e-12)
            d = budget.apply_budget(cfg, "flops", 1e12)
            assert d["steps"] == round(1e12 / (4 * seq * fpt)) and d["flops_per_token"] == fpt
            steps.append(d["steps"])
        assert steps[1] < steps[0] / 2
