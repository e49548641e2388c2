"""The tests' shared helpers, one module: tiny configs (three presets, one builder),
subprocess runners (the CLIs, the tools, Python snippets on N fake CPU devices), readers of
metrics.jsonl, small corpora, a trained tiny run and an independent numpy forward pass."""

from __future__ import annotations

import functools
import importlib
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np

from jaxllm.config import defaults, set_key, tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One persistent compilation cache for every subprocess of the session (tiny programs; the
# cache only skips recompiling identical HLO, it does not change results).
JIT_CACHE = os.path.join(tempfile.gettempdir(), f"jaxllm-test-jit-cache-{os.getuid()}")

TINY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "data.seq_len": 32,
        "train.batch_size": 4, "train.log_every": 1, "train.eval_every": 4,
        "train.eval_batches": 1, "train.sample_tokens": 0, "optim.warmup_steps": 2,
        "log.progress": False, "log.tensorboard": False, "data.prefetch": 0}

MODEL_TINY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4,
              "model.vocab_size": 384, "model.dtype": "float32", "model.init_std": 0.02,
              "data.seq_len": 32, "train.steps": 20, "train.batch_size": 4,
              "train.log_every": 5, "train.eval_every": 0, "train.eval_batches": 1,
              "train.sample_tokens": 0, "optim.lr": 3e-3, "optim.warmup_steps": 5,
              "log.tensorboard": False, "log.progress": False}
EVAL_TINY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4,
             "model.dtype": "float32", "model.activation": "gelu", "model.norm": "rmsnorm",
             "model.use_bias": False, "data.seq_len": 32, "train.steps": 12,
             "train.batch_size": 8, "train.log_every": 4, "train.eval_every": 0,
             "train.eval_batches": 1, "train.sample_tokens": 0, "optim.lr": 1e-2,
             "optim.warmup_steps": 2, "checkpoint.every": 0, "checkpoint.async_save": False,
             "data.prefetch": 0, "log.tensorboard": False, "log.progress": False}


def run_cli(args, env=None, timeout=600, **kw):
    """`python ARGS...` from the repo root with this checkout first on PYTHONPATH; returns
    the CompletedProcess (text)."""
    path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    full_env = {**os.environ, "PYTHONPATH": path}
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def flags(overrides: dict) -> list[str]:
    out = []
    for k, v in {**TINY, **overrides}.items():
        v = str(v).lower() if isinstance(v, bool) else v
        out.append(f"--config.{k}={v}")
    return out


