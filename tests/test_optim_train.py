"""Every optimizer trains the tiny model through the real loop; 8-bit Adam tracks AdamW.

These go through `jaxllm.train.loop.train` (sharded state, the train step's Sophia
Hessian refresh, metrics rows), on the embedded corpus with the byte tokenizer.
"""

from __future__ import annotations

import math

import pytest
from tests.fixtures import tiny_model_cfg

from jaxllm.config import tiny
from jaxllm.train.loop import train
from tests.fixtures import rows as metrics_rows

# Peak learning rates for the tiny model (tiny_cfg: d_model 32, 2 layers, seq 32, batch 4).
LR = {"adamw": 3e-3, "lion": 1e-3, "sophia_g": 3e-3, "sophia_h": 3e-3, "adam8bit": 3e-3,
      "sgd": 0.3}


def run(tmp_path, name, steps, **model):
    cfg = tiny_model_cfg(**model)
    cfg.model.vocab_size = 0  # byte tokenizer, padded to 384
    cfg.optim.update(name=name, lr=LR[name], warmup_steps=10)
    cfg.train.update(steps=steps, log_every=10, eval_every=steps // 4, eval_batches=2)
    cfg.checkpoint.every = 0
    train(cfg, str(tmp_path / name))
    return metrics_rows(tmp_path / name)


@pytest.mark.parametrize("name", list(LR))
def test_optimizer_trains_tiny_model_100_steps(tmp_path, name):
    rows = run(tmp_path, name, 100)
    ev = [r["loss"] for r in rows if r.get("split") == "eval"]
    tr = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in tr] == list(range(10, 101, 10))
    assert all(math.isfinite(r["loss"]) for r in tr)
    # train loss (rows at steps 10..100) falls: steps 90-100 are 0.3 nats below steps 10-20;
    # held-out loss (steps 25, 50, 75, 100) ends below its first value and far below
    # ln(384) = 5.95, the loss of the near-uniform initial model
    first, last = (tr[0]["loss"] + tr[1]["loss"]) / 2, (tr[-2]["loss"] + tr[-1]["loss"]) / 2
    assert last < first - 0.3, (first, last)
    assert len(ev) == 4 and ev[3] < ev[0] < math.log(384), ev
    assert ev[3] < 0.75 * math.log(384), ev
    if name.startswith("sophia"):
        assert all(0.0 <= r["sophia_win_rate"] <= 1.0 for r in tr)
    else:
        assert "sophia_win_rate" not in tr[0]


def test_adam8bit_within_2_percent_of_adamw_every_logged_step_tiny_config(tmp_path):
    """The optimizer issue's bound, on the tiny model itself (`jaxllm.config.tiny()`: d_model
    128, 4 layers, batch 16 x 256 tokens, lr 3e-3, warmup 50, logging every 20 steps), 200
    steps, same data and seed: the train loss of 8-bit Adam is within 2% of float32 AdamW's
    at every logged step after warmup (steps 60..200; measured: at most +1.6%, step 180),
    and the final held-out loss too (measured +0.5%).

    How tight 2% is on this model: AdamW with a bfloat16 first moment (MaxText/Levanter's
    memory saving) differs from float32 AdamW by up to 2.5% per row on the same run, and
    other seeds move 8-bit Adam up to 2-5% either way (BENCHMARKS.md)."""
    rows = {}
    for name in ("adamw", "adam8bit"):
        cfg = tiny()
        cfg.optim.name = name
        cfg.train.update(steps=200, sample_tokens=0)
        cfg.checkpoint.every = 0
        cfg.log.update(progress=False, tensorboard=False)
        train(cfg, str(tmp_path / name))
        rows[name] = metrics_rows(tmp_path / name)
    assert next(r for r in rows["adam8bit"] if r.get("event") == "start")["opt_state_bytes"] \
        < 0.3 * next(r for r in rows["adamw"] if r.get("event") == "start")["opt_state_bytes"]
    def losses(name, split):
        return {r["step"]: r["loss"] for r in rows[name] if r.get("split") == split}
    a, b = losses("adamw", "train"), losses("adam8bit", "train")
    logged = [s for s in sorted(a) if s > cfg.optim.warmup_steps]
    assert logged == list(range(60, 201, 20)) and sorted(b) == sorted(a)
    ratio = {s: b[s] / a[s] for s in logged}
    assert all(abs(r - 1) <= 0.02 for r in ratio.values()), ratio
    ea, eb = losses("adamw", "eval"), losses("adam8bit", "eval")
    assert abs(eb[200] / ea[200] - 1) <= 0.02, (ea, eb)
    assert ea[200] < 0.75 * ea[50]  # AdamW itself learned
