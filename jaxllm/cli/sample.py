"""`jaxllm-sample --workdir=DIR --prompt=TEXT [...]`: KV-cached generation from a checkpoint.

The prompt is encoded after the document-start EOS (as every training document starts);
generation stops at the first EOS. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxllm.cli.errors import ArgParser, fail, user_errors


def parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="jaxllm-sample", description=__doc__.split("\n")[0])
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


def check_size(cfg, prompt_bytes: int, max_tokens: int, num: int) -> None:
    """Refuse, before restoring anything, a request the position table or the host's memory
    cannot hold: the KV cache is 2 * layers * num * (prompt + max_tokens) * kv_heads *
    head_dim values. (The prompt's token count is bounded by its UTF-8 bytes + 1.)"""
    m = cfg.model
    if max_tokens < 1 or num < 1:
        fail(f"must be >= 1 (--max_tokens={max_tokens}, --num={num}): give positive counts")
    total = prompt_bytes + 1 + max_tokens
    if m.pos_encoding == "learned" and max_tokens + 1 > (m.max_position or cfg.data.seq_len):
        fail(f"too many tokens (--max_tokens={max_tokens}): the learned position table has "
             f"{m.max_position or cfg.data.seq_len} positions; ask for fewer")
    kv = m.n_kv_heads or m.n_heads
    itemsize = 4 if m.dtype == "float32" else 2
    cache = 2 * m.n_layers * num * total * kv * (m.d_model // m.n_heads) * itemsize
    memory, where = _memory()
    if cache > memory:
        fail(f"too many tokens (--max_tokens={max_tokens}, --num={num}): the KV cache would "
             f"take {cache / 2**30:,.1f} GiB, more than the {memory / 2**30:,.1f} GiB of {where}; "
             "ask for fewer")


def _memory() -> tuple[int, str]:
    """Bytes the KV cache can at most use: the accelerator's memory, else the host's RAM."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), jax.devices()[0].device_kind
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host"


def main(argv=None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    with user_errors():
        from jaxllm.run import load_run, read_config
        check_size(read_config(args.workdir), len(args.prompt.encode("utf-8")),
                   args.max_tokens, args.num)
        try:
            run = load_run(args.workdir, step=args.step, tokenizer=args.tokenizer)
            texts = sample(run, args.prompt, max_tokens=args.max_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, num=args.num)
        except ValueError as e:
            fail(str(e))
        for i, text in enumerate(texts):
            if args.num > 1:
                print(f"--- sample {i + 1} ---")
            print(args.prompt + text, flush=True)


if __name__ == "__main__":
    main()
