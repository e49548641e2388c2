"""Configuration: the schema (key, default, help, checks), validation with one-line errors.

Every experiment is a `ml_collections.ConfigDict` built from `defaults()` by a file in
`configs/` and overridden on the command line (`--config.model.pos_encoding=alibi`).
`SCHEMA` is the one description of every key: its default, its help (the README config
reference is generated from it) and its per-key checks (type, range, allowed choices).
`validate(cfg)` runs those checks, then the cross-field rules (`_cross_field`, the one
place for them), and raises `ConfigError`, which the command-line entry points turn into
`error: ...` and exit 2.

Choices are owned by the modules that implement them: a `choices="module:NAME"` entry
names that module's registry (e.g. `jaxllm.kernels:BACKENDS`, the attention backends it
dispatches to), read when a config is first validated. This module imports nothing of
jaxllm at import time, so `import jaxllm.config` stays light.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math

from ml_collections import ConfigDict, config_dict

# Logical axis -> mesh axes. Parameters and activations carry the logical names; this
# table (overridable as `mesh.rules`) decides where each one lives (MaxText style).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: default, help (`{choices}` is replaced by the allowed values) and
    its own checks: `lo`/`hi` bounds, `choices` (a tuple, or "module:NAME" of a registry),
    `kind` (the type; default: the default's type; a None default means optional)."""

    default: object
    help: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple | str | None = None
    kind: type | None = None

    def type(self) -> type:
        return self.kind or type(self.default)


