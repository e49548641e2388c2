"""Plot and tabulate training runs: loss and bits per byte against steps and tokens, tokens/s.

    python tools/plot_runs.py runs/a runs/b [--labels=a,b] --out=runs.png [--md=runs.md]

Writes one PNG (matplotlib, Agg) and prints a markdown table (also to --md) of each run's
final train loss, final and best eval bpb, tokens/s and parameter count.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxllm.cli.errors import ArgParser, check_output_file, fail, user_errors

COLUMNS = ["run", "step", "tokens", "final_loss", "final_bpb", "best_bpb", "tokens_per_s",
           "params"]


def main(argv=None) -> None:
    p = ArgParser(prog="plot_runs.py", description=__doc__.split("\n")[0])
    p.add_argument("workdirs", nargs="+", help="training workdirs")
    p.add_argument("--labels", default="", help="comma-separated names (default: folder names)")
    p.add_argument("--out", default="runs.png", help="PNG to write")
    p.add_argument("--md", default="", help="also write the markdown table here")
    p.add_argument("--title", default="", help="figure title")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    with user_errors():
        from jaxllm.eval import report
        labels = args.labels.split(",") if args.labels else None
        if labels and len(labels) != len(args.workdirs):
            fail(f"--labels: {len(labels)} names for {len(args.workdirs)} workdirs")
        for w in args.workdirs:
            if not os.path.isdir(w):
                fail(f"not a directory ({w}): give training workdirs")
        check_output_file(args.out, "--out")
        if args.md:
            check_output_file(args.md, "--md")
        rows = [report.summarize(w, name) for w, name in
                zip(args.workdirs, labels or [None] * len(args.workdirs), strict=True)]
        table = report.markdown_table(rows, COLUMNS)
        report.plot_runs(args.workdirs, args.out, labels, args.title)
        print(table)
        print(f"wrote {args.out}")
        if args.md:
            with open(args.md, "w") as f:
                f.write(table + "\n")


if __name__ == "__main__":
    main()
