"""Hugging Face export/import (jaxllm/hf, tools/export_hf.py, tools/import_hf.py).

The exported tensors are checked against an independent numpy forward pass written from
transformers' modeling files (tests/hf_reference.py); the round trip jaxllm -> HF -> jaxllm
must give back the same parameters and logits, through real checkpoints and the CLIs.
The optional tests/test_hf_transformers.py compares with transformers itself.
"""

from __future__ import annotations

import functools
import json
import os

import hf_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.fixtures import run_cli, tiny_model_cfg
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxllm.config import ConfigError, validate
from jaxllm.hf import export_hf, family, from_hf, import_hf, to_hf
from jaxllm.hf.convert import restore_params
from jaxllm.hf.tokenizer import byte_tokenizer_json, write_tokenizer
from jaxllm.hf.mapping import blocks_of
from jaxllm.model.transformer import ModelDef, abstract_model

# name -> model keys; every family, tied/untied, GQA, biases, scanned and listed blocks
VARIANTS = {
    "llama": dict(pos_encoding="rope", activation="swiglu", norm="rmsnorm", use_bias=False),
    "llama_gqa_bias_untied_geglu": dict(
        pos_encoding="rope", activation="geglu", norm="rmsnorm", use_bias=True, n_kv_heads=2,
        tie_embeddings=False, scan_layers=False, rope_base=500.0),
    "gpt2": dict(pos_encoding="learned", activation="gelu", norm="layernorm", use_bias=True),
    "gpt2_nopos_relu_nobias_untied": dict(
        pos_encoding="none", activation="relu", norm="layernorm", use_bias=False,
        tie_embeddings=False, scan_layers=False),
    "mpt": dict(pos_encoding="alibi", activation="gelu_exact", norm="layernorm",
                use_bias=False),
    "mpt_6heads": dict(pos_encoding="alibi", activation="gelu_exact", norm="layernorm",
                       use_bias=False, d_model=48, n_heads=6, tie_embeddings=False),
    "mistral": dict(pos_encoding="rope", activation="swiglu", norm="rmsnorm", use_bias=False,
                    n_kv_heads=2, tie_embeddings=False),
    "qwen2": dict(pos_encoding="rope", activation="swiglu", norm="rmsnorm", use_bias=False,
                  qkv_bias=True, n_kv_heads=2, rope_base=1e6),
}
ARCH = {"mistral": "mistral"}  # the export's --arch where it is not the default
HF_CLASS = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "mpt": "MptForCausalLM",
            "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class Model:
    """A jitted forward pass of fixed parameters (called like the NNX module)."""

    def __init__(self, cfg, params):
        self.fn = jax.jit(ModelDef(abstract_model(cfg)[0], cfg).apply(params).__call__)

    def __call__(self, tokens):
        return self.fn(tokens)


@functools.lru_cache(maxsize=None)
def make(name):
    """A validated config, a model and its parameters, every one random (non-zero biases and
    norm weights too, so a misplaced tensor cannot hide behind an init of 0 or 1)."""
    cfg = tiny_model_cfg(**VARIANTS[name])
    cfg.data.seq_len = 16
    validate(cfg)

    rng = np.random.RandomState(len(name))
    abstract = nnx.to_pure_dict(abstract_model(cfg)[1])
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: ((1.0 if str(path[-1]).endswith("'scale']") else 0.0)
                         + 0.2 * rng.standard_normal(a.shape)).astype(np.float32), abstract)
    return cfg, Model(cfg, params), params


