"""Open a training workdir for evaluation: its resolved config, tokenizer and newest params.

`load_run(workdir)` reads `DIR/config.json` (the resolved config the run trained with),
builds the abstract train state (`train.state.abstract_state`) on a mesh of the local
devices and restores the newest finished checkpoint of `DIR/checkpoints` (or `step`),
falling back to older steps when the newest is unreadable, as training does. Only the
`state` item is read; the data iterator is not needed for evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from ml_collections import ConfigDict

from jaxllm.config import ConfigError, defaults, keep_saved_behaviour, validate
from jaxllm.runfiles import read_config_json

log = logging.getLogger("jaxllm")


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


def _merge(node: ConfigDict, saved: dict, prefix: str = "") -> None:
    for key, value in saved.items():
        if key not in node:
            log.warning("config.json: ignoring unknown key %s%s", prefix, key)
            continue
        if isinstance(node[key], ConfigDict) and isinstance(value, dict):
            _merge(node[key], value, f"{prefix}{key}.")
        elif isinstance(node[key], tuple) and isinstance(value, list):
            node[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            node[key] = value


def load_run_config(workdir: str) -> ConfigDict:
    """The resolved config of a run (DIR/config.json over the current defaults)."""
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir: {workdir} is not a directory")
    path = os.path.join(workdir, "config.json")
    try:
        saved = read_config_json(path)
    except FileNotFoundError:
        raise ConfigError(f"--workdir: {path} not found; is {workdir} a training "
                          "workdir (jaxllm-train --workdir=...)?") from None
    cfg = defaults()
    try:
        _merge(cfg, saved)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--workdir: {path} does not match the config schema ({e})") from None
    return keep_saved_behaviour(cfg, saved)


def load_run(workdir: str, *, step: int | None = None, tokenizer: str | None = None,
             overrides: dict | None = None) -> Run:
    """Restore the params of the newest (or `step`) checkpoint of `workdir`.

    `tokenizer` replaces `data.tokenizer` (e.g. the file moved); it must have the size the
    model was built for. `overrides` ({"data.path": ...}) change data keys for evaluation.
    """
    import jax

    from jaxllm import optim, parallel
    from jaxllm.checkpoint import Checkpointer
    from jaxllm.train.loop import resolve
    from jaxllm.train.state import abstract_state

    cfg = load_run_config(workdir)
    trained_vocab = cfg.model.vocab_size
    if tokenizer:
        cfg.data.tokenizer = tokenizer
    for key, value in (overrides or {}).items():
        sec, name = key.split(".")
        cfg[sec][name] = value
    # evaluation runs on this process's devices: one data-parallel axis, no accumulation
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)
    cfg.train.grad_accum = 1
    cfg.train.batch_size = jax.device_count()
    validate(cfg)
    tok = resolve(cfg)
    if cfg.model.vocab_size != trained_vocab or tok.vocab_size > trained_vocab:
        raise ConfigError(f"--tokenizer: {cfg.data.tokenizer} has {tok.vocab_size} tokens, "
                          f"but the model was trained with vocab_size {trained_vocab}")
    mesh = parallel.make_mesh(cfg)
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"--workdir: no checkpoints in {workdir} ({ckpt_dir} missing)")
    ckpt = Checkpointer(ckpt_dir, cfg)
    steps = ckpt.steps()
    if not steps:
        raise ConfigError(f"--workdir: no finished checkpoint in {ckpt_dir}")
    if step is not None and step not in steps:
        raise ConfigError(f"--step: {step} not in the checkpoints of {workdir} "
                          f"(available: {', '.join(map(str, steps))})")
    model_def, abstract, _ = abstract_state(cfg, mesh, optim.build_optimizer(cfg))
    params, restored = _restore_params(ckpt, abstract, [step] if step is not None
                                       else list(reversed(steps)), cfg, mesh)
    ckpt.close()
    return Run(workdir, cfg, tok, model_def, params, restored, mesh)


def _restore_params(ckpt, abstract, candidates, cfg, mesh):
    import orbax.checkpoint as ocp

    from jaxllm import parallel

    errors = []
    for s in candidates:
        try:
            with parallel.activate(cfg, mesh):
                out = ckpt.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract)))
            return out["state"]["params"], s
        except Exception as e:  # noqa: BLE001 - a torn step: report it, try an older one
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("checkpoint step %d is unreadable (%s); trying an older one", s, msg)
            errors.append(f"step {s}: {msg}")
    raise ConfigError(f"--workdir: no checkpoint could be restored ({'; '.join(errors)})")