SCHEMA = {
    "model": {
        "d_model": Key(768, "width of the residual stream", lo=1),
        "n_layers": Key(12, "transformer blocks", lo=1),
        "n_heads": Key(12, "query heads", lo=1),
        "n_kv_heads": Key(0, "key/value heads for grouped-query attention; 0 = n_heads", lo=0),
        "d_ff": Key(0, "MLP width; 0 = 4*d_model, or 2/3 of that rounded up to 64 for gated", lo=0),
        "vocab_size": Key(0, "0 = the tokenizer's size rounded up to a multiple of 128", lo=0),
        "vocab_used": Key(0, "real ids; ids from here to vocab_size get -inf logits; 0 = "
                          "tokenizer size", lo=0),
        "pos_encoding": Key("rope", "{choices}", choices="jaxllm.model.positions:POS_ENCODINGS"),
        "rope_base": Key(10000.0, "RoPE theta base (half-split layout, GPT-NeoX style)", lo=1.0),
        "max_position": Key(0, "learned position table size; 0 = data.seq_len", lo=0),
        "activation": Key("gelu", "{choices} (gelu: tanh form, GPT-2; gelu_exact: erf, MPT)",
                          choices="jaxllm.model.layers:ACTIVATIONS"),
        "norm": Key("layernorm", "{choices}", choices="jaxllm.model.layers:NORMS"),
        "norm_eps": Key(1e-5, "epsilon of every norm", lo=0.0),
        "use_bias": Key(True, "biases in linear layers and LayerNorm"),
        "qkv_bias": Key(False, "biases on the q/k/v projections only (Qwen2); implied by "
                        "use_bias"),
        "tie_embeddings": Key(True, "output projection shares the token embedding"),
        "init_std": Key(0.02, "std of weight init (residual projections scaled by 1/sqrt(2L))",
                        lo=0.0),
        "dtype": Key("bfloat16", "compute dtype: {choices}", choices="jaxllm.model.layers:DTYPES"),
        "param_dtype": Key("float32", "parameter storage dtype",
                           choices="jaxllm.model.layers:DTYPES"),
        "attention_backend": Key("auto", "{choices} (kernels/__init__.py)",
                                 choices="jaxllm.kernels:BACKENDS"),
        "remat": Key("none", "{choices} (activation checkpointing)",
                     choices="jaxllm.model.transformer:REMAT"),
        "scan_layers": Key(True, "compile one block and scan it over layers"),
        "scan_unroll": Key(0, "blocks per scan step; 0 = auto: all on CPU (faster there), 1 "
                           "elsewhere", lo=0),
    },
    "optim": {
        "name": Key("adamw", "{choices}", choices="jaxllm.optim.build:OPTIMIZERS"),
        "lr": Key(None, "peak learning rate; None = optimizer default", lo=0.0, kind=float),
        "schedule": Key("cosine", "{choices} (all after linear warmup)",
                        choices="jaxllm.optim.build:SCHEDULES"),
        "warmup_steps": Key(100, "linear warmup from 0", lo=0),
        "min_lr_ratio": Key(0.1, "final lr as a fraction of peak (cosine, linear, wsd)",
                            lo=0.0, hi=1.0),
        "wsd_decay_fraction": Key(0.2, "wsd: share of steps spent in the final decay",
                                  lo=0.0, hi=1.0),
        "b1": Key(None, "first-moment decay; None = optimizer default", lo=0.0, hi=1.0,
                  kind=float),
        "b2": Key(None, "second-moment decay; None = optimizer default", lo=0.0, hi=1.0,
                  kind=float),
        "eps": Key(None, "epsilon; None = default (Adam 1e-8, Sophia 1e-12)", lo=0.0,
                   kind=float),
        "weight_decay": Key(None, "decoupled; None = optimizer default", lo=0.0, kind=float),
        "decay_embeddings": Key(False, "apply weight decay to embedding tables"),
        "clip": Key(1.0, "global gradient-norm clip; 0 = off", lo=0.0),
        "momentum": Key(0.9, "sgd momentum", lo=0.0, hi=1.0),
        "nesterov": Key(True, "sgd Nesterov momentum"),
        "hessian_every": Key(10, "sophia: refresh the Hessian estimate every k steps", lo=1),
        "gamma": Key(None, "sophia: 0.05 (G) / 0.01 (H) when None", lo=0.0, kind=float),
        "hessian_schedule": Key("official", "sophia: {choices}; official: h = 0 for k steps, "
                                "paper: from step 0",
                                choices="jaxllm.optim.build:HESSIAN_SCHEDULES"),
        "block_size": Key(256, "adam8bit: quantization block", lo=1),
        "min_8bit_size": Key(4096, "adam8bit: tensors smaller than this stay float32", lo=0),
        "fp32_embedding_state": Key(False, "adam8bit: embedding tables keep float32 moments"),
    },
    "train": {
        "steps": Key(1000, "optimizer steps", lo=1),
        "batch_size": Key(32, "global batch, in sequences", lo=1),
        "grad_accum": Key(1, "micro-batches per step (batch_size must divide)", lo=1),
        "seed": Key(0, "parameter init and data order", lo=0),
        "log_every": Key(10, "train rows in metrics.jsonl", lo=1),
        "eval_every": Key(200, "eval rows (loss, bpb); 0 = only at the end", lo=0),
        "eval_batches": Key(8, "eval batches (of batch_size sequences) per evaluation", lo=1),
        "loss_chunk": Key(0, "tokens per logits chunk along the sequence; 0 = whole sequence",
                          lo=0),
        "z_loss": Key(0.0, "coefficient of the log(Z)^2 auxiliary loss; 0 = off", lo=0.0),
        "max_skips": Key(5, "stop (exit 3) after this many consecutive skipped steps", lo=1),
        "max_update_ratio": Key(1.0, "skip updates larger than this x the parameter norm; "
                                "0 = off", lo=0.0),
        "spike_sigmas": Key(0.0, "skip steps whose loss exceeds mean + k*std of a window; 0 = off",
                            lo=0.0),
        "spike_window": Key(100, "accepted losses in the spike window (fixed for a run)", lo=1),
        "sample_tokens": Key(200, "bytes/tokens generated at the end of training; 0 = none",
                             lo=0),
        "sample_prompt": Key("def ", "prompt of the end-of-training sample"),
        "profile": Key(False, "write a jax.profiler trace of a few steps to WORKDIR/profile"),
    },
    "data": {
        "path": Key("", 'prepared data dir, raw .txt/.jsonl/.parquet file or glob; "" = '
                     "embedded"),
        "tokenizer": Key("byte", "byte | path to a SentencePiece .model | tokenizers .json"),
        "seq_len": Key(1024, "tokens per training sequence", lo=2),
        "packing": Key("concat", "{choices}; concat: concat-then-split",
                       choices="jaxllm.data.pipeline:PACKING"),
        "eval_fraction": Key(0.05, "share of documents held out for eval", lo=0.0, hi=0.5),
        "valid_fraction": Key(0.0, "share held out for validation (e.g. lr choice); 0 = none",
                              lo=0.0, hi=0.5),
        "mixture": Key("", '"path1:weight,path2:weight" weighted mixture of prepared datasets'),
        "text_field": Key("text", "JSON Lines field / Parquet column holding the text"),
        "prefetch": Key(2, "batches prepared ahead in a background thread", lo=0),
    },
    "mesh": {
        "data": Key(-1, "data-parallel axis; -1 = all remaining devices", lo=-1),
        "fsdp": Key(1, "fully-sharded data-parallel axis (parameters and optimizer state)",
                    lo=-1),
        "tensor": Key(1, "tensor-parallel axis (heads, MLP width, vocab)", lo=-1),
        "rules": Key(DEFAULT_RULES, "logical axis -> mesh axes", kind=tuple),
    },
    "checkpoint": {
        "every": Key(500, "save every N steps (and always at the end); 0 = only at the end",
                     lo=0),
        "keep": Key(3, "newest checkpoints kept", lo=1),
        "permanent_every": Key(0, "also keep every Nth step forever; 0 = off", lo=0),
        "async_save": Key(True, "write in the background while training continues"),
    },
    "dist": {
        "coordinator": Key("", 'HOST:PORT of process 0; "" = auto-detect (TPU, SLURM) or '
                            "single"),
        "num_processes": Key(0, "0 = auto", lo=0),
        "process_id": Key(-1, "-1 = auto", lo=-1),
    },
    "log": {
        "tensorboard": Key(True, "TensorBoard events in WORKDIR/tb"),
        "wandb": Key(False, "also log to Weights & Biases (needs `wandb` installed)"),
        "wandb_project": Key("jaxllm", "W&B project name"),
        "progress": Key(True, "progress bar on stderr"),
    },
}


