"""What a user meets around the tensors of a Hugging Face export/import: bfloat16 files,
shards, the model card and generation config, Mistral / Qwen2 specifics, ALiBi's length
limit and the project's own presets (torch-free; tests/test_hf_transformers.py runs
transformers itself on the same paths)."""

from __future__ import annotations

import functools
import json

import ml_dtypes
import numpy as np
import pytest
from tests.fixtures import run_cli, tiny_model_cfg
from test_hf import _save_hf, make

from jaxllm.config import ConfigError
from jaxllm.hf import export_hf, family, from_hf, import_hf, load_workdir_config, read_hf, to_hf
from jaxllm.hf.convert import restore_params
from jaxllm.hf.mapping import architecture
from jaxllm.hf.weights import parse_size, read_safetensors


@functools.lru_cache(maxsize=None)
def workdir(tmp_root, name="llama"):
    """A jaxllm workdir (step-0 checkpoint) holding `make(name)`'s parameters."""
    import pathlib
    root = pathlib.Path(tmp_root)
    _save_hf(name, root / f"hf_{name}")
    base = tiny_model_cfg()
    base.data.seq_len = 16
    import_hf(root / f"hf_{name}", root / f"wd_{name}", base, tokenizer="byte")
    return root / f"wd_{name}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_export"))


def test_bfloat16_export_imports_through_the_cli(root, tmp_path):
    """`export_hf.py --dtype bfloat16` -> `import_hf.py` in a fresh process (where nothing
    has registered bfloat16 with numpy): the parameters come back as their bf16 values."""
    wd = workdir(root)
    r = run_cli(["tools/export_hf.py", f"--workdir={wd}", f"--out={tmp_path / 'bf'}",
                 "--dtype=bfloat16"])
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["torch_dtype"] == \
        "bfloat16"
    r = run_cli(["tools/import_hf.py", f"--hf_dir={tmp_path / 'bf'}",
                 f"--workdir={tmp_path / 'wd2'}", "--config.data.seq_len=16"])
    assert r.returncode == 0, r.stderr
    _, before = restore_params(load_workdir_config(wd), wd)
    _, after = restore_params(load_workdir_config(tmp_path / "wd2"), tmp_path / "wd2")
    bf = before["embed"]["embedding"][:259].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(after["embed"]["embedding"], bf)
    w = before["blocks"]["attn"]["wq"]
    np.testing.assert_array_equal(after["blocks"]["attn"]["wq"],
                                  w.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert not np.array_equal(after["blocks"]["attn"]["wq"], w)  # really rounded


def test_reader_reads_every_float_dtype_written_by_safetensors(tmp_path):
    from safetensors.numpy import save_file
    x = np.random.RandomState(0).standard_normal((3, 5)).astype(np.float32)
    want = {"f32": x, "f16": x.astype(np.float16), "bf16": x.astype(ml_dtypes.bfloat16),
            "f64": x.astype(np.float64), "i64": np.arange(7), "empty": np.zeros((0, 4))}
    save_file(want, str(tmp_path / "m.safetensors"))
    got = read_safetensors(tmp_path / "m.safetensors")
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(ConfigError, match="bad.safetensors: unreadable safetensors file"):
        read_safetensors(tmp_path / "bad.safetensors")


def test_sharded_export_writes_an_index_like_transformers(root, tmp_path):
    wd = workdir(root)
    s = export_hf(wd, tmp_path / "sh", max_shard_size="20KB")
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == [f for f in s["files"] if f.endswith(".safetensors")]
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "sh" / "model.safetensors").exists()
    one = export_hf(wd, tmp_path / "one")
    hf1, t1 = read_hf(tmp_path / "one")
    hf2, t2 = read_hf(tmp_path / "sh")
    assert hf1 == hf2 and sorted(t1) == sorted(t2) == sorted(index["weight_map"])
    for k in t1:
        np.testing.assert_array_equal(t1[k], t2[k])
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in t1.values())
    for f in shards:  # each shard within the limit unless one tensor alone is larger
        part = read_safetensors(tmp_path / "sh" / f)
        assert sum(x.nbytes for x in part.values()) <= 20_000 or len(part) == 1
    assert one["files"] == ["model.safetensors"]


def test_parse_size_and_bad_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500mb") == 5 * 10**8 and parse_size(1000) == 1000
    for bad in ("", "-1GB", "5 parsecs", "0"):
        with pytest.raises(ConfigError, match="--max_shard_size: got"):
            parse_size(bad)