def ids(n=16, seed=0):
    return np.random.RandomState(seed).randint(0, 259, (2, n)).astype(np.int32)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_matches_numpy_reference_of_hf_semantics(name):
    cfg, model, params = make(name)
    hf, tensors = to_hf(cfg, params, arch=ARCH.get(name))
    assert hf["architectures"][0] == HF_CLASS[name.split("_")[0]]
    x = ids()
    ref = np.asarray(model(jnp.asarray(x)))
    for b in range(2):
        got = hf_reference.forward(hf, tensors, x[b])
        np.testing.assert_allclose(got, ref[b], atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1.0  # logits far from zero: the comparison has teeth


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_gives_identical_parameters_and_logits(name):
    cfg, model, params = make(name)
    hf, tensors = to_hf(cfg, params, arch=ARCH.get(name))
    keys, back = from_hf(json.loads(json.dumps(hf)), tensors)
    assert (keys["use_bias"], keys["qkv_bias"]) == (cfg.model.use_bias, cfg.model.qkv_bias) \
        or name.startswith("gpt2")  # GPT-2 always has biases (zeros for use_bias=false)
    cfg2 = tiny_model_cfg(**VARIANTS[name])
    cfg2.data.seq_len = 16
    cfg2.model.update(keys)
    validate(cfg2)
    back["blocks"] = blocks_of(back["blocks"], cfg2.model.scan_layers)
    want = nnx.to_pure_dict(abstract_model(cfg2)[1])
    assert jax.tree.structure(want) == jax.tree.structure(back)
    jax.tree.map(lambda w, b: w.shape == b.shape or pytest.fail(f"{w.shape} {b.shape}"),
                 want, back)
    if cfg.model.use_bias or name.startswith(("llama", "mpt", "mistral", "qwen2")):
        # no zero-filled biases
        assert jax.tree.structure(back) == jax.tree.structure(params)
        jax.tree.map(np.testing.assert_array_equal, back, params)
    x = jnp.asarray(ids())
    np.testing.assert_array_equal(np.asarray(Model(cfg2, back)(x)), np.asarray(model(x)))


def test_trim_vocab_keeps_logits_of_real_ids():
    cfg, model, params = make("llama_gqa_bias_untied_geglu")
    hf, tensors = to_hf(cfg, params, vocab=259)
    assert hf["vocab_size"] == 259
    assert tensors["model.embed_tokens.weight"].shape == (259, 32)
    assert tensors["lm_head.weight"].shape == (259, 32)
    x = ids()
    got = hf_reference.forward(hf, tensors, x[0])
    np.testing.assert_allclose(got, np.asarray(model(jnp.asarray(x)))[0, :, :259], atol=1e-4)


@pytest.mark.parametrize("model,needle", [
    (dict(pos_encoding="rope", norm="layernorm", activation="swiglu"),
     "no transformers class pairs rope with layernorm"),
    (dict(pos_encoding="rope", norm="rmsnorm", activation="gelu"),
     "rope needs a gated activation (swiglu, geglu, reglu, glu) as in Llama; got gelu"),
    (dict(pos_encoding="learned", norm="layernorm", activation="swiglu"),
     "GPT-2 has no gated MLP; activation must be one of gelu, gelu_exact, relu, swish"),
    (dict(pos_encoding="learned", norm="layernorm", activation="gelu", n_kv_heads=2),
     "GPT-2 has no grouped-query attention (n_kv_heads=2 != n_heads=4)"),
    (dict(pos_encoding="alibi", norm="layernorm", activation="gelu", use_bias=False),
     "activation must be gelu_exact, got gelu (jaxllm gelu is the tanh approximation)"),
    (dict(pos_encoding="alibi", norm="layernorm", activation="gelu_exact", use_bias=True),
     "alibi needs norm=layernorm with use_bias=false, qkv_bias=false (MPT)"),
    (dict(pos_encoding="alibi", norm="layernorm", activation="gelu_exact", use_bias=False,
          d_ff=64), "MPT's MLP width is 4*d_model (128), got d_ff=64"),
])
def test_inexpressible_models_are_refused_by_name(model, needle):
    cfg = tiny_model_cfg(**model)
    with pytest.raises(ConfigError) as e:
        family(cfg.model)
    assert str(e.value).startswith("model: no transformers class can express this model: ")
    assert needle in str(e.value)


def _hf(name="llama"):
    cfg, _, params = make(name)
    hf, tensors = to_hf(cfg, params)
    return json.loads(json.dumps(hf)), tensors


@pytest.mark.parametrize("edit,needle", [
    (lambda h, t: h.update(model_type="falcon"),
     "model_type 'falcon' is not supported; allowed: llama, mistral, qwen2, gpt2, mpt"),
    (lambda h, t: h.update(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}),
     "rope scaling 'llama3' is not supported"),
    (lambda h, t: h.update(hidden_act="gelu"), "hidden_act 'gelu' has no jaxllm equivalent"),
    (lambda h, t: t.pop("model.layers.1.mlp.up_proj.weight"),
     "tensor model.layers.1.mlp.up_proj.weight is missing from the weights"),
    (lambda h, t: t.update({"model.layers.0.self_attn.q_proj.weight": np.zeros((8, 32))}),
     "tensor model.layers.0.self_attn.q_proj.weight has shape (8, 32), expected (32, 32)"),
    (lambda h, t: t.update({"lm_head.bias": np.zeros(384)}),
     "tensors jaxllm has no place for: lm_head.bias"),
    (lambda h, t: h.pop("intermediate_size"), "llama config has no 'intermediate_size'"),
])
def test_import_refuses_what_jaxllm_cannot_hold(edit, needle):
    hf, tensors = _hf()
    edit(hf, tensors)
    with pytest.raises(ConfigError, match="^x/config.json: ") as e:
        from_hf(hf, tensors, "x/config.json")
    assert needle in str(e.value)