def defaults() -> ConfigDict:
    """The full schema with defaults (configs/base.py)."""
    c = ConfigDict()
    for section, keys in SCHEMA.items():
        c[section] = ConfigDict()
        for name, key in keys.items():
            c[section][name] = (config_dict.placeholder(key.type()) if key.default is None
                                else key.default)
    return c


def tiny() -> ConfigDict:
    """The CPU default (configs/tiny.py, and `jaxllm-train` with no --config): a 0.9M-parameter
    byte-level model on the embedded corpus that trains in minutes on 2 cores."""
    c = defaults()
    c.model.update(d_model=128, n_layers=4, n_heads=4, pos_encoding="rope",
                   activation="swiglu", norm="rmsnorm", use_bias=False, dtype="float32")
    c.optim.update(lr=3e-3, warmup_steps=50)
    c.train.update(steps=300, batch_size=16, log_every=20, eval_every=50, eval_batches=4,
                   sample_tokens=160)
    c.data.seq_len = 256
    c.checkpoint.every = 100
    return c


def get_config(arg=None) -> ConfigDict:
    """Lets `--config` default to this file: the tiny CPU default."""
    return tiny()


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {what}")


def unknown_key(cfg, key: str) -> str | None:
    """None when the dotted `key` names an entry of `cfg` (a ConfigDict or a dict); else the
    error message: the first unknown part and the keys allowed where it stops."""
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not hasattr(node, "keys") or part not in node:
            where = ".".join(parts[:i]) or "the top level"
            allowed = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
            return f"{key}: unknown config key; keys under {where}: {allowed}"
        node = node[part]
    return None


def get_key(cfg, key: str, default=...):
    """The value at dotted `key` ("model.d_model") of a ConfigDict or a nested dict; a
    missing key gives `default`, or ConfigError naming it when no default is given."""
    msg = unknown_key(cfg, key)
    if msg is not None:
        if default is ...:
            raise ConfigError(msg)
        return default
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def set_key(cfg, key: str, value) -> None:
    """Set dotted `key` of `cfg`; ConfigError naming the key when the schema lacks it."""
    head, _, last = key.rpartition(".")
    parent = get_key(cfg, head) if head else cfg
    msg = unknown_key(cfg, key)
    if msg is not None:
        raise ConfigError(msg)
    parent[last] = value



@functools.cache
def choices(ref) -> tuple:
    """The allowed values of a `Key.choices`: a tuple, or the registry "module:NAME" (a
    tuple, or a dict whose keys are the names) of the module that implements them."""
    if not isinstance(ref, str):
        return tuple(ref)
    module, name = ref.split(":")
    return tuple(getattr(importlib.import_module(module), name))


def _check_key(key: str, spec: Key, v) -> None:
    """The per-key checks of `spec` on value `v`: type, range, choices."""
    if v is None and spec.default is None:
        return
    kind = spec.type()
    if spec.choices is not None:
        allowed = choices(spec.choices)
        _check(v in allowed, key, f"got {v!r}; allowed: {', '.join(allowed)}")
        return
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             tuple: "a tuple"}
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    _check(ok, key, f"must be {names[kind]}, got {v!r}")
    if kind is int:  # shapes, steps and counts become int32 on the device
        _check(v < 2**31, key, f"must be < 2**31, got {v!r}")
    if spec.lo is not None:
        _check(v >= spec.lo, key, f"must be >= {spec.lo}, got {v!r}")
    if spec.hi is not None:
        _check(v <= spec.hi, key, f"must be <= {spec.hi}, got {v!r}")


