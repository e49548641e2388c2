"""The files of a workdir besides checkpoints: metrics.jsonl and the run's JSON files.

- `open_metrics(path)`: open metrics.jsonl for appending so that this run's rows start on
  a fresh line. A torn last line (a run killed in the middle of a write, a full disk) is
  cut off and set aside in `metrics.jsonl.torn` (appended, never deleted); a last row that
  is complete but lacks its newline gets one.
- `read_rows(path)`: every row of a metrics file that is a JSON object; a line that is not
  (torn, garbage, a bare value) is skipped with one warning naming the file and lines,
  instead of stopping plots, ablation tables and evaluations.
- `read_config_json(path)`: a run's config.json as a dict of sections; a file that parses
  but has another shape is a ConfigError naming it (not a TypeError deep inside a reader).
"""

from __future__ import annotations

import json
import logging
import os

from jaxllm.config import ConfigError

log = logging.getLogger("jaxllm")
TORN_SUFFIX = ".torn"


def repair_tail(path: str) -> str | None:
    """Make `path` end with a newline; returns the torn fragment set aside (or None)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return None
            f.seek(max(size - (1 << 20), 0))
            tail = f.read()
    except FileNotFoundError:
        return None
    if tail.endswith(b"\n"):
        return None
    cut = tail.rfind(b"\n") + 1  # 0: the whole (last MiB of the) file is one line
    fragment = tail[cut:]
    try:
        complete = isinstance(json.loads(fragment), dict)
    except ValueError:
        complete = False
    if complete:  # a whole row whose newline is missing: keep it
        with open(path, "ab") as f:
            f.write(b"\n")
        return None
    with open(path + TORN_SUFFIX, "ab") as f:
        f.write(fragment + b"\n")
    with open(path, "r+b") as f:
        f.truncate(size - len(fragment))
    log.warning("%s: its last line was torn (%d bytes, a killed or full-disk write); moved "
                "it to %s", path, len(fragment), path + TORN_SUFFIX)
    return fragment.decode("utf-8", errors="replace")


def open_metrics(path: str):
    """metrics.jsonl opened for appending, its torn tail repaired first (`repair_tail`)."""
    repair_tail(path)
    return open(path, "a")  # noqa: SIM115 - the writer owns and closes it


def read_rows(path: str) -> list[dict]:
    """The JSON-object rows of a metrics file, skipping bad lines with one warning."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step", 0), int):
                rows.append(row)
            else:
                bad.append(n)
    if bad:
        log.warning("%s: skipped %d unreadable line(s) (line %s); the other rows are used",
                    path, len(bad), ", ".join(map(str, bad[:5])) + (" ..." if bad[5:] else ""))
    return rows


def read_config_json(path) -> dict:
    """A run's config.json: {section: {key: value}}. FileNotFoundError passes through;
    anything else that is not such a dict is a ConfigError naming the file."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(f"unreadable run file ({path}): {e}; restore it from a copy or "
                          "use a new --workdir") from None
    if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
        raise ConfigError(f"malformed run file ({path}): expected a JSON object of config "
                          "sections; restore it from a copy or use a new --workdir")
    return saved
