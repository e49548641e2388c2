"""grain input pipeline: documents -> token stream -> packed sequences -> per-process batches.

Each batch is a dict of int32 arrays [batch_size / process_count, seq_len]: `inputs`,
`targets`, `segment_ids` (1, 2, ... per document inside the row; 0 = padding, to be
loss-masked), `positions` (restart at 0 at each document start) and `target_bytes` (UTF-8
bytes each target token stands for, for bits per byte).

Sources: the embedded corpus (`data.path == ""`), a prepared directory
(`tools/prepare_data.py`), raw `.txt/.jsonl/.parquet` files or globs (prepared once into
`.jaxllm_cache/` beside them), or a weighted mixture (`data.mixture = "a:3,b:1"`, mixed by
`grain.MapDataset.mix`). Prepared data is split into train/eval by document
(`prepare.split_mask`), or by tokens when it has too few documents for that (`token_cuts`,
a `data_split` event); the embedded corpus by file name (`corpus.split_of`). With
`data.valid_fraction` > 0 a third split, `valid`, is cut from what was train (the eval
documents stay the same); it is read like eval.

Packing (`data.packing`):
- `concat`: the split's documents, each followed by EOS, are concatenated and cut into
  windows of seq_len + 1 tokens (inputs = w[:-1], targets = w[1:]); a new segment starts
  after every EOS.
- `first_fit`: every document becomes the segment [EOS] + doc + [EOS] (inputs = all but the
  last token, targets = all but the first), cut into pieces of at most seq_len targets when
  longer; pieces are packed into rows by grain's FirstFitPackIterDataset (Krell et al.
  2021, "Efficient sequence packing without cross-contamination"), padding with segment 0.

Train: shuffled from `train.seed`, repeated forever, each process reads the disjoint
elements `process_index::process_count` (of the shuffled, mixed stream, before packing).
With `concat` the global batch of a step holds the same windows for any process count;
with `first_fit` each process packs its own elements, so rows depend on the process count.
Eval: deterministic and finite (one pass); every process walks the same global rows and
takes its slice of each global batch, the last global batch padded with segment-0 rows, so
all processes see the same number of batches. Padding anywhere (first-fit rows, padded eval
rows) has segment id 0, position 0, inputs/targets = the tokenizer's pad id, and
target_bytes 0.
`data.prefetch` > 0 prepares that many batches ahead in a background thread. Iterator
state (`get_state`/`set_state`) restores the exact position.
"""

from __future__ import annotations

import atexit
import pathlib
import weakref

import grain
import numpy as np

from jaxllm.config import ConfigError
from jaxllm.data.corpus import embedded_documents, expand_inputs
from jaxllm.data.prepare import PreparedData, cache_dir_for, prepare, split_mask

KEYS = ("inputs", "targets", "segment_ids", "positions", "target_bytes")
PACKING = ("concat", "first_fit")  # `data.packing` (module docstring)
# Elements are cheap memory-mapped slices: two reader threads keep up, and grain's default
# (16 threads, 500 elements ahead) costs ~1 s at every start and restore on a small host.
READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


