"""Configuration: defaults, allowed choices, and validation with one-line errors.

Every experiment is a `ml_collections.ConfigDict` built from `defaults()` by a file in
`configs/` and overridden on the command line (`--config.model.pos_encoding=alibi`).
`validate(cfg)` checks every choice, type, range and cross-field rule and raises
`ConfigError`, which the command-line entry points turn into `error: ...` and exit 2.
This module imports nothing else of jaxllm.
"""

from __future__ import annotations

import importlib.util
import math

from ml_collections import ConfigDict, config_dict

POS_ENCODINGS = ("rope", "alibi", "learned", "none")
ACTIVATIONS = ("relu", "gelu", "gelu_exact", "swish", "glu", "reglu", "geglu", "swiglu")
GATED = {"glu": "sigmoid", "reglu": "relu", "geglu": "gelu", "swiglu": "swish"}
NORMS = ("layernorm", "rmsnorm")
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("auto", "xla", "cudnn", "flash", "splash")  # = jaxllm.kernels.BACKENDS
REMAT = ("none", "full", "dots", "dots_no_batch")
OPTIMIZERS = ("adamw", "lion", "sophia_g", "sophia_h", "adam8bit", "sgd")
SCHEDULES = ("cosine", "linear", "wsd", "constant")
HESSIAN_SCHEDULES = ("official", "paper")
PACKING = ("concat", "first_fit")

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


