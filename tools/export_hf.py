"""Export a jaxllm checkpoint to a Hugging Face `transformers` model directory.

    python tools/export_hf.py --workdir runs/tiny --out hf/tiny [--dtype bfloat16]

Reads WORKDIR/config.json and the newest restorable checkpoint (or --step) and writes
model.safetensors, config.json, generation_config.json, tokenizer files and jaxllm.json.
rope + gated MLP + rmsnorm -> LlamaForCausalLM; learned/no positions + layernorm ->
GPT2LMHeadModel; alibi + gelu_exact + layernorm without bias -> MptForCausalLM; anything
else ends with `error: ...` naming what no transformers class can express (exit 2).
Logic: jaxllm/hf/.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxllm.cli.errors import ArgParser, user_errors


def main(argv=None) -> int:
    ap = ArgParser(prog="export_hf.py", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="jaxllm workdir (config.json, checkpoints/)")
    ap.add_argument("--out", required=True, help="new (or empty) output directory")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step; default: newest")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="tensor dtype; default: as stored (model.param_dtype)")
    ap.add_argument("--trim_vocab", action="store_true",
                    help="drop the padding rows beyond the tokenizer's vocabulary")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer (byte | .model | .json); default: the run's data.tokenizer")
    args = ap.parse_args(argv)
    with user_errors():
        from jaxllm.hf import export_hf
        s = export_hf(args.workdir, args.out, step=args.step, dtype=args.dtype,
                      trim_vocab=args.trim_vocab, tokenizer=args.tokenizer)
        print(f"exported step {s['step']} as {s['architecture']} ({s['tensors']} tensors, "
              f"vocab {s['vocab_size']}) to {s['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
