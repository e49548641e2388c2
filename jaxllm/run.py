"""Open a run: a workdir's saved config, its tokenizer and its newest restorable parameters.

One reader of `DIR/config.json` (`saved_config`, `read_config`) and one way to restore a
run's parameters (`restore_params`, through `Checkpointer.restore_params`), shared by
evaluation, sampling, Hugging Face export, the resume check of training and the tools.

- `config.json` holds the resolved config the run trained with. `read_config` lays it over
  the current `config.defaults()`; a key the current schema does not know (a run written
  by another version) is ignored with a warning, at any depth; keys config.json predates
  keep the behaviour the run trained with (`config.keep_saved_behaviour`).
- Parameters are read alone (no optimizer state, no data iterator) from the newest
  finished checkpoint, or an older one when the newest is unreadable (the same walk
  training uses, `checkpoint.Checkpointer`), onto the shardings of the mesh given.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
from etils import epath
from flax import nnx
from ml_collections import ConfigDict

from jaxllm import parallel
from jaxllm.checkpoint import Checkpointer
from jaxllm.config import ConfigError, defaults, keep_saved_behaviour, set_key, validate
from jaxllm.data.resolve import resolve
from jaxllm.model.transformer import ModelDef, abstract_model
from jaxllm.runfiles import read_config_json

log = logging.getLogger("jaxllm")


def workdir_path(workdir) -> epath.Path:
    """The workdir as an epath: local paths made absolute, gs:// and the like kept."""
    return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))


def saved_config(workdir) -> dict | None:
    """The raw `DIR/config.json` of a run, or None when it has none yet (also when DIR is
    no directory: whoever creates the workdir reports that)."""
    path = workdir_path(workdir) / "config.json"
    if not path.exists():
        return None
    return read_config_json(path)


def merge_saved(node: ConfigDict, saved: dict, prefix: str = "") -> None:
    """Lay a saved config (JSON) over `node`: unknown keys warned about and ignored, JSON
    lists turned back into the tuples the schema holds."""
    for key, value in saved.items():
        if key not in node:
            log.warning("config.json: ignoring unknown key %s%s", prefix, key)
            continue
        if isinstance(node[key], ConfigDict) and isinstance(value, dict):
            merge_saved(node[key], value, f"{prefix}{key}.")
        elif isinstance(node[key], tuple) and isinstance(value, list):
            node[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            node[key] = value


def read_config(workdir) -> ConfigDict:
    """The resolved config of a run: `DIR/config.json` over the current defaults."""
    path = workdir_path(workdir) / "config.json"
    if not path.parent.is_dir():
        raise ConfigError(f"--workdir: {workdir} is not a directory (a jaxllm-train "
                          "--workdir)")
    saved = saved_config(workdir)
    if saved is None:
        raise ConfigError(f"{path}: not found; is {workdir} a jaxllm workdir "
                          "(jaxllm-train --workdir=...)?")
    cfg = defaults()
    try:
        merge_saved(cfg, saved)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: does not match the config schema ({e})") from None
    return keep_saved_behaviour(cfg, saved)


def restore_params(cfg, workdir, mesh, step: int | None = None):
    """(model_def, params, step) of checkpoint `step` (default: the newest readable one)."""
    ckpt_dir = workdir_path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ConfigError(f"--workdir: no checkpoints in {workdir} ({ckpt_dir} missing)")
    ckpt = Checkpointer(ckpt_dir, cfg)
    try:
        steps = ckpt.steps()
        if not steps:
            raise ConfigError(f"--workdir: no finished checkpoint in {ckpt_dir}")
        if step is not None and step not in steps:
            raise ConfigError(f"--step: {step} is not among the checkpoints of {workdir} "
                              f"(available: {', '.join(map(str, steps))})")
        graphdef, abstract = abstract_model(cfg)
        shardings = nnx.to_pure_dict(parallel.state_shardings(abstract, mesh, cfg))
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nnx.to_pure_dict(abstract), shardings)
        with parallel.activate(cfg, mesh):
            got, params = ckpt.restore_params(target, step)
    finally:
        ckpt.close()
    return ModelDef(graphdef, cfg), params, got


@dataclasses.dataclass
class Run:
    """A restored run: config, tokenizer, model definition, params, step and mesh."""

    workdir: str
    cfg: ConfigDict
    tokenizer: object
    model_def: object
    params: dict
    step: int
    mesh: object


def load_run(workdir: str, *, step: int | None = None, tokenizer: str | None = None,
             overrides: dict | None = None) -> Run:
    """Open a run for evaluation or sampling on this process's devices (one data-parallel
    axis): config, tokenizer and the params of the newest (or `step`) checkpoint.

    `tokenizer` replaces `data.tokenizer` (e.g. the file moved); it must have the size the
    model was built for. `overrides` ({"data.path": ...}) change data keys for evaluation.
    """
    cfg = read_config(workdir)
    trained_vocab = cfg.model.vocab_size
    if tokenizer:
        cfg.data.tokenizer = tokenizer
    for key, value in (overrides or {}).items():
        set_key(cfg, key, value)
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)
    cfg.train.grad_accum = 1
    cfg.train.batch_size = jax.device_count()
    validate(cfg)
    tok = resolve(cfg)
    if cfg.model.vocab_size != trained_vocab or tok.vocab_size > trained_vocab:
        raise ConfigError(f"--tokenizer: {cfg.data.tokenizer} has {tok.vocab_size} tokens, "
                          f"but the model was trained with vocab_size {trained_vocab}")
    mesh = parallel.make_mesh(cfg)
    model_def, params, got = restore_params(cfg, workdir, mesh, step)
    return Run(workdir, cfg, tok, model_def, params, got, mesh)
