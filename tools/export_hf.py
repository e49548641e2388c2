"""Export a jaxllm checkpoint to a Hugging Face `transformers` model directory.

    python tools/export_hf.py --workdir runs/tiny --out hf/tiny [--dtype bfloat16]

Reads WORKDIR/config.json and the newest restorable checkpoint (or --step) and writes
model.safetensors (or shards + index), config.json, generation_config.json, tokenizer files
(the training's document separator prepended as BOS), a model card README.md and
jaxllm.json. rope + gated MLP + rmsnorm -> LlamaForCausalLM (or --arch mistral; q/k/v
biases only -> Qwen2ForCausalLM); learned/no positions + layernorm ->
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
    ap.add_argument("--keep_vocab_padding", action="store_true",
                    help="keep the padding ids beyond the tokenizer's vocabulary (a vocab "
                    "that is a multiple of 128 is faster on GPUs); generation_config then "
                    "suppresses them, but their logits are not -inf in transformers")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer (byte | .model | .json); default: the run's data.tokenizer")
    ap.add_argument("--arch", default=None,
                    choices=("llama", "mistral", "qwen2", "gpt2", "mpt"),
                    help="transformers class; default: Qwen2 for q/k/v biases only, else "
                    "Llama, GPT-2 or MPT by the model's shape")
    ap.add_argument("--max_seq_len", type=int, default=None,
                    help="ALiBi (MPT) only: the length transformers allows; default 8 x "
                    "data.seq_len (ALiBi extrapolates past the training length)")
    ap.add_argument("--max_shard_size", default=None,
                    help="split the weights into shards of at most this size (e.g. 2GB, "
                    "500MB) with model.safetensors.index.json; default: one file")
    args = ap.parse_args(argv)
    with user_errors():
        from jaxllm.hf import export_hf
        s = export_hf(args.workdir, args.out, step=args.step, dtype=args.dtype,
                      keep_vocab_padding=args.keep_vocab_padding, tokenizer=args.tokenizer,
                      arch=args.arch, max_seq_len=args.max_seq_len,
                      max_shard_size=args.max_shard_size)
        print(f"exported step {s['step']} as {s['architecture']} ({s['tensors']} tensors in "
              f"{len([f for f in s['files'] if f.endswith('.safetensors')])} file(s), "
              f"vocab {s['vocab_size']}) to {s['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
