"""grain pipeline: packing, per-process sharding, exact resume, mixtures, splits, raw paths."""

import json

import grain
import numpy as np
import pytest

from jaxllm import config
from jaxllm.data.pipeline import KEYS, load_split, make_pipeline
from jaxllm.data.prepare import PreparedData, eval_mask, prepare
from jaxllm.data.tokenizers import load_tokenizer

BYTE = load_tokenizer("byte")
EOS = BYTE.eos_id


def random_docs(n, seed, alphabet="abcdefghij é中😀\n"):
    rng = np.random.default_rng(seed)
    chars = list(alphabet)
    return ["".join(rng.choice(chars, size=int(rng.integers(1, 90)))) for _ in range(n)]


def write_prepared(tmp, name, docs):
    src = tmp / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([str(src)], str(tmp / name), "byte", workers=1, progress=False)
    return str(tmp / name)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    docs = random_docs(240, 0)
    return write_prepared(tmp, "main", docs), docs


def make_cfg(path, packing="concat", seq_len=32, batch=4, prefetch=2, eval_fraction=0.2):
    cfg = config.defaults()
    cfg.data.path, cfg.data.packing, cfg.data.seq_len = path, packing, seq_len
    cfg.data.prefetch, cfg.data.eval_fraction = prefetch, eval_fraction
    cfg.train.batch_size, cfg.train.seed = batch, 3
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def rows(batches):
    return [tuple(np.concatenate([b[k][r] for k in KEYS]).tolist())
            for b in batches for r in range(len(b["inputs"]))]


def split_docs(docs, split, frac=0.2):
    mask = eval_mask(len(docs), frac)
    return [d for d, m in zip(docs, mask) if m == (split == "eval")]


def expected_segments(inputs):
    """Direct loop: a new document starts after every EOS; positions count from its start."""
    seg, pos, s, p = [], [], 1, 0
    for i, t in enumerate(inputs):
        if i > 0 and inputs[i - 1] == EOS:
            s, p = s + 1, 0
        seg.append(s)
        pos.append(p)
        p += 1
    return seg, pos


def test_concat_batches(dataset):
    path, docs = dataset
    cfg = make_cfg(path)
    stream = np.concatenate([BYTE.encode(d) + [EOS] for d in split_docs(docs, "train")])
    n = (len(stream) - 1) // 32
    order = grain.MapDataset.range(n).seed(3).shuffle()
    batches = take(make_pipeline(cfg, BYTE), 3)
    for k, b in enumerate(batches):
        assert set(b) == set(KEYS) and all(v.dtype == np.int32 and v.shape == (4, 32)
                                           for v in b.values())
        for r in range(4):
            i = order[4 * k + r]
            w = stream[i * 32:(i + 1) * 32 + 1]
            assert b["inputs"][r].tolist() == w[:-1].tolist()
            assert b["targets"][r].tolist() == w[1:].tolist()
            seg, pos = expected_segments(w[:-1].tolist())
            assert b["segment_ids"][r].tolist() == seg and b["positions"][r].tolist() == pos
            assert b["target_bytes"][r].tolist() == [int(t < 256) for t in w[1:]]


def test_first_fit_eval_covers_every_document_piece(dataset):
    path, docs = dataset
    cfg = make_cfg(path, packing="first_fit", seq_len=40)
    segments, total_bytes, n_rows = [], 0, 0
    for b in make_pipeline(cfg, BYTE, "eval"):
        for r in range(len(b["inputs"])):
            seg, pos = b["segment_ids"][r], b["positions"][r]
            pad = seg == 0
            assert (b["targets"][r][pad] == BYTE.pad_id).all()
            assert (b["inputs"][r][pad] == BYTE.pad_id).all()
            assert (b["target_bytes"][r][pad] == 0).all() and (pos[pad] == 0).all()
            assert (np.diff(seg[~pad]) >= 0).all()
            assert (pad == (np.arange(40) >= (~pad).sum())).all()  # padding only at the end
            for s in np.unique(seg[~pad]):
                m = seg == s
                assert pos[m].tolist() == list(range(m.sum()))
                segments.append((tuple(b["inputs"][r][m]), tuple(b["targets"][r][m])))
            total_bytes += int(b["target_bytes"][r].sum())
            n_rows += 1
    expected = []
    for d in split_docs(docs, "eval"):
        full = [EOS] + BYTE.encode(d) + [EOS]
        for k in range(0, len(full) - 1, 40):
            w = full[k:k + 41]
            expected.append((tuple(w[:-1]), tuple(w[1:])))
    assert sorted(segments) == sorted(expected)
    assert total_bytes == sum(len(d.encode()) for d in split_docs(docs, "eval"))
    assert n_rows % 4 == 0


