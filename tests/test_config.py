"""The error contract for bad configs and flags: one `error:` line naming the key, exit 2."""

import importlib.util
import os

import pytest
from tests.fixtures import run_cli

from jaxllm.config import ConfigError, defaults, tiny, validate

BAD = [
    (["--config.model.pos_encoding=sinusoidal"], "model.pos_encoding"),
    (["--config.model.activation=tanh"], "model.activation"),
    (["--config.model.d_model=abc"], "model.d_model"),
    (["--config.model.no_such_key=1"], "no_such_key"),
    (["--config.model.n_heads=3"], "model.d_model"),
    (["--config.model.n_kv_heads=3"], "model.n_kv_heads"),
    (["--config.model.pos_encoding=learned", "--config.model.max_position=64"],
     "model.max_position"),
    (["--config=configs/does_not_exist.py"], "does_not_exist.py"),
    (["--config.train.steps=0"], "train.steps"),
    (["--config.optim.name=adafactor"], "optim.name"),
    (["--config.train.grad_accum=3"], "train.grad_accum"),
    (["--config.mesh.fsdp=-1"], "mesh"),
    (["--config.dist.coordinator=localhost:1234"], "dist.num_processes"),
    (["--config.data.tokenizer=/no/such/tokenizer.model"], "data.tokenizer"),
    (["--config.optim.b2=1.5"], "optim.b2"),
]
if importlib.util.find_spec("wandb") is None:  # the test extra does not install it
    BAD.append((["--config.log.wandb=true"], "log.wandb"))


@pytest.mark.parametrize("args,key", BAD, ids=[k for _, k in BAD])
def test_bad_input_gets_error_contract(tmp_path, args, key):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("precious")
    proc = run_cli(["-m", "jaxllm.train", f"--workdir={workdir}", *args])
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and key in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(workdir)) == ["keep.txt"]
    assert (workdir / "keep.txt").read_text() == "precious"


