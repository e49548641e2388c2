"""Thin command-line entry points; errors follow the contract of `jaxllm/cli/errors.py`
(`error: ...`, exit 2). Here: the absl `--config` flag shared by the flag-based commands."""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

import jaxllm.config as jaxllm_config
from jaxllm.cli.errors import check_number, fail, quiet_libraries
from jaxllm.config import defaults, unknown_key, validate


def define_config_flag(argv, name: str = "config", default: str | None = None,
                       help_text: str = "config file (configs/NAME.py[:ARG]); default: the "
                       "tiny CPU config") -> None:
    """Define `--config` (an ml_collections config file, locked; default: the tiny CPU config
    in jaxllm/config.py) and `--verbose`. Defining `--config` already applies
    `--config.KEY=VALUE` overrides, so it runs under the error contract."""
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, "show library (absl/Orbax/JAX) logging")
    if name in flags.FLAGS:
        return
    try:
        config_flags.DEFINE_config_file(name, default or jaxllm_config.__file__, help_text,
                                        lock_config=True)
    except (AttributeError, KeyError):
        fail(_unknown_key(argv))


def parse_config(flag_values, argv):
    """Parse absl flags (ml_collections config file + `--config.KEY=VALUE` overrides) under
    the error contract (positional arguments and non-finite numbers refused), then
    validate."""
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        doc = (sys.modules["__main__"].__doc__ or "").strip()
        helps = [flag_values.module_help(m) for m in flag_values.flags_by_module_dict()
                 if not m.startswith("absl")]
        print((doc + "\n\n" if doc else "") + "\n".join(helps))
        sys.exit(0)
    try:
        extra = flag_values(list(argv))[1:]
    except flags.Error as e:
        fail(str(e).strip().splitlines()[-1].replace("flag --", "--"))
    except (AttributeError, KeyError):
        fail(_unknown_key(argv))
    except (OSError, SyntaxError, ImportError) as e:
        fail(f"--config: {e}")
    if extra:
        fail(f"unexpected positional argument(s) ({' '.join(extra)}): every setting is a "
             "--flag=VALUE or --config.KEY=VALUE")
    quiet_libraries(bool(flag_values["verbose"].value) if "verbose" in flag_values else False)
    for name in flag_values:
        if not name.startswith("config"):
            check_number("--" + name, flag_values[name].value)
    try:
        cfg = flag_values["config"].value
        cfg = cfg.unlock() if hasattr(cfg, "unlock") else cfg
    except OSError:
        path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
        why = "no such file" if not os.path.exists(path.split(":")[0]) else "it failed to load"
        fail(f"--config: cannot load {path} ({why}); give a configs/NAME.py[:ARG] file")
    return validate(cfg)


def _unknown_key(argv) -> str:
    """Name the first `--config.KEY=...` override that is not in the schema."""
    schema = defaults()
    for arg in argv:
        if arg.startswith("--config."):
            msg = unknown_key(schema, arg[len("--config."):].split("=")[0])
            if msg:
                return msg
    return "--config: unknown config key"