def test_gpt2_names_without_transformer_prefix_and_mask_buffers_import():
    """Original GPT-2 hub files name tensors `h.0...` and carry `attn.bias` mask buffers."""
    hf, tensors = _hf("gpt2")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16)))
    keys, back = from_hf(hf, bare)
    keys2, back2 = from_hf(hf, tensors)
    assert keys == keys2
    jax.tree.map(np.testing.assert_array_equal, back, back2)


def test_byte_tokenizer_json_encodes_exactly_like_jaxllm_bytes():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(byte_tokenizer_json())
    text = "def f(x):\n    return x  # ünïcödé ✓ 🚀\t end "
    assert tok.encode(text).ids == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text
    assert [tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [256, 257, 258]
    assert tok.get_vocab_size() == 259


def test_byte_tokenizer_json_loads_in_jaxllm_with_byte_ids(tmp_path):
    from jaxllm.data.tokenizers import load_tokenizer
    (tmp_path / "t.json").write_text(byte_tokenizer_json())
    tok = load_tokenizer(str(tmp_path / "t.json"))
    text = "héllo, wörld\n"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (257, 258, 256, 259)
    assert tok.token_bytes(tok.encode(text)).sum() == len(text.encode("utf-8"))


@pytest.mark.parametrize("kind,name", [("sentencepiece_bpe", "tokenizer.model"),
                                       ("byte_bpe", "tokenizer.json")])
def test_trained_tokenizers_are_copied_with_their_special_ids(tmp_path, kind, name):
    from jaxllm.data.tokenizer_training import train_tokenizer
    from jaxllm.data.tokenizers import load_tokenizer
    corpus = tmp_path / "c.txt"
    corpus.write_text(open(json.__file__).read() * 2)
    spec = train_tokenizer([str(corpus)], kind, 400, str(tmp_path / kind), progress=False)
    tok = load_tokenizer(spec)
    (tmp_path / "out").mkdir()
    got = write_tokenizer(spec, tmp_path / "out", 64)
    # the document separator (EOS) is what every encoded text starts with, so it is BOS
    assert got == {"bos": tok.eos_id, "eos": tok.eos_id, "pad": tok.pad_id,
                   "vocab": tok.vocab_size}
    if name == "tokenizer.model":
        assert (tmp_path / "out" / name).read_bytes() == open(spec, "rb").read()
    else:  # the same tokenizer plus a post-processor that prepends the separator
        from tokenizers import Tokenizer
        hf_tok = Tokenizer.from_file(str(tmp_path / "out" / name))
        assert hf_tok.encode("a b").ids == [tok.eos_id, *tok.encode("a b")]
    tcfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tcfg["model_max_length"] == 64 and tcfg["add_bos_token"] is True
    assert tcfg["split_special_tokens"] is True and tcfg["bos_token"] == tcfg["eos_token"]
    again = load_tokenizer(str(tmp_path / "out" / name))
    text = "import json\n    x = {'a': 1}  # ü"
    assert again.encode(text) == tok.encode(text)


def _save_hf(name, d):
    cfg, model, params = make(name)
    hf, tensors = to_hf(cfg, params)
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(hf))
    write_tokenizer("byte", d, 16)
    return cfg, model, hf, tensors


