"""grain input pipeline: documents -> token stream -> packed sequences -> per-process batches.

Each element is a dict of int32 arrays of length `seq_len`:
`inputs`, `targets`, `segment_ids` (1, 2, ... per document inside the sequence; 0 = padding),
`positions` (restart at 0 at each document start) and `target_bytes` (UTF-8 bytes each target
token stands for, for bits per byte).
"""

from __future__ import annotations

import grain
import numpy as np

from jaxllm.data.corpus import embedded_documents


def token_stream(tokenizer, documents) -> np.ndarray:
    """Concatenate encoded documents, each followed by EOS."""
    parts = []
    for _, text in documents:
        parts.append(np.asarray(tokenizer.encode(text), dtype=np.int32))
        parts.append(np.asarray([tokenizer.eos_id], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


class PackedWindows:
    """Random-access concat-then-split windows over a token stream (a grain data source)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, tokenizer):
        self.tokens, self.seq_len, self.tokenizer = tokens, seq_len, tokenizer
        self.n = max((len(tokens) - 1) // seq_len, 0)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        w = self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return pack_window(w, self.tokenizer)


def pack_window(w: np.ndarray, tokenizer) -> dict:
    """Split a window of T+1 tokens into inputs/targets with per-document ids and positions."""
    inputs, targets = w[:-1], w[1:]
    starts = np.zeros(len(inputs), bool)
    starts[0] = True
    starts[1:] = inputs[:-1] == tokenizer.eos_id
    seg = np.cumsum(starts).astype(np.int32)
    idx = np.arange(len(inputs))
    pos = (idx - np.maximum.accumulate(np.where(starts, idx, 0))).astype(np.int32)
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "segment_ids": seg,
        "positions": pos,
        "target_bytes": tokenizer.token_bytes(targets).astype(np.int32),
    }


def load_split(cfg, tokenizer, split: str) -> np.ndarray:
    if cfg.data.path:
        raise ValueError(f"data.path: {cfg.data.path!r} not supported yet")
    return token_stream(tokenizer, embedded_documents(split, cfg.data.eval_fraction))


def make_pipeline(cfg, tokenizer, split: str = "train", process_index: int = 0,
                  process_count: int = 1, batch_size: int | None = None):
    """A checkpointable iterator of per-process batches (dict of [local_batch, seq_len])."""
    batch_size = batch_size or cfg.train.batch_size
    if batch_size % process_count:
        raise ValueError(f"train.batch_size {batch_size} not divisible by "
                         f"{process_count} processes")
    source = PackedWindows(load_split(cfg, tokenizer, split), cfg.data.seq_len, tokenizer)
    if len(source) == 0:
        raise ValueError(f"data: the {split} split has fewer than seq_len+1 tokens")
    ds = grain.MapDataset.source(source)
    if split == "train":
        ds = ds.seed(cfg.train.seed).shuffle().repeat()
    ds = ds[process_index::process_count]
    ds = ds.batch(batch_size // process_count, drop_remainder=split == "train")
    it = ds.to_iter_dataset()
    return iter(it)
