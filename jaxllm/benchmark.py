"""Training-throughput benchmark: model size x sequence length x position encoding x backend.

Each configuration runs the real train step (`state.init_state` +
`train.step.jit_train_step`, the construction `train.loop` uses: explicit shardings, donated
state) on one synthetic token batch, and reports medians over timed steps after warm-up:
tokens/s per device, MFU (`train.metrics`, the one formula 6N + 12·L·d·T of PaLM and
llm-foundry), step time, peak device memory (`device.memory_stats()`, null where the
platform has none, e.g. CPU), XLA's compiled-memory estimate, and the attention share of the
FLOPs. The table has the shape of MosaicML's llm-foundry throughput table. Each
configuration can run in a fresh subprocess (`isolate`), so peak memory is per
configuration and an out-of-memory configuration is a row, not a crash.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from jaxllm import optim, parallel
from jaxllm.bench_report import format_row, markdown, write_report
from jaxllm.isolate import emit_row, run_row
from jaxllm.config import ConfigError, validate
from jaxllm.model.positions import POS_ENCODINGS
from jaxllm.kernels import BACKENDS, resolve_backend
from jaxllm.train import metrics as M
from jaxllm.model.transformer import abstract_model
from jaxllm.state import init_state
from jaxllm.train.step import jit_train_step

# GPT-3 / MosaicML shapes: name -> (d_model, n_layers, n_heads).
SIZES = {"124m": (768, 12, 12), "350m": (1024, 24, 16), "760m": (1536, 24, 16),
         "1.3b": (2048, 24, 16), "tiny": (64, 2, 4)}
GPT2_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64 (nanoGPT)
TINY = {"sizes": ["tiny"], "seq_lens": [64, 128], "pos": ["rope", "alibi"], "batch": 2,
        "steps": 3, "warmup": 1, "vocab": 256}



def parse_size(name: str) -> tuple[int, int, int]:
    """`124m`, `350m`, `760m`, `1.3b`, `tiny`, or a custom `d<d_model>l<layers>h<heads>`."""
    key = name.strip().lower()
    if key in SIZES:
        return SIZES[key]
    m = re.fullmatch(r"d(\d+)l(\d+)h(\d+)", key)
    if not m:
        raise ConfigError(f"--sizes: unknown size {name!r}; allowed: {', '.join(SIZES)} "
                          "or d<d_model>l<layers>h<heads> (e.g. d512l8h8)")
    return tuple(int(g) for g in m.groups())


def batch_for(seq_len: int, data_shards: int, batch: int = 0, tokens_per_batch: int = 0) -> int:
    """Global batch in sequences: `batch`, else `tokens_per_batch // seq_len` rounded down to
    a multiple of the data-parallel shards (at least one sequence per shard)."""
    if batch:
        return batch
    b = max(tokens_per_batch // seq_len, 1)
    return max(b // data_shards, 1) * data_shards


def bench_config(base, size: str, seq_len: int, pos: str, backend: str, batch: int,
                 vocab: int = GPT2_VOCAB):
    """`base` with the size, sequence length, position encoding, backend and batch set."""
    d, n_layers, n_heads = parse_size(size)
    cfg = copy.deepcopy(base)
    cfg.model.update(d_model=d, n_layers=n_layers, n_heads=n_heads, pos_encoding=pos,
                     attention_backend=backend)
    if pos == "learned":
        cfg.model.max_position = max(cfg.model.max_position, seq_len)
    if not cfg.model.vocab_size:
        cfg.model.vocab_size = vocab
    cfg.data.seq_len = seq_len
    cfg.train.batch_size = batch
    return validate(cfg)


def synthetic_batch(cfg, batch: int, seed: int = 0) -> dict:
    """This process's slice of a batch of uniform random tokens: one document per row."""
    n = batch // jax.process_count()
    t = cfg.data.seq_len
    rng = np.random.default_rng(seed + jax.process_index())
    toks = rng.integers(0, cfg.model.vocab_size, (n, t + 1), dtype=np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
            "segment_ids": np.ones((n, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy()}


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on the first local device since process start (None if unknown)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def compiled_memory_bytes(compiled) -> int | None:
    """XLA's per-device estimate: arguments + outputs - donated aliases + temporaries."""
    try:
        ma = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if ma is None:
        return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
               + ma.temp_size_in_bytes)


def donated_bytes(compiled) -> int | None:
    """Bytes of the arguments whose buffers the outputs reuse (the donated train state)."""
    try:
        return int(compiled.memory_analysis().alias_size_in_bytes)
    except (NotImplementedError, RuntimeError, AttributeError):
        return None


def describe(cfg, name: str = "") -> dict:
    """The static half of a row: shapes, parameter count, FLOPs per token, attention share."""
    m = cfg.model
    row = {"model": name or f"d{m.d_model}l{m.n_layers}h{m.n_heads}", "d_model": m.d_model,
           "n_layers": m.n_layers, "n_heads": m.n_heads, "vocab_size": m.vocab_size,
           "seq_len": cfg.data.seq_len, "pos_encoding": m.pos_encoding,
           "attention_backend": m.attention_backend,
           "attention_impl": resolve_backend(m.attention_backend,
                                             alibi=m.pos_encoding == "alibi", dtype=m.dtype),
           "dtype": m.dtype, "remat": m.remat, "global_batch": cfg.train.batch_size,
           "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len}
    params = nnx.to_pure_dict(abstract_model(cfg)[1])  # shapes only, nothing allocated
    n_no_pos = M.param_count(params, exclude_positions=True)
    args = (n_no_pos, m.n_layers, m.d_model, cfg.data.seq_len)
    row.update(params=M.param_count(params), params_no_pos=n_no_pos,
               flops_per_token=M.flops_per_token(*args),
               attention_flops_share=M.attention_flops_share(*args))
    return row


def compile_train_step(cfg):
    """The real train step compiled for `cfg`, its fresh state and a synthetic batch:
    (compiled, state, batch, mesh, compile seconds). Call the step under
    `parallel.activate(cfg, mesh)`."""
    mesh = parallel.make_mesh(cfg)
    tx = optim.build_optimizer(cfg, guard_nonfinite=False)  # the step guards
    model_def, state, shardings = init_state(cfg, mesh, tx)
    batch = parallel.global_batch(synthetic_batch(cfg, cfg.train.batch_size), mesh)
    with parallel.activate(cfg, mesh):
        t0 = time.perf_counter()
        compiled = jit_train_step(cfg, model_def, tx, shardings, mesh).lower(
            state, batch).compile()
    return compiled, state, batch, mesh, time.perf_counter() - t0


def measure(cfg, steps: int, warmup: int, name: str = "") -> dict:
    """Time the real train step on a synthetic batch; a row of the table (status `ok`)."""
    row = describe(cfg, name)
    fpt = row["flops_per_token"]
    compiled, state, batch, mesh, row["compile_s"] = compile_train_step(cfg)
    with parallel.activate(cfg, mesh):
        row["compiled_memory_bytes"] = compiled_memory_bytes(compiled)
        row["donated_bytes"] = donated_bytes(compiled)
        for _ in range(warmup):
            state, m = compiled(state, batch)
        jax.block_until_ready(state)
        # As in the loop: the next step is queued before the previous one is read, so a
        # step's time is the interval between completions (no dispatch gap in it).
        t_prev = time.perf_counter()
        state, m = compiled(state, batch)
        times, pending = [], m
        for i in range(steps):
            if i + 1 < steps:
                state, m = compiled(state, batch)
            jax.block_until_ready(pending)
            t = time.perf_counter()
            times.append(t - t_prev)
            t_prev, pending = t, m
    step_s = statistics.median(times)
    n_dev = jax.device_count()
    tps = row["tokens_per_step"] / step_s
    row.update(status="ok", steps=steps, warmup=warmup, step_ms=step_s * 1e3,
               step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
               tokens_per_s=tps, tokens_per_s_per_device=tps / n_dev,
               mfu=M.mfu(tps / n_dev, fpt, M.peak_flops()),
               peak_memory_bytes=peak_memory_bytes(), loss=float(jax.device_get(m["loss"])))
    return row


def _failure(cfg, name: str, err: str) -> dict:
    """A row for a configuration that did not run: out of memory, backend unavailable, ..."""
    row = describe(cfg, name)
    status = "oom" if "RESOURCE_EXHAUSTED" in err or "out of memory" in err.lower() else "error"
    return {**row, "status": status, "error": err.strip().splitlines()[0][:300] if err else ""}


def measure_safely(cfg, steps: int, warmup: int, name: str = "", isolate: bool = False):
    """`measure` in this process (errors become rows) or in a fresh subprocess."""
    if not isolate:
        try:
            return measure(cfg, steps, warmup, name)
        except (ImportError, NotImplementedError, ValueError, RuntimeError) as e:
            return _failure(cfg, name, f"{type(e).__name__}: {e}")
        finally:
            jax.clear_caches()
    spec = json.dumps({"config": cfg.to_dict(), "steps": steps, "warmup": warmup,
                       "name": name})
    row, err = run_row("jaxllm.benchmark", spec)
    return row if row is not None else _failure(cfg, name, err)


def grid(base, sizes, seq_lens, pos_list, backends, batch=0, tokens_per_batch=0,
         vocab=GPT2_VOCAB) -> list:
    """The (name, cfg) configurations of the grid, checked before anything runs."""
    for p in pos_list:
        if p not in POS_ENCODINGS:
            raise ConfigError(f"--pos: unknown {p!r}; allowed: {', '.join(POS_ENCODINGS)}")
    for b in backends:
        if b not in BACKENDS:
            raise ConfigError(f"--backends: unknown {b!r}; allowed: {', '.join(BACKENDS)}")
    for t in seq_lens:
        if t < 2:
            raise ConfigError(f"--seq_lens: {t} is too short (at least 2 tokens)")
    for s in sizes:
        parse_size(s)
    shards = parallel.mesh_shape(base, jax.device_count())
    shards = shards[0] * shards[1] * base.train.grad_accum
    out = []
    for size in sizes:
        for t in seq_lens:
            for p in pos_list:
                for b in backends:
                    nb = batch_for(t, shards, batch, tokens_per_batch)
                    if nb % shards:
                        raise ConfigError(
                            f"--batch: {nb} must be a multiple of mesh.data*mesh.fsdp x "
                            f"train.grad_accum ({shards}) on {jax.device_count()} devices")
                    out.append((size, bench_config(base, size, t, p, b, nb, vocab)))
    return out


def run(base, sizes, seq_lens, pos_list, backends, *, batch=0, tokens_per_batch=0, steps=10,
        warmup=3, vocab=GPT2_VOCAB, isolate=None, out_dir="", echo=print) -> dict:
    """Run the grid; write DIR/bench.json and DIR/bench.md when `out_dir`; return the report."""
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    if batch < 0 or tokens_per_batch < 0:
        raise ConfigError("--batch and --tokens_per_batch must be >= 0")
    if not batch and not tokens_per_batch:
        tokens_per_batch = 16384 * jax.device_count()  # nanoGPT: 16 x 1024 per device
    configs = grid(base, sizes, seq_lens, pos_list, backends, batch, tokens_per_batch, vocab)
    if isolate is None:  # per-config peak memory and OOM rows where it matters
        isolate = jax.default_backend() != "cpu" and jax.process_count() == 1
    rows = []
    for name, cfg in configs:
        row = measure_safely(cfg, steps, warmup, name, isolate)
        rows.append(row)
        echo(format_row(row))
    dev = jax.devices()[0]
    report = {"meta": {"device_kind": dev.device_kind, "platform": dev.platform,
                       "devices": jax.device_count(), "processes": jax.process_count(),
                       "jax": jax.__version__, "peak_flops_per_device": M.peak_flops(),
                       "steps": steps, "warmup": warmup, "isolated": isolate,
                       "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                       "mfu_formula": "6*N + 12*L*d_model*T per token (N without position "
                                      "tables); attention share = 12*L*d*T / that"},
              "rows": rows}
    if out_dir:
        write_report(report, markdown(report), out_dir, "bench")
    return report


def _child(spec_json: str) -> None:
    """Subprocess entry of `measure_safely(isolate=True)`: one row as a JSON line."""
    spec = json.loads(spec_json)
    cfg = ConfigDict(spec["config"])
    row = measure(cfg, spec["steps"], spec["warmup"], spec["name"])
    emit_row(row)


if __name__ == "__main__":
    _child(sys.argv[1])
