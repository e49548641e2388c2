"""Train a tokenizer that `data.tokenizer` can name.

    python tools/train_tokenizer.py --kind=sentencepiece_bpe --vocab_size=32000 \
        --input='corpus/*.jsonl' --output=tok/spm32k      # writes tok/spm32k.model
    python tools/train_tokenizer.py --kind=byte_bpe --vocab_size=8192 --output=tok/bpe8k
                                                         # embedded corpus -> tok/bpe8k.json

Kinds: sentencepiece_bpe, sentencepiece_unigram, byte_bpe. Inputs: files or globs of
.txt/.jsonl/.parquet, or `embedded` (default). Logic: jaxllm/data/tokenizer_training.py.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxllm.cli.errors import ArgParser, fail, returns_status, user_errors
from jaxllm.data.corpus import BadRecords, expand_inputs
from jaxllm.data.tokenizer_training import KINDS, train_tokenizer
from jaxllm.data.tokenizers import load_tokenizer


@returns_status
def main(argv=None) -> int:
    ap = ArgParser(prog="train_tokenizer.py", description=__doc__.split("\n")[0])
    ap.add_argument("--kind", required=True, choices=KINDS)
    ap.add_argument("--vocab_size", type=int, required=True)
    ap.add_argument("--output", required=True, help="path; the suffix .model/.json is set")
    ap.add_argument("--input", nargs="+", default=["embedded"],
                    help="files/globs of .txt/.jsonl/.parquet, or 'embedded'")
    ap.add_argument("--text_field", default="text", help="JSON Lines field / Parquet column")
    ap.add_argument("--blank_line_docs", action="store_true",
                    help=".txt: every blank-line-separated block is a document")
    ap.add_argument("--max_bytes", type=int, default=0, help="cap on training text; 0 = all")
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)
    if args.max_bytes < 0:
        fail(f"out of range (--max_bytes={args.max_bytes}): >= 0 (0 = all)")
    bad = BadRecords()
    with user_errors():
        try:
            path = train_tokenizer(expand_inputs(args.input, "--input"), args.kind,
                                   args.vocab_size, args.output, text_field=args.text_field,
                                   blank_line_docs=args.blank_line_docs,
                                   max_bytes=args.max_bytes or None,
                                   progress=not args.no_progress, bad=bad)
            tok = load_tokenizer(path)
        except ValueError as e:
            fail(str(e))
    print(f"wrote {path}: {tok.kind}, vocab {tok.vocab_size}, sha256 {tok.sha256[:12]}")
    print(bad.summary())
    print(f"use it with --config.data.tokenizer={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
