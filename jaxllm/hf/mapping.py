"""jaxllm parameters <-> Hugging Face `transformers` tensors, as pure numpy.

These transformers classes express a jaxllm block exactly (pre-norm, residual stream,
causal attention scaled by 1/sqrt(head_dim), no dropout):

| jaxllm model                                          | transformers class  |
|-------------------------------------------------------|---------------------|
| rope + gated MLP (swiglu/geglu/reglu/glu) + rmsnorm   | LlamaForCausalLM    |
| the same with swiglu and no biases                    | MistralForCausalLM (`arch`) |
| the same with swiglu and q/k/v biases only (qkv_bias) | Qwen2ForCausalLM    |
| learned (or no) positions + relu/gelu/gelu_exact/swish + layernorm | GPT2LMHeadModel |
| alibi + gelu_exact + layernorm without bias, d_ff = 4 d_model | MptForCausalLM |

Layout facts the mapping relies on (read off transformers' modeling files):

- RoPE: jaxllm rotates half-split pairs `(x[i], x[i + d/2])` with theta_i = base^(-2i/d)
  (`model/positions.py`), which is exactly HF Llama's `rotate_half` + `cat(freqs, freqs)`
  (the GPT-NeoX layout), so q/k projections are copied with no permutation. Meta's
  original Llama checkpoints use interleaved pairs; HF's own conversion script permutes
  those *into* this layout, so nothing is permuted here in either direction.
- Grouped-query attention: query head h reads kv head h // (H/K) in both (HF `repeat_kv`).
- GELU: jaxllm `gelu` is the tanh approximation (= HF `gelu_new`, GPT-2's default);
  `gelu_exact` is the erf form (= HF `gelu`). MPT hard-codes `nn.GELU(approximate="none")`
  and a 4*d_model MLP, so only `gelu_exact` with d_ff = 4*d_model exports to MPT.
- ALiBi: MPT's slopes (alibi_bias_max 8) equal Press et al.'s, also for non-powers of two
  (`concat(s[1::2], s[::2])` of the next power of two), and its bias `m*(j - (S-1))`
  differs from `m*(j - i)` by a per-row constant that softmax ignores.
- GPT-2 stores Conv1D weights as [in, out] and fuses q, k, v as `c_attn` [d, 3d]; MPT
  fuses them as `Wqkv` [3d, d] (nn.Linear, [out, in]); heads are the major factor of the
  fused width in both. Missing biases (jaxllm use_bias=false) export as zeros, which is
  exact; `pos_encoding=none` exports to GPT-2 as an all-zero position table.
- The vocabulary is padded to a multiple of 128 in jaxllm; `vocab` keeps rows [0, vocab)
  (logits of real ids equal; the padding rows are simply absent), None exports them all.
- Mistral is Llama without biases (its sliding window is left off: attention is full);
  Qwen2 is Llama with q/k/v biases and no others.
"""

from __future__ import annotations

import numpy as np

from jaxllm.config import ConfigError
from jaxllm.model.layers import resolved_d_ff

# jaxllm activation <-> transformers ACT2FN name
LLAMA_ACT = {"swiglu": "silu", "geglu": "gelu_new", "reglu": "relu", "glu": "sigmoid"}
GPT2_ACT = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "swish": "silu"}
HF_ACT_ALIASES = {"gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new",
                  "gelu_python": "gelu", "swish": "silu"}


