"""Import a local Hugging Face Llama, GPT-2 or MPT model into a new jaxllm workdir.

    python tools/import_hf.py --hf_dir hf/gpt2 --workdir runs/gpt2-cont \
        [--config configs/NAME.py] [--config.data.seq_len=1024 ...] [--tokenizer PATH]
    jaxllm-train --config runs/gpt2-cont/config.py --workdir runs/gpt2-cont \
        --config.train.steps=2000          # continued pre-training from step 0

Reads config.json + model.safetensors (or a sharded index) and writes WORKDIR/config.json,
WORKDIR/config.py and a step-0 checkpoint: the imported parameters, a fresh optimizer
state and the data iterator of the --config data settings. The architecture comes from
the Hugging Face config; everything else (data, optimizer, training, mesh) from --config.
The tokenizer: --tokenizer, else a jaxllm export's byte tokenizer, else the directory's
tokenizer.json / tokenizer.model (copied into the workdir). Logic: jaxllm/hf/.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags
from ml_collections import config_flags

import jaxllm.config as jaxllm_config
from jaxllm.cli import parse_config, user_errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", jaxllm_config.__file__,
    "config file for everything but the architecture; default: the tiny CPU config",
    lock_config=True)
flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (config.json, safetensors)")
flags.DEFINE_string("workdir", None, "new jaxllm workdir to create")
flags.DEFINE_string("tokenizer", None, "data.tokenizer to use (byte | .model | .json)")


def main(argv=None) -> int:
    with user_errors():
        cfg = parse_config(FLAGS, sys.argv if argv is None else argv)
        for name in ("hf_dir", "workdir"):
            if not FLAGS[name].value:
                raise jaxllm_config.ConfigError(f"--{name}: required")
        from jaxllm.hf import import_hf
        s = import_hf(FLAGS.hf_dir, FLAGS.workdir, cfg, tokenizer=FLAGS.tokenizer)
        print(f"imported {s['family']} ({s['layers']} layers, vocab {s['vocab_size']}, "
              f"tokenizer {s['tokenizer']}) into {s['workdir']} at step 0; continue with:\n"
              f"  jaxllm-train --config={s['workdir']}/config.py --workdir={s['workdir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
