"""Thin command-line entry points; errors follow the contract: `error: ...`, exit 2."""

from __future__ import annotations

import os
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


def define_config_flag(argv, name: str = "config") -> None:
    """Define `--config` (an ml_collections config file, locked; default: the tiny CPU config
    in jaxllm/config.py). Defining it already applies `--config.KEY=VALUE` overrides, so it
    runs under the error contract."""
    from absl import flags
    from ml_collections import config_flags

    import jaxllm.config as jaxllm_config
    if name in flags.FLAGS:
        return
    try:
        config_flags.DEFINE_config_file(
            name, jaxllm_config.__file__,
            "config file (configs/NAME.py[:ARG]); default: the tiny CPU config",
            lock_config=True)
    except (AttributeError, KeyError):
        _fail(_unknown_key(argv))


def parse_config(flag_values, argv):
    """Parse absl flags (ml_collections config file + `--config.KEY=VALUE` overrides) under
    the error contract, then validate."""
    from absl import flags

    from jaxllm.config import validate
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        doc = (sys.modules["__main__"].__doc__ or "").strip()
        helps = [flag_values.module_help(m) for m in flag_values.flags_by_module_dict()
                 if not m.startswith("absl")]
        print((doc + "\n\n" if doc else "") + "\n".join(helps))
        sys.exit(0)
    try:
        flag_values(list(argv))
    except flags.Error as e:
        _fail(str(e).strip().splitlines()[-1].replace("flag --", "--"))
    except (AttributeError, KeyError):
        _fail(_unknown_key(argv))
    except (OSError, SyntaxError, ImportError) as e:
        _fail(f"--config: {e}")
    try:
        cfg = flag_values["config"].value
        cfg = cfg.unlock() if hasattr(cfg, "unlock") else cfg
    except OSError:
        path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
        why = "no such file" if not os.path.exists(path.split(":")[0]) else "it failed to load"
        _fail(f"--config: cannot load {path} ({why}); give a configs/NAME.py[:ARG] file")
    return validate(cfg)


def _unknown_key(argv) -> str:
    """Name the first `--config.KEY=...` override that is not in the schema."""
    from jaxllm.config import defaults, unknown_key
    schema = defaults()
    for arg in argv:
        if arg.startswith("--config."):
            msg = unknown_key(schema, arg[len("--config."):].split("=")[0])
            if msg:
                return msg
    return "--config: unknown config key"