def env(devices: int = 1, **extra) -> dict:
    e = dict(os.environ)
    e.update({"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
              "JAX_COMPILATION_CACHE_DIR": JIT_CACHE,
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_train(workdir, overrides: dict, devices: int = 1, timeout: int = 300, **extra_env):
    """`python -m jaxllm.train --workdir=... --config.K=V ...` (TINY + overrides) in a
    subprocess with the test environment."""
    cmd = [sys.executable, "-m", "jaxllm.train", f"--workdir={workdir}", *flags(overrides)]
    return subprocess.run(cmd, cwd=ROOT, env=env(devices, **extra_env), capture_output=True,
                          text=True, timeout=timeout, check=False)


def run_tool(script: str, *args: str, timeout: int = 300):
    """`python tools/SCRIPT ARGS...` (or `-m MODULE` when script starts with "-m ") in a
    subprocess with the test environment."""
    cmd = script.split() if script.startswith("-m ") else [str(ROOT / "tools" / script)]
    return subprocess.run([sys.executable, *cmd, *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def run_py(code: str, devices: int = 1, timeout: int = 300):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(devices),
                          capture_output=True, text=True, timeout=timeout, check=False)


def rows(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_rows(workdir, split: str = "train") -> dict:
    """{step: row} of one split (the last row wins where a step repeats)."""
    return {r["step"]: r for r in rows(workdir) if r.get("split") == split}


def events(workdir, name: str) -> list[dict]:
    return [r for r in rows(workdir) if r.get("event") == name]


def _build(base, preset: dict, overrides: dict):
    """`base` with the preset's and then the caller's keys set (a bare name is a model key)."""
    for k, v in {**preset, **overrides}.items():
        set_key(base, k if "." in k else f"model.{k}", v)
    return base


def tiny_cfg(**overrides):
    """The tiny CPU config + TINY, for in-process `train()` calls of the checkpoint, resume
    and fault tests (dotted keys: `tiny_cfg(**{"train.steps": 4})`)."""
    return _build(tiny(), TINY, overrides)


def tiny_model_cfg(**model):
    """A very small float32 model for fast model/optimizer tests (vocab 384, byte tokens)."""
    return _build(defaults(), MODEL_TINY, model)


def tiny_eval_cfg(**model):
    """A very small float32 model (byte tokenizer) that trains in seconds on CPU, for the
    eval/sample/ablate tests."""
    return _build(defaults(), EVAL_TINY, model)


def use_jit_cache():
    """Generator for a module-scoped autouse fixture: the persistent compilation cache for
    in-process `train()` calls (each builds new jitted closures), restored afterwards."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    for k, v in zip(keys, (JIT_CACHE, 0.0, 0), strict=True):
        jax.config.update(k, v)
    cc.reset_cache()
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()


# ---------------------------------------------------------------- eval, sample, ablate
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


def corpus_texts(names=("bisect.py", "colorsys.py", "keyword.py", "fnmatch.py", "this.py"),
                 limit=2500):
    return [(STDLIB / n).read_text()[:limit] for n in names]


def write_jsonl(path, texts) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return str(path)


def train_tiny(workdir, data_path, **model):
    from jaxllm.train.loop import train

    cfg = tiny_eval_cfg(**model)
    cfg.data.path = str(data_path)
    cfg.data.eval_fraction = 0.2
    train(cfg, str(workdir))
    return cfg


@functools.lru_cache(maxsize=8)
def ref_forward(model_def):
    import jax
    return jax.jit(lambda params, tokens: model_def.apply(params)(tokens))


def ref_logprobs(run, tokens) -> np.ndarray:
    """float64 log-softmax of the model's logits for one unpadded, unpacked sequence (no
    segment ids, default positions), computed in numpy: [len(tokens), vocab]."""
    import jax

    logits = np.asarray(jax.device_get(ref_forward(run.model_def)(
        run.params, np.asarray(tokens, np.int32)[None])))[0]
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ref_continuation(run, tokens, start) -> tuple[float, bool]:
    """Summed log-prob of targets tokens[1:][start:] and whether each is the greedy argmax over
    the real vocabulary."""
    lp = ref_logprobs(run, tokens[:-1])
    tgt = np.asarray(tokens[1:])
    rows = np.arange(len(tgt))[start:]
    total = float(lp[rows, tgt[start:]].sum())
    greedy = bool((lp[rows, :run.tokenizer.vocab_size].argmax(-1) == tgt[start:]).all())
    return total, greedy


def random_run(tokenizer: str = "byte", **model):
    """A `restore.Run` with freshly initialized params (no checkpoint); a large init_std
    makes the predictions decisive."""
    from jaxllm import optim, parallel
    from jaxllm.run import Run
    from jaxllm.data.resolve import resolve
    from jaxllm.state import init_state

    cfg = tiny_eval_cfg(**{"init_std": 0.5, **model})
    cfg.train.batch_size = 1
    cfg.data.tokenizer = tokenizer
    tok = resolve(cfg)
    mesh = parallel.make_mesh(cfg)
    model_def, state, _ = init_state(cfg, mesh, optim.build_optimizer(cfg))
    return Run("", cfg, tok, model_def, state["params"], 0, mesh)


def jax_internal(module: str, attr: str | None = None):
    """A module (or one of its names) of JAX's private `jax._src` tree, for the few tests
    that lower for a platform this host lacks: no public API reaches the Pallas Triton
    lowering, jaxlib's Triton compilation handlers or the cuDNN version gate. When a JAX
    upgrade moves the name, those tests skip and say which name moved, instead of failing
    at import."""
    import pytest
    try:
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    except (ImportError, AttributeError):
        import jax
        pytest.skip(f"jax {jax.__version__} has no {module}{'.' + attr if attr else ''}; "
                    "this test reaches it to lower for a platform this host lacks")
