"""Document-length report of a prepared dataset: percentiles, histogram, and per candidate
sequence length L (512 ... 32768) the token share in documents of >= L tokens, their
count, and how often they would repeat to fill --budget tokens of L-token sequences.

    python tools/seqlen_report.py --data data/mycorpus --budget 2e9 --png lengths.png

Logic: jaxllm/data/seqlen.py.
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxllm.cli.errors import ArgParser, fail, returns_status, user_errors
from jaxllm.data import seqlen
from jaxllm.data.prepare import PreparedData


@returns_status
def main(argv=None) -> int:
    ap = ArgParser(prog="seqlen_report.py", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="prepared directory (tools/prepare_data.py)")
    ap.add_argument("--budget", type=float, default=1e9, help="training tokens to fill")
    ap.add_argument("--png", default="", help="histogram path; default DATA/seqlen_hist.png")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    if not args.budget > 0:
        fail(f"--budget: must be > 0, got {args.budget}")
    with user_errors():
        try:
            data = PreparedData(args.data, "--data")
            png = args.png or str(pathlib.Path(args.data) / "seqlen_hist.png")
            info = seqlen.summary(data.doc_len)
            rows = seqlen.length_table(data.doc_len, args.budget)
            seqlen.histogram_png(data.doc_len, png, title=f"{args.data}: document lengths")
        except ValueError as e:
            fail(str(e))
    if args.json:
        print(json.dumps({"summary": info, "lengths": rows, "budget": args.budget, "png": png}))
    else:
        print(seqlen.format_report(info, rows, args.budget))
        print(f"histogram: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
