"""MPT-style model: ALiBi (no position embeddings), exact (erf) GELU, LayerNorm without biases,
a 4*d_model MLP: exactly MosaicML MPT (exports as MptForCausalLM, tools/export_hf.py).

ARG picks the width: 125m (default), 350m, 760m or 1b.
"""

from jaxllm.config import defaults

SIZES = {"125m": (768, 12, 12), "350m": (1024, 24, 16), "760m": (1536, 24, 12),
         "1b": (2048, 24, 16)}


def get_config(arg=None):
    d, n_layers, n_heads = SIZES[arg or "125m"]
    c = defaults()
    c.model.update(d_model=d, n_layers=n_layers, n_heads=n_heads, pos_encoding="alibi",
                   activation="gelu_exact", norm="layernorm", use_bias=False, tie_embeddings=True,
                   vocab_size=50432)
    c.optim.update(name="adamw", lr=6e-4, warmup_steps=2000)
    c.train.update(steps=100000, batch_size=256, log_every=10, eval_every=1000)
    c.data.seq_len = 2048
    c.checkpoint.every = 1000
    return c
