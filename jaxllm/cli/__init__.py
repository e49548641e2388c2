"""Thin command-line entry points; errors follow the contract: `error: ...`, exit 2."""

from __future__ import annotations

import sys
from contextlib import contextmanager


@contextmanager
def user_errors():
    """Turn user-facing errors into one line on stderr and exit status 2, no traceback."""
    from jaxllm.config import ConfigError
    try:
        yield
    except ConfigError as e:
        _fail(str(e))
    except FileNotFoundError as e:
        _fail(f"{e.filename or ''}: {e.strerror or e}")


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_config(flag_values, argv):
    """Parse absl flags (ml_collections config file + `--config.KEY=VALUE` overrides) under
    the error contract, then validate."""
    from absl import flags

    from jaxllm.config import validate
    try:
        flag_values(list(argv))
    except flags.Error as e:
        _fail(str(e).strip().splitlines()[-1].replace("flag --", "--"))
    except (OSError, SyntaxError, ImportError) as e:
        _fail(f"--config: {e}")
    cfg = flag_values["config"].value
    return validate(cfg.unlock() if hasattr(cfg, "unlock") else cfg)
