"""`jaxllm-eval --workdir=DIR [...]`: bits per byte, downstream tasks, length extrapolation.

`--lm_eval_tasks=hellaswag,arc_easy` also runs lm-evaluation-harness tasks on the run
(jaxllm/eval/lm_eval_model.py); their metrics join the same report and JSON.

Restores the newest checkpoint of DIR (its config from DIR/config.json), scores the held-out
split of the training data or of `--data.path`, prints markdown tables, and with `--out`
writes the results as JSON. The workdir is not modified.
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxllm.cli.errors import ArgParser, check_output_file, fail, user_errors


def _on_off(v: str) -> bool:
    if v.lower() in ("on", "true", "1", "yes"):
        return True
    if v.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {v!r}")


def parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="jaxllm-eval", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="training workdir to evaluate")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--data.path", dest="data_path", default=None,
                   help="evaluate on this data instead (prepared dir, .txt/.jsonl/.parquet, glob)")
    p.add_argument("--data.text_field", dest="text_field", default=None,
                   help="JSON Lines field / Parquet column of the text")
    p.add_argument("--split", default="eval", choices=("eval", "valid", "train", "all"),
                   help="documents to score: the held-out split (default), valid (the "
                        "data.valid_fraction split), train or all")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer path if it moved (must be the one the model trained with)")
    p.add_argument("--batch_size", type=int, default=8, help="rows per batch")
    p.add_argument("--seq_len", type=int, default=0, help="row length (default: training)")
    p.add_argument("--packing", type=_on_off, default=True,
                   help="on: pack document pieces into rows; off: one per row, padded")
    p.add_argument("--max_bytes", type=int, default=0,
                   help="score the first documents holding this many bytes (0 = all)")
    p.add_argument("--tasks", default="",
                   help="'builtin' and/or comma-separated .jsonl task files")
    p.add_argument("--lm_eval_tasks", default="",
                   help="comma-separated lm-evaluation-harness tasks (needs jaxllm[eval])")
    p.add_argument("--lm_eval_include", default="",
                   help="folder of extra lm-eval task YAMLs (lm-eval's --include_path)")
    p.add_argument("--lm_eval_limit", type=int, default=0,
                   help="score only the first N documents of each lm-eval task (0 = all)")
    p.add_argument("--extrapolation", action="store_true",
                   help="also bpb at 1x/2x/4x/8x the training length")
    p.add_argument("--extrap_bytes", type=int, default=65536,
                   help="bytes of documents scored by --extrapolation (0 = all)")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    with user_errors():
        if args.out:
            check_output_file(args.out, "--out")
        from jaxllm.eval.evaluate import evaluate, format_report
        try:
            result = evaluate(
                args.workdir, step=args.step, data_path=args.data_path,
                text_field=args.text_field, split=args.split, tokenizer=args.tokenizer,
                batch_size=args.batch_size, seq_len=args.seq_len, packing=args.packing,
                max_bytes=args.max_bytes, tasks=args.tasks, extrapolation=args.extrapolation,
                extrap_bytes=args.extrap_bytes, lm_eval_tasks=args.lm_eval_tasks,
                lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit)
        except ValueError as e:
            fail(str(e))
        print(format_report(result), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
