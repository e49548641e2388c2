"""Import a local Hugging Face Llama, Mistral, Qwen2, GPT-2 or MPT model into a new workdir.

    python tools/import_hf.py --hf_dir hf/gpt2 --workdir runs/gpt2-cont \
        [--config configs/NAME.py] [--config.data.seq_len=1024 ...] [--tokenizer PATH]
    jaxllm-train --config runs/gpt2-cont/config.py --workdir runs/gpt2-cont \
        --config.train.steps=2000          # continued pre-training from step 0

Reads config.json + model.safetensors (or a sharded index; float32, bfloat16 or float16
weights) and writes WORKDIR/config.json, WORKDIR/config.py and a step-0 checkpoint: the
imported parameters, a fresh optimizer state and the data iterator of the --config data
settings. The architecture comes from
the Hugging Face config; everything else (data, optimizer, training, mesh) from --config.
The tokenizer: --tokenizer, else a jaxllm export's byte tokenizer, else the directory's
tokenizer.json / tokenizer.model (copied into the workdir). Logic: jaxllm/hf/.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags

from jaxllm.cli import define_config_flag, parse_config
from jaxllm.cli.errors import user_errors
from jaxllm.config import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (config.json, safetensors)")
flags.DEFINE_string("workdir", None, "new jaxllm workdir to create")
flags.DEFINE_string("tokenizer", None, "data.tokenizer to use (byte | .model | .json)")


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    with user_errors():
        define_config_flag(argv)
        cfg = parse_config(FLAGS, argv)
        for name in ("hf_dir", "workdir"):
            if not FLAGS[name].value:
                raise ConfigError(f"--{name}: required")
        from jaxllm.hf import import_hf
        s = import_hf(FLAGS.hf_dir, FLAGS.workdir, cfg, tokenizer=FLAGS.tokenizer)
        print(f"imported {s['family']} ({s['layers']} layers, vocab {s['vocab_size']}, "
              f"tokenizer {s['tokenizer']}) into {s['workdir']} at step 0; continue with:\n"
              f"  jaxllm-train --config={s['workdir']}/config.py --workdir={s['workdir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
