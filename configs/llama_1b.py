"""A Llama-style ~1.3B model: RoPE, SwiGLU, RMSNorm, no biases, untied embeddings.

d_model 2048, 24 layers, 16 heads (head size 128), d_ff 5632, vocab 32000 (e.g. a
SentencePiece model): 1.35B parameters. ARG sets the sequence length (default 2048).
"""

from jaxllm.config import defaults


def get_config(arg=None):
    c = defaults()
    c.model.update(d_model=2048, n_layers=24, n_heads=16, d_ff=5632, pos_encoding="rope",
                   activation="swiglu", norm="rmsnorm", norm_eps=1e-6, use_bias=False,
                   tie_embeddings=False, vocab_size=32000, remat="dots_no_batch")
    c.optim.update(name="adamw", lr=3e-4, warmup_steps=2000)
    c.train.update(steps=100000, batch_size=512, log_every=10, eval_every=1000)
    c.data.seq_len = int(arg) if arg else 2048
    c.checkpoint.every = 1000
    return c