def family(m) -> str:
    """The transformers class family that expresses model config `m` exactly, or ConfigError
    naming what none can express."""
    kv = m.n_kv_heads or m.n_heads
    why = []
    if m.pos_encoding == "rope":
        if m.norm != "rmsnorm":
            why.append("rope needs norm=rmsnorm (Llama); no transformers class pairs "
                       f"rope with {m.norm}")
        if m.activation not in LLAMA_ACT:
            why.append(f"rope needs a gated activation ({', '.join(LLAMA_ACT)}) as in "
                       f"Llama; got {m.activation}")
        return _ok("llama", why)
    if m.pos_encoding in ("learned", "none"):
        if m.norm != "layernorm":
            why.append(f"{m.pos_encoding} positions need norm=layernorm (GPT-2)")
        if m.activation not in GPT2_ACT:
            why.append(f"GPT-2 has no gated MLP; activation must be one of "
                       f"{', '.join(GPT2_ACT)}, got {m.activation}")
        if kv != m.n_heads:
            why.append(f"GPT-2 has no grouped-query attention (n_kv_heads={kv} != "
                       f"n_heads={m.n_heads})")
        return _ok("gpt2", why)
    if m.pos_encoding == "alibi":
        if m.norm != "layernorm" or m.use_bias or m.qkv_bias:
            why.append("alibi needs norm=layernorm with use_bias=false, qkv_bias=false (MPT)")
        if m.activation != "gelu_exact":
            why.append(f"MPT's MLP is exact (erf) GELU; activation must be gelu_exact, got "
                       f"{m.activation}" + (" (jaxllm gelu is the tanh approximation)"
                                           if m.activation == "gelu" else ""))
        if resolved_d_ff(m) != 4 * m.d_model:
            why.append(f"MPT's MLP width is 4*d_model ({4 * m.d_model}), got "
                       f"d_ff={resolved_d_ff(m)}")
        if kv != m.n_heads:
            why.append(f"MPT has no grouped-query attention (n_kv_heads={kv})")
        return _ok("mpt", why)
    raise ConfigError(f"model.pos_encoding: {m.pos_encoding!r} has no transformers class")


ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
         "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel", "mpt": "MptForCausalLM"}


def architecture(m, arch: str | None = None) -> str:
    """The model_type to export `m` as: `arch` if it expresses `m` exactly, else the
    family's default (qwen2 for a Llama-shaped model with q/k/v biases only, else llama)."""
    fam = family(m)
    qwen = m.qkv_bias and not m.use_bias
    if arch is None:
        return "qwen2" if fam == "llama" and qwen else fam
    if arch not in ARCHS:
        raise ConfigError(f"--arch: got {arch!r}; allowed: {', '.join(ARCHS)}")
    fits = {"llama": fam == "llama", "gpt2": fam == "gpt2", "mpt": fam == "mpt",
            "mistral": fam == "llama" and not (m.use_bias or m.qkv_bias)
            and m.activation == "swiglu",
            "qwen2": fam == "llama" and qwen and m.activation == "swiglu"}
    if not fits[arch]:
        raise ConfigError(f"--arch: {arch} cannot express this model ({fam}-shaped, "
                          f"activation {m.activation}, use_bias {m.use_bias}, qkv_bias "
                          f"{m.qkv_bias}); it exports as {architecture(m)}")
    return arch


def _ok(name, why):
    if why:
        raise ConfigError("model: no transformers class can express this model: "
                          + "; ".join(why))
    return name


# ----------------------------------------------------------------------------- layers
def layers_of(params, n_layers: int) -> list[dict]:
    """Per-layer parameter dicts from stacked (scan_layers) or listed blocks."""
    blocks = params["blocks"]
    if "attn" in blocks:
        return [_map(lambda x, i=i: np.asarray(x)[i], blocks) for i in range(n_layers)]
    return [_map(np.asarray, blocks[i] if i in blocks else blocks[str(i)])
            for i in range(n_layers)]


def blocks_of(layers: list[dict], scan: bool):
    """Inverse of `layers_of`: stacked along a leading axis, or {i: layer}."""
    if scan:
        return _map(lambda *xs: np.stack(xs), *layers)
    return {i: layer for i, layer in enumerate(layers)}