@pytest.mark.parametrize("name", ["llama_gqa_bias_untied_geglu", "gpt2"])
def test_checkpoint_round_trip_through_workdir(tmp_path, name):
    """HF dir -> import (step-0 checkpoint, as jaxllm-train resumes it) -> export: same
    tensors bit for bit, and the restored model's logits equal the original's."""
    from jaxllm import optim, parallel
    from jaxllm.checkpoint import Checkpointer
    from jaxllm.data.pipeline import make_pipeline
    from jaxllm.hf import load_workdir_config
    from jaxllm.data.resolve import resolve
    from jaxllm.state import abstract_state

    cfg0, model, hf, tensors = _save_hf(name, tmp_path / "hf")
    base = tiny_model_cfg(scan_layers=cfg0.model.scan_layers)
    base.data.seq_len = 16
    s = import_hf(tmp_path / "hf", tmp_path / "wd", base, tokenizer="byte")
    assert s["family"] == name.split("_")[0]
    # restore exactly as the training loop does (state + data iterator)
    cfg = load_workdir_config(tmp_path / "wd")
    tok = resolve(cfg)
    mesh = parallel.make_mesh(cfg)
    tx = optim.build_optimizer(cfg)
    _, abstract, _ = abstract_state(cfg, mesh, tx)
    ck = Checkpointer(str(tmp_path / "wd" / "checkpoints"), cfg)
    it = make_pipeline(cfg, tok, "train", 0, 1)
    with parallel.activate(cfg, mesh):
        r = ck.restore(abstract, it)
        step, state = r.step, r.state
    ck.close()
    assert step == 0 and int(state["step"]) == 0
    x = jnp.asarray(ids())
    restored = jax.tree.map(np.asarray, state["params"])
    # the same logits for the tokenizer's 259 ids; the padding ids are masked (-inf)
    assert cfg.model.vocab_used == 259
    got = np.asarray(Model(cfg, restored)(x))
    np.testing.assert_array_equal(got[..., :259], np.asarray(model(x))[..., :259])
    assert np.all(got[..., 259:] == -np.inf)
    mu = jax.tree.leaves(state["opt_state"])
    assert all(float(jnp.abs(m).max()) == 0.0 for m in mu if m.ndim > 0)  # fresh moments
    out = export_hf(tmp_path / "wd", tmp_path / "out", keep_vocab_padding=True)
    assert out["step"] == 0
    again = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(again) == sorted(tensors)
    for k in tensors:
        np.testing.assert_array_equal(again[k], tensors[k])
    hf2 = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: v for k, v in hf2.items() if not k.endswith("token_id")} == hf
    # every text starts with the document separator (EOS), which is therefore also BOS
    assert (hf2["bos_token_id"], hf2["eos_token_id"], hf2["pad_token_id"]) == (258, 258, 256)
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(259, 384))  # kept padding: never generated
    assert json.loads((tmp_path / "out" / "jaxllm.json").read_text())["tokenizer"] == "byte"


