"""Throughput benchmark (tools/bench.py, jaxllm/benchmark.py): rows, tables, FLOPs share,
failures as rows, subprocess isolation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxllm import bench_report, isolate, optim, parallel
from jaxllm import benchmark as B
from jaxllm.config import ConfigError, defaults
from jaxllm.state import abstract_state
from jaxllm.train import metrics as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Faster CPU compiles for the subprocess; the numbers it times are not checked.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _bench(*args, cwd=ROOT):
    env = {**os.environ, "XLA_FLAGS": FAST_XLA, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), *args],
                          check=False, capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def _table(md: str) -> list[dict]:
    """The rows of the markdown table in `md` as {column: cell}; every row has one cell per
    column of the header."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == list(bench_report.COLUMNS) and set(lines[1]) <= set("|-")
    out = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip().removeprefix("|").removesuffix("|").split(" | ")]
        assert len(cells) == len(head), ln
        out.append(dict(zip(head, cells, strict=True)))
    return out


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
    table = _table((out / "bench.md").read_text())
    assert len(table) == len(rows)  # one table row per configuration, same values
    for x, cell in zip(rows, table, strict=True):
        assert (cell["seq len"], cell["pos"], cell["attn"], cell["global batch"]) == (
            str(x["seq_len"]), x["pos_encoding"], x["attention_impl"], str(x["global_batch"]))
        assert cell["MFU"] == "n/a" and cell["peak mem"] == "n/a"  # unknown on CPU
        assert cell["attn FLOPs"] == f"{100 * x['attention_flops_share']:.1f}%"
        assert float(cell["tokens/s/device"].replace(",", "")) == pytest.approx(
            x["tokens_per_s_per_device"], abs=0.5)
    assert _table(r.stdout[r.stdout.index("| model |"):]) == table  # printed as well


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
    (cell,) = _table(md)
    assert (cell["seq len"], cell["pos"], cell["attn"]) == ("32", "alibi", "xla")
    assert cell["tokens/s/device"].startswith("oom: RuntimeError: RESOURCE_EXH")
    assert all(cell[c] == "" for c in ("MFU", "step ms", "peak mem", "XLA mem est"))
    assert cell["attn FLOPs"] == f"{100 * row['attention_flops_share']:.1f}%"  # static
    bad = B.bench_config(defaults(), "tiny", 32, "rope", "xla", 3, 256)
    bad.train.grad_accum = 2  # 3 sequences cannot split into 2 micro-batches: child fails
    row = B.measure_safely(bad, 1, 0, "tiny", isolate=True)
    assert row["status"] == "error" and "train.batch_size: 3 must be divisible" in row["error"]


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


def test_vs_torch_smoke_tiny(tmp_path):
    """`bench.py --vs_torch --tiny`: eager PyTorch (nanoGPT's architecture) and jaxllm train
    the same tiny shape in interleaved worker processes; both rows are complete, the two
    models have the same parameter count (same architecture), and both start at ~ln(vocab)
    on uniform random tokens. No timing is checked."""
    pytest.importorskip("torch")
    out = tmp_path / "vt"
    r = _bench("--vs_torch", "--tiny", "--notorch_compile", "--steps=2", "--rounds=2",
               "--warmup=1", f"--out={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "vs_torch.json").read_text())
    rows = report["rows"]
    assert [x["impl"] for x in rows] == ["torch_eager", "jaxllm"]
    assert report["meta"]["rounds"] == 2 and report["meta"]["steps_per_round"] == 1
    for x in rows:
        assert x["status"] == "ok", x
        assert x["steps"] == 2 and x["step_ms_min"] <= x["step_ms"] <= x["step_ms_max"]
        assert x["tokens_per_step"] == 2 * 16
        assert abs(x["loss"] - np.log(64)) < 0.2  # uniform random tokens, ~4 steps in
    assert rows[0]["params"] == rows[1]["params"]
    assert rows[0]["vs_eager"] == 1.0
    assert rows[1]["vs_eager"] == pytest.approx(rows[0]["step_ms"] / rows[1]["step_ms"])
    md = (out / "vs_torch.md").read_text()
    assert "| d32 L2 T16 | " in md and "| jaxllm (jax.jit) |" in md and md in r.stdout + "\n"


def test_vs_torch_without_torch_reports_rows_not_a_crash(tmp_path, monkeypatch):
    """Where torch cannot be imported, its rows say so (status `unavailable`, the import
    error) and jaxllm's row is still measured; bad --rounds is a flag error (exit 2)."""
    from jaxllm import vs_torch as V
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    monkeypatch.setenv("PYTHONPATH", f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("XLA_FLAGS", FAST_XLA)
    report = V.compare(defaults(), V.TINY_SHAPES, V.IMPLS, rounds=1, steps_per_round=1,
                       warmup=0, echo=lambda s: None)
    rows = {x["impl"]: x for x in report["rows"]}
    for impl in ("torch_eager", "torch_compile"):
        assert rows[impl]["status"] == "unavailable"
        assert rows[impl]["error"] == "ImportError: torch is not installed here"
    assert rows["jaxllm"]["status"] == "ok" and rows["jaxllm"]["vs_eager"] is None
    assert "| unavailable: ImportError: torch is not installed here |" in V.markdown(report)
    r = _bench("--vs_torch", "--tiny", "--rounds=0")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "error: --steps and --rounds must be >= 1")
