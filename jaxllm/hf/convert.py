"""Hugging Face directories <-> jaxllm workdirs (the files around `mapping.py`).

Export: a workdir's `config.json` + newest restorable Orbax checkpoint (parameters only,
restored onto one device) -> `model.safetensors` (or shards and an index), `config.json`,
`generation_config.json`, tokenizer files (`tokenizer.py`), a model card `README.md` and
`jaxllm.json` (the source config, step and tokenizer).
Import: `config.json` + `model.safetensors` (or a sharded `model.safetensors.index.json`)
-> a workdir holding `config.json`, `config.py` (for `jaxllm-train --config`) and a
step-0 checkpoint (imported parameters, fresh optimizer state) that `jaxllm-train
--workdir` resumes from, for continued pre-training.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np

import jax

from jaxllm import optim, parallel, run
from jaxllm.checkpoint import Checkpointer, data_meta
from jaxllm.config import ConfigError, validate
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.resolve import resolve
from jaxllm.hf.card import generation_config, model_card, run_summary
from jaxllm.hf.mapping import architecture, blocks_of, family, to_hf
from jaxllm.hf.reverse import from_hf
from jaxllm.hf.tokenizer import write_tokenizer
from jaxllm.hf.weights import parse_size, read_weights, write_weights
from jaxllm.model.layers import DTYPES
from jaxllm.state import abstract_state, fresh_state
from jaxllm.workdir_lock import acquire_for_run

def load_workdir_config(workdir):
    """The run's config (`run.read_config`: config.json over the defaults), validated."""
    return validate(run.read_config(workdir))


def restore_params(cfg, workdir, step=None):
    """(step, params as numpy) of the newest restorable checkpoint (or `step`), read onto
    one device (`run.restore_params`); optimizer state and data iterator are not read."""
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = parallel.make_mesh(cfg, jax.devices()[:1])
    _, params, got = run.restore_params(cfg, workdir, mesh, step)
    return got, jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)


# ----------------------------------------------------------------------------- export
def export_hf(workdir, out, *, step=None, dtype=None, keep_vocab_padding=False,
              tokenizer=None, arch=None, max_seq_len=None, max_shard_size=None):
    """Write the Hugging Face directory `out` for the workdir's checkpoint; returns a summary.

    The vocabulary is cut to the tokenizer's size unless `keep_vocab_padding`; an ALiBi
    (MPT) export allows `max_seq_len` tokens (default 8 x data.seq_len: ALiBi extrapolates);
    `max_shard_size` (e.g. "2GB") splits the weights into shards with an index."""
    cfg = load_workdir_config(workdir)
    kind = architecture(cfg.model, arch)  # refuse before reading any checkpoint
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype: got {dtype!r}; allowed: {', '.join(DTYPES)}")
    if max_seq_len is not None and (kind != "mpt" or max_seq_len < 1):
        raise ConfigError(f"--max_seq_len: got {max_seq_len}; it sets the length limit of "
                          "ALiBi (MPT) exports only, and must be >= 1")
    if max_shard_size is not None:
        parse_size(max_shard_size)
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; choose a new output directory")
    spec = tokenizer or cfg.data.tokenizer
    got_step, params = restore_params(cfg, workdir, step)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _write_export(cfg, params, got_step, workdir, out, spec, kind, dtype,
                             keep_vocab_padding, max_seq_len, max_shard_size)
    except BaseException:  # leave no half-written export behind
        shutil.rmtree(out, ignore_errors=True)
        if not created:
            out.mkdir()
        raise


def _write_export(cfg, params, got_step, workdir, out, spec, kind, dtype, keep_vocab_padding,
                  max_seq_len, max_shard_size):
    limit = max_seq_len or (8 * cfg.data.seq_len if kind == "mpt" else None)
    ids = write_tokenizer(spec, out, limit or cfg.data.seq_len)
    if ids["vocab"] > cfg.model.vocab_size:
        raise ConfigError(f"--tokenizer: {spec} has {ids['vocab']} tokens; the model has "
                          f"{cfg.model.vocab_size}")
    hf, tensors = to_hf(cfg, params, vocab=None if keep_vocab_padding else ids["vocab"],
                        arch=kind, max_seq_len=limit)
    if dtype is not None:
        tensors = {k: np.asarray(v.astype(DTYPES[dtype])) for k, v in tensors.items()}
        hf["torch_dtype"] = dtype
    hf.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    files = write_weights(tensors, out, max_shard_size)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(generation_config(ids, hf["vocab_size"]), indent=2) + "\n")
    tok_name = "byte" if spec == "byte" else os.path.basename(spec)
    (out / "README.md").write_text(model_card(cfg, hf, got_step, tok_name,
                                              run_summary(workdir, got_step)))
    (out / "jaxllm.json").write_text(json.dumps(
        {"source": os.path.abspath(workdir), "step": got_step, "tokenizer": tok_name,
         "config": json.loads(cfg.to_json_best_effort())}, indent=2) + "\n")
    return {"family": family(cfg.model), "architecture": hf["architectures"][0],
            "step": got_step, "tensors": len(tensors), "vocab_size": hf["vocab_size"],
            "files": files, "out": str(out)}


