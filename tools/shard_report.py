"""Per-device memory of a config on a mesh, without devices: size a pod before renting it.

    python tools/shard_report.py --config=configs/llama_1b.py --mesh=1,-1,4 --devices=64
    python tools/shard_report.py --config=configs/llama_1b.py --mesh=1,8,1 --devices=8 \
        --config.optim.name=adam8bit --config.model.remat=full --json

--mesh=data,fsdp,tensor (-1 = the rest; default: the config's mesh.*), --devices=N.
Prints per-device bytes of parameters, gradients, optimizer state and estimated
activations (the formula: jaxllm/sizing.py). Nothing is allocated: shapes come from
jax.eval_shape and shardings from the logical-axis rules on an abstract mesh.
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags

import jaxllm.config as jaxllm_config
from jaxllm.cli import define_config_flag, parse_config
from jaxllm.cli.errors import user_errors
from jaxllm.config import ConfigError
from jaxllm.data.resolve import resolve

FLAGS = flags.FLAGS
flags.DEFINE_string("mesh", "", "data,fsdp,tensor sizes (-1 = the rest); default: config")
flags.DEFINE_integer("devices", 0, "number of devices to size for (required)")
flags.DEFINE_bool("json", False, "print the report as JSON")


def main(argv) -> None:
    """Parse flags (errors: `error: ...`, exit 2), size, print."""
    with user_errors():
        define_config_flag(argv)
        cfg = parse_config(FLAGS, argv)
        if FLAGS.devices < 1:
            raise ConfigError(f"--devices: must be >= 1, got {FLAGS.devices}")
        if FLAGS.mesh:
            try:
                sizes = [int(s) for s in FLAGS.mesh.split(",")]
                if len(sizes) != 3 or 0 in sizes or min(sizes) < -1 or sizes.count(-1) > 1:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"--mesh: got {FLAGS.mesh!r}; expected data,fsdp,tensor "
                                  "(positive ints, at most one -1)") from None
            cfg.mesh.update(data=sizes[0], fsdp=sizes[1], tensor=sizes[2])
            jaxllm_config.validate(cfg)
        from jaxllm import sizing
        resolve(cfg)
        r = sizing.report(cfg, FLAGS.devices)
    print(json.dumps(r, indent=2) if FLAGS.json else sizing.format_report(r))


if __name__ == "__main__":
    main(sys.argv)
