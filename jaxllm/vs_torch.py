"""CPU training speed of jaxllm against nanoGPT's architecture in PyTorch, side by side.

For each shape, one worker process per implementation (jaxllm's real train step; eager
PyTorch, `jaxllm.torch_gpt`; `torch.compile` of the same model where a compiler toolchain
works) builds and warms up its step, then the workers take turns: each round every worker
runs `steps_per_round` timed steps while the others wait idle (A B C A B C ...), so
machine load changes hit all implementations alike. Rows are median step times; the
ratio is eager PyTorch's median step time over each implementation's (above 1 = faster).

jaxllm runs the GPT-2 equivalent of nanoGPT (learned positions, GELU tanh, LayerNorm
with bias, tied embeddings, float32, AdamW with clipping at 1.0) on the JAX CPU backend,
with every other key from the given base config (so `--config.model.KEY=...` overrides
reach it). Workers that fail (no torch, no C++ compiler for `torch.compile`) become rows
with status `unavailable` and the reason.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from ml_collections import ConfigDict

from jaxllm.bench_report import write_report
from jaxllm.config import validate
from jaxllm.isolate import child_env
from jaxllm.torch_gpt import make_trainer

# (name, d_model, n_layers, n_heads, seq_len, batch, vocab)
SHAPES = (("d256 L4 T256", 256, 4, 4, 256, 16, 384),
          ("d128 L4 T64", 128, 4, 4, 64, 16, 384),
          ("d384 L6 T256", 384, 6, 6, 256, 16, 384))
TINY_SHAPES = (("d32 L2 T16", 32, 2, 4, 16, 2, 64),)
IMPLS = ("torch_eager", "torch_compile", "jaxllm")
LABELS = {"torch_eager": "PyTorch eager (nanoGPT architecture)",
          "torch_compile": "PyTorch torch.compile", "jaxllm": "jaxllm (jax.jit)"}


def jax_config(base, shape):
    """`base` set to nanoGPT's architecture at `shape` (float32, XLA attention on CPU)."""
    _, d, n_layers, n_heads, seq_len, batch, vocab = shape
    cfg = copy.deepcopy(base)
    cfg.model.update(d_model=d, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab,
                     pos_encoding="learned", max_position=seq_len, activation="gelu",
                     norm="layernorm", use_bias=True, tie_embeddings=True, dtype="float32",
                     param_dtype="float32")
    cfg.optim.update(name="adamw", clip=1.0)
    cfg.data.seq_len = seq_len
    cfg.train.update(batch_size=batch, grad_accum=1)
    return validate(cfg)


def _tokens(shape, seed: int = 0):
    _, _, _, _, t, b, vocab = shape
    toks = np.random.default_rng(seed).integers(0, vocab, (b, t + 1), dtype=np.int32)
    return toks[:, :-1].copy(), toks[:, 1:].copy()


def _jax_step(spec):
    """(step() -> loss, params, compile seconds) for jaxllm's real train step."""
    import jax  # JAX only in this worker: the PyTorch workers never load XLA

    from jaxllm import benchmark as B
    from jaxllm import parallel
    from jaxllm.train import metrics as M
    cfg = ConfigDict(spec["config"])
    compiled, state, batch, mesh, compile_s = B.compile_train_step(cfg)
    box = {"state": state}

    def step():
        with parallel.activate(cfg, mesh):
            box["state"], m = compiled(box["state"], batch)
        return float(m["loss"])  # waits for the step
    return step, M.param_count(jax.device_get(state["params"])), compile_s


def _torch_step(spec):
    _, d, n_layers, n_heads, seq_len, _, vocab = spec["shape"]
    x, y = _tokens(spec["shape"])
    train, n_params = make_trainer(vocab, seq_len, d, n_layers, n_heads,
                                   compile=spec["impl"] == "torch_compile")
    t0 = time.perf_counter()
    train(x, y)  # torch.compile compiles here
    return (lambda: train(x, y)), n_params, time.perf_counter() - t0


def worker(spec_json: str) -> None:
    """Subprocess: build and warm up one implementation, then run timed steps on request
    (`run N` on stdin -> one `VS {"times": [...], "loss": ...}` line); `quit` ends it."""
    spec = json.loads(spec_json)
    try:
        step, n_params, compile_s = (_jax_step if spec["impl"] == "jaxllm"
                                     else _torch_step)(spec)
        for _ in range(spec["warmup"]):
            step()
    except Exception as e:  # noqa: BLE001 - any failure is the row's reason
        msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:200]
        print("VS " + json.dumps({"error": msg}), flush=True)
        return
    print("VS " + json.dumps({"ready": True, "params": n_params, "compile_s": compile_s}),
          flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            return
        times, loss = [], None
        for _ in range(int(cmd[1])):
            t = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t)
        print("VS " + json.dumps({"times": times, "loss": loss}), flush=True)


