"""Run an ablation grid: every cell over seeds (and lr multipliers), then tables and plots.

    python tools/ablate.py --grid=configs/ablations/choices.py[:ARG] --root=runs/ablate \
        [--seeds=3] [--lr_sweep=0.25,0.5,1,2,4] [--budget=tokens:N|bytes:N|flops:N] \
        [--baseline=CELL] [--only=model.pos_encoding=rope,alibi] [--set=train.steps=150] \
        [--eval_bytes=N] [--lm_eval_tasks=arc_easy,piqa] [--dry_run]

Finished runs (final checkpoint, final eval row and ROOT/<run>/ablation.json with the same
config) are not rerun, so more seeds or a wider sweep only train the new runs. Writes
ROOT/table.md, results.json and bpb_vs_{tokens,bytes,flops}.png. The logic lives in
jaxllm/experiments.py, jaxllm/budget.py, jaxllm/ablation_report.py and jaxllm/stats.py.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxllm.cli.errors import ArgParser, fail, user_errors


def _pairs(items, flag):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"{flag}: expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> None:
    p = ArgParser(prog="ablate.py", description=__doc__.split("\n")[0])
    p.add_argument("--grid", default="configs/ablations/choices.py", help="grid file[:ARG]")
    p.add_argument("--root", default="runs/ablate", help="one workdir per cell goes here")
    p.add_argument("--only", action="append", default=[],
                   help="AXIS=label1,label2: run only these values of an axis (repeatable)")
    p.add_argument("--set", action="append", default=[],
                   help="KEY=VALUE: override a base config key for every cell (repeatable)")
    p.add_argument("--eval_bytes", type=int, default=None,
                   help="held-out bytes scored per cell (default: the grid's eval.max_bytes)")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per cell (train.seed + 0..N-1: init and data order)")
    p.add_argument("--lr_sweep", default="1",
                   help="peak-lr multipliers, e.g. 0.25,0.5,1,2,4 (chosen on a validation split)")
    p.add_argument("--budget", default=None,
                   help="tokens:N, bytes:N or flops:N: steps and warmup derived per cell")
    p.add_argument("--baseline", default=None,
                   help="cell the others are compared with (paired over seeds; default: first)")
    p.add_argument("--lm_eval_tasks", default=None,
                   help="lm-evaluation-harness tasks scored per cell (default: the grid's "
                   "eval.lm_eval_tasks)")
    p.add_argument("--lm_eval_include", default=None, help="folder of extra lm-eval task YAMLs")
    p.add_argument("--dry_run", action="store_true", help="list the runs and exit")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    with user_errors():
        from jaxllm import experiments as ex
        grid = ex.load_grid(args.grid)
        grid = ex.restrict(grid, {k: v.split(",") for k, v in _pairs(args.only, "--only").items()})
        overrides = {k: _value(v) for k, v in _pairs(args.set, "--set").items()}
        if args.eval_bytes is not None:
            if args.eval_bytes < 0:
                fail(f"--eval_bytes: must be >= 0, got {args.eval_bytes}")
            grid["eval"]["max_bytes"] = args.eval_bytes
        for key in ("lm_eval_tasks", "lm_eval_include"):
            if getattr(args, key) is not None:
                grid["eval"][key] = getattr(args, key)
        opts = _options(args)
        if args.dry_run:
            for name, _, ov in ex.cells(grid):
                runs = [ex.run_name(name, k, m) for m in opts["lr_sweep"]
                        for k in range(opts["seeds"])]
                print(name, json.dumps(ov), f"({len(runs)} runs)")
            return
        try:
            ex.run_grid(grid, args.root, overrides, **opts)
        except (TypeError, ValueError) as e:
            fail(str(e))
        except InterruptedError as e:
            print(f"stopped: {e}", file=sys.stderr)
            sys.exit(1)
        with open(os.path.join(args.root, "table.md")) as f:
            print(f.read(), end="")
        print(f"wrote {args.root}/table.md, results.json, bpb_vs_{{tokens,bytes,flops}}.png")


def _options(args) -> dict:
    from jaxllm.budget import parse_budget

    if args.seeds < 1:
        fail(f"--seeds: must be >= 1, got {args.seeds}")
    try:
        sweep = [float(m) for m in args.lr_sweep.split(",")]
    except ValueError:
        sweep = []
    if not sweep or min(sweep) <= 0 or len(set(sweep)) != len(sweep):
        fail(f"--lr_sweep: expected distinct positive multipliers like 0.5,1,2, "
              f"got {args.lr_sweep!r}")
    budget = parse_budget(args.budget) if args.budget else None
    return {"seeds": args.seeds, "lr_sweep": sorted(sweep), "budget": budget,
            "baseline": args.baseline}

if __name__ == "__main__":
    main()