def token_stream(tokenizer, documents) -> np.ndarray:
    """Concatenate encoded documents, each followed by EOS."""
    texts = [text for _, text in documents]
    if hasattr(tokenizer, "encode_batch"):
        encoded = tokenizer.encode_batch(texts)
    else:
        encoded = map(getattr(tokenizer, "encode_array", tokenizer.encode), texts)
    parts = []
    for ids in encoded:
        parts.append(np.asarray(ids, dtype=np.int32))
        parts.append(np.asarray([tokenizer.eos_id], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


class Split:
    """The documents of one split as a virtual stream (each document ends with its EOS)."""

    def __init__(self, spans: np.ndarray, doc_fn=None, flat: np.ndarray | None = None):
        self.spans = np.asarray(spans, np.int64)  # tokens per document, EOS included
        self.cum = np.concatenate([[0], np.cumsum(self.spans)]).astype(np.int64)
        self.doc_fn, self.flat = doc_fn, flat

    @classmethod
    def from_stream(cls, tokens: np.ndarray, eos_id: int) -> Split:
        ends = np.flatnonzero(tokens == eos_id)
        return cls(np.diff(np.concatenate([[-1], ends])), flat=tokens)

    def __len__(self) -> int:
        return len(self.spans)

    @property
    def num_tokens(self) -> int:
        return int(self.cum[-1])

    def doc(self, j: int) -> np.ndarray:
        if self.flat is not None:
            return self.flat[self.cum[j]:self.cum[j + 1]]
        return self.doc_fn(j)

    def stream(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the concatenated split."""
        if self.flat is not None:
            return self.flat[a:b]
        j = int(np.searchsorted(self.cum, a, side="right")) - 1
        parts = []
        while a < b:
            d = self.doc(j)
            lo = a - self.cum[j]
            piece = d[lo:lo + (b - a)]
            parts.append(piece)
            a += len(piece)
            j += 1
        return np.concatenate(parts).astype(np.int32)


class PackedWindows:
    """Random-access concat-then-split windows over a split (a grain data source)."""

    def __init__(self, split: Split, seq_len: int, tokenizer):
        self.split, self.seq_len, self.tokenizer = split, seq_len, tokenizer
        self.n = max((split.num_tokens - 1) // seq_len, 0)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        t = self.seq_len
        return pack_window(self.split.stream(i * t, (i + 1) * t + 1), self.tokenizer)


def pack_window(w: np.ndarray, tokenizer) -> dict:
    """Split a window of T+1 tokens into inputs/targets with per-document ids and positions."""
    w = np.asarray(w, np.int32)
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


class DocPieces:
    """Random-access first-fit inputs: [EOS] + doc + [EOS] cut into <= seq_len targets."""

    def __init__(self, split: Split, seq_len: int, tokenizer):
        self.split, self.seq_len, self.tokenizer = split, seq_len, tokenizer
        per_doc = -(-split.spans // seq_len)  # (span + 1 tokens) - 1 targets, in pieces
        self.doc = np.repeat(np.arange(len(split)), per_doc)
        self.piece = np.arange(len(self.doc)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)

    def __len__(self):
        return len(self.doc)

    def __getitem__(self, k):
        t = self.seq_len
        seg = np.concatenate([[self.tokenizer.eos_id], self.split.doc(int(self.doc[k]))])
        w = seg[self.piece[k] * t:self.piece[k] * t + t + 1].astype(np.int32)
        return {"inputs": w[:-1], "targets": w[1:],
                "target_bytes": self.tokenizer.token_bytes(w[1:]).astype(np.int32)}


def first_fit(ds: grain.IterDataset, seq_len: int, seed: int, shuffle: bool, bins: int,
              pad_id: int):
    length = {"inputs": seq_len, "targets": seq_len, "target_bytes": seq_len}
    packed = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=length, num_packing_bins=bins, seed=seed, shuffle_bins=shuffle,
        padding_struct={"inputs": pad_id, "targets": pad_id, "target_bytes": 0})
    return packed.map(lambda e: {
        "inputs": e["inputs"], "targets": e["targets"],
        "segment_ids": e["inputs_segment_ids"].astype(np.int32),
        "positions": e["inputs_positions"].astype(np.int32),
        "target_bytes": e["target_bytes"]})


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    out = []
    for item in spec.split(","):
        path, sep, w = item.strip().rpartition(":")
        try:
            weight = float(w)
        except ValueError:
            weight = -1.0
        if not sep or not path or not weight > 0:
            raise ValueError(f"data.mixture: bad entry {item.strip()!r}; expected "
                             "'path:weight,path:weight' with weights > 0")
        out.append((path, weight))
    return out


def open_prepared(path: str, cfg, tokenizer, key: str) -> PreparedData:
    """A prepared directory, or raw files/globs prepared once into a cache beside them (in
    this process: no worker processes inside a training job; for big corpora run
    tools/prepare_data.py, which tokenizes in parallel)."""

    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        data = PreparedData(str(p), key)
    else:
        files = expand_inputs([path], key)
        cache = cache_dir_for(files, cfg.data.tokenizer, tokenizer, cfg.data.text_field)
        if not (cache / "manifest.json").exists():
            try:
                prepare(files, str(cache), cfg.data.tokenizer, text_field=cfg.data.text_field,
                        workers=1, progress=False)
            except (OSError, ValueError) as e:  # another process finished first: use its copy
                if not (cache / "manifest.json").exists():
                    if isinstance(e, OSError):
                        raise ValueError(
                            f"cannot write the token cache ({cache}: {e.strerror}) [{key}]: "
                            "prepare the data into a writable directory with "
                            "tools/prepare_data.py and point data.path there") from None
                    raise
        data = PreparedData(str(cache), key)
    data.check_tokenizer(tokenizer, key)
    return data


def load_split(cfg, tokenizer, split: str, path: str | None = None,
               key: str = "data.path") -> Split:
    """The documents of `split` from `path` (default data.path; "" = embedded corpus)."""
    path = cfg.data.path if path is None else path
    if not path:
        return Split.from_stream(
            token_stream(tokenizer, embedded_documents(split, cfg.data.eval_fraction,
                                                       cfg.data.valid_fraction)),
            tokenizer.eos_id)
    data = open_prepared(path, cfg, tokenizer, key)
    cuts = token_cuts(data, cfg)
    if cuts is not None:  # too few documents to split by document: split by tokens
        full = Split(data.doc_len + 1, doc_fn=data.doc)
        bounds = {"train": (0, cuts[0]), "valid": cuts, "eval": (cuts[1], full.num_tokens)}
        return token_range(full, *bounds[split])
    docs = np.flatnonzero(split_mask(len(data), split, cfg.data.eval_fraction,
                                     cfg.data.valid_fraction))
    return Split(data.doc_len[docs] + 1, doc_fn=lambda j: data.doc(docs[j]))


def whole_if_token_split(cfg, tokenizer, path: str | None = None,
                         key: str = "data.path") -> Split | None:
    """Every document of a corpus that is split by tokens (`token_cuts`), whole and in
    corpus order (what `--split=all` evaluates); None where the split is by document."""
    path = cfg.data.path if path is None else path
    if not path:
        return None
    data = open_prepared(path, cfg, tokenizer, key)
    if token_cuts(data, cfg) is None:
        return None
    return Split(data.doc_len + 1, doc_fn=data.doc)


def token_cuts(data: PreparedData, cfg) -> tuple[int, int] | None:
    """Token offsets (train end, valid end) of a split by tokens, or None to split by
    document.

    The split is by document (`prepare.split_mask`) unless that leaves train or eval with
    fewer than seq_len + 2 tokens (a corpus of one document, or of a few): then the last
    eval_fraction of the tokens (at least seq_len + 2) is eval, the valid_fraction before
    it valid, the rest train. None too when eval_fraction is 0 or the corpus is too small
    for such splits."""
    frac, vfrac, need = cfg.data.eval_fraction, cfg.data.valid_fraction, cfg.data.seq_len + 2
    spans = data.doc_len + 1
    sizes = [spans[split_mask(len(data), s, frac, vfrac)].sum() for s in ("train", "eval")]
    if frac <= 0 or min(sizes) >= need:
        return None
    total = int(spans.sum())
    valid_end = total - max(int(np.ceil(frac * total)), need)
    train_end = valid_end - (max(int(np.ceil(vfrac * total)), need) if vfrac > 0 else 0)
    return (train_end, valid_end) if train_end >= need else None


def token_range(full: Split, a: int, b: int) -> Split:
    """Tokens [a, b) of `full`; its documents are the pieces of full's documents there."""
    j0 = int(np.searchsorted(full.cum, a, side="right")) - 1
    j1 = int(np.searchsorted(full.cum, b, side="left"))
    starts = np.maximum(full.cum[j0:j1], a)
    spans = np.minimum(full.cum[j0 + 1:j1 + 1], b) - starts

    def doc(k):
        lo = int(starts[k] - full.cum[j0 + k])
        return full.doc(j0 + k)[lo:lo + int(spans[k])]
    return Split(spans, doc_fn=doc)


def split_events(cfg, tokenizer) -> list[dict]:
    """`data_split` events for the datasets of a run that are split by tokens."""
    if not cfg.data.path and not cfg.data.mixture:
        return []
    paths = ([p for p, _ in parse_mixture(cfg.data.mixture)] if cfg.data.mixture
             else [cfg.data.path])
    events = []
    for p in paths:
        data = open_prepared(p, cfg, tokenizer, "data.path")
        cuts = token_cuts(data, cfg)
        if cuts is not None:
            total = int((data.doc_len + 1).sum())
            events.append({"event": "data_split", "path": p, "policy": "tokens",
                           "documents": len(data), "train_tokens": cuts[0],
                           "valid_tokens": cuts[1] - cuts[0], "eval_tokens": total - cuts[1],
                           "reason": "too few documents for a split by document"})
    return events


def _members(cfg, tokenizer, split: str) -> list[tuple[Split, float]]:
    if cfg.data.mixture:
        return [(load_split(cfg, tokenizer, split, p, "data.mixture"), w)
                for p, w in parse_mixture(cfg.data.mixture)]
    return [(load_split(cfg, tokenizer, split), 1.0)]


def _pad_and_slice(batch: dict, size: int, index: int, count: int, pad_id: int) -> dict:
    out = {}
    for k in KEYS:
        v = batch[k]
        if len(v) < size:
            fill = pad_id if k in ("inputs", "targets") else 0
            v = np.concatenate([v, np.full((size - len(v),) + v.shape[1:], fill, v.dtype)])
        out[k] = v[index::count]
    return out


def make_pipeline(cfg, tokenizer, split: str = "train", process_index: int = 0,
                  process_count: int = 1, batch_size: int | None = None):
    """A checkpointable iterator of per-process batches (dict of [local_batch, seq_len]).

    Bad data settings or files raise ConfigError (a ValueError) naming the key and file.
    """
    try:
        return _make_pipeline(cfg, tokenizer, split, process_index, process_count, batch_size)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _make_pipeline(cfg, tokenizer, split, process_index, process_count, batch_size):
    batch_size = batch_size or cfg.train.batch_size
    if batch_size % process_count:
        raise ValueError(f"train.batch_size: {batch_size} is not divisible by "
                         f"{process_count} processes")
    if split not in ("train", "valid", "eval"):
        raise ValueError(f"split: got {split!r}; allowed: train, valid, eval")
    seq_len, packing, seed = cfg.data.seq_len, cfg.data.packing, cfg.train.seed
    element = PackedWindows if packing == "concat" else DocPieces
    sources = []
    for path_split, weight in _members(cfg, tokenizer, split):
        source = element(path_split, seq_len, tokenizer)
        if len(source) == 0:
            raise ValueError(f"data: the {split} split has fewer than seq_len+1 tokens")
        sources.append((grain.MapDataset.source(source), weight))
    local = batch_size // process_count
    bins = max(2 * local, 16)
    if split == "train":
        parts = [ds.seed(seed + k).shuffle().repeat() for k, (ds, _) in enumerate(sources)]
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(
            parts, [w for _, w in sources])
        ds = ds[process_index::process_count]
        if packing == "concat":
            it = ds.batch(local, drop_remainder=True).to_iter_dataset(READ)
        else:
            it = first_fit(ds.to_iter_dataset(READ), seq_len, seed, True, bins,
                           tokenizer.pad_id).batch(local, drop_remainder=True)
    else:
        ds = grain.MapDataset.concatenate([ds for ds, _ in sources])
        it = ds.to_iter_dataset(READ)
        if packing == "first_fit":
            it = first_fit(it, seq_len, seed, False, max(2 * batch_size, 16), tokenizer.pad_id)
        it = it.batch(batch_size, drop_remainder=False).map(
            lambda b: _pad_and_slice(b, batch_size, process_index, process_count,
                                     tokenizer.pad_id))
    if not cfg.data.prefetch:
        return iter(it)
    it = iter(grain.experimental.ThreadPrefetchIterDataset(
        it, prefetch_buffer_size=cfg.data.prefetch))
    _LIVE.add(it)
    return it


_LIVE = weakref.WeakSet()


@atexit.register
def _close_prefetchers() -> None:
    """Stop prefetch threads at exit; grain's __del__ would run again during interpreter
    teardown (module globals gone) and print tracebacks, so it is disabled then."""
    for it in list(_LIVE):
        it.close()
    grain.experimental.ThreadPrefetchDatasetIterator.__del__ = lambda self: None
