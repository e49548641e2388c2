"""nanoGPT's GPT-2 architecture in eager PyTorch: the CPU speed reference of `--vs_torch`.

Written here from the published architecture (Radford et al. 2019, as in Karpathy's
nanoGPT): learned token and position tables, pre-norm blocks with LayerNorm (with bias),
one fused qkv projection, causal `scaled_dot_product_attention`, a 4x MLP with GELU (tanh
approximation), a final LayerNorm and an output projection tied to the token table; init
normal(0, 0.02) with residual projections scaled by 1/sqrt(2L); AdamW with weight decay on
matrices only, gradient clipping at global norm 1.0. It is what jaxllm's config with
`pos_encoding=learned, activation=gelu, norm=layernorm, use_bias=true, tie_embeddings=true,
dtype=float32` computes, so the two step times compare like for like.

torch is an optional dependency (`pip install jaxllm[bench]`): importing this module does
not import it; `make_trainer` does.
"""

from __future__ import annotations

import math


def _modules():
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    class Block(nn.Module):
        def __init__(self, d: int, n_heads: int):
            super().__init__()
            self.n_heads = n_heads
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                       for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, d))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self, vocab: int, seq_len: int, d: int, n_layers: int, n_heads: int):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
            self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
            self.ln_f = nn.LayerNorm(d)
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):  # residual projections (GPT-2)
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers))
                elif p.dim() == 2:
                    nn.init.normal_(p, 0.0, 0.02)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, idx, targets):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.t()  # tied output projection
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    return torch, GPT


def make_trainer(vocab: int, seq_len: int, d_model: int, n_layers: int, n_heads: int, *,
                 compile: bool = False, seed: int = 0, lr: float = 6e-4):
    """A `step(inputs, targets) -> loss` closure (numpy int arrays in, float out) doing one
    AdamW step with clipping, and the model's parameter count. `compile=True` wraps the
    model in `torch.compile` (raises if no working compiler toolchain is found)."""
    torch, GPT = _modules()
    torch.manual_seed(seed)
    model = GPT(vocab, seq_len, d_model, n_layers, n_heads)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    fwd = torch.compile(model) if compile else model

    def step(inputs, targets) -> float:
        loss = fwd(torch.from_numpy(inputs).long(), torch.from_numpy(targets).long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    return step, n_params
