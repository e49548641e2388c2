"""The scoring engine shared by bits per byte, the downstream harness and length extrapolation.

A `Request` is a token sequence `tokens` (inputs `tokens[:-1]`, targets `tokens[1:]`) whose
targets from index `start` on are scored. Requests become rows of a fixed length: one per
row, padded (`packing=False`), or several per row (`packing=True`, next-fit in order), each
its own segment (ids 1, 2, ...; 0 = padding) with positions restarting at 0, so attention
never crosses requests and a request's score does not depend on its neighbours, the batch
size or the packing. Batches have a fixed shape [batch_size, length] (the last one padded
with segment-0 rows) and go through one jitted forward pass that reuses the training
loss code (`model.loss.forward_sums`: per-token NLL, chunked over the sequence); sums
are taken on the host in float64.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from jaxllm import parallel
from jaxllm.config import ConfigError
from jaxllm.model.transformer import position_limit
from jaxllm.model.loss import forward_sums, greedy_hits, hidden, token_nll


@dataclasses.dataclass
class Request:
    tokens: np.ndarray  # int32 [n + 1]
    start: int = 0  # first scored target index


def continuation_request(context, continuation, seq_len: int) -> Request | None:
    """Context ids (separator included) + continuation ids as one request scoring the
    continuation, cut to its last `seq_len + 1` tokens (contexts are truncated from the left,
    as lm-evaluation-harness does); None when the continuation is empty or alone has more
    than `seq_len` tokens."""
    cont = np.asarray(continuation, np.int32)
    if len(cont) == 0 or len(cont) > seq_len:
        return None
    tokens = np.concatenate([np.asarray(context, np.int32), cont])[-(seq_len + 1):]
    return Request(tokens, len(tokens) - 1 - len(cont))


@dataclasses.dataclass
class Scores:
    """Per request: summed NLL (nats), scored tokens, their UTF-8 bytes, all-greedy flag."""

    nll: np.ndarray
    tokens: np.ndarray
    bytes: np.ndarray
    greedy: np.ndarray | None


def pack_rows(lengths, length: int, packing: bool) -> list[list[int]]:
    """Group request indices into rows of at most `length` targets (next-fit, in order)."""
    rows, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if n > length:
            raise ValueError(f"request {i} has {n} targets, more than the row length {length}")
        if cur and (not packing or used + n > length):
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def make_batch(requests, rows, length: int, batch_size: int):
    """numpy arrays [batch_size, length] for `rows` (<= batch_size) plus the score mask."""
    b = {k: np.zeros((batch_size, length), np.int32)
         for k in ("inputs", "targets", "segment_ids", "positions")}
    scored = np.zeros((batch_size, length), bool)
    place = []  # (request index, row, offset, n)
    for r, row in enumerate(rows):
        off = 0
        for seg, i in enumerate(row, start=1):
            req = requests[i]
            n = len(req.tokens) - 1
            b["inputs"][r, off:off + n] = req.tokens[:-1]
            b["targets"][r, off:off + n] = req.tokens[1:]
            b["segment_ids"][r, off:off + n] = seg
            b["positions"][r, off:off + n] = np.arange(n)
            scored[r, off + req.start:off + n] = True
            place.append((i, r, off, n))
            off += n
    return b, scored, place


class Scorer:
    """Jitted scoring of requests with a restored run (`restore.Run`)."""

    def __init__(self, run, batch_size: int = 8, chunk: int | None = None):
        n_dev = jax.device_count()
        if batch_size < 1 or batch_size % n_dev:
            raise ConfigError(f"--batch_size: {batch_size} must be a positive multiple of "
                              f"the device count ({n_dev})")
        self.run, self.batch_size = run, batch_size
        self.vocab_limit = run.tokenizer.vocab_size
        chunk = run.cfg.train.loss_chunk if chunk is None else chunk
        self._nll, self._greedy = _compiled(run.model_def, chunk, self.vocab_limit)

    def max_length(self) -> int | None:
        """Rows may not exceed a learned position table; None when unbounded."""
        return position_limit(self.run.cfg)

    def score(self, requests, length: int, packing: bool = False, greedy: bool = False,
              batch_size: int | None = None) -> Scores:
        """Score every request in rows of `length` tokens."""
        limit = self.max_length()
        if limit is not None and length > limit:
            raise ValueError(f"row length {length} exceeds the learned position table ({limit})")
        bs = batch_size or self.batch_size
        tok = self.run.tokenizer
        n = len(requests)
        out = Scores(np.zeros(n), np.zeros(n, np.int64), np.zeros(n, np.int64),
                     np.ones(n, bool) if greedy else None)
        for i, req in enumerate(requests):
            if not 0 <= req.start < len(req.tokens) - 1:
                raise ValueError(f"request {i}: start {req.start} outside its "
                                 f"{len(req.tokens) - 1} targets")
            out.tokens[i] = len(req.tokens) - 1 - req.start
            out.bytes[i] = int(tok.token_bytes(req.tokens[1:][req.start:]).sum())
        rows = pack_rows([len(r.tokens) - 1 for r in requests], length, packing)
        with parallel.activate(self.run.cfg, self.run.mesh):
            for lo in range(0, len(rows), bs):
                local, scored, place = make_batch(requests, rows[lo:lo + bs], length, bs)
                batch = parallel.global_batch(local, self.run.mesh)
                if greedy:
                    nll, hits = jax.device_get(self._greedy(self.run.params, batch))
                else:
                    nll, hits = jax.device_get(self._nll(self.run.params, batch)), None
                nll = np.asarray(nll, np.float64)
                for i, r, off, m in place:
                    sel = scored[r, off:off + m]
                    out.nll[i] = nll[r, off:off + m][sel].sum()
                    if greedy:
                        out.greedy[i] = bool(hits[r, off:off + m][sel].all())
        return out


@functools.lru_cache(maxsize=16)
def _compiled(model_def, chunk: int, limit: int):
    """Jitted (nll, nll + greedy hits) functions, shared by every Scorer of one model."""

    def nll_fn(params, batch):
        return forward_sums(model_def, params, batch, chunk)[2]

    def greedy_fn(params, batch):
        model, h, weights = hidden(model_def, params, batch)
        nll = token_nll(model, h, batch["targets"], weights, chunk)[2]
        return nll, greedy_hits(model, h, batch["targets"], limit, chunk)

    return jax.jit(nll_fn), jax.jit(greedy_fn)

