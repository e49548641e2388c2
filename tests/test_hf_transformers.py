"""Optional: transformers' own models on the exported directories give jaxllm's logits
within 1e-4 in float32, and its tokenizer loads the exported byte tokenizer. Runs only
where `torch` and `transformers` import (pip install jaxllm[hf]); skipped otherwise."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from tests.fixtures import tiny_model_cfg  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from test_hf import VARIANTS, ids, make  # noqa: E402

from jaxllm.hf import export_hf, import_hf, to_hf  # noqa: E402
from jaxllm.hf.convert import write_tokenizer  # noqa: E402

TOL = 1e-4


def hf_logits(d, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(d), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def save(cfg, params, d, vocab=None):
    hf, tensors = to_hf(cfg, params, vocab=vocab)
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(hf))
    write_tokenizer("byte", d, cfg.data.seq_len)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_logits_match(tmp_path, name):
    cfg, model, params = make(name)
    save(cfg, params, tmp_path / "hf")
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


def test_exported_workdir_loads_with_tokenizer(tmp_path):
    """Through a real checkpoint: import -> workdir -> export_hf -> transformers."""
    cfg, model, params = make("llama_gqa_bias_untied_geglu")
    save(cfg, params, tmp_path / "hf")
    base = tiny_model_cfg(scan_layers=False)
    base.data.seq_len = 16
    import_hf(tmp_path / "hf", tmp_path / "wd", base, tokenizer="byte")
    export_hf(tmp_path / "wd", tmp_path / "out")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    text = "def f(x):\n    return x  # ünï ✓"
    assert tok(text)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (257, 258, 256)
    x = np.asarray([tok(text)["input_ids"][:16]])
    err = np.abs(hf_logits(tmp_path / "out", x) - np.asarray(model(jnp.asarray(x)))).max()
    assert err < TOL


@pytest.mark.parametrize("kind", ["sentencepiece_bpe", "byte_bpe"])
def test_exported_trained_tokenizers_encode_like_jaxllm(tmp_path, kind):
    from jaxllm.data.tokenizer_training import train_tokenizer
    from jaxllm.data.tokenizers import load_tokenizer
    (tmp_path / "c.txt").write_text(open(json.__file__).read() * 2)
    spec = train_tokenizer([str(tmp_path / "c.txt")], kind, 400, str(tmp_path / kind),
                           progress=False)
    (tmp_path / "out").mkdir()
    write_tokenizer(spec, tmp_path / "out", 64)
    ours, theirs = load_tokenizer(spec), transformers.AutoTokenizer.from_pretrained(
        str(tmp_path / "out"))
    for text in ["import json\n    x = {'a': 1}  # ü", " leading space", "two  spaces\n\nend"]:
        assert theirs(text)["input_ids"] == ours.encode(text)