def test_model_card_and_generation_config(root, tmp_path):
    wd = workdir(root)
    with open(wd / "metrics.jsonl", "a") as f:  # what a training run records
        f.write(json.dumps({"split": "train", "step": 0, "tokens_seen": 4096}) + "\n")
        f.write(json.dumps({"split": "eval", "step": 0, "bpb": 2.345678}) + "\n")
        f.write(json.dumps({"split": "eval", "step": 9, "bpb": 1.0}) + "\n")  # after the step
    export_hf(wd, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    for needle in ("# LlamaForCausalLM exported from jaxllm", "| trained | step 0, 4,096 tokens",
                   "| eval bits per byte | 2.3457 |", "tokenizer `byte`", "2 layers, d_model 32",
                   "library_name: transformers"):
        assert needle in card, needle
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 258, "eos_token_id": 258, "pad_token_id": 256}
    export_hf(wd, tmp_path / "pad", keep_vocab_padding=True)
    gen = json.loads((tmp_path / "pad" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(259, 384))
    assert json.loads((tmp_path / "pad" / "config.json").read_text())["vocab_size"] == 384


def test_mpt_length_limit_default_flag_and_refusals(root, tmp_path):
    wd = workdir(root, "mpt")
    export_hf(wd, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["max_seq_len"] == 8 * 16
    assert json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())[
        "model_max_length"] == 8 * 16
    r = run_cli(["tools/export_hf.py", f"--workdir={wd}", f"--out={tmp_path / 'b'}",
                 "--max_seq_len=4096"])
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "b" / "config.json").read_text())["max_seq_len"] == 4096
    r = run_cli(["tools/export_hf.py", f"--workdir={workdir(root)}",
                 f"--out={tmp_path / 'c'}", "--max_seq_len=64"])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --max_seq_len: got 64; it sets the length limit of ALiBi (MPT) exports only, "
        "and must be >= 1"]
    assert not (tmp_path / "c").exists()


def test_arch_choice_and_refusals():
    llama = tiny_model_cfg(pos_encoding="rope", activation="swiglu", norm="rmsnorm", use_bias=False)
    assert architecture(llama.model) == "llama"
    assert architecture(llama.model, "mistral") == "mistral"
    qwen = tiny_model_cfg(pos_encoding="rope", activation="swiglu", norm="rmsnorm", use_bias=False,
                    qkv_bias=True)
    assert architecture(qwen.model) == "qwen2" and architecture(qwen.model, "llama") == "llama"
    with pytest.raises(ConfigError, match="^--arch: mistral cannot express this model .*"
                       "qkv_bias True.*it exports as qwen2$"):
        architecture(qwen.model, "mistral")
    with pytest.raises(ConfigError, match="^--arch: got 'falcon'; allowed: llama, mistral, "
                       "qwen2, gpt2, mpt$"):
        architecture(llama.model, "falcon")


def test_qwen2_exported_as_llama_has_zero_o_proj_bias():
    cfg, _, params = make("qwen2")
    hf, t = to_hf(cfg, params, arch="llama")
    assert hf["attention_bias"] is True and hf["mlp_bias"] is False
    assert not t["model.layers.0.self_attn.o_proj.bias"].any()
    q = to_hf(cfg, params)[1]
    assert "model.layers.0.self_attn.o_proj.bias" not in q
    np.testing.assert_array_equal(q["model.layers.1.self_attn.k_proj.bias"],
                                  t["model.layers.1.self_attn.k_proj.bias"])


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_shorter_than_the_sequence_is_refused(kind):
    cfg, _, params = make(kind)
    hf, tensors = to_hf(cfg, params, arch=kind)
    hf = json.loads(json.dumps(hf))
    hf.update(sliding_window=8, use_sliding_window=True)
    with pytest.raises(ConfigError, match="^c.json: sliding_window=8 is shorter than "
                       "data.seq_len 16; jaxllm attends to the whole sequence"):
        from_hf(hf, tensors, "c.json", seq_len=16)
    keys, _ = from_hf(hf, tensors, "c.json", seq_len=8)  # covers the sequence: exact
    assert keys["qkv_bias"] is (kind == "qwen2")
    if kind == "qwen2":  # Qwen2 keeps the window off unless use_sliding_window
        hf["use_sliding_window"] = False
        from_hf(hf, tensors, "c.json", seq_len=16)


@pytest.mark.parametrize("preset,arg,want", [("mpt_style", None, "mpt"),
                                             ("gpt2_124m", None, "gpt2"),
                                             ("llama_1b", None, "llama")])
def test_presets_export_to_their_namesakes(preset, arg, want):
    import importlib.util

    from tests.fixtures import ROOT
    spec = importlib.util.spec_from_file_location(preset, f"{ROOT}/configs/{preset}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(arg)
    assert family(cfg.model) == want == architecture(cfg.model)
