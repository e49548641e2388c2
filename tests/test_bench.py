"""Throughput benchmark (tools/bench.py), chunked cross-entropy, FLOPs share, device prefetch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import bench_report, isolate, optim, parallel
from jaxllm import benchmark as B
from jaxllm.config import ConfigError, defaults, tiny
from jaxllm.model.loss import chunk_size, forward_sums
from jaxllm.model.transformer import ModelDef, Transformer
from jaxllm.state import abstract_state
from jaxllm.train import metrics as M
from jaxllm.train.prefetch import DevicePrefetch
from jaxllm.train.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Faster CPU compiles for the subprocess; the numbers it times are not checked.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _bench(*args, cwd=ROOT):
    env = {**os.environ, "XLA_FLAGS": FAST_XLA, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), *args],
                          check=False, capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def gpt_params_by_hand(d, n_layers, vocab):
    """GPT block with biases, LayerNorm, GELU MLP (4d), tied embeddings, no position table:
    per layer 2 LayerNorms (4d), q/k/v/o (4d^2 + 4d), MLP (8d^2 + 5d); plus embedding and
    the final LayerNorm."""
    return vocab * d + n_layers * (12 * d * d + 13 * d) + 2 * d


def test_bench_tiny_writes_table_json_markdown(tmp_path):
    """`bench.py --tiny` runs the real train step and reports every column; MFU is null on
    CPU (unknown peak), peak memory is n/a, the attention share matches the hand formula."""
    out = tmp_path / "b"
    r = _bench("--tiny", "--seq_lens=32,64", "--pos=rope", f"--out={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    meta, rows = report["meta"], report["rows"]
    assert meta["platform"] == "cpu" and meta["peak_flops_per_device"] is None
    assert meta["steps"] == 3 and meta["warmup"] == 1 and meta["isolated"] is False
    assert [(x["seq_len"], x["pos_encoding"]) for x in rows] == [(32, "rope"), (64, "rope")]
    n = gpt_params_by_hand(64, 2, 256)
    for x in rows:
        assert x["status"] == "ok", x
        assert x["model"] == "tiny" and (x["d_model"], x["n_layers"], x["n_heads"]) == (64, 2, 4)
        assert x["params"] == x["params_no_pos"] == n
        t = x["seq_len"]
        fpt = 6 * n + 12 * 2 * 64 * t
        assert x["flops_per_token"] == fpt
        assert x["attention_flops_share"] == pytest.approx(12 * 2 * 64 * t / fpt, rel=1e-12)
        assert x["global_batch"] == 2 and x["tokens_per_step"] == 2 * t
        assert x["mfu"] is None and x["peak_memory_bytes"] is None
        assert x["compiled_memory_bytes"] > 0
        # the state is donated: params and both AdamW moments (float32) reuse their buffers
        assert x["donated_bytes"] >= 3 * 4 * n
        assert x["step_ms_min"] <= x["step_ms"] <= x["step_ms_max"]
        assert x["tokens_per_s"] == pytest.approx(2 * t / (x["step_ms"] / 1e3), rel=1e-9)
        assert x["tokens_per_s_per_device"] == x["tokens_per_s"]  # one CPU device
        assert abs(x["loss"] - np.log(256)) < 0.1  # uniform random tokens: loss ~ ln V
        assert x["attention_impl"] == "xla" and x["dtype"] == "bfloat16"
    assert rows[1]["attention_flops_share"] > rows[0]["attention_flops_share"]
    md = (out / "bench.md").read_text()
    header = ("| model | params | seq len | pos | attn | global batch | tokens/s/device | MFU "
              "| step ms | peak mem | XLA mem est | attn FLOPs |")
    assert header in md and md.count("\n| tiny |") == 2
    cells = [ln.split(" | ") for ln in md.splitlines() if ln.startswith("| tiny | 0.1M | 64 |")]
    assert len(cells) == 1 and cells[0][3:6] == ["rope", "xla", "2"]
    assert cells[0][7] == "n/a" and cells[0][9] == "n/a" and cells[0][11] == "12.3% |"
    assert header in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["--seq_lens=1k"], "error: --seq_lens: must be comma-separated integers, got 1k"),
    (["--steps=many"], "error: --steps=many: invalid literal for int()"),
    (["--config.model.nope=2"], "error: model.nope: unknown config key; keys under model:"),
    (["--config=/nonexistent.py"], "error: --config: cannot load /nonexistent.py (no such file)"),
    (["extra"], "error: unexpected positional argument(s) (extra)"),
    ([f"--config={ROOT}/configs/base.py", "--config.train.grad_accum=2", "--batch=3"],
     "error: --batch: 3 must be a multiple of mesh.data*mesh.fsdp x train.grad_accum (2)"),
])
def test_bench_bad_flags(args, msg):
    r = _bench("--tiny", *args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(msg)
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("kw,msg", [
    ({"sizes": ["2b"]}, "--sizes: unknown size '2b'; allowed: 124m, 350m, 760m, 1.3b, tiny or d"),
    ({"pos_list": ["sinusoidal"]}, "--pos: unknown 'sinusoidal'; allowed: rope, alibi, learned"),
    ({"backends": ["triton"]}, "--backends: unknown 'triton'; allowed: auto, xla, cudnn, flash"),
    ({"seq_lens": [1]}, "--seq_lens: 1 is too short"),
    ({"steps": 0}, r"--steps must be >= 1 and --warmup >= 0 \(got 0, 1\)"),
])
def test_bad_grid_is_refused_before_running(kw, msg):
    args = {"sizes": ["tiny"], "seq_lens": [32], "pos_list": ["rope"], "backends": ["xla"],
            "batch": 2, "steps": 1, "warmup": 1, **kw}
    with pytest.raises(ConfigError, match=msg):
        B.run(defaults(), **args)


def test_batch_sizing_and_sizes():
    assert B.batch_for(1024, 8, tokens_per_batch=16384 * 8) == 128
    assert B.batch_for(8192, 8, tokens_per_batch=16384 * 8) == 16
    assert B.batch_for(8192, 8, tokens_per_batch=16384) == 8  # at least one per shard
    assert B.batch_for(3000, 2, tokens_per_batch=10000) == 2  # 3 rounded down to 2
    assert B.batch_for(1024, 8, batch=12, tokens_per_batch=10**6) == 12
    assert B.parse_size("1.3B") == (2048, 24, 16) and B.parse_size("d512l8h8") == (512, 8, 8)
    with pytest.raises(ConfigError, match="--sizes: unknown size 'x'"):
        B.parse_size("x")
    cfg = B.bench_config(defaults(), "350m", 2048, "learned", "xla", 8)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (1024, 24, 16)
    assert cfg.model.max_position == 2048 and cfg.model.vocab_size == 50304
    assert cfg.train.batch_size == 8 and cfg.model.attention_backend == "xla"


def test_attention_flops_share_by_hand():
    """GPT-2 124M at T=1024: N = 50304*768 + 12*(12*768^2 + 13*768) + 2*768 (no position
    table); the share is 12*L*d*T / (6N + 12*L*d*T), and the parameter count of the real
    model (learned positions excluded) equals the hand count; with the 1024x768 position
    table it is nanoGPT's 124,475,904."""
    cfg = B.bench_config(defaults(), "124m", 1024, "learned", "xla", 8)
    mesh = parallel.make_mesh(cfg, jax.devices()[:1])
    _, tree, _ = abstract_state(cfg, mesh, optim.build_optimizer(cfg))
    n = 50304 * 768 + 12 * (12 * 768 * 768 + 13 * 768) + 2 * 768
    assert n == gpt_params_by_hand(768, 12, 50304) == 123_689_472
    assert M.param_count(tree["params"], exclude_positions=True) == n
    assert M.param_count(tree["params"]) == n + 1024 * 768 == 124_475_904  # nanoGPT's count
    attn = 12 * 12 * 768 * 1024
    assert attn == 113_246_208
    share = M.attention_flops_share(n, 12, 768, 1024)
    assert share == pytest.approx(attn / (6 * n + attn), rel=1e-12)
    assert share == pytest.approx(0.132392, abs=1e-6)
    # 8x the length: the share grows as MosaicML's table shows for small models
    assert M.attention_flops_share(n, 12, 768, 8192) == pytest.approx(
        8 * attn / (6 * n + 8 * attn), rel=1e-12)


