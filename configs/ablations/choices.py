"""The "what should you train?" grid at small scale: positional encoding x activation x
optimizer x tokenizer, every cell with the same data and token budget (tools/ablate.py).

    python tools/ablate.py --grid=configs/ablations/choices.py:ARG --root=runs/ablate

ARG picks the axes (default `pos_act`): `pos_act` (4 x 2 = 8 cells), `pos`, `act` (all seven
activations), `optim` (AdamW, Lion, Sophia-G, Sophia-H, 8-bit Adam, SGD), `tokenizer` (bytes,
SentencePiece BPE / unigram and byte-level BPE trained on the training text), `seq_len`
(64, 128, 256, 512: compare at a matched `--budget=flops:N`), `all` (the full 4 x 2 x 6 x 4
product: 192 cells). Restrict any axis with `--only=AXIS=a,b`. Seeds, learning-rate sweeps
and budgets are flags of tools/ablate.py (`--seeds`, `--lr_sweep`, `--budget`); the
README's "Ablation verdicts" section has the commands sized for 2 CPU cores.

Base: the tiny CPU config (jaxllm.config.tiny: 4 layers, d_model 128, seq_len 256, batch 16,
byte tokens, the embedded Python stdlib corpus), shortened to 150 steps. The optimizer
learning rates follow Chen et al. 2023 for Lion (10x smaller lr and 10x larger weight
decay than AdamW; Sophia with its own defaults and short warmup at this scale). Note: the
budget is in tokens (steps x batch x seq_len), so a subword tokenizer sees more text than
bytes do; bits per byte on the same held-out text is what makes the cells comparable.
"""

from jaxllm.config import tiny

POS = ("rope", "alibi", "learned", "none")
ACT = ("relu", "gelu", "swish", "glu", "reglu", "geglu", "swiglu")
OPTIM = {
    "adamw": {"optim.name": "adamw", "optim.lr": 3e-3},
    "lion": {"optim.name": "lion", "optim.lr": 3e-4, "optim.weight_decay": 1.0},
    "sophia_g": {"optim.name": "sophia_g", "optim.lr": 3e-3},
    "sophia_h": {"optim.name": "sophia_h", "optim.lr": 3e-3},
    "adam8bit": {"optim.name": "adam8bit", "optim.lr": 3e-3},
    "sgd": {"optim.name": "sgd", "optim.lr": 0.3},
}
TOKENIZERS = {
    "byte": {"data.tokenizer": "byte"},
    "spm_bpe_1k": {"data.tokenizer": "train:sentencepiece_bpe:1024"},
    "spm_unigram_1k": {"data.tokenizer": "train:sentencepiece_unigram:1024"},
    "byte_bpe_1k": {"data.tokenizer": "train:byte_bpe:1024"},
}


def base():
    c = tiny()
    c.train.update(steps=150, eval_every=50, log_every=10, sample_tokens=0)
    c.optim.warmup_steps = 30
    c.checkpoint.every = 0
    c.log.progress = False
    return c


def get_grid(arg=None):
    pos = {"model.pos_encoding": list(POS)}
    act2 = {"model.activation": ["gelu", "swiglu"]}
    presets = {
        "pos_act": {**pos, **act2},
        "pos": pos,
        "act": {"model.activation": list(ACT)},
        "optim": {"optimizer": OPTIM},
        "tokenizer": {"tokenizer": TOKENIZERS},
        "seq_len": {"data.seq_len": [64, 128, 256, 512]},
        "all": {**pos, **act2, "optimizer": OPTIM, "tokenizer": TOKENIZERS},
    }
    arg = arg or "pos_act"
    if arg not in presets:
        raise ValueError(f"unknown preset {arg!r}; allowed: {', '.join(presets)}")
    return {"base": base(), "axes": presets[arg],
            "eval": {"max_bytes": 200_000, "tasks": "builtin", "batch_size": 16}}
