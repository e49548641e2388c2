"""`jaxllm-train --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]`.

With no --config it trains the tiny CPU default on the embedded corpus.

Exit status: 0 done; 2 bad config/flags/data or no restorable checkpoint (`error: ...`);
3 stopped after train.max_skips consecutive skipped (non-finite or spiking) steps;
128 + signal (143 SIGTERM, 130 SIGINT) when preempted after saving a checkpoint; the
same command resumes.
"""

from __future__ import annotations

import sys

from absl import flags

from jaxllm.cli import define_config_flag, parse_config
from jaxllm.cli.errors import fail, user_errors

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/default", "where checkpoints, metrics and logs go")


def main(argv=None) -> None:
    argv = sys.argv if argv is None else argv
    with user_errors():
        define_config_flag(argv)
        cfg = parse_config(FLAGS, argv)
        if not FLAGS.workdir.strip():
            fail("empty path (--workdir): give the run's directory, e.g. --workdir=runs/mine")
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
