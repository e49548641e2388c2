"""transformers itself on both sides of the conversion, for every family (Llama, Mistral,
Qwen2, GPT-2, MPT): its models on exported directories give jaxllm's logits within 1e-4 in
float32; its own randomly initialised models (saved in float32, bfloat16 or shards) import
to the same logits; and AutoTokenizer + generate / pipeline("text-generation") reproduce
`jaxllm-sample --temperature=0` token for token for the byte, SentencePiece and byte-level
BPE tokenizers, past the training length for ALiBi. Needs `pip install jaxllm[hf]` (CI
installs it); skipped where torch or transformers is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tests.fixtures import tiny_model_cfg  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from test_hf import ARCH, VARIANTS, Model, ids, make  # noqa: E402

from jaxllm.hf import export_hf, from_hf, import_hf, read_hf, to_hf  # noqa: E402
from jaxllm.hf.mapping import blocks_of  # noqa: E402
from jaxllm.hf.tokenizer import write_tokenizer  # noqa: E402
from jaxllm.model.transformer import abstract_model  # noqa: E402

TOL = 1e-4


def load(d, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(d), dtype=dtype, attn_implementation="eager").eval()


def hf_logits(d, tokens):
    with torch.no_grad():
        return load(d)(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def save(cfg, params, d, vocab=None, arch=None):
    hf, tensors = to_hf(cfg, params, vocab=vocab, arch=arch)
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(hf))
    write_tokenizer("byte", d, cfg.data.seq_len)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_logits_match(tmp_path, name):
    cfg, model, params = make(name)
    save(cfg, params, tmp_path / "hf", arch=ARCH.get(name))
    x = ids()
    ref = np.asarray(model(jnp.asarray(x)))
    got = hf_logits(tmp_path / "hf", x)
    err = float(np.abs(got - ref).max())
    print(f"{name}: max |transformers - jaxllm| = {err:.3g} (max |logit| "
          f"{float(np.abs(ref).max()):.3g})")
    assert got.shape == ref.shape and err < TOL


def test_trimmed_vocab_loads_and_matches_real_ids(tmp_path):
    cfg, model, params = make("gpt2")
    save(cfg, params, tmp_path / "hf", vocab=259)
    x = ids()
    got = hf_logits(tmp_path / "hf", x)
    assert got.shape[-1] == 259
    np.testing.assert_allclose(got, np.asarray(model(jnp.asarray(x)))[..., :259], atol=TOL)


SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
HF_CONFIGS = {  # name -> (config class, kwargs, save_pretrained kwargs)
    "llama": (lambda: transformers.LlamaConfig(**SIZE, attention_bias=True, mlp_bias=True),
              {"max_shard_size": "20KB"}),
    "mistral": (lambda: transformers.MistralConfig(**SIZE, sliding_window=None), {}),
    "qwen2": (lambda: transformers.Qwen2Config(**SIZE, tie_word_embeddings=True), {}),
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                             vocab_size=300), {}),
    "mpt": (lambda: transformers.MptConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                                           vocab_size=300), {"bf16": True}),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_transformers_models_import_to_the_same_logits(tmp_path, name):
    """transformers' own random models, saved by save_pretrained (MPT in bfloat16, Llama in
    shards with an index), give the same logits in jaxllm after import."""
    make_config, how = HF_CONFIGS[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config()).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():  # nothing hides behind an init of 0 or 1
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and "norm" in pname
                                                 or ".ln_" in pname else 0.0))
    if how.get("bf16"):
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "hf"), max_shard_size=how.get("max_shard_size",
                                                                       "5GB"))
    if "max_shard_size" in how:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf, tensors = read_hf(tmp_path / "hf")
    keys, params = from_hf(hf, tensors, "config.json", seq_len=16)
    cfg = tiny_model_cfg(**keys)
    cfg.data.seq_len = 16
    params["blocks"] = blocks_of(params["blocks"], cfg.model.scan_layers)
    nnx.to_pure_dict(abstract_model(cfg)[1])  # builds: the shapes fit the model
    x = np.random.RandomState(0).randint(0, 300, (2, 16))
    ref = hf_logits(tmp_path / "hf", x)
    got = np.asarray(Model(cfg, jax.tree.map(jnp.asarray, params))(jnp.asarray(x)))
    assert got.shape == ref.shape and float(np.abs(ref).max()) > 0.5
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def _tokenizer(kind, tmp_path):
    if kind == "byte":
        return "byte"
    from jaxllm.data.tokenizer_training import train_tokenizer
    (tmp_path / "c.txt").write_text(open(json.__file__).read() * 2)
    return train_tokenizer([str(tmp_path / "c.txt")], kind, 400, str(tmp_path / kind),
                           progress=False)


TEXTS = ["import json\n    x = {'a': 1}  # ü", " leading space", "two  spaces\n\nend",
         "literal </s> <s> <pad> <|endoftext|> <unk> tokens"]


@pytest.mark.parametrize("kind", ["byte", "sentencepiece_bpe", "byte_bpe"])
def test_exported_tokenizers_encode_like_training(tmp_path, kind):
    """Every text starts with the document separator (EOS), as training and jaxllm-sample
    encode it; special-token strings in the text are plain text on both sides."""
    from jaxllm.data.tokenizers import load_tokenizer
    spec = _tokenizer(kind, tmp_path)
    (tmp_path / "out").mkdir()
    write_tokenizer(spec, tmp_path / "out", 64)
    ours = load_tokenizer(spec)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert theirs.bos_token_id == theirs.eos_token_id == ours.eos_id
    for text in TEXTS:
        got = theirs(text)["input_ids"]
        assert got == [ours.eos_id, *ours.encode(text)]
        assert theirs.decode(got, skip_special_tokens=True) == ours.decode(got[1:]) == text


# tokenizer, family, new tokens: ALiBi (MPT) generates past the training length of 16
GENERATION = [("byte", "mpt", 40), ("sentencepiece_bpe", "llama", 12),
              ("byte_bpe", "qwen2", 12)]


@pytest.mark.parametrize("kind,name,n_new", GENERATION)
def test_generate_and_pipeline_reproduce_jaxllm_sample(tmp_path, kind, name, n_new):
    from jaxllm import parallel
    from jaxllm.cli.sample import sample
    from jaxllm.run import load_run
    from jaxllm.model.sample import generate
    from jaxllm.data.resolve import resolve

    spec = _tokenizer(kind, tmp_path)
    cfg = tiny_model_cfg(**VARIANTS[name], vocab_size=0)
    cfg.data.update(seq_len=16, tokenizer=spec)
    tok = resolve(cfg)
    rng = np.random.RandomState(1)  # large weights: the continuation depends on the prompt
    params = jax.tree.map(lambda a: (0.5 * rng.standard_normal(a.shape)).astype(np.float32)
                          + (1.0 if a.ndim == 1 else 0.0),
                          nnx.to_pure_dict(abstract_model(cfg)[1]))
    save_dir = tmp_path / "hf0"
    hf, tensors = to_hf(cfg, params, arch=ARCH.get(name))
    save_dir.mkdir()
    save_file(tensors, str(save_dir / "model.safetensors"))
    (save_dir / "config.json").write_text(json.dumps(hf))
    base = tiny_model_cfg(scan_layers=cfg.model.scan_layers)
    base.data.update(seq_len=16)
    import_hf(save_dir, tmp_path / "wd", base, tokenizer=spec)
    export_hf(tmp_path / "wd", tmp_path / "out", max_shard_size="30KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()

    run = load_run(str(tmp_path / "wd"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    model = load(tmp_path / "out")
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=hf_tok)
    outs = []
    for prompt in ("def main(", "The </s> cat"):
        text = sample(run, prompt, max_tokens=n_new, temperature=0.0, top_k=0, top_p=1.0,
                      seed=0, num=1)[0]  # what `jaxllm-sample --temperature=0` prints
        prompt_ids = [tok.eos_id, *tok.encode(prompt)]
        with parallel.activate(run.cfg, run.mesh):
            ours = np.asarray(generate(run.model_def, run.params, jnp.asarray([prompt_ids]),
                                       jax.random.key(0), n_new=n_new, temperature=0.0,
                                       vocab_limit=tok.vocab_size))[0].tolist()
        ours = ours[:ours.index(tok.eos_id) + 1] if tok.eos_id in ours else ours
        enc = hf_tok(prompt, return_tensors="pt")
        assert enc["input_ids"][0].tolist() == prompt_ids
        theirs = model.generate(**enc, max_new_tokens=n_new, do_sample=False)[0]
        assert theirs[len(prompt_ids):].tolist() == ours
        got = pipe(prompt, max_new_tokens=n_new, do_sample=False)[0]["generated_text"]
        # the texts of the same tokens; random weights also emit invalid UTF-8, which
        # sentencepiece and tokenizers' ByteFallback replace by different U+FFFD runs
        new = [i for i in ours if i != tok.eos_id]
        assert text == tok.decode(new)
        assert got == prompt + hf_tok.decode(new, skip_special_tokens=True)
        if kind != "sentencepiece_bpe" or "\ufffd" not in got + text:
            assert got == prompt + text
        outs.append(ours)
        if name == "mpt":  # past the training length, where transformers used to stop
            assert len(prompt_ids) + len(ours) > 16 + 8
    assert outs[0] != outs[1]  # the output depends on the context