def test_export_bfloat16_trimmed_and_parameters_only(tmp_path):
    import ml_dtypes

    from jaxllm.hf import load_workdir_config, read_hf
    _, _, hf, tensors = _save_hf("llama", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "wd", tiny_model_cfg(), tokenizer="byte")
    step, params = restore_params(load_workdir_config(tmp_path / "wd"), tmp_path / "wd")
    assert step == 0 and set(params) == {"embed", "blocks", "ln_f"}
    with pytest.raises(ConfigError,
                       match=r"--step: 7 is not among the checkpoints of .* \(available: 0\)"):
        restore_params(load_workdir_config(tmp_path / "wd"), tmp_path / "wd", step=7)
    export_hf(tmp_path / "wd", tmp_path / "bf", dtype="bfloat16", step=0)  # trimmed
    hf2, t2 = read_hf(tmp_path / "bf")
    assert hf2["torch_dtype"] == "bfloat16" and hf2["vocab_size"] == 259
    for k, x in tensors.items():
        want = x[:259] if k == "model.embed_tokens.weight" else x
        assert t2[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(t2[k], want.astype(ml_dtypes.bfloat16))


def test_clis_round_trip_and_error_contract(tmp_path):
    _, _, _, tensors = _save_hf("mpt", tmp_path / "hf")
    params = make("mpt")[2]
    wd, out = tmp_path / "wd", tmp_path / "out"
    # imported sharded over 8 simulated devices (fsdp 2 x tensor 2 x data 2) ...
    r = run_cli(["tools/import_hf.py", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={wd}",
                 "--config.data.seq_len=16", "--config.train.batch_size=4",
                 "--config.mesh.fsdp=2", "--config.mesh.tensor=2"],
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert r.returncode == 0, r.stderr
    assert f"jaxllm-train --config={wd}/config.py --workdir={wd}" in r.stdout
    saved = json.loads((wd / "config.json").read_text())
    assert saved["model"]["activation"] == "gelu_exact"
    # the directory's tokenizer.json is copied into the workdir and used from there
    assert saved["data"]["tokenizer"] == str((wd / "tokenizer.json").resolve())
    # ... and exported by a one-device process
    r = run_cli(["tools/export_hf.py", f"--workdir={wd}", f"--out={out}"])
    assert r.returncode == 0, r.stderr
    assert "exported step 0 as MptForCausalLM" in r.stdout
    again = load_file(str(out / "model.safetensors"))
    for k in tensors:  # the vocabulary cut to the tokenizer's 259 ids
        want = tensors[k][:259] if k == "transformer.wte.weight" else tensors[k]
        np.testing.assert_array_equal(again[k], want)
    # ALiBi extrapolates: transformers may run 8 x the training length
    assert json.loads((out / "config.json").read_text())["max_seq_len"] == 8 * 16
    # exporting an imported export gives the same tokenizer (one document separator)
    assert (out / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()
    # continued pre-training: jaxllm-train resumes the step-0 checkpoint; its first loss is
    # the loss of the original model on the first batch
    r = run_cli(["-m", "jaxllm.train", f"--config={wd}/config.py", f"--workdir={wd}",
                 "--config.train.steps=1", "--config.train.log_every=1",
                 "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
                 "--config.train.sample_tokens=0", "--config.train.eval_batches=1",
                 "--config.log.tensorboard=false", "--config.log.progress=false"])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in open(wd / "metrics.jsonl")]
    assert any(r.get("event") == "restored" and r["step"] == 0 for r in rows)
    loss = next(r["loss"] for r in rows if r.get("split") == "train")
    from jaxllm.data.pipeline import make_pipeline
    from jaxllm.hf import load_workdir_config
    from jaxllm.data.resolve import resolve
    from jaxllm.model.loss import forward_sums
    cfg = load_workdir_config(wd)
    batch = next(iter(make_pipeline(cfg, resolve(cfg), "train", 0, 1)))
    nll, _, _, w = forward_sums(ModelDef(abstract_model(cfg)[0], cfg), params,
                                {k: jnp.asarray(v) for k, v in batch.items()}, 0)
    assert loss == pytest.approx(float(nll / w.sum()), rel=1e-5)
    # errors: one line, exit 2, nothing written
    r = run_cli(["tools/export_hf.py", f"--workdir={wd}", f"--out={out}"])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {out}: exists and is not empty; choose a new output directory"]
    r = run_cli(["tools/import_hf.py", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={wd}"])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {wd}: already holds checkpoints; use a new --workdir"]
    r = run_cli(["tools/export_hf.py", "--workdir", str(tmp_path / "nope"), "--out", "x"])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --workdir: {tmp_path / 'nope'} is not a directory (a jaxllm-train "
        "--workdir)"]
    assert not os.path.exists(tmp_path / "x")


def test_import_picks_the_tokenizer(tmp_path):
    from jaxllm.hf.convert import _tokenizer_for_import
    d, wd = tmp_path / "hf", tmp_path / "wd"
    d.mkdir()
    with pytest.raises(ConfigError, match="no tokenizer.json or tokenizer.model; pass "
                       "--tokenizer=byte|PATH"):
        _tokenizer_for_import(d, wd, None)
    (d / "tokenizer.model").write_bytes(b"sp")
    assert _tokenizer_for_import(d, wd, None) == str((wd / "tokenizer.model").resolve())
    assert (wd / "tokenizer.model").read_bytes() == b"sp"
    write_tokenizer("byte", d, 16)  # tokenizer.json is preferred over tokenizer.model
    assert _tokenizer_for_import(d, wd, None) == str((wd / "tokenizer.json").resolve())
    (d / "jaxllm.json").write_text(json.dumps({"tokenizer": "byte"}))  # a jaxllm export
    assert _tokenizer_for_import(d, wd, None) == "byte"
    assert _tokenizer_for_import(d, wd, "my.model") == "my.model"
