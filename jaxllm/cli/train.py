"""`jaxllm-train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]`.

With no --config it trains the tiny CPU default on the embedded corpus.

Exit status: 0 done; 2 bad config/flags/data or no restorable checkpoint (`error: ...`);
3 stopped after train.max_skips consecutive skipped (non-finite or spiking) steps;
128 + signal (143 SIGTERM, 130 SIGINT) when preempted after saving a checkpoint; the
same command resumes.
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
        from jaxllm.train.guard import TrainingDiverged
        from jaxllm.train.loop import train
        try:
            result = train(cfg, FLAGS.workdir)
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_status)
    if result.get("preempted"):
        print(f"preempted at step {result['step']}: checkpoint saved; rerun the same command "
              "to resume", file=sys.stderr)
        sys.exit(result["exit_status"])


if __name__ == "__main__":
    main()
