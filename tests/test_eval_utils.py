"""Shared helpers of the eval/sample/ablate tests (no tests here): tiny configs, small
corpora written on the fly, a trained tiny checkpoint, an independent numpy scorer."""

from __future__ import annotations

import functools
import json
import pathlib
import sysconfig

import numpy as np

from jaxllm.config import defaults

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


def tiny_cfg(**model):
    """A very small float32 model (byte tokenizer) that trains in seconds on CPU."""
    c = defaults()
    c.model.update(d_model=32, n_layers=2, n_heads=4, dtype="float32", activation="gelu",
                   norm="rmsnorm", use_bias=False)
    c.model.update(**model)
    c.data.seq_len = 32
    c.train.update(steps=12, batch_size=8, log_every=4, eval_every=0, eval_batches=1,
                   sample_tokens=0)
    c.optim.update(lr=1e-2, warmup_steps=2)
    c.checkpoint.update(every=0, async_save=False)
    c.data.prefetch = 0
    c.log.update(tensorboard=False, progress=False)
    return c


def corpus_texts(names=("bisect.py", "colorsys.py", "keyword.py", "fnmatch.py", "this.py"),
                 limit=2500):
    return [(STDLIB / n).read_text()[:limit] for n in names]


def write_jsonl(path, texts) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return str(path)


def train_tiny(workdir, data_path, **model):
    from jaxllm.train.loop import train

    cfg = tiny_cfg(**model)
    cfg.data.path = str(data_path)
    cfg.data.eval_fraction = 0.2
    train(cfg, str(workdir))
    return cfg


@functools.lru_cache(maxsize=8)
def ref_forward(model_def):
    import jax
    return jax.jit(lambda params, tokens: model_def.apply(params)(tokens))


def ref_logprobs(run, tokens) -> np.ndarray:
    """float64 log-softmax of the model's logits for one unpadded, unpacked sequence (no
    segment ids, default positions), computed in numpy: [len(tokens), vocab]."""
    import jax

    logits = np.asarray(jax.device_get(ref_forward(run.model_def)(
        run.params, np.asarray(tokens, np.int32)[None])))[0]
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ref_continuation(run, tokens, start) -> tuple[float, bool]:
    """Summed log-prob of targets tokens[1:][start:] and whether each is the greedy argmax over
    the real vocabulary."""
    lp = ref_logprobs(run, tokens[:-1])
    tgt = np.asarray(tokens[1:])
    rows = np.arange(len(tgt))[start:]
    total = float(lp[rows, tgt[start:]].sum())
    greedy = bool((lp[rows, :run.tokenizer.vocab_size].argmax(-1) == tgt[start:]).all())
    return total, greedy


def random_run(tokenizer: str = "byte", **model):
    """A `restore.Run` with freshly initialized params (no checkpoint); a large init_std
    makes the predictions decisive."""
    from jaxllm import optim, parallel
    from jaxllm.run import Run
    from jaxllm.data.resolve import resolve
    from jaxllm.state import init_state

    cfg = tiny_cfg(**{"init_std": 0.5, **model})
    cfg.train.batch_size = 1
    cfg.data.tokenizer = tokenizer
    tok = resolve(cfg)
    mesh = parallel.make_mesh(cfg)
    model_def, state, _ = init_state(cfg, mesh, optim.build_optimizer(cfg))
    return Run("", cfg, tok, model_def, state["params"], 0, mesh)
