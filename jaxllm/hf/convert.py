"""Hugging Face directories <-> jaxllm workdirs (the files around `mapping.py`).

Export: a workdir's `config.json` + newest restorable Orbax checkpoint (parameters only,
restored onto one device) -> `model.safetensors`, `config.json`, `generation_config.json`,
tokenizer files and `jaxllm.json` (the source config, step and tokenizer).
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

import jax
import numpy as np

from jaxllm import optim, parallel, run
from jaxllm.checkpoint import Checkpointer, data_meta
from jaxllm.config import ConfigError, validate
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.resolve import resolve
from jaxllm.data.tokenizers import (
    bytes_to_unicode,  # GPT-2's {char: byte} map
    load_tokenizer,
)
from jaxllm.hf.mapping import blocks_of, family, to_hf
from jaxllm.hf.reverse import from_hf
from jaxllm.model.layers import DTYPES
from jaxllm.state import abstract_state, fresh_state
from jaxllm.workdir_lock import acquire_for_run

BYTE_SPECIALS = {"<pad>": 256, "<s>": 257, "</s>": 258}  # jaxllm ByteTokenizer ids


def restore_params(cfg, workdir, step=None):
    """(step, params as numpy) of the newest restorable checkpoint (or `step`), read onto
    one device (`run.restore_params`)."""
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = parallel.make_mesh(cfg, jax.devices()[:1])
    _, params, got = run.restore_params(cfg, workdir, mesh, step)
    return got, jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)


# ----------------------------------------------------------------------------- tokenizer
def byte_tokenizer_json() -> str:
    """A `tokenizers` byte-level BPE with no merges whose ids equal jaxllm's ByteTokenizer:
    byte b -> id b (GPT-2's printable byte alphabet), then <pad> 256, <s> 257, </s> 258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_of = bytes_to_unicode()
    assert sorted(pre_tokenizers.ByteLevel.alphabet()) == sorted(byte_of)
    tok = Tokenizer(models.BPE(vocab=dict(byte_of), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BYTE_SPECIALS))
    assert all(tok.token_to_id(t) == i for t, i in BYTE_SPECIALS.items())
    return tok.to_str()


def write_tokenizer(spec: str, out: pathlib.Path, seq_len: int) -> dict:
    """Write HF tokenizer files for jaxllm tokenizer `spec`; returns the special ids."""
    tcfg = {"add_bos_token": False, "add_eos_token": False, "model_max_length": seq_len,
            "clean_up_tokenization_spaces": False}
    if spec == "byte":
        (out / "tokenizer.json").write_text(byte_tokenizer_json())
        names = {v: k for k, v in BYTE_SPECIALS.items()}
        ids = {"bos": 257, "eos": 258, "pad": 256}
        tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        src = pathlib.Path(spec).expanduser()
        if not src.is_file():
            raise ConfigError(f"data.tokenizer: {src} not found; pass --tokenizer=PATH")
        try:
            tok = load_tokenizer(str(src))
        except (OSError, ValueError) as e:
            raise ConfigError(str(e) if str(e).startswith("data.tokenizer") else
                              f"data.tokenizer: {e}") from None
        ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
        if src.suffix == ".model":
            import sentencepiece as spm
            shutil.copyfile(src, out / "tokenizer.model")
            sp = spm.SentencePieceProcessor(model_file=str(src))
            names = {i: sp.id_to_piece(i) for i in ids.values()}
            # jaxllm encodes with the identity normalizer and no dummy-prefix space
            tcfg.update(tokenizer_class="LlamaTokenizer", add_prefix_space=False, legacy=False)
        else:
            from tokenizers import Tokenizer
            shutil.copyfile(src, out / "tokenizer.json")
            t = Tokenizer.from_file(str(src))
            names = {i: t.id_to_token(i) for i in ids.values()}
            tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tcfg.update({f"{k}_token": names[i] for k, i in ids.items()})
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {f"{k}_token": names[i] for k, i in ids.items()}, indent=2) + "\n")
    return ids


# ----------------------------------------------------------------------------- export
def export_hf(workdir, out, *, step=None, dtype=None, trim_vocab=False, tokenizer=None):
    """Write the Hugging Face directory `out` for the workdir's checkpoint; returns a summary."""
    from safetensors.numpy import save_file

    cfg = validate(run.read_config(workdir))
    fam = family(cfg.model)  # refuse before reading any checkpoint
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype: got {dtype!r}; allowed: {', '.join(DTYPES)}")
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; choose a new output directory")
    spec = tokenizer or cfg.data.tokenizer
    vocab = None
    if trim_vocab:
        vocab = load_tokenizer(spec).vocab_size
    got_step, params = restore_params(cfg, workdir, step)
    hf, tensors = to_hf(cfg, params, vocab=vocab)
    if dtype is not None:
        tensors = {k: np.asarray(v.astype(DTYPES[dtype])) for k, v in tensors.items()}
        hf["torch_dtype"] = dtype
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(spec, out, cfg.data.seq_len)
    hf.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
           "pad_token_id": ids["pad"], "max_length": cfg.data.seq_len}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / "jaxllm.json").write_text(json.dumps(
        {"source": os.path.abspath(workdir), "step": got_step, "tokenizer":
         "byte" if spec == "byte" else os.path.basename(spec),
         "config": json.loads(cfg.to_json_best_effort())}, indent=2) + "\n")
    return {"family": fam, "architecture": hf["architectures"][0], "step": got_step,
            "tensors": len(tensors), "vocab_size": hf["vocab_size"], "out": str(out)}


# ----------------------------------------------------------------------------- import
def read_hf(hf_dir):
    """(config dict, {name: np.ndarray}) of a local Hugging Face model directory."""
    from safetensors import safe_open

    d = pathlib.Path(hf_dir)
    try:
        hf = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{d / 'config.json'}: not found; is {d} a Hugging Face model "
                          "directory?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{d / 'config.json'}: unreadable ({e})") from None
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{d}: no model.safetensors (or model.safetensors.index.json); only "
                          "safetensors weights are read (convert .bin files first)")
    tensors = {}
    for name in files:
        try:
            with safe_open(str(d / name), framework="np") as f:
                for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    tensors[k] = f.get_tensor(k)
        except Exception as e:  # noqa: BLE001 (safetensors raises several kinds)
            raise ConfigError(f"{d / name}: unreadable safetensors file ({e})") from None
    return hf, tensors


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
    keys, params = from_hf(hf, tensors, str(d / "config.json"))

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
