"""Tokenizers behind one small interface.

`encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `bos_id`, `eos_id`,
`pad_id`, `name`, `kind`, `sha256` (of the tokenizer file; "" for bytes) and
`token_bytes(ids)`: the UTF-8 bytes each token accounts for, summing to the byte length of
the text it came from (special tokens count 0), so bits per byte stays exact under any
tokenizer. Exactness needs every id to stand for one fixed byte string, so:

- `byte`: ids 0-255 are the bytes themselves, then PAD, BOS, EOS.
- SentencePiece (Kudo & Richardson 2018; BPE or unigram) from a `.model`: the model must
  have byte fallback (every character is encodable). It is loaded with the identity
  normalizer, no dummy-prefix space and no whitespace collapsing (the setting
  `tools/train_tokenizer.py` trains with), so a piece's bytes are its text with `▁` read as
  one space and `<0xNN>` as one byte. A model trained with a dummy prefix still loads; only
  the first word of a document may then split differently than under its native settings.
  The one text that cannot round-trip is a literal U+2581 `▁` (it decodes as a space).
- Byte-level BPE (GPT-2 / GPT-NeoX style; Sennrich et al. 2016, Radford et al. 2019) from a
  Hugging Face `tokenizers` `.json` whose pre-tokenizer and decoder are ByteLevel and that
  has no normalizer: each character of a token maps back to one byte. A ByteLevel
  `add_prefix_space` is switched off on load (it would add a byte the text lacks), and
  special-token strings in text are encoded as ordinary text (as SentencePiece does).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import Tokenizer


class ByteTokenizer:
    """Raw UTF-8 bytes: ids 0-255 are bytes, then PAD, BOS, EOS."""

    kind = "byte"
    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259
    name = "byte"
    sha256 = ""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_bytes(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return ((ids >= 0) & (ids < 256)).astype(np.int32)


class _TableTokenizer:
    """Shared parts: a per-id byte-length table and file identity."""

    kind = name = sha256 = ""
    vocab_size = bos_id = eos_id = pad_id = 0
    _bytes_table: np.ndarray

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def token_bytes(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        ok = (ids >= 0) & (ids < self.vocab_size)
        return np.where(ok, self._bytes_table[np.clip(ids, 0, self.vocab_size - 1)], 0).astype(
            np.int32)


class SentencePieceTokenizer(_TableTokenizer):
    """A SentencePiece BPE or unigram model with byte fallback (see module docstring)."""

    def __init__(self, path: pathlib.Path, data: bytes):
        proto = pb.ModelProto()
        try:
            proto.ParseFromString(data)
        except Exception as e:
            raise ValueError(f"data.tokenizer: {path} is not a SentencePiece model ({e})") from e
        if not proto.pieces:
            raise ValueError(f"data.tokenizer: {path} is not a SentencePiece model (no pieces)")
        if not proto.trainer_spec.byte_fallback:
            raise ValueError(
                f"data.tokenizer: {path} has no byte fallback, so some text cannot be encoded "
                "and bits per byte would be inexact; retrain it with tools/train_tokenizer.py")
        norm = proto.normalizer_spec
        norm.name, norm.precompiled_charsmap = "identity", b""
        norm.add_dummy_prefix, norm.remove_extra_whitespaces = False, False
        norm.escape_whitespaces = True
        proto.denormalizer_spec.Clear()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto.SerializeToString())
        except Exception as e:
            raise ValueError(
                f"data.tokenizer: {path} is a corrupt SentencePiece model ({e})") from e
        mtype = {1: "unigram", 2: "bpe"}.get(proto.trainer_spec.model_type, "other")
        self.kind = f"sentencepiece_{mtype}"
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"data.tokenizer: {path} defines no end-of-sequence piece (eos_id)")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.bos_id = self.bos_id if self.bos_id >= 0 else self.eos_id
        table = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                table[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i)):
                table[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        self._bytes_table = table

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Several texts at once, on SentencePiece's own threads."""
        return self.sp.encode(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.sp.decode(ids)


def bytes_to_unicode() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable-character map (char -> byte)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=False)}


class ByteLevelBPETokenizer(_TableTokenizer):
    """A Hugging Face `tokenizers` byte-level BPE (ByteLevel pre-tokenizer and decoder)."""

    kind = "byte_bpe"

    def __init__(self, path: pathlib.Path, data: bytes):
        def nodes(node) -> list:
            if not isinstance(node, dict):
                return []
            out = [node]
            for sub in node.get("pretokenizers", []) + node.get("decoders", []):
                out += nodes(sub)
            return out

        def types(node) -> set:
            return {n.get("type") for n in nodes(node)}

        try:
            spec = json.loads(data)
            # A prefix space (RoBERTa style) would add a byte the text does not have.
            for n in nodes(spec.get("pre_tokenizer")):
                if n.get("type") == "ByteLevel":
                    n["add_prefix_space"] = False
            self.tok = Tokenizer.from_str(json.dumps(spec))
            # special tokens come from the pipeline, never from text: a literal
            # "<|endoftext|>" in a document is ordinary text (and its bytes count)
            self.tok.encode_special_tokens = True
        except Exception as e:
            raise ValueError(f"data.tokenizer: {path} is not a valid tokenizers .json ({e})") from e

        if "ByteLevel" not in types(spec.get("pre_tokenizer")) or "ByteLevel" not in types(
                spec.get("decoder")) or spec.get("normalizer") is not None:
            raise ValueError(
                f"data.tokenizer: {path} is not a byte-level BPE (needs ByteLevel pre-tokenizer "
                "and decoder and no normalizer); train one with tools/train_tokenizer.py")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        byte_of = bytes_to_unicode()
        table = np.zeros(self.vocab_size, np.int32)
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            table[i] = len(token) if all(c in byte_of for c in token) else len(token.encode())
        special = {}
        for t in spec.get("added_tokens", []):
            if t.get("special"):
                table[t["id"]] = 0
                special[t["content"]] = t["id"]
            else:
                table[t["id"]] = len(t["content"].encode("utf-8"))
        self._bytes_table = table
        eos = next((special[k] for k in ("<|endoftext|>", "</s>", "<eos>") if k in special), None)
        if eos is None:
            raise ValueError(f"data.tokenizer: {path} has no special <|endoftext|> token for EOS")
        self.eos_id = eos
        self.bos_id = special.get("<|startoftext|>", special.get("<s>", eos))
        self.pad_id = special.get("<|padding|>", special.get("<pad>", eos))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Several texts at once, on the tokenizers library's own threads."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(spec: str):
    """`byte`, or a path to a SentencePiece `.model` / tokenizers `.json`."""
    if spec == "byte":
        return ByteTokenizer()
    path = pathlib.Path(spec).expanduser()
    if path.suffix not in (".model", ".json"):
        raise ValueError(f"data.tokenizer: unsupported {spec!r}; allowed: byte, a SentencePiece "
                         ".model file or a tokenizers .json file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"data.tokenizer: cannot read {path} ({e.strerror})") from e
    tok = (SentencePieceTokenizer if path.suffix == ".model" else ByteLevelBPETokenizer)(path, data)
    tok.sha256 = hashlib.sha256(data).hexdigest()
    tok.name = f"{tok.kind}:{path.name}"
    return tok