class _Worker:
    def __init__(self, spec: dict, env: dict):
        self.impl, self.times, self.info = spec["impl"], [], {}
        self.stderr = tempfile.TemporaryFile("w+")  # a pipe could fill up and block it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxllm.vs_torch", json.dumps(spec)], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        self.info = self._read()  # waits until built and warmed up (compiles one at a time)

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("VS "):
                return json.loads(line[3:])
        self.stderr.seek(0)
        err = [ln for ln in self.stderr.read().splitlines() if ln.strip()]
        return {"error": err[-1][:200] if err else f"exit status {self.proc.wait()}"}

    def run(self, n: int) -> None:
        if "error" in self.info:
            return
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        out = self._read()
        self.times += out.get("times", [])
        self.info.update({k: v for k, v in out.items() if k != "times"})

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc.stdout.close()
        self.stderr.close()


def compare(base, shapes=SHAPES, impls=IMPLS, *, rounds: int = 5, steps_per_round: int = 2,
            warmup: int = 2, out_dir: str = "", echo=print) -> dict:
    """Run every implementation at every shape, interleaved; return (and write) the report."""
    env = {**child_env(), "JAX_PLATFORMS": "cpu"}
    load0 = os.getloadavg()
    rows = []
    for shape in shapes:
        specs = [{"impl": i, "shape": list(shape), "warmup": warmup,
                  "config": jax_config(base, shape).to_dict() if i == "jaxllm" else None}
                 for i in impls]
        workers = []
        try:
            for spec in specs:
                workers.append(_Worker(spec, env))
            for _ in range(rounds):
                for w in workers:
                    w.run(steps_per_round)
        finally:
            for w in workers:
                w.close()
        rows += _rows(shape, workers)
        for r in rows[-len(workers):]:
            echo(format_row(r))
    report = {"meta": {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                       "rounds": rounds, "steps_per_round": steps_per_round, "warmup": warmup,
                       "cpus": os.cpu_count(), "loadavg_start": load0,
                       "loadavg_end": os.getloadavg(), "versions": _versions(env)},
              "rows": rows}
    if out_dir:
        write_report(report, markdown(report), out_dir, "vs_torch")
    return report


def _rows(shape, workers) -> list[dict]:
    name, d, n_layers, n_heads, seq_len, batch, vocab = shape
    head = {"shape": name, "d_model": d, "n_layers": n_layers, "n_heads": n_heads,
            "seq_len": seq_len, "batch": batch, "vocab": vocab, "tokens_per_step": batch * seq_len}
    rows = []
    for w in workers:
        row = {**head, "impl": w.impl}
        if "error" in w.info or not w.times:
            row.update(status="unavailable", error=w.info.get("error", "no steps timed"))
        else:
            med = statistics.median(w.times)
            row.update(status="ok", params=w.info["params"], compile_s=w.info["compile_s"],
                       steps=len(w.times), step_ms=med * 1e3, step_ms_min=min(w.times) * 1e3,
                       step_ms_max=max(w.times) * 1e3, tokens_per_s=batch * seq_len / med,
                       loss=w.info.get("loss"))
        rows.append(row)
    ref = next((r for r in rows if r["impl"] == "torch_eager" and r["status"] == "ok"), None)
    for r in rows:
        r["vs_eager"] = (ref["step_ms"] / r["step_ms"]
                         if ref and r["status"] == "ok" else None)
    return rows


def _versions(env) -> dict:
    code = ("import json, importlib.metadata as m\nout = {}\nfor p in ('jax', 'jaxlib', 'torch'):"
            "\n    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = None"
            "\nprint(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


COLUMNS = ("shape", "params", "tokens/step", "implementation", "step ms (median)", "tokens/s",
           "vs PyTorch eager")


def _cells(r: dict) -> list[str]:
    head = [r["shape"], f"{r['params'] / 1e6:.2f}M" if "params" in r else "",
            str(r["tokens_per_step"]), LABELS[r["impl"]]]
    if r["status"] != "ok":
        return head + [f"unavailable: {r['error']}"[:80], "", ""]
    ratio = "" if r["vs_eager"] is None else f"{r['vs_eager']:.2f}x"
    return head + [f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:,.0f}", ratio]


def format_row(r: dict) -> str:
    return "  ".join(f"{c}={v}" for c, v in zip(COLUMNS, _cells(r), strict=True) if v)


def markdown(report: dict) -> str:
    meta = report["meta"]
    v = meta.get("versions", {})
    head = (f"CPU training step, {meta['cpus']} CPUs, jax {v.get('jax')}, torch {v.get('torch')}, "
            f"{meta['date']}; medians of {meta['rounds']} interleaved rounds x "
            f"{meta['steps_per_round']} steps after {meta['warmup']} warm-up steps; load "
            f"average {meta['loadavg_start'][0]:.1f} at start, {meta['loadavg_end'][0]:.1f} at "
            "end. Same shapes, float32, AdamW with clipping at 1.0, uniform random tokens.")
    lines = [head, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    worker(sys.argv[1])
