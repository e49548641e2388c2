"""`jaxllm-train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]`.

With no --config it trains the tiny CPU default on the embedded corpus.
"""

from __future__ import annotations

import logging
import sys

from absl import flags

from jaxllm.cli import define_config_flag, parse_config, user_errors

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/default", "where checkpoints, metrics and logs go")


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv if argv is None else argv
    with user_errors():
        define_config_flag(argv)
        cfg = parse_config(FLAGS, argv)
        from jaxllm.train.loop import train
        train(cfg, FLAGS.workdir)


if __name__ == "__main__":
    main()
