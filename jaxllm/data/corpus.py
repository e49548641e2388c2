"""The embedded default corpus: the running interpreter's standard-library source.

Every Python install carries it, so nothing is downloaded. Files are read in sorted order
(test suites and site-packages excluded); each file is one document; the train/eval split
is by file: a stable hash of the relative path puts about `eval_fraction` of the files in
eval.
"""

from __future__ import annotations

import pathlib
import sysconfig
import zlib

SKIP_DIRS = {"site-packages", "test", "tests", "idle_test"}


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[pathlib.Path]:
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py")
                  if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def in_eval_split(name: str, eval_fraction: float) -> bool:
    """Stable, order-free split by document name."""
    return (zlib.crc32(name.encode()) % 10_000) < eval_fraction * 10_000


def embedded_documents(split: str, eval_fraction: float = 0.05):
    """Yield (name, text) for the stdlib files of one split, in a fixed order."""
    root = stdlib_root()
    for path in stdlib_files():
        name = path.relative_to(root).as_posix()
        if in_eval_split(name, eval_fraction) != (split == "eval"):
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield name, text
