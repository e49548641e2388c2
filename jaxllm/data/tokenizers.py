"""Tokenizers behind one small interface.

`encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `bos_id`, `eos_id`,
`pad_id`, and `token_bytes(ids)`: the UTF-8 bytes each token accounts for, summing to the
byte length of the text it came from (special tokens count 0) so bits per byte stays
exact under any tokenizer.
"""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """Raw UTF-8 bytes: ids 0-255 are bytes, then PAD, BOS, EOS."""

    kind = "byte"
    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_bytes(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids < 256).astype(np.int32)


def load_tokenizer(spec: str):
    """`byte`, or a path to a SentencePiece `.model` / tokenizers `.json`."""
    if spec == "byte":
        return ByteTokenizer()
    raise ValueError(f"data.tokenizer: unsupported {spec!r}; allowed: byte")
