"""The error contract every command shares (the jaxllm-* entry points and tools/*.py).

A failure the user can fix (a bad flag, path, permission, full disk, malformed file,
non-finite number, impossible size, a second Ctrl-C) ends with exit status 2 and ONE line
on stderr, `error: <what> (<which file/key>): <what to do>`, no traceback. Anything else
is a bug and still raises (traceback, exit status 1).

- `user_errors()`: the context every command body runs in; maps ConfigError, OSError and
  KeyboardInterrupt to that line.
- `ArgParser`: argparse whose usage errors are that one line, with `--verbose`, and whose
  numbers must be finite (and integers fit in 64 bits).
- `fail(msg)`: print the line and exit 2; `returns_status`: the same as a return value.
- `check_output_file` / `check_output_dir`: validate an output path before expensive work.
- `quiet_libraries(verbose)`: keep absl/Orbax/JAX logging out of the terminal.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import math
import os
import sys
import traceback
from contextlib import contextmanager

from jaxllm.config import ConfigError

EXIT_USER = 2  # exit status of every user-caused failure
LIBRARY_LOGGERS = ("absl", "orbax", "jax", "jax._src", "etils", "grain", "tensorboardX")

_ADVICE = {
    errno.ENOSPC: ("no space left on device", "free disk space or use another path; "
                   "saved checkpoints are kept"),
    errno.EDQUOT: ("disk quota exceeded", "free space or use another path"),
    errno.EACCES: ("permission denied", "make it writable/readable or choose another path"),
    errno.EPERM: ("operation not permitted", "check its owner and permissions"),
    errno.EROFS: ("read-only file system", "choose a path on a writable file system"),
    errno.EISDIR: ("is a directory", "give a file path here, not a directory"),
    errno.ENOTDIR: ("not a directory", "a part of this path is a regular file; "
                    "choose another path"),
    errno.EEXIST: ("already exists", "remove it or choose another path"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
}


def fail(msg: str):
    """Print `error: msg` (one line) to stderr and exit with status 2."""
    print("error: " + " ".join(str(msg).split()), file=sys.stderr, flush=True)
    sys.exit(EXIT_USER)


def returns_status(main):
    """Decorator for a tool's `main(argv) -> int`: a `fail()` (SystemExit) becomes the
    returned exit status, so callers (and `sys.exit(main())`) see 2 either way."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
    return wrapper


def describe_os_error(e: OSError) -> str:
    """`<what> (<file>): <what to do>` for an OSError."""
    what, todo = _ADVICE.get(e.errno, (e.strerror or type(e).__name__, "check the path"))
    where = e.filename if e.filename is not None else "?"
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    return f"{what} ({where}): {todo}"


@contextmanager
def user_errors():
    """Run a command body under the error contract (see the module docstring)."""
    try:
        yield
    except ConfigError as e:
        fail(str(e))
    except OSError as e:
        fail(describe_os_error(e))
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C): stopped without saving; finished checkpoints are kept, "
             "rerun the same command to resume")


def check_number(name: str, value) -> None:
    """Refuse a non-finite float or an integer that does not fit in 64 bits."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        fail(f"non-finite number ({name}={value}): give a finite value")
    if isinstance(value, int) and not -(1 << 63) <= value < (1 << 63):
        fail(f"number too large ({name}={value}): give a value below 2**63")


class ArgParser(argparse.ArgumentParser):
    """argparse under the error contract: usage errors are one `error:` line (exit 2),
    positional arguments are refused unless declared, numbers must be finite, and every
    tool gets `--verbose` (library logging in the terminal)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--verbose", action="store_true",
                          help="show library (absl/Orbax/JAX) logging")

    def error(self, message):
        fail(f"{message} ({self.prog}): see {self.prog} --help")

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        for key, value in vars(ns).items():
            for v in value if isinstance(value, list) else [value]:
                check_number("--" + key, v)
        quiet_libraries(ns.verbose)
        return ns


def check_output_file(path: str, flag: str) -> None:
    """Fail now (not after the work) when `path` cannot be written as a file."""
    if not path:
        fail(f"empty path ({flag}): give a file path")
    if os.path.isdir(path):
        fail(f"is a directory ({flag}={path}): give a file path")
    _writable_dir(os.path.dirname(os.path.abspath(path)), path, flag)


def check_output_dir(path: str, flag: str) -> None:
    """Fail now when `path` cannot be created or written as a directory."""
    if not path:
        fail(f"empty path ({flag}): give a directory")
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"not a directory ({flag}={path}): it is an existing file; choose a directory")
    _writable_dir(path, path, flag)


def _writable_dir(directory: str, path: str, flag: str) -> None:
    """Create `directory` if needed and fail unless it is writable (`path` as given)."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        fail(f"{describe_os_error(e)} [{flag}]")
    if not os.access(directory, os.W_OK):
        fail(f"not writable ({flag}={path}): choose a writable directory")


def quiet_libraries(verbose: bool = False) -> None:
    """Our warnings go to stderr as `WARNING jaxllm: ...`; library logging (absl, Orbax,
    JAX, grain) only with --verbose, so an `error:` line is not drowned in it."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    level = logging.INFO if verbose else logging.CRITICAL
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose and not hasattr(sys.excepthook, "jaxllm_filtered"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ warnings
        sys.excepthook = _drop_background_noise(sys.excepthook, whole=True)
        sys.unraisablehook = _drop_background_noise(sys.unraisablehook, whole=False)
        logging.getLogger("asyncio").addFilter(_background_log_record)


_BACKGROUND = ("/asyncio/", "/orbax/", "/tensorstore/", "/concurrent/futures/", "threading.py")


def _in_background(tb, whole: bool) -> bool:
    """Whether traceback `tb` comes from library background work: all its frames
    (`whole`) or any of them in asyncio/Orbax/TensorStore/thread-pool code."""
    files = [f.filename for f in traceback.extract_tb(tb)] if tb is not None else []
    hits = [any(m in f for m in _BACKGROUND) for f in files]
    return bool(hits) and (all(hits) if whole else any(hits))


def _background_log_record(record: logging.LogRecord) -> bool:
    """asyncio logs "Task exception was never retrieved" with the traceback of each of
    Orbax's write tasks still pending when a save failed (it already is our one
    `error:` line); keep every other asyncio record."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and _in_background(exc.__traceback__, whole=True))


def _drop_background_noise(hook, whole: bool):
    """Wrap sys.excepthook / sys.unraisablehook: drop the tracebacks that Orbax's
    background writers leave behind after a failed save (an event loop closed under a
    pending write, coroutines collected at exit): frames of asyncio/Orbax/TensorStore only
    (`whole`), or any such frame for unraisable ones. Anything from our code still shows."""
    def filtered(*args):
        tb = args[2] if len(args) == 3 else getattr(args[0], "exc_traceback", None)
        if _in_background(tb, whole):
            return
        hook(*args)
    filtered.jaxllm_filtered = True
    return filtered