def validate(cfg: ConfigDict) -> ConfigDict:
    """Check every key against the schema, then the cross-field rules; raise ConfigError on
    the first failure."""
    for section, keys in SCHEMA.items():
        for name, spec in keys.items():
            _check_key(f"{section}.{name}", spec, cfg[section][name])
    _cross_field(cfg)
    return cfg


def _cross_field(cfg: ConfigDict) -> None:
    """Rules between keys (the only place for them; rules that need the device count are
    `parallel.check_mesh`'s)."""
    m, t, d, mesh, dist = cfg.model, cfg.train, cfg.data, cfg.mesh, cfg.dist
    _check(not (m.vocab_size and m.vocab_used > m.vocab_size), "model.vocab_used",
           f"must be <= model.vocab_size ({m.vocab_used} > {m.vocab_size})")
    _check(m.d_model % m.n_heads == 0, "model.d_model",
           f"must be divisible by model.n_heads ({m.d_model} % {m.n_heads} != 0)")
    kv = m.n_kv_heads or m.n_heads
    _check(kv <= m.n_heads and m.n_heads % kv == 0, "model.n_kv_heads",
           f"model.n_heads ({m.n_heads}) must be a multiple of n_kv_heads ({kv})")
    _check((m.d_model // m.n_heads) % 2 == 0 or m.pos_encoding != "rope", "model.n_heads",
           "rope needs an even head size (d_model / n_heads)")
    _check(t.batch_size % t.grad_accum == 0, "train.grad_accum",
           f"must divide train.batch_size ({t.batch_size} % {t.grad_accum} != 0)")
    _check(d.tokenizer != "", "data.tokenizer",
           "must be 'byte' or a path to a SentencePiece .model or tokenizers .json")
    if m.pos_encoding == "learned":
        table = m.max_position or d.seq_len
        _check(table >= d.seq_len, "model.max_position",
               f"learned positions must cover data.seq_len ({table} < {d.seq_len})")
    for axis in ("data", "fsdp", "tensor"):
        _check(mesh[axis] != 0, f"mesh.{axis}",
               "must be a positive device count or -1 (the rest)")
    _check([mesh.data, mesh.fsdp, mesh.tensor].count(-1) <= 1, "mesh",
           "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    if dist.coordinator:
        _check(":" in dist.coordinator, "dist.coordinator", "must be HOST:PORT")
        _check(dist.num_processes >= 1, "dist.num_processes",
               "must be set (>= 1) with dist.coordinator")
        _check(0 <= dist.process_id < dist.num_processes, "dist.process_id",
               f"must be in [0, {dist.num_processes}) with dist.coordinator")
    if cfg.log.wandb:
        _check(importlib.util.find_spec("wandb") is not None, "log.wandb",
               "true needs the wandb package (pip install wandb); or set log.wandb=false")


def keep_saved_behaviour(cfg: ConfigDict, saved: dict) -> ConfigDict:
    """`cfg` loaded from a run's config.json (`saved`): keys that config.json predates
    keep the behaviour the run was trained with, not today's default. A run without
    `model.vocab_used` trained with no padding mask, so it keeps none."""
    if "vocab_used" not in saved.get("model", {}):
        cfg.model.vocab_used = cfg.model.vocab_size
    return cfg


def padded_vocab(size: int, multiple: int = 128) -> int:
    return -(-size // multiple) * multiple


def reference_markdown() -> str:
    """The config reference table of the README, generated from `SCHEMA`."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section, keys in SCHEMA.items():
        for name, spec in keys.items():
            shown = "`None`" if spec.default is None else f"`{spec.default!r}`"
            if spec.type() is tuple:
                shown = "see below"
            text = spec.help
            if spec.choices is not None:
                text = text.replace("{choices}", " | ".join(choices(spec.choices)))
            rows.append(f"| `{section}.{name}` | {shown} | {text.replace('|', '/')} |")
    return "\n".join(rows)


# Keys that fix the shapes of parameters: a checkpoint restores only under equal values.
SHAPE_KEYS = (
    "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff",
    "model.vocab_size", "model.pos_encoding", "model.max_position", "model.activation",
    "model.norm", "model.use_bias", "model.qkv_bias", "model.tie_embeddings",
    "model.param_dtype", "model.scan_layers", "optim.name", "data.tokenizer",
)