def _map(fn, tree, *rest):
    if isinstance(tree, dict):
        return {k: _map(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
    return fn(tree, *rest)


def _zeros_if_none(x, shape, dtype):
    return np.zeros(shape, dtype) if x is None else x


# ----------------------------------------------------------------------------- export
def _attn_parts(a, m) -> dict:
    """One layer's attention weights as 2-D matrices [in, out] and flat biases (or None)."""
    d, h = m.d_model, m.n_heads
    kv, hd = m.n_kv_heads or h, d // h
    return {"wq": a["wq"].reshape(d, h * hd), "wk": a["wk"].reshape(d, kv * hd),
            "wv": a["wv"].reshape(d, kv * hd), "wo": a["wo"].reshape(h * hd, d),
            **{b: None if a.get(f"{b[1]}_bias") is None else a[f"{b[1]}_bias"].reshape(-1)
               for b in ("bq", "bk", "bv")}}


def _llama_layer(t, i, L, w, m, dt, kind) -> None:
    pre, mlp = f"model.layers.{i}.", L["mlp"]
    for name, key in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")):
        t[pre + f"self_attn.{name}_proj.weight"] = w[key].T
    for name in ("gate", "up", "down"):
        t[pre + f"mlp.{name}_proj.weight"] = mlp[f"w_{name}"].T
    if w["bq"] is not None:
        t.update({pre + f"self_attn.{n}_proj.bias": w[f"b{n}"] for n in "qkv"})
    if m.use_bias:
        t.update({pre + "self_attn.o_proj.bias": L["attn"]["o_bias"],
                  **{pre + f"mlp.{n}_proj.bias": mlp[f"{n}_bias"] for n in ("gate", "up", "down")}})
    elif w["bq"] is not None and kind == "llama":  # Llama's attention_bias includes o_proj
        t[pre + "self_attn.o_proj.bias"] = np.zeros((m.d_model,), dt)
    t[pre + "input_layernorm.weight"] = L["ln1"]["scale"]
    t[pre + "post_attention_layernorm.weight"] = L["ln2"]["scale"]


def _gpt2_layer(t, i, L, w, m, dt, kind) -> None:
    pre, mlp, d, f = f"transformer.h.{i}.", L["mlp"], m.d_model, resolved_d_ff(m)

    def z(x, n):
        return _zeros_if_none(x, (n,), dt)
    t[pre + "attn.c_attn.weight"] = np.concatenate([w["wq"], w["wk"], w["wv"]], axis=1)
    t[pre + "attn.c_attn.bias"] = np.concatenate([z(w["bq"], d), z(w["bk"], d), z(w["bv"], d)])
    t[pre + "attn.c_proj.weight"] = w["wo"]
    t[pre + "attn.c_proj.bias"] = z(L["attn"].get("o_bias"), d)
    t[pre + "mlp.c_fc.weight"] = mlp["w_up"]
    t[pre + "mlp.c_fc.bias"] = z(mlp.get("up_bias"), f)
    t[pre + "mlp.c_proj.weight"] = mlp["w_down"]
    t[pre + "mlp.c_proj.bias"] = z(mlp.get("down_bias"), d)
    for j in (1, 2):
        t[pre + f"ln_{j}.weight"] = L[f"ln{j}"]["scale"]
        t[pre + f"ln_{j}.bias"] = z(L[f"ln{j}"].get("bias"), d)


def _mpt_layer(t, i, L, w, m, dt, kind) -> None:
    pre, mlp = f"transformer.blocks.{i}.", L["mlp"]
    t[pre + "attn.Wqkv.weight"] = np.concatenate([w["wq"], w["wk"], w["wv"]], axis=1).T
    t[pre + "attn.out_proj.weight"] = w["wo"].T
    t[pre + "ffn.up_proj.weight"] = mlp["w_up"].T
    t[pre + "ffn.down_proj.weight"] = mlp["w_down"].T
    t[pre + "norm_1.weight"] = L["ln1"]["scale"]
    t[pre + "norm_2.weight"] = L["ln2"]["scale"]


_LAYER = {"llama": _llama_layer, "gpt2": _gpt2_layer, "mpt": _mpt_layer}


def _outer(t, fam, p, emb, cfg, dt) -> None:
    """Embeddings and the final norm of family `fam`."""
    d = cfg.model.d_model
    if fam == "llama":
        t["model.embed_tokens.weight"] = emb
        t["model.norm.weight"] = p["ln_f"]["scale"]
    elif fam == "gpt2":
        n_pos = cfg.model.max_position or cfg.data.seq_len
        t["transformer.wte.weight"] = emb
        t["transformer.wpe.weight"] = (p["pos_embed"]["embedding"] if "pos_embed" in p
                                       else np.zeros((n_pos, d), dt))
        t["transformer.ln_f.weight"] = p["ln_f"]["scale"]
        t["transformer.ln_f.bias"] = _zeros_if_none(p["ln_f"].get("bias"), (d,), dt)
    else:
        t["transformer.wte.weight"] = emb
        t["transformer.norm_f.weight"] = p["ln_f"]["scale"]


def to_hf(cfg, params, vocab: int | None = None, arch: str | None = None,
          max_seq_len: int | None = None):
    """(hf_config dict, {name: np.ndarray}) for `params` (a pure dict of arrays), as
    `architecture(cfg.model, arch)`; `max_seq_len` is MPT's limit (default data.seq_len)."""
    m = cfg.model
    fam, kind = family(m), architecture(m, arch)
    p = _map(np.asarray, params)
    v = m.vocab_size if vocab is None else vocab
    if not 0 < v <= m.vocab_size:
        raise ConfigError(f"vocab: must be in [1, {m.vocab_size}], got {v}")
    emb = p["embed"]["embedding"][:v]
    t = {}
    for i, L in enumerate(layers_of(p, m.n_layers)):
        _LAYER[fam](t, i, L, _attn_parts(L["attn"], m), m, emb.dtype, kind)
    _outer(t, fam, p, emb, cfg, emb.dtype)
    if not m.tie_embeddings:
        t["lm_head.weight"] = p["lm_head"][:, :v].T
    t = {k: np.ascontiguousarray(x) for k, x in t.items()}
    return hf_config(cfg, kind, v, max_seq_len or cfg.data.seq_len), t


def hf_config(cfg, kind: str, vocab: int, max_seq_len: int) -> dict:
    """The transformers config.json for model_type `kind` (`architecture`)."""
    m = cfg.model
    d, h = m.d_model, m.n_heads
    common = {"architectures": [ARCHS[kind]], "model_type": kind, "vocab_size": vocab,
              "tie_word_embeddings": bool(m.tie_embeddings), "torch_dtype": m.param_dtype,
              "use_cache": True, "initializer_range": m.init_std}
    if kind in ("llama", "mistral", "qwen2"):
        out = {"hidden_size": d, "intermediate_size": resolved_d_ff(m),
               "num_hidden_layers": m.n_layers, "num_attention_heads": h,
               "num_key_value_heads": m.n_kv_heads or h, "head_dim": d // h,
               "hidden_act": LLAMA_ACT[m.activation], "rms_norm_eps": m.norm_eps,
               "rope_theta": float(m.rope_base),
               "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rope_base)},
               "max_position_embeddings": cfg.data.seq_len, "attention_dropout": 0.0, **common}
        if kind == "llama":
            out.update(attention_bias=bool(m.use_bias or m.qkv_bias), mlp_bias=m.use_bias)
        else:  # full attention: no sliding window
            out.update(sliding_window=None, use_sliding_window=False,
                       max_window_layers=m.n_layers)
        return out
    if kind == "gpt2":
        return {"n_embd": d,
                "n_layer": m.n_layers, "n_head": h, "n_inner": resolved_d_ff(m),
                "n_positions": m.max_position or cfg.data.seq_len,
                "activation_function": GPT2_ACT[m.activation],
                "layer_norm_epsilon": m.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                **common}
    return {"d_model": d, "n_heads": h, "n_layers": m.n_layers, "expansion_ratio": 4,
            "max_seq_len": max_seq_len, "layer_norm_epsilon": m.norm_eps,
            "learned_pos_emb": False, "no_bias": True, "norm_type": "low_precision_layernorm",
            "resid_pdrop": 0.0, "emb_pdrop": 0.0, "logit_scale": None,
            "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_pdrop": 0,
                            "clip_qkv": None, "softmax_scale": None, "qk_ln": False,
                            "prefix_lm": False, "attn_type": "multihead_attention"},
            **common}
