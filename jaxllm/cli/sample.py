"""`jaxllm-sample --workdir=DIR --prompt=TEXT [...]`: KV-cached generation from a checkpoint.

The prompt is encoded after the document-start EOS (as every training document starts);
generation stops at the first EOS. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jaxllm.cli import _fail, user_errors
from jaxllm.cli.eval import _Parser


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jaxllm-sample", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="training workdir")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max_tokens", type=int, default=200, help="new tokens per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=40, help="keep the k most likely (0 = off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--num", type=int, default=1, help="samples")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path if it moved")
    return p


def sample(run, prompt: str, *, max_tokens: int, temperature: float, top_k: int,
           top_p: float, seed: int, num: int) -> list[str]:
    """`num` continuations of `prompt` (text after the prompt, cut at the first EOS)."""
    import jax

    from jaxllm import parallel
    from jaxllm.model.sample import continuations

    if num < 1:
        raise ValueError(f"--num: must be >= 1, got {num}")
    with parallel.activate(run.cfg, run.mesh):
        return continuations(run.model_def, run.params, run.tokenizer, prompt,
                             jax.random.key(seed), n_new=max_tokens, num=num,
                             temperature=temperature, top_k=top_k, top_p=top_p)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    with user_errors():
        from jaxllm.run import load_run
        try:
            run = load_run(args.workdir, step=args.step, tokenizer=args.tokenizer)
            texts = sample(run, args.prompt, max_tokens=args.max_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, num=args.num)
        except ValueError as e:
            _fail(str(e))
        for i, text in enumerate(texts):
            if args.num > 1:
                print(f"--- sample {i + 1} ---")
            print(args.prompt + text, flush=True)


if __name__ == "__main__":
    main()
