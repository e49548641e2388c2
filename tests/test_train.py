"""End-to-end training on the embedded corpus: metrics contract, checkpoint, sample, determinism."""


import numpy as np
from tests.fixtures import rows, run_cli, tiny_model_cfg

from jaxllm.train.loop import train


def small(**train_kw):
    cfg = tiny_model_cfg()
    cfg.model.vocab_size = 0  # follows the tokenizer
    cfg.train.update(steps=12, log_every=2, eval_every=6, eval_batches=1, **train_kw)
    cfg.checkpoint.every = 6
    cfg.log.tensorboard = True
    return cfg


def test_workdir_contract_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    out = train(small(), str(a))
    train(small(), str(b))
    ra, rb = rows(a), rows(b)
    start = ra[0]
    assert start["event"] == "start" and start["step"] == 0
    for key in ("param_count", "opt_state_bytes", "devices", "mesh"):
        assert key in start
    tr = [r for r in ra if r.get("split") == "train"]
    ev = [r for r in ra if r.get("split") == "eval"]
    assert [r["step"] for r in tr] == [2, 4, 6, 8, 10, 12]
    for r in tr:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= r.keys()
        assert r["mfu"] is None  # CPU: unknown peak
    assert [r["step"] for r in ev] == [6, 12] and all("bpb" in r for r in ev)
    assert (a / "config.json").exists() and (a / "tb").is_dir()
    assert sorted(p.name for p in (a / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "6"]
    # same config and seed: identical losses, bitwise
    assert [r["loss"] for r in tr] == [r["loss"] for r in rb if r.get("split") == "train"]
    assert [r["bpb"] for r in ev] == [r["bpb"] for r in rb if r.get("split") == "eval"]
    assert out["step"] == 12


def test_cli_trains_evaluates_checkpoints_and_samples(tmp_path):
    wd = tmp_path / "run"
    proc = run_cli(["-m", "jaxllm.train", f"--workdir={wd}", "--config.model.d_model=64",
                    "--config.train.steps=60", "--config.train.eval_every=20",
                    "--config.train.eval_batches=2", "--config.data.seq_len=64",
                    "--config.train.sample_tokens=24", "--config.checkpoint.every=30"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--- sample ---\ndef " in proc.stdout
    bpb = [r["bpb"] for r in rows(wd) if r.get("split") == "eval"]
    assert len(bpb) == 3 and bpb[-1] < bpb[0]
    assert (wd / "checkpoints" / "60").is_dir()
    # running the same command again resumes at the end: no new training rows
    again = run_cli(["-m", "jaxllm.train", f"--workdir={wd}", "--config.model.d_model=64",
                     "--config.train.steps=60", "--config.data.seq_len=64",
                     "--config.train.sample_tokens=0"])
    assert again.returncode == 0, again.stderr[-2000:]
    starts = [r for r in rows(wd) if r.get("event") == "start"]
    assert starts[-1]["step"] == 60 and starts[-1]["resumed_from"] == 60
    assert np.isfinite(bpb).all()


def test_resume_with_changed_model_shape_is_refused(tmp_path):
    wd = tmp_path / "run"
    train(small(), str(wd))
    before = sorted(p.name for p in (wd / "checkpoints").iterdir())
    proc = run_cli(["-m", "jaxllm.train", f"--workdir={wd}", "--config.model.d_model=64",
                    "--config.model.n_layers=2", "--config.data.seq_len=32"])
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "model.d_model" in proc.stderr
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == before


def test_gradient_accumulation_equals_one_big_batch():
    import jax

    from jaxllm import optim, parallel
    from jaxllm.data.resolve import resolve
    from jaxllm.state import init_state
    from jaxllm.train.step import make_train_step

    def one_step(accum):
        cfg = small()
        cfg.train.grad_accum = accum
        resolve(cfg)
        mesh = parallel.make_mesh(cfg, jax.devices()[:1])
        tx = optim.build_optimizer(cfg)
        model_def, state, _ = init_state(cfg, mesh, tx)
        rng = np.random.default_rng(0)
        toks = rng.integers(0, 256, (4, 33)).astype(np.int32)
        seg = np.ones((4, 32), np.int32)
        seg[1, 20:] = 2  # two documents in one row
        seg[3, 28:] = 0  # padding: uneven token counts across micro-batches
        batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg,
                 "positions": np.tile(np.arange(32, dtype=np.int32), (4, 1))}
        with parallel.activate(cfg, mesh):
            new, m = jax.jit(make_train_step(cfg, model_def, tx))(state, batch)
        return float(m["loss"]), float(m["grad_norm"]), jax.tree.leaves(new["params"])

    l1, g1, p1 = one_step(1)
    l2, g2, p2 = one_step(2)
    assert abs(l1 - l2) <= 1e-6 * abs(l1) and abs(g1 - g2) <= 1e-5 * g1
    for a, b in zip(p1, p2, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
