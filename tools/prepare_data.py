"""Tokenize a corpus into memory-mapped token shards for training (`data.path=DIR`).

    python tools/prepare_data.py --input 'corpus/*.jsonl' --output data/mycorpus \
        --tokenizer tok/spm32k.model --workers 8

Inputs: files or globs of .txt (one document per file, or per blank-line-separated block
with --blank_line_docs), .jsonl (text in --text_field), .parquet (column --text_field), or
`embedded`. Bad records (undecodable bytes, empty documents, malformed JSON lines, missing
field) are skipped, counted per file, and reported at the end and in manifest.json.
Logic: jaxllm/data/prepare.py.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxllm.cli.errors import ArgParser, fail, returns_status, user_errors
from jaxllm.data.corpus import expand_inputs
from jaxllm.data.prepare import prepare


@returns_status
def main(argv=None) -> int:
    ap = ArgParser(prog="prepare_data.py", description=__doc__.split("\n")[0])
    ap.add_argument("--input", nargs="+", required=True,
                    help="files/globs of .txt/.jsonl/.parquet, or 'embedded'")
    ap.add_argument("--output", required=True, help="directory to create")
    ap.add_argument("--tokenizer", default="byte", help="byte | .model | .json (data.tokenizer)")
    ap.add_argument("--text_field", default="text", help="JSON Lines field / Parquet column")
    ap.add_argument("--blank_line_docs", action="store_true",
                    help=".txt: every blank-line-separated block is a document")
    ap.add_argument("--workers", type=int, default=0, help="tokenizer processes; 0 = per CPU")
    ap.add_argument("--shard_tokens", type=int, default=1 << 28, help="tokens per shard file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)
    if not 0 <= args.workers <= 1024:
        fail(f"out of range (--workers={args.workers}): 0 (one per CPU) to 1024")
    if not 1 <= args.shard_tokens < 1 << 40:
        fail(f"out of range (--shard_tokens={args.shard_tokens}): 1 to 2**40 tokens per shard")
    with user_errors():
        try:
            m = prepare(expand_inputs(args.input, "--input"), args.output, args.tokenizer,
                        text_field=args.text_field, blank_line_docs=args.blank_line_docs,
                        workers=args.workers, progress=not args.no_progress,
                        shard_tokens=args.shard_tokens, overwrite=args.overwrite)
        except ValueError as e:
            fail(str(e))
    print(f"wrote {args.output}: {m['num_docs']:,} documents, {m['num_tokens']:,} tokens "
          f"(EOS included), {m['num_bytes']:,} bytes, {len(m['shards'])} shard(s), "
          f"tokenizer {m['tokenizer']['name']}")
    bad = m["bad_records"]
    if bad["total"]:
        kinds = ", ".join(f"{k} {v}" for k, v in bad.items() if v and k != "total")
        print(f"bad records skipped: {bad['total']} ({kinds})")
        for s in m["sources"]:
            if s["bad"]:
                print(f"  {s['file']}: " + ", ".join(f"{k} {v}" for k, v in s["bad"].items()))
    else:
        print("bad records: none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