def defaults() -> ConfigDict:
    """The full schema with defaults (configs/base.py). Comments become the README reference."""
    c = ConfigDict()
    c.model = m = ConfigDict()
    m.d_model = 768  # width of the residual stream
    m.n_layers = 12  # transformer blocks
    m.n_heads = 12  # query heads
    m.n_kv_heads = 0  # key/value heads for grouped-query attention; 0 = n_heads
    m.d_ff = 0  # MLP width; 0 = 4*d_model, or 2/3 of that rounded up to 64 for gated
    m.vocab_size = 0  # 0 = the tokenizer's size rounded up to a multiple of 128
    m.vocab_used = 0  # real ids; ids from here to vocab_size get -inf logits; 0 = tokenizer size
    m.pos_encoding = "rope"  # rope | alibi | learned | none
    m.rope_base = 10000.0  # RoPE theta base (half-split layout, GPT-NeoX style)
    m.max_position = 0  # learned position table size; 0 = data.seq_len
    # gelu is the tanh approximation (GPT-2 gelu_new); gelu_exact the erf form (MPT)
    m.activation = "gelu"  # relu | gelu | gelu_exact | swish | glu | reglu | geglu | swiglu
    m.norm = "layernorm"  # layernorm | rmsnorm
    m.norm_eps = 1e-5  # epsilon of every norm
    m.use_bias = True  # biases in linear layers and LayerNorm
    m.qkv_bias = False  # biases on the q/k/v projections only (Qwen2); implied by use_bias
    m.tie_embeddings = True  # output projection shares the token embedding
    m.init_std = 0.02  # std of weight init (residual projections scaled by 1/sqrt(2L))
    m.dtype = "bfloat16"  # compute dtype: float32 | bfloat16 | float16
    m.param_dtype = "float32"  # parameter storage dtype
    m.attention_backend = "auto"  # auto | xla | cudnn | flash | splash (kernels/__init__.py)
    m.remat = "none"  # none | full | dots | dots_no_batch (activation checkpointing)
    m.scan_layers = True  # compile one block and scan it over layers

    c.optim = o = ConfigDict()
    o.name = "adamw"  # adamw | lion | sophia_g | sophia_h | adam8bit | sgd
    o.lr = config_dict.placeholder(float)  # peak learning rate; None = optimizer default
    o.schedule = "cosine"  # cosine | linear | wsd | constant (all after linear warmup)
    o.warmup_steps = 100  # linear warmup from 0
    o.min_lr_ratio = 0.1  # final lr as a fraction of peak (cosine, linear, wsd)
    o.wsd_decay_fraction = 0.2  # wsd: share of steps spent in the final decay
    o.b1 = config_dict.placeholder(float)  # first-moment decay; None = optimizer default
    o.b2 = config_dict.placeholder(float)  # second-moment decay; None = optimizer default
    o.eps = config_dict.placeholder(float)  # epsilon; None = default (Adam 1e-8, Sophia 1e-12)
    o.weight_decay = config_dict.placeholder(float)  # decoupled; None = optimizer default
    o.decay_embeddings = False  # apply weight decay to embedding tables
    o.clip = 1.0  # global gradient-norm clip; 0 = off
    o.momentum = 0.9  # sgd momentum
    o.nesterov = True  # sgd Nesterov momentum
    o.hessian_every = 10  # sophia: refresh the Hessian estimate every k steps
    o.gamma = config_dict.placeholder(float)  # sophia: 0.05 (G) / 0.01 (H) when None
    o.hessian_schedule = "official"  # sophia: official (h = 0 for k steps) | paper (step 0)
    o.block_size = 256  # adam8bit: quantization block
    o.min_8bit_size = 4096  # adam8bit: tensors smaller than this stay float32
    o.fp32_embedding_state = False  # adam8bit: embedding tables keep float32 moments

    c.train = t = ConfigDict()
    t.steps = 1000  # optimizer steps
    t.batch_size = 32  # global batch, in sequences
    t.grad_accum = 1  # micro-batches per step (batch_size must divide)
    t.seed = 0  # parameter init and data order
    t.log_every = 10  # train rows in metrics.jsonl
    t.eval_every = 200  # eval rows (loss, bpb); 0 = only at the end
    t.eval_batches = 8  # eval batches (of batch_size sequences) per evaluation
    t.loss_chunk = 0  # tokens per logits chunk along the sequence; 0 = whole sequence
    t.z_loss = 0.0  # coefficient of the log(Z)^2 auxiliary loss; 0 = off
    t.max_skips = 5  # stop (exit 3) after this many consecutive skipped steps
    t.max_update_ratio = 1.0  # skip updates larger than this x the parameter norm; 0 = off
    t.spike_sigmas = 0.0  # skip steps whose loss exceeds mean + k*std of a window; 0 = off
    t.spike_window = 100  # accepted losses in the spike window (fixed for a run)
    t.sample_tokens = 200  # bytes/tokens generated at the end of training; 0 = none
    t.sample_prompt = "def "  # prompt of the end-of-training sample
    t.profile = False  # write a jax.profiler trace of a few steps to WORKDIR/profile

    c.data = d = ConfigDict()
    d.path = ""  # prepared data dir, raw .txt/.jsonl/.parquet file or glob; "" = embedded
    d.tokenizer = "byte"  # byte | path to a SentencePiece .model | tokenizers .json
    d.seq_len = 1024  # tokens per training sequence
    d.packing = "concat"  # concat (concat-then-split) | first_fit
    d.eval_fraction = 0.05  # share of documents held out for eval
    d.valid_fraction = 0.0  # share held out for validation (e.g. lr choice); 0 = none
    d.mixture = ""  # "path1:weight,path2:weight" weighted mixture of prepared datasets
    d.text_field = "text"  # JSON Lines field / Parquet column holding the text
    d.prefetch = 2  # batches prepared ahead in a background thread

    c.mesh = ms = ConfigDict()
    ms.data = -1  # data-parallel axis; -1 = all remaining devices
    ms.fsdp = 1  # fully-sharded data-parallel axis (parameters and optimizer state)
    ms.tensor = 1  # tensor-parallel axis (heads, MLP width, vocab)
    ms.rules = DEFAULT_RULES  # logical axis -> mesh axes

    c.checkpoint = ck = ConfigDict()
    ck.every = 500  # save every N steps (and always at the end); 0 = only at the end
    ck.keep = 3  # newest checkpoints kept
    ck.permanent_every = 0  # also keep every Nth step forever; 0 = off
    ck.async_save = True  # write in the background while training continues

    c.dist = ds = ConfigDict()
    ds.coordinator = ""  # HOST:PORT of process 0; "" = auto-detect (TPU, SLURM) or single
    ds.num_processes = 0  # 0 = auto
    ds.process_id = -1  # -1 = auto

    c.log = lg = ConfigDict()
    lg.tensorboard = True  # TensorBoard events in WORKDIR/tb
    lg.wandb = False  # also log to Weights & Biases (needs `wandb` installed)
    lg.wandb_project = "jaxllm"  # W&B project name
    lg.progress = True  # progress bar on stderr
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


def _choice(cfg: ConfigDict, key: str, choices) -> None:
    v = _get(cfg, key)
    _check(v in choices, key, f"got {v!r}; allowed: {', '.join(choices)}")


