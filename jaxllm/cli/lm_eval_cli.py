"""`jaxllm-lm-eval ARGS`: lm-evaluation-harness's own command line, with the `jaxllm` model.

    jaxllm-lm-eval --model jaxllm --model_args workdir=DIR[,step=N,batch_size=B,max_length=L] \
        --tasks hellaswag,arc_easy [any other lm-eval flag]

The arguments go unchanged to lm-eval's `lm_eval` command (`lm_eval.__main__.cli_evaluate`).
lm-eval 0.4 finds a `--model` name only in its registry, which is filled by the modules
that are imported; it reads no plugin entry points, so a model living outside its source
tree needs this one import first: jaxllm.eval.lm_eval_model registers `jaxllm`.
"""

from __future__ import annotations

import sys

from jaxllm.cli.errors import fail, user_errors


def main(argv=None) -> None:
    with user_errors():
        try:
            import jaxllm.eval.lm_eval_model  # noqa: F401  (registers --model jaxllm)
            from lm_eval.__main__ import cli_evaluate
        except ImportError as e:
            fail(f"jaxllm-lm-eval needs lm-eval: pip install 'jaxllm[eval]' ({e})")
        if argv is not None:
            sys.argv = [sys.argv[0], *argv]
        try:
            cli_evaluate()
        except ValueError as e:  # lm-eval's errors about flags, tasks and model args
            fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


if __name__ == "__main__":
    main()
