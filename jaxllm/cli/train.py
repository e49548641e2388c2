"""`jaxllm-train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]`.

With no --config it trains the tiny CPU default on the embedded corpus.
"""

from __future__ import annotations

import logging
import sys

from absl import flags
from ml_collections import config_flags

import jaxllm.config as jaxllm_config
from jaxllm.cli import parse_config, user_errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", jaxllm_config.__file__,
    "config file (configs/NAME.py[:ARG]); default: the tiny CPU config", lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "where checkpoints, metrics and logs go")


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with user_errors():
        cfg = parse_config(FLAGS, sys.argv if argv is None else argv)
        from jaxllm.train.loop import train
        train(cfg, FLAGS.workdir)


if __name__ == "__main__":
    main()