def test_first_fit_train_rows(dataset):
    path, _ = dataset
    cfg = make_cfg(path, packing="first_fit", seq_len=40)
    for b in take(make_pipeline(cfg, BYTE), 5):
        assert all(v.shape == (4, 40) and v.dtype == np.int32 for v in b.values())
        for r in range(4):
            seg, pos, inp = b["segment_ids"][r], b["positions"][r], b["inputs"][r]
            for s in np.unique(seg[seg > 0]):
                m = np.flatnonzero(seg == s)
                assert pos[m].tolist() == list(range(len(m)))
                assert (np.diff(m) == 1).all()
            tgt = b["targets"][r]
            assert b["target_bytes"][r].tolist() == BYTE.token_bytes(tgt).tolist()
            assert (tgt[seg == 0] == BYTE.pad_id).all()
            # inside a segment, the target of position i is the input at i + 1
            same = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
            assert (tgt[:-1][same] == inp[1:][same]).all()


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_two_processes_read_disjoint_data(dataset, packing):
    path, _ = dataset
    cfg = make_cfg(path, packing=packing)
    one = rows(take(make_pipeline(cfg, BYTE, "train"), 6))
    parts = [rows(take(make_pipeline(cfg, BYTE, "train", p, 2), 6)) for p in range(2)]
    if packing == "concat":  # same global elements, split between processes
        assert set(parts[0]).isdisjoint(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(one)
    ev_one = rows(list(make_pipeline(cfg, BYTE, "eval", batch_size=14)))
    ev = [rows(list(make_pipeline(cfg, BYTE, "eval", p, 2, batch_size=14))) for p in range(2)]
    assert len(ev[0]) == len(ev[1]) and len(ev_one) == 2 * len(ev[0])

    def real(rs):  # rows with any non-padding token (segment ids are r[64:96])
        return [r for r in rs if any(r[64:96])]

    assert sorted(real(ev[0] + ev[1])) == sorted(real(ev_one))
    assert set(real(ev[0])).isdisjoint(ev[1])
    n_real = len(real(ev_one))  # the last global batch is padded to 14 rows
    assert len(ev_one) == n_real + (-n_real) % 14
    assert packing != "concat" or n_real == 120  # 120 windows: 6 padding rows


def test_first_fit_processes_read_disjoint_documents(dataset):
    """Sharding happens before packing: within an epoch no document reaches both processes.
    (seq_len 400 keeps every document whole; 3 batches stay inside the first epoch.)"""
    path, docs = dataset
    cfg = make_cfg(path, packing="first_fit", seq_len=400, eval_fraction=0.0)
    seen = []
    for p in range(2):
        got = []
        for b in take(make_pipeline(cfg, BYTE, "train", p, 2), 3):
            for r in range(2):
                seg = b["segment_ids"][r]
                got += [tuple(b["targets"][r][seg == s].tolist()) for s in np.unique(seg[seg > 0])]
        assert len(got) == len(set(got))
        seen.append(set(got))
    assert seen[0].isdisjoint(seen[1])
    whole = {tuple(BYTE.encode(d) + [EOS]) for d in docs}
    assert seen[0] | seen[1] <= whole and len(seen[0] | seen[1]) >= 20


@pytest.mark.parametrize("packing,prefetch", [("concat", 2), ("first_fit", 2), ("concat", 0)])
def test_resume_is_exact_across_epochs(dataset, packing, prefetch):
    """State saved after k batches (inside epoch 1) restores to the same next batches as an
    unbroken run, for more batches than an epoch has."""
    from jaxllm.data.pipeline import DocPieces, PackedWindows

    path, _ = dataset
    cfg = make_cfg(path, packing=packing, prefetch=prefetch, batch=8)
    split = load_split(cfg, BYTE, "train")
    rows_per_epoch_max = len((PackedWindows if packing == "concat" else DocPieces)(
        split, 32, BYTE))  # a row holds >= 1 element
    k = split.num_tokens // 32 // 8 - 2  # every row holds <= 32 targets: still epoch 1
    n = rows_per_epoch_max // 8 - k + 10
    it = make_pipeline(cfg, BYTE)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    unbroken = take(it, n)
    resumed_it = make_pipeline(cfg, BYTE)
    resumed_it.set_state(state)
    assert rows(take(resumed_it, n)) == rows(unbroken)


def test_resume_crosses_epoch_boundary_concat(dataset):
    path, _ = dataset
    cfg = make_cfg(path, batch=4)
    train_windows = (load_split(cfg, BYTE, "train").num_tokens - 1) // 32
    per_epoch = train_windows // 4
    it = make_pipeline(cfg, BYTE)
    take(it, per_epoch - 2)
    state = it.get_state()
    ref = take(it, 10)
    it2 = make_pipeline(cfg, BYTE)
    it2.set_state(state)
    assert rows(take(it2, 10)) == rows(ref)
    # the 10 batches do run into the second epoch: windows repeat from the first epoch
    first_epoch = rows(take(make_pipeline(cfg, BYTE), per_epoch))
    assert set(rows(ref)[-4:]) <= set(first_epoch)


def test_train_and_eval_splits_are_disjoint_by_document(dataset):
    path, docs = dataset
    cfg = make_cfg(path)
    tr, ev = load_split(cfg, BYTE, "train"), load_split(cfg, BYTE, "eval")
    assert len(tr) + len(ev) == len(docs) and 0 < len(ev) < len(docs) // 2
    tr_docs = {tuple(tr.doc(j).tolist()) for j in range(len(tr))}
    ev_docs = {tuple(ev.doc(j).tolist()) for j in range(len(ev))}
    assert tr_docs.isdisjoint(ev_docs)
    assert tr_docs | ev_docs == {tuple(BYTE.encode(d) + [EOS]) for d in docs}


def test_mixture_weights(tmp_path):
    a = write_prepared(tmp_path, "a", random_docs(80, 1, alphabet="abc"))
    b = write_prepared(tmp_path, "b", random_docs(80, 2, alphabet="xyz"))
    cfg = make_cfg("", seq_len=16, batch=8)
    cfg.data.mixture = f"{a}:3,{b}:1"
    from_a = 0
    batches = take(make_pipeline(cfg, BYTE), 50)
    for bt in batches:
        for r in bt["inputs"]:
            letters = set(r[r < 256].tolist())
            assert letters <= set(b"abc \n") or letters <= set(b"xyz \n")
            from_a += bool(letters & set(b"abc"))
    assert abs(from_a / 400 - 0.75) < 0.05
    assert sum(1 for _ in make_pipeline(cfg, BYTE, "eval")) > 0
    for bad in (f"{a}", f"{a}:0", f"{a}:x,{b}:1"):
        cfg.data.mixture = bad
        with pytest.raises(ValueError, match="data.mixture: bad entry"):
            make_pipeline(cfg, BYTE)


def test_raw_files_prepared_on_the_fly(tmp_path):
    docs = random_docs(60, 5)
    (tmp_path / "raw").mkdir()
    for i in range(2):
        (tmp_path / "raw" / f"part{i}.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in docs[i * 30:(i + 1) * 30]))
    cfg = make_cfg(str(tmp_path / "raw" / "*.jsonl"), seq_len=16)
    first = take(make_pipeline(cfg, BYTE), 2)
    caches = list((tmp_path / "raw" / ".jaxllm_cache").iterdir())
    assert len(caches) == 1 and PreparedData(str(caches[0])).manifest["num_docs"] == 60
    mtime = (caches[0] / "manifest.json").stat().st_mtime_ns
    assert rows(take(make_pipeline(cfg, BYTE), 2)) == rows(first)
    assert (caches[0] / "manifest.json").stat().st_mtime_ns == mtime  # reused
    cfg.data.path = str(tmp_path / "missing" / "*.jsonl")
    with pytest.raises(ValueError, match="data.path: no input files match"):
        make_pipeline(cfg, BYTE)
    cfg.data.path = str(tmp_path)
    with pytest.raises(ValueError, match="data.path: .*manifest.json is missing"):
        make_pipeline(cfg, BYTE)


def test_embedded_corpus_unchanged():
    """data.path == "": windows of the embedded stream in grain's seeded shuffle order."""
    from jaxllm.data.corpus import embedded_documents

    cfg = make_cfg("", seq_len=64, batch=4, eval_fraction=0.05)
    stream = np.concatenate([np.append(np.frombuffer(t.encode(), np.uint8), EOS)
                             for _, t in embedded_documents("train", 0.05)])
    order = grain.MapDataset.range((len(stream) - 1) // 64).seed(3).shuffle()
    b = next(make_pipeline(cfg, BYTE))
    for r in range(4):
        i = order[r]
        assert b["inputs"][r].tolist() == stream[i * 64:(i + 1) * 64].tolist()
        assert b["targets"][r].tolist() == stream[i * 64 + 1:(i + 1) * 64 + 1].tolist()