def test_chunk_size():
    assert [chunk_size(64, c) for c in (0, 16, 24, 64, 100, 1)] == [64, 16, 16, 64, 64, 1]
    assert chunk_size(1000, 384) == 250 and chunk_size(97, 10) == 1


def test_chunked_cross_entropy_equals_unchunked_and_saves_memory():
    """Loss and gradients (with z-loss) agree within float32 tolerance, and the chunked
    backward pass never holds the [B, T, V] float32 logits: XLA's temporary memory for it
    is below the size of those logits, while the unchunked one's is above."""
    cfg = tiny()
    cfg.model.update(d_model=16, n_layers=1, n_heads=2, vocab_size=4096, dtype="float32")
    b, t, v = 2, 128, 4096
    cfg.data.seq_len = t
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    md, params = ModelDef(graphdef, cfg), nnx.to_pure_dict(params)
    rng = np.random.default_rng(0)
    seg = np.ones((b, t), np.int32)
    seg[1, 100:] = 0  # padding: excluded by the weights
    batch = {"inputs": jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
             "segment_ids": jnp.asarray(seg),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}

    def loss(p, chunk):
        nll, z, _, w = forward_sums(md, p, batch, chunk)
        return (nll + 1e-2 * z) / w.sum()

    out, temp = {}, {}
    for chunk in (0, 16):
        f = jax.jit(jax.value_and_grad(lambda p, c=chunk: loss(p, c)))
        compiled = f.lower(params).compile()
        temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
        out[chunk] = compiled(params)
    (l0, g0), (l1, g1) = out[0], out[16]
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-7)
    logits_bytes = b * t * v * 4
    assert temp[16] < logits_bytes < temp[0], (temp, logits_bytes)