def _get(cfg: ConfigDict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _typed(cfg: ConfigDict, key: str, kind, *, lo=None, hi=None, optional=False) -> None:
    v = _get(cfg, key)
    if v is None and optional:
        return
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    _check(ok, key, f"must be {name}, got {v!r}")
    if kind is int:  # shapes, steps and counts become int32 on the device
        _check(v < 2**31, key, f"must be < 2**31, got {v!r}")
    if lo is not None:
        _check(v >= lo, key, f"must be >= {lo}, got {v!r}")
    if hi is not None:
        _check(v <= hi, key, f"must be <= {hi}, got {v!r}")


def validate(cfg: ConfigDict) -> ConfigDict:
    """Check every choice, type, range and cross-field rule; raise ConfigError on the first."""
    m, _o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    for key in ("model.d_model", "model.n_layers", "model.n_heads"):
        _typed(cfg, key, int, lo=1)
    for key in ("model.n_kv_heads", "model.d_ff", "model.vocab_size", "model.vocab_used",
                "model.max_position"):
        _typed(cfg, key, int, lo=0)
    _choice(cfg, "model.pos_encoding", POS_ENCODINGS)
    _choice(cfg, "model.activation", ACTIVATIONS)
    _choice(cfg, "model.norm", NORMS)
    _choice(cfg, "model.dtype", DTYPES)
    _choice(cfg, "model.param_dtype", DTYPES)
    _choice(cfg, "model.attention_backend", BACKENDS)
    _choice(cfg, "model.remat", REMAT)
    _typed(cfg, "model.rope_base", float, lo=1.0)
    _typed(cfg, "model.norm_eps", float, lo=0.0)
    _typed(cfg, "model.init_std", float, lo=0.0)
    for key in ("model.use_bias", "model.qkv_bias", "model.tie_embeddings",
                "model.scan_layers"):
        _typed(cfg, key, bool)
    _check(not (m.vocab_size and m.vocab_used > m.vocab_size), "model.vocab_used",
           f"must be <= model.vocab_size ({m.vocab_used} > {m.vocab_size})")
    _check(m.d_model % m.n_heads == 0, "model.d_model",
           f"must be divisible by model.n_heads ({m.d_model} % {m.n_heads} != 0)")
    kv = m.n_kv_heads or m.n_heads
    _check(kv <= m.n_heads and m.n_heads % kv == 0, "model.n_kv_heads",
           f"model.n_heads ({m.n_heads}) must be a multiple of n_kv_heads ({kv})")
    _check((m.d_model // m.n_heads) % 2 == 0 or m.pos_encoding != "rope", "model.n_heads",
           "rope needs an even head size (d_model / n_heads)")

    _choice(cfg, "optim.name", OPTIMIZERS)
    _choice(cfg, "optim.schedule", SCHEDULES)
    for key in ("optim.lr", "optim.weight_decay", "optim.gamma"):
        _typed(cfg, key, float, lo=0.0, optional=True)
    for key in ("optim.b1", "optim.b2"):
        _typed(cfg, key, float, lo=0.0, hi=1.0, optional=True)
    _typed(cfg, "optim.eps", float, lo=0.0, optional=True)
    _typed(cfg, "optim.clip", float, lo=0.0)
    _typed(cfg, "optim.min_lr_ratio", float, lo=0.0, hi=1.0)
    _typed(cfg, "optim.wsd_decay_fraction", float, lo=0.0, hi=1.0)
    _typed(cfg, "optim.momentum", float, lo=0.0, hi=1.0)
    _typed(cfg, "optim.warmup_steps", int, lo=0)
    _typed(cfg, "optim.hessian_every", int, lo=1)
    _choice(cfg, "optim.hessian_schedule", HESSIAN_SCHEDULES)
    _typed(cfg, "optim.block_size", int, lo=1)
    _typed(cfg, "optim.min_8bit_size", int, lo=0)
    for key in ("optim.nesterov", "optim.decay_embeddings", "optim.fp32_embedding_state"):
        _typed(cfg, key, bool)

    for key in ("train.steps", "train.batch_size", "train.grad_accum", "train.log_every",
                "train.eval_batches", "train.max_skips", "train.spike_window"):
        _typed(cfg, key, int, lo=1)
    for key in ("train.seed", "train.eval_every", "train.sample_tokens", "train.loss_chunk"):
        _typed(cfg, key, int, lo=0)
    _typed(cfg, "train.z_loss", float, lo=0.0)
    _typed(cfg, "train.spike_sigmas", float, lo=0.0)
    _typed(cfg, "train.max_update_ratio", float, lo=0.0)
    _typed(cfg, "train.sample_prompt", str)
    _typed(cfg, "train.profile", bool)
    _check(t.batch_size % t.grad_accum == 0, "train.grad_accum",
           f"must divide train.batch_size ({t.batch_size} % {t.grad_accum} != 0)")

    _typed(cfg, "data.path", str)
    _typed(cfg, "data.tokenizer", str)
    _check(d.tokenizer != "", "data.tokenizer",
           "must be 'byte' or a path to a SentencePiece .model or tokenizers .json")
    _typed(cfg, "data.seq_len", int, lo=2)
    _choice(cfg, "data.packing", PACKING)
    _typed(cfg, "data.eval_fraction", float, lo=0.0, hi=0.5)
    _typed(cfg, "data.valid_fraction", float, lo=0.0, hi=0.5)
    _typed(cfg, "data.mixture", str)
    _typed(cfg, "data.text_field", str)
    _typed(cfg, "data.prefetch", int, lo=0)
    if m.pos_encoding == "learned":
        table = m.max_position or d.seq_len
        _check(table >= d.seq_len, "model.max_position",
               f"learned positions must cover data.seq_len ({table} < {d.seq_len})")

    for key in ("mesh.data", "mesh.fsdp", "mesh.tensor"):
        _typed(cfg, key, int, lo=-1)
        _check(_get(cfg, key) != 0, key, "must be a positive device count or -1 (the rest)")
    _check([cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) <= 1, "mesh",
           "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    _check(m.n_heads % max(cfg.mesh.tensor, 1) == 0 and kv % max(cfg.mesh.tensor, 1) == 0,
           "mesh.tensor", f"must divide model.n_heads ({m.n_heads}) and n_kv_heads ({kv})")

    _typed(cfg, "checkpoint.every", int, lo=0)
    _typed(cfg, "checkpoint.keep", int, lo=1)
    _typed(cfg, "checkpoint.permanent_every", int, lo=0)
    _typed(cfg, "checkpoint.async_save", bool)
    _typed(cfg, "dist.coordinator", str)
    _typed(cfg, "dist.num_processes", int, lo=0)
    _typed(cfg, "dist.process_id", int, lo=-1)
    if cfg.dist.coordinator:
        _check(":" in cfg.dist.coordinator, "dist.coordinator", "must be HOST:PORT")
        _check(cfg.dist.num_processes >= 1, "dist.num_processes",
               "must be set (>= 1) with dist.coordinator")
        _check(0 <= cfg.dist.process_id < cfg.dist.num_processes, "dist.process_id",
               f"must be in [0, {cfg.dist.num_processes}) with dist.coordinator")
    for key in ("log.tensorboard", "log.wandb", "log.progress"):
        _typed(cfg, key, bool)
    _typed(cfg, "log.wandb_project", str)
    if cfg.log.wandb:
        _check(importlib.util.find_spec("wandb") is not None, "log.wandb",
               "true needs the wandb package (pip install wandb); or set log.wandb=false")
    return cfg


def resolved_d_ff(m: ConfigDict) -> int:
    """MLP width: explicit, else 4*d_model, or 2/3 of that rounded up to 64 when gated."""
    if m.d_ff:
        return m.d_ff
    if m.activation in GATED:
        return -(-(2 * 4 * m.d_model // 3) // 64) * 64
    return 4 * m.d_model


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
    """The config reference table (README), generated from `defaults()` and its comments."""
    import inspect
    import re
    src = inspect.getsource(defaults)
    prefix = {}
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for line in src.splitlines():
        sec = re.match(r"\s*c\.(\w+) = (\w+) = ConfigDict\(\)", line)
        if sec:
            prefix[sec.group(2)] = sec.group(1)
            continue
        m = re.match(r"\s*(\w+)\.(\w+) = (.+?)\s+# (.+)$", line)
        if m and m.group(1) in prefix:
            section, key = prefix[m.group(1)], m.group(2)
            value = defaults()[section][key]
            shown = "`None`" if value is None else f"`{value!r}`"
            if key == "rules":
                shown = "see below"
            rows.append(f"| `{section}.{key}` | {shown} | {m.group(4).replace('|', '/')} |")
    return "\n".join(rows)


# Keys that fix the shapes of parameters: a checkpoint restores only under equal values.
SHAPE_KEYS = (
    "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff",
    "model.vocab_size", "model.pos_encoding", "model.max_position", "model.activation",
    "model.norm", "model.use_bias", "model.qkv_bias", "model.tie_embeddings",
    "model.param_dtype", "model.scan_layers", "optim.name", "data.tokenizer",
)