def test_defaults_and_presets_validate():
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    validate(defaults())
    validate(tiny())
    for name in ("base", "tiny", "gpt2_124m", "llama_1b", "mpt_style"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "configs",
                                                                          f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        validate(mod.get_config())


def test_presets_match_their_names():
    import importlib.util

    import jax
    from tests.fixtures import ROOT
    from flax import nnx

    from jaxllm.model.transformer import Transformer
    from jaxllm.train.metrics import param_count

    def load(name):
        spec = importlib.util.spec_from_file_location(name, f"{ROOT}/configs/{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.get_config()

    def count(cfg):
        abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
        return param_count(nnx.to_pure_dict(nnx.split(abstract)[1]))
    gpt2 = count(load("gpt2_124m"))
    assert 123e6 < gpt2 < 126e6, gpt2  # 124.4M with the 50304-padded vocabulary
    llama = count(load("llama_1b"))
    assert 1.25e9 < llama < 1.45e9, llama
    mpt = load("mpt_style")
    assert (mpt.model.pos_encoding, mpt.model.activation, mpt.model.norm, mpt.model.use_bias) == (
        "alibi", "gelu_exact", "layernorm", False)  # MPT's exact GELU: exports as MPT
    del jax


def test_validate_raises_config_error_with_key():
    c = tiny()
    c.data.seq_len = 1
    with pytest.raises(ConfigError, match="data.seq_len"):
        validate(c)


def test_wandb_logging_path_with_a_stub_module(tmp_path, monkeypatch):
    """log.wandb=true: wandb.init gets the project, the config and the workdir; every train
    and eval row is logged at its step under `split/` names; the run is finished. (A stub
    module stands in for wandb, which the test extra does not install.)"""
    import importlib.machinery
    import sys
    import types

    from tests.fixtures import tiny_model_cfg

    from jaxllm.train.loop import train
    from tests.fixtures import rows as metrics_rows

    calls = []
    stub = types.ModuleType("wandb")
    stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, scalars, step):
            calls.append(("log", step, scalars))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()
    stub.init = init
    monkeypatch.setitem(sys.modules, "wandb", stub)
    cfg = tiny_model_cfg()
    cfg.train.update(steps=10, eval_every=5)
    cfg.log.update(wandb=True, wandb_project="proj")
    train(cfg, str(tmp_path))
    kind, kw = calls[0]
    assert kind == "init" and kw["project"] == "proj" and kw["dir"] == str(tmp_path)
    assert kw["config"]["model"]["d_model"] == 32
    want = [(r["step"], r["split"], r["loss"]) for r in metrics_rows(tmp_path) if "split" in r]
    got = [(c[1], k.split("/")[0], v) for c in calls if c[0] == "log"
           for k, v in c[2].items() if k.endswith("/loss")]
    assert got == want and {s for s, split, _ in got if split == "eval"} == {5, 10}
    assert calls[-1] == ("finish",)


def test_dotted_keys_one_walk():
    """get_key / set_key / unknown_key: the one walk over dotted keys (CLI overrides,
    ablation grids, resume checks, eval overrides all use it)."""
    from jaxllm.config import get_key, set_key, unknown_key
    cfg = tiny()
    assert get_key(cfg, "model.d_model") == 128 and get_key(cfg, "mesh.rules")[0][0] == "batch"
    set_key(cfg, "optim.lr", 0.5)
    assert cfg.optim.lr == 0.5
    assert get_key({"model": {"d_model": 7}}, "model.d_model") == 7  # a saved config.json
    assert get_key({"model": {}}, "model.d_model", None) is None
    assert unknown_key(cfg, "train.steps") is None
    assert unknown_key(cfg, "train.nope").startswith(
        "train.nope: unknown config key; keys under train: batch_size, ")
    assert unknown_key(cfg, "nope.x").startswith("nope.x: unknown config key; keys under the "
                                                 "top level: checkpoint, data, ")
    assert "keys under model.d_model: none" in unknown_key(cfg, "model.d_model.x")
    for bad in (lambda: set_key(cfg, "model.zz", 1), lambda: get_key(cfg, "zz.a")):
        with pytest.raises(ConfigError, match="unknown config key"):
            bad()
    assert "zz" not in cfg.model


def test_choices_are_the_registries_of_the_implementing_modules(monkeypatch):
    """One source per choice: config validation reads the registry of the module that
    implements it, so a backend added there is a valid config value at once."""
    from jaxllm import config, kernels
    from jaxllm.model import layers, transformer
    from jaxllm.optim import build
    want = {"model.attention_backend": kernels.BACKENDS, "model.remat": transformer.REMAT,
            "model.activation": layers.ACTIVATIONS, "model.dtype": tuple(layers.DTYPES),
            "optim.name": tuple(build._DEFAULTS), "optim.schedule": tuple(build.SCHEDULES)}
    for key, reg in want.items():
        sec, name = key.split(".")
        assert config.choices(config.SCHEMA[sec][name].choices) == tuple(reg), key
    for sec, keys in config.SCHEMA.items():  # every default is one of its choices
        for name, spec in keys.items():
            if spec.choices is not None:
                assert spec.default in config.choices(spec.choices), (sec, name)
    cfg = tiny()
    cfg.model.attention_backend = "mine"
    with pytest.raises(ConfigError, match="model.attention_backend: got 'mine'; allowed: "
                       + ", ".join(kernels.BACKENDS) + "$"):
        validate(cfg)
    monkeypatch.setattr(kernels, "BACKENDS", (*kernels.BACKENDS, "mine"))
    config.choices.cache_clear()
    try:
        validate(cfg)
    finally:
        config.choices.cache_clear()


def test_reference_table_has_a_row_per_schema_key():
    from jaxllm.config import SCHEMA, reference_markdown
    rows = reference_markdown().splitlines()[2:]
    assert [r.split("`")[1] for r in rows] == [f"{s}.{k}" for s in SCHEMA for k in SCHEMA[s]]
    assert len(rows) == sum(len(v) for v in defaults().values())
