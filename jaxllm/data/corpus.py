"""The embedded default corpus: the running interpreter's standard-library source.

Every Python install carries it, so nothing is downloaded. Files are read in sorted order
(test suites and site-packages excluded); each file is one document; the train/eval split
is by file: a stable hash of the relative path puts about `eval_fraction` of the files in
eval (and `valid_fraction` in a validation split, when asked for).
"""

from __future__ import annotations

import glob
import json
import pathlib
import re
import sysconfig
import zlib

SKIP_DIRS = {"site-packages", "test", "tests", "idle_test"}


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[pathlib.Path]:
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py")
                  if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def split_of(name: str, eval_fraction: float, valid_fraction: float = 0.0) -> str:
    """Stable, order-free split by document name: "eval", "valid" (the next hash
    bucket; none when valid_fraction is 0) or "train"."""
    bucket = zlib.crc32(name.encode()) % 10_000
    if bucket < eval_fraction * 10_000:
        return "eval"
    return "valid" if bucket < (eval_fraction + valid_fraction) * 10_000 else "train"


def embedded_documents(split: str, eval_fraction: float = 0.05, valid_fraction: float = 0.0):
    """Yield (name, text) for the stdlib files of one split, in a fixed order."""
    root = stdlib_root()
    for path in stdlib_files():
        name = path.relative_to(root).as_posix()
        if split_of(name, eval_fraction, valid_fraction) != split:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield name, text


# ---------------------------------------------------------------------------------------
# Reading the user's corpus: .txt / .jsonl / .parquet files or globs, or "embedded".

EMBEDDED = "embedded"
SUFFIXES = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".json": "jsonl",
            ".parquet": "parquet"}
BAD_KINDS = ("undecodable", "unencodable", "empty", "malformed_json", "missing_field")


def expand_inputs(inputs, key: str = "data.path") -> list[str]:
    """Files named by paths or globs (sorted, deduplicated), or [EMBEDDED].

    Raises ValueError naming `key` for a pattern that matches nothing, an unsupported
    suffix or an empty file list.
    """

    out: list[str] = []
    for spec in inputs:
        if spec in (EMBEDDED, ""):
            out.append(EMBEDDED)
            continue
        matches = sorted(glob.glob(str(pathlib.Path(spec).expanduser()), recursive=True))
        files = [m for m in matches if pathlib.Path(m).is_file()]
        if not files:
            raise ValueError(f"{key}: no input files match {spec!r}")
        for f in files:
            if pathlib.Path(f).suffix.lower() not in SUFFIXES:
                raise ValueError(f"{key}: {f}: unsupported file type; allowed: "
                                 f"{', '.join(sorted(SUFFIXES))}")
        out.extend(files)
    out = list(dict.fromkeys(out))
    if not out:
        raise ValueError(f"{key}: no input files given")
    return out


class BadRecords:
    """Counts of skipped records per kind and per file (reported, never fatal)."""

    def __init__(self):
        self.counts = {k: 0 for k in BAD_KINDS}
        self.by_file: dict[str, dict[str, int]] = {}

    def add(self, kind: str, source: str, n: int = 1) -> None:
        self.counts[kind] += n
        per = self.by_file.setdefault(source, {})
        per[kind] = per.get(kind, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "bad records: none"
        parts = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v)
        files = "; ".join(f"{f}: " + ", ".join(f"{k} {v}" for k, v in d.items())
                          for f, d in sorted(self.by_file.items()))
        return f"bad records skipped: {self.total} ({parts}) in {files}"


def _decode(raw: bytes, source: str, bad: BadRecords) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        bad.add("undecodable", source)
        return None
    if not text.strip():
        bad.add("empty", source)
        return None
    return text


def _encodable(text: str, source: str, bad: BadRecords) -> bool:
    """False (counted as `unencodable`) for text that is not valid Unicode, e.g. a JSON
    string holding an unpaired surrogate (`"\\ud800"`), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        bad.add("unencodable", source)
        return False


def _txt_docs(path: str, blank_line_docs: bool, bad: BadRecords):
    try:
        raw = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"data.path: cannot read {path} ({e.strerror})") from e
    if not blank_line_docs:
        text = _decode(raw, path, bad)
        if text is not None:
            yield text
        return

    for block in re.split(rb"(?:\r?\n[ \t]*){2,}", raw):
        if block.strip():
            text = _decode(block, path, bad)
            if text is not None:
                yield text


def _jsonl_docs(path: str, field: str, bad: BadRecords):

    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ValueError(f"data.path: cannot read {path} ({e.strerror})") from e
    with fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                bad.add("undecodable", path)
                continue
            except json.JSONDecodeError:
                bad.add("malformed_json", path)
                continue
            text = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                bad.add("missing_field", path)
            elif not text.strip():
                bad.add("empty", path)
            elif _encodable(text, path, bad):
                yield text


def _parquet_docs(path: str, field: str, bad: BadRecords):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"data.path: {path} is not a readable Parquet file ({e})") from e
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"data.text_field: column {field!r} not in {path} "
                         f"(columns: {', '.join(names)})")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, bytes):
                text = _decode(text, path, bad)
                if text is not None:
                    yield text
            elif not isinstance(text, str):
                bad.add("missing_field", path)
            elif not text.strip():
                bad.add("empty", path)
            else:
                yield text


def iter_texts(files: list[str], *, text_field: str = "text", blank_line_docs: bool = False,
               bad: BadRecords | None = None):
    """Yield (source, text) for every good document of `files` (from `expand_inputs`).

    `.txt`: the whole file is one document, or with `blank_line_docs` every block separated
    by blank lines. `.jsonl`/`.json`: one JSON object per line, text in `text_field`.
    `.parquet`: the `text_field` column. EMBEDDED: every stdlib file (the train/eval split
    of prepared data is made later, by document). Bad records go to `bad`.
    """
    bad = bad if bad is not None else BadRecords()
    for f in files:
        if f == EMBEDDED:
            for name, text in embedded_documents("train", 0.0):
                yield f"{EMBEDDED}:{name}", text
            continue
        kind = SUFFIXES[pathlib.Path(f).suffix.lower()]
        if kind == "txt":
            docs = _txt_docs(f, blank_line_docs, bad)
        elif kind == "jsonl":
            docs = _jsonl_docs(f, text_field, bad)
        else:
            docs = _parquet_docs(f, text_field, bad)
        for text in docs:
            yield f, text
