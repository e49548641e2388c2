"""Tokenizers: lossless round trips, exact byte accounting, training CLI, load errors."""

import hashlib
import json
import pathlib

import numpy as np
import pytest

from jaxllm.config import padded_vocab
from jaxllm.data.tokenizer_training import KINDS, train_tokenizer
from jaxllm.data.tokenizers import load_tokenizer

TEXTS = [
    "",
    "def f(x):\n    return x + 1  # comment\n\n\tindented\r\nwindows line",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇯🇵 keycap 1️⃣",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353 and precomposed é ä ñ",
    "   leading spaces, trailing spaces   ",
    "digits 1234567890 3.14159 0x1F",
    "mixed ﬁ ligature Ω Å ẞ \u200b zero width \u00a0 nbsp",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny tokenizer of every kind, trained by the library on a small text file."""
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    base = pathlib.Path(json.__file__).read_text() + pathlib.Path(hashlib.__file__).read_text()
    corpus.write_text(base + "\n" + "\n".join(TEXTS) * 3)
    return {k: load_tokenizer(train_tokenizer([str(corpus)], k, 400, str(d / k), progress=False))
            for k in KINDS}


def all_tokenizers(trained):
    return [load_tokenizer("byte")] + [trained[k] for k in KINDS]


def test_round_trip_and_exact_bytes(trained):
    for tok in all_tokenizers(trained):
        for text in TEXTS:
            ids = tok.encode(text)
            assert tok.decode(ids) == text, (tok.kind, text)
            tb = tok.token_bytes(ids)
            assert tb.dtype == np.int32 and tb.shape == (len(ids),)
            assert tb.sum() == len(text.encode("utf-8")), (tok.kind, text)
        specials = [tok.eos_id, tok.bos_id, tok.pad_id]
        assert tok.token_bytes(specials).tolist() == [0, 0, 0]
        # decode ignores specials; token_bytes of out-of-range ids is 0
        ids = [tok.bos_id] + tok.encode(TEXTS[2]) + [tok.eos_id]
        assert tok.decode(ids) == TEXTS[2]
        assert tok.token_bytes([tok.vocab_size, -1]).tolist() == [0, 0]


def test_token_bytes_prefix_sums_match_library_offsets(trained):
    """Cumulative token bytes agree with the libraries' own offsets wherever a token ends."""
    text = "ab 中文😀 e\u0301\n  x = 42 👨‍👩‍👧"
    sp = trained["sentencepiece_bpe"]
    pieces = sp.sp.encode(text, out_type="proto").pieces
    cum = np.cumsum(sp.token_bytes([p.id for p in pieces]))
    checked = 0
    for i, p in enumerate(pieces):
        if p.end > p.begin:
            assert cum[i] == p.end
            checked += 1
    assert checked > 5
    bpe = trained["byte_bpe"]
    enc = bpe.tok.encode(text, add_special_tokens=False)
    cum = np.cumsum(bpe.token_bytes(enc.ids))
    for i, (_, end) in enumerate(enc.offsets):
        if i + 1 == len(enc.offsets) or enc.offsets[i + 1][0] >= end:
            assert cum[i] == len(text[:end].encode("utf-8"))


def test_tokenizer_attributes(trained):
    for kind, tok in trained.items():
        assert tok.kind == kind
        assert tok.vocab_size == 400
        assert len({tok.eos_id, tok.pad_id}) == 2 and 0 <= tok.eos_id < tok.vocab_size
        assert kind in tok.name
        v = padded_vocab(tok.vocab_size)
        assert v % 128 == 0 and tok.vocab_size <= v < tok.vocab_size + 128
    byte = load_tokenizer("byte")
    assert (byte.vocab_size, byte.eos_id, byte.kind) == (259, 258, "byte")
    assert byte.sha256 == "" and len(trained["byte_bpe"].sha256) == 64


def test_dummy_prefix_model_still_exact(tmp_path):
    """A SentencePiece model trained with default settings (dummy prefix, whitespace
    collapsing) but with byte fallback loads with exact round trips."""
    import sentencepiece as spm

    lines = pathlib.Path(json.__file__).read_text().splitlines()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([ln for ln in lines if ln.strip()]),
        model_prefix=str(tmp_path / "native"), vocab_size=400, byte_fallback=True,
        minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "native.model"))
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.token_bytes(ids).sum() == len(text.encode())


def test_prefix_space_byte_bpe_still_exact(trained, tmp_path):
    """A RoBERTa-style byte-level BPE (add_prefix_space) is loaded without the prefix."""
    spec = json.loads(trained["byte_bpe"].tok.to_str())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "prefix.json").write_text(json.dumps(spec))
    tok = load_tokenizer(str(tmp_path / "prefix.json"))
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.token_bytes(ids).sum() == len(text.encode())


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data.tokenizer: .*missing.model"):
        load_tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="data.tokenizer: unsupported 'gpt2'"):
        load_tokenizer("gpt2")
    bad = tmp_path / "corrupt.model"
    bad.write_bytes(b"\x00\x01 not a protobuf \xff\xfe" * 10)
    with pytest.raises(ValueError, match=r"data.tokenizer: .*corrupt.model"):
        load_tokenizer(str(bad))
    bad_json = tmp_path / "corrupt.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match=r"data.tokenizer: .*corrupt.json"):
        load_tokenizer(str(bad_json))
    # A WordPiece tokenizer is valid JSON but not byte-level: rejected with a reason.
    from tokenizers import Tokenizer, models, pre_tokenizers
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.save(str(tmp_path / "wp.json"))
    with pytest.raises(ValueError, match=r"wp.json is not a byte-level BPE"):
        load_tokenizer(str(tmp_path / "wp.json"))
    # SentencePiece without byte fallback cannot be exact: rejected.
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(pathlib.Path(json.__file__).read_text().splitlines()),
        model_prefix=str(tmp_path / "nofb"), vocab_size=200, minloglevel=2)
    with pytest.raises(ValueError, match=r"nofb.model has no byte fallback"):
        load_tokenizer(str(tmp_path / "nofb.model"))


def test_train_tokenizer_cli(tmp_path, capsys):
    from tools.train_tokenizer import main

    src = tmp_path / "docs.jsonl"
    body = pathlib.Path(json.__file__).read_text()
    src.write_text("\n".join(json.dumps({"text": body[i:i + 500]}) for i in range(0, 10000, 500))
                   + "\n{broken\n")
    out = tmp_path / "bpe"
    assert main(["--kind=byte_bpe", "--vocab_size=300", f"--output={out}",
                 "--input", str(src), "--no_progress"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "malformed_json 1" in text
    tok = load_tokenizer(str(out) + ".json")
    assert tok.vocab_size == 300
    assert tok.sha256 == hashlib.sha256((tmp_path / "bpe.json").read_bytes()).hexdigest()
    assert main(["--kind=sentencepiece_bpe", "--vocab_size=300", f"--output={out}",
                 "--input", str(tmp_path / "nothing*.txt")]) == 2
    assert capsys.readouterr().err.startswith("error: --input: no input files match")
    assert main(["--kind=sentencepiece_bpe", "--vocab_size=100", f"--output={out}",
                 "--input", str(src), "--no_progress"]) == 2
    assert "error: --vocab_size" in capsys.readouterr().err