# ----------------------------------------------------------------------------- import
def read_hf(hf_dir):
    """(config dict, {name: np.ndarray}) of a local Hugging Face model directory (float32,
    bfloat16, float16 ... weights; one file or shards)."""
    d = pathlib.Path(hf_dir)
    try:
        hf = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{d / 'config.json'}: not found; is {d} a Hugging Face model "
                          "directory?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{d / 'config.json'}: unreadable ({e})") from None
    return hf, read_weights(d)


def _tokenizer_for_import(d: pathlib.Path, workdir: pathlib.Path, override):
    if override:
        return override
    marker = d / "jaxllm.json"
    if marker.exists() and json.loads(marker.read_text()).get("tokenizer") == "byte":
        return "byte"
    for name in ("tokenizer.json", "tokenizer.model"):
        if (d / name).exists():
            workdir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(d / name, workdir / name)
            return str((workdir / name).resolve())
    raise ConfigError(f"{d}: no tokenizer.json or tokenizer.model; pass --tokenizer=byte|PATH")


CONFIG_PY = '''"""Config of this imported workdir: jaxllm defaults updated with config.json.

`jaxllm-train --config={path} --workdir={workdir} [--config.KEY=VALUE ...]`
"""
import pathlib

from jaxllm.run import read_config


def get_config(arg=None):
    return read_config(pathlib.Path(__file__).parent)
'''


def import_hf(hf_dir, workdir, cfg, tokenizer=None) -> dict:
    """Create `workdir` with a step-0 checkpoint of the Hugging Face model in `hf_dir`.
    `cfg` supplies everything but the architecture (data, optimizer, training, mesh)."""
    d, wd = pathlib.Path(hf_dir), pathlib.Path(workdir)
    if (wd / "checkpoints").exists() and any((wd / "checkpoints").iterdir()):
        raise ConfigError(f"{wd}: already holds checkpoints; use a new --workdir")
    hf, tensors = read_hf(d)
    keys, params = from_hf(hf, tensors, str(d / "config.json"), cfg.data.seq_len)

    cfg.model.update(keys)
    cfg.data.tokenizer = _tokenizer_for_import(d, wd, tokenizer)
    tok = resolve(cfg)  # validates; the vocabulary must cover the tokenizer
    mesh = parallel.make_mesh(cfg)
    tx = optim.build_optimizer(cfg)
    _, abstract, shardings = abstract_state(cfg, mesh, tx)
    params["blocks"] = blocks_of(params["blocks"], cfg.model.scan_layers)
    want = jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    if set(got) != {p for p, _ in want}:
        raise AssertionError(f"parameter tree mismatch: {sorted(map(str, got))} vs "
                             f"{sorted(str(p) for p, _ in want)}")
    for path, a in want:
        assert got[path].shape == a.shape, (path, got[path].shape, a.shape)
    params = jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding),
                          params, abstract["params"])

    with parallel.activate(cfg, mesh):
        state = jax.jit(lambda p: fresh_state(cfg, tx, p), out_shardings=shardings)(params)
        train_it = make_pipeline(cfg, tok, "train", jax.process_index(), jax.process_count())
        # one writer per workdir: refused (exit 2) while a run or another import holds it
        lock = acquire_for_run(str(wd.resolve()), jax.process_index() == 0,
                               jax.process_count())
        try:
            ckpt = Checkpointer(str((wd / "checkpoints").resolve()), cfg)
            ckpt.save(0, state, train_it, {"config": cfg.to_json_best_effort(),
                                           **data_meta(cfg, 0)})
            ckpt.close()
            if jax.process_index() == 0:
                (wd / "config.json").write_text(cfg.to_json_best_effort(indent=2))
                (wd / "config.py").write_text(CONFIG_PY.format(path=wd / "config.py",
                                                               workdir=wd))
        finally:
            if lock is not None:
                lock.release()
    return {"family": family(cfg.model), "layers": cfg.model.n_layers,
            "vocab_size": cfg.model.vocab_size, "tokenizer": cfg.data.tokenizer,
            "workdir": str(wd)}
