"""A numpy forward pass of Hugging Face Llama (and Mistral / Qwen2: the same block, biases
where the tensors have them), GPT-2 and MPT, written from transformers' modeling files (not
from jaxllm): the torch-free yardstick for the exported tensors."""

from __future__ import annotations

import math

import numpy as np

ACT = {
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu_new": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi)
                                                  * (x + 0.044715 * x ** 3))),
    "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
}


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * w
    return y if b is None else y + b


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _attend(q, k, v, bias=None):
    """q [T, H, D], k/v [T, K, D] (kv heads repeated as HF's repeat_kv), causal."""
    t, h, d = q.shape
    k, v = np.repeat(k, h // k.shape[1], axis=1), np.repeat(v, h // v.shape[1], axis=1)
    s = np.einsum("thd,shd->hts", q, k) / math.sqrt(d)
    if bias is not None:
        s = s + bias
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(t, h * d)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def forward(hf: dict, t: dict, ids) -> np.ndarray:
    """Logits [T, V] of one sequence of token ids."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    ids = np.asarray(ids)
    n = len(ids)
    fam = hf["model_type"]
    if fam in ("llama", "mistral", "qwen2"):  # one modeling file each, the same math
        d, h = hf["hidden_size"], hf["num_attention_heads"]
        kv, hd, eps = hf["num_key_value_heads"], hf["head_dim"], hf["rms_norm_eps"]
        act = ACT[hf["hidden_act"]]
        inv = 1.0 / hf["rope_theta"] ** (np.arange(0, hd, 2) / hd)
        emb = np.concatenate([np.arange(n)[:, None] * inv] * 2, axis=-1)[:, None, :]
        cos, sin = np.cos(emb), np.sin(emb)
        x = t["model.embed_tokens.weight"][ids]

        def lin(name, y):
            out = y @ t[name + ".weight"].T
            return out + t[name + ".bias"] if name + ".bias" in t else out
        for i in range(hf["num_hidden_layers"]):
            p = f"model.layers.{i}."
            y = _rms(x, t[p + "input_layernorm.weight"], eps)
            q = lin(p + "self_attn.q_proj", y).reshape(n, h, hd)
            k = lin(p + "self_attn.k_proj", y).reshape(n, kv, hd)
            v = lin(p + "self_attn.v_proj", y).reshape(n, kv, hd)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            x = x + lin(p + "self_attn.o_proj", _attend(q, k, v))
            y = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
            y = act(lin(p + "mlp.gate_proj", y)) * lin(p + "mlp.up_proj", y)
            x = x + lin(p + "mlp.down_proj", y)
        x = _rms(x, t["model.norm.weight"], eps)
        head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
        return x @ head.T
    if fam == "gpt2":
        d, h, eps = hf["n_embd"], hf["n_head"], hf["layer_norm_epsilon"]
        act = ACT[hf["activation_function"]]
        x = t["transformer.wte.weight"][ids] + t["transformer.wpe.weight"][np.arange(n)]
        for i in range(hf["n_layer"]):
            p = f"transformer.h.{i}."
            y = _ln(x, t[p + "ln_1.weight"], t[p + "ln_1.bias"], eps)
            qkv = y @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
            q, k, v = (z.reshape(n, h, d // h) for z in np.split(qkv, 3, axis=-1))
            a = _attend(q, k, v)
            x = x + a @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
            y = _ln(x, t[p + "ln_2.weight"], t[p + "ln_2.bias"], eps)
            y = act(y @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"])
            x = x + y @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
        x = _ln(x, t["transformer.ln_f.weight"], t["transformer.ln_f.bias"], eps)
        return x @ t.get("lm_head.weight", t["transformer.wte.weight"]).T
    assert fam == "mpt", fam
    d, h, eps = hf["d_model"], hf["n_heads"], hf["layer_norm_epsilon"]
    # transformers' build_mpt_alibi_tensor (alibi_bias_max 8)
    n2 = 2 ** math.ceil(math.log2(h))
    slopes = 1.0 / 2.0 ** (np.arange(1, n2 + 1) * (8.0 / n2))
    if n2 != h:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:h]
    bias = slopes[:, None, None] * np.arange(1 - n, 1)[None, None, :]
    x = t["transformer.wte.weight"][ids]
    for i in range(hf["n_layers"]):
        p = f"transformer.blocks.{i}."
        y = _ln(x, t[p + "norm_1.weight"], None, eps)
        q, k, v = (z.reshape(n, h, d // h)
                   for z in np.split(y @ t[p + "attn.Wqkv.weight"].T, 3, axis=-1))
        x = x + _attend(q, k, v, bias) @ t[p + "attn.out_proj.weight"].T
        y = _ln(x, t[p + "norm_2.weight"], None, eps)
        x = x + ACT["gelu"](y @ t[p + "ffn.up_proj.weight"].T) @ t[p + "ffn.down_proj.weight"].T
    x = _ln(x, t["transformer.norm_f.weight"], None, eps)
    return x @ t.get("lm_head.weight", t["transformer.wte.weight"]).T