def _host_iter(n=50):
    ds = grain.MapDataset.range(n).map(lambda i: {"x": np.full((2, 3), i, np.int32)})
    return iter(ds.to_iter_dataset())


def test_device_prefetch_order_lookahead_and_checkpoint_state(tmp_path):
    puts = []

    def put(local):
        puts.append(int(local["x"][0, 0]))
        return {k: jnp.asarray(x) for k, x in local.items()}

    it = DevicePrefetch(_host_iter(), put, size=1)
    got = [int(next(it)["x"][0, 0]) for _ in range(3)]
    assert got == [0, 1, 2] and puts == [0, 1, 2, 3]  # batch 3 already on device
    assert isinstance(next(iter([it])), grain.DatasetIterator)
    # checkpoint through grain's Orbax handler: the saved state is "after batch 2"
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(tmp_path, args=grain.checkpoint.CheckpointSave(it))
    fresh = DevicePrefetch(_host_iter(), put, size=2)
    handler.restore(tmp_path, args=grain.checkpoint.CheckpointRestore(fresh))
    assert [int(next(fresh)["x"][0, 0]) for _ in range(3)] == [3, 4, 5]
    plain = _host_iter()
    plain.set_state(it.get_state())
    assert int(next(plain)["x"][0, 0]) == 3
    # set_state drops what was queued ahead; size 0 transfers on demand only
    it.set_state(fresh.get_state())
    assert int(next(it)["x"][0, 0]) == 6
    puts.clear()
    lazy = DevicePrefetch(_host_iter(4), put, size=0)
    assert [int(b["x"][0, 0]) for b in lazy] == [0, 1, 2, 3] and puts == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="prefetch size must be >= 0"):
        DevicePrefetch(_host_iter(), put, size=-1)


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


