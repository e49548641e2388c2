"""GPT-2 small (124M): learned positions, GELU, LayerNorm with biases, tied embeddings.

Pass a sequence length as ARG: --config=configs/gpt2_124m.py:2048 (default 1024).
"""

from jaxllm.config import defaults


def get_config(arg=None):
    c = defaults()
    seq = int(arg) if arg else 1024
    c.model.update(d_model=768, n_layers=12, n_heads=12, pos_encoding="learned",
                   activation="gelu", norm="layernorm", use_bias=True, tie_embeddings=True,
                   vocab_size=50304, max_position=max(1024, seq))
    c.optim.update(name="adamw", lr=6e-4, warmup_steps=2000)
    c.train.update(steps=600000, batch_size=480, log_every=10, eval_every=1000)
    c.data.seq_len = seq
    c.checkpoint.every = 2000
    return c