@pytest.mark.parametrize("remat,policies", [
    ("none", ["None"]),  # only the chunked loss's checkpoint
    ("dots_no_batch", ["DotsSaveable(only_if_no_batch_dims=True)", "None"]),
])
def test_train_step_remat_policy_and_bf16_matmuls(remat, policies):
    """The traced train step checkpoints the scanned block with the configured policy, and
    with model.dtype=bfloat16 no matmul runs with two float32 operands."""
    cfg = B.bench_config(defaults(), "tiny", 32, "rope", "xla", 2, 256)
    cfg.model.remat = remat
    mesh = parallel.make_mesh(cfg, jax.devices()[:1])
    tx = optim.build_optimizer(cfg)
    model_def, tree, _ = abstract_state(cfg, mesh, tx)
    batch = {k: jax.ShapeDtypeStruct((2, 32), jnp.int32)
             for k in ("inputs", "targets", "segment_ids", "positions")}
    with parallel.activate(cfg, mesh):
        jaxpr = jax.make_jaxpr(make_train_step(cfg, model_def, tx))(tree, batch)
    eqns = list(_eqns(jaxpr.jaxpr))
    found = sorted(str(e.params["policy"]) for e in eqns if e.primitive.name == "remat2")
    assert found == policies
    dots = [tuple(str(v.aval.dtype) for v in e.invars) for e in eqns
            if e.primitive.name == "dot_general"]
    assert dots.count(("bfloat16", "bfloat16")) >= 10
    assert ("float32", "float32") not in dots


def test_failed_configurations_become_rows(monkeypatch):
    """Out of memory and other runtime failures are rows with a status, in-process and in
    an isolated subprocess; the static columns (parameters, attention share) stay filled."""
    cfg = B.bench_config(defaults(), "tiny", 32, "alibi", "xla", 2, 256)

    def oom(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.1G")
    monkeypatch.setattr(B, "measure", oom)
    row = B.measure_safely(cfg, 1, 0, "tiny")
    assert row["status"] == "oom" and row["error"].startswith("RuntimeError: RESOURCE_EXH")
    assert row["params"] == gpt_params_by_hand(64, 2, 256) and row["seq_len"] == 32
    md = bench_report.markdown({"meta": {"devices": 1, "device_kind": "cpu", "platform": "cpu",
                              "jax": "x", "steps": 1, "warmup": 0, "date": "d",
                              "mfu_formula": "f"}, "rows": [row]})
    assert "| tiny | 0.1M | 32 | alibi | xla | 2 | oom: RuntimeError: RESOURCE_EXH" in md
    assert md.rstrip().endswith("|  |  |  |  | 6.6% |")
    bad = B.bench_config(defaults(), "tiny", 32, "rope", "xla", 3, 256)
    bad.train.grad_accum = 2  # 3 sequences cannot split into 2 micro-batches: child fails
    row = B.measure_safely(bad, 1, 0, "tiny", isolate=True)
    assert row["status"] == "error" and "train.batch_size: 3 must be divisible" in row["error"]


def test_resume_through_device_prefetch_matches_uninterrupted(tmp_path):
    """The loop prefetches the next batch to the device; a checkpoint still records the data
    position of the last batch trained on, so stop + resume gives the same losses."""
    from tests.fixtures import tiny_model_cfg

    from jaxllm.train.loop import train

    def cfg(steps):
        c = tiny_model_cfg()
        c.model.vocab_size = 0
        c.optim.schedule = "constant"  # the lr must not depend on train.steps here
        c.train.update(steps=steps, log_every=1, eval_every=0)
        c.checkpoint.every = 0
        return c

    def losses(wd):
        rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}

    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg(8), str(a))
    train(cfg(4), str(b))
    train(cfg(8), str(b))
    la, lb = losses(a), losses(b)
    assert sorted(lb) == list(range(1, 9))
    assert [la[s] for s in range(1, 9)] == [lb[s] for s in range(1, 9)]


def test_parent_leaves_device_memory_to_isolated_children(monkeypatch):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    monkeypatch.setattr(isolate, "_parent_env", {})
    isolate.keep_parent_light()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    env = isolate.child_env()
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    assert ROOT in env["PYTHONPATH"].split(os.pathsep)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE")
    monkeypatch.setattr(isolate, "_parent_env", {})
    isolate.keep_parent_light()
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in isolate.child_env()
