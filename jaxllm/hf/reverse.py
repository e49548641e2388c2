"""Hugging Face `transformers` tensors -> jaxllm parameters: the inverse of `mapping.to_hf`
for LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel and
MptForCausalLM (layout facts: `mapping`).

Whatever jaxllm cannot reproduce exactly is refused with a one-line ConfigError naming the
key: rope scaling (Llama 3's `llama3`, YaRN, ...), a head size other than d_model/n_heads,
activations without a jaxllm twin, GPT-2's inverse-layer-index scaling or cross-attention,
MPT's clip_qkv / qk_ln / prefix-LM / logit scaling, a Mistral/Qwen2 sliding window shorter
than the training sequence (`seq_len`; a longer one never applies), and tensors with no
place in jaxllm.
"""

from __future__ import annotations

import numpy as np

from jaxllm.config import ConfigError
from jaxllm.hf.mapping import GPT2_ACT, HF_ACT_ALIASES, LLAMA_ACT

_IGNORED = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
_DEFAULT_TIE = {"llama": False, "mistral": False, "qwen2": False, "gpt2": True, "mpt": True}


def from_hf(hf: dict, tensors: dict, source: str = "config.json", seq_len: int | None = None):
    """(jaxllm model keys, params with `blocks` as a per-layer list) from a transformers
    config dict and its tensors (any float dtype; returned as float32). `seq_len`: the
    sequence length the model will run at (checked against a sliding window)."""
    kind = hf.get("model_type")
    fam = {"mistral": "llama", "qwen2": "llama"}.get(kind, kind)
    if fam not in _IMPORT:
        raise ConfigError(f"{source}: model_type {kind!r} is not supported; "
                          f"allowed: {', '.join(_DEFAULT_TIE)}")
    if kind in ("mistral", "qwen2"):
        _check_window(hf, source, seq_len)
    if fam == "gpt2":  # GPT2Model files name tensors without the `transformer.` prefix
        tensors = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): x
                   for k, x in tensors.items()}
    used = set()

    def get(name, shape, required=True):
        if name not in tensors:
            if required:
                raise ConfigError(f"{source}: tensor {name} is missing from the weights")
            return None
        x = np.asarray(tensors[name]).astype(np.float32)
        if tuple(x.shape) != tuple(shape):
            raise ConfigError(f"{source}: tensor {name} has shape {tuple(x.shape)}, "
                              f"expected {tuple(shape)} from config.json")
        used.add(name)
        return x

    try:
        keys, params = _IMPORT[fam](hf, get, source)
    except KeyError as e:
        raise ConfigError(f"{source}: {fam} config has no {e.args[0]!r}") from None
    tie = hf.get("tie_word_embeddings", _DEFAULT_TIE[kind])
    keys["tie_embeddings"] = bool(tie)
    head = get("lm_head.weight", (keys["vocab_size"], keys["d_model"]), required=not tie)
    if not tie:
        params["lm_head"] = head.T
    extra = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED))
    if extra:
        raise ConfigError(f"{source}: tensors jaxllm has no place for: {', '.join(extra[:5])}"
                          + (" ..." if len(extra) > 5 else ""))
    return keys, params


def _act(name, table, source, what):
    inv = {v: k for k, v in table.items()}
    act = HF_ACT_ALIASES.get(name, name)
    if act not in inv:
        raise ConfigError(f"{source}: {what} {name!r} has no jaxllm equivalent; allowed: "
                          + ", ".join(sorted(inv)))
    return inv[act]


def _import_llama(hf, get, source):
    d, h, n = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    kv = hf.get("num_key_value_heads") or h
    hd = hf.get("head_dim") or d // h
    if hd * h != d:
        raise ConfigError(f"{source}: head_dim {hd} * num_attention_heads {h} != hidden_size "
                          f"{d}; jaxllm needs head size d_model / n_heads")
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype != "default" or rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{source}: rope scaling {rtype!r} is not supported; jaxllm has "
                          "plain RoPE only (rope_type default)")
    theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
    f, v = hf["intermediate_size"], hf["vocab_size"]
    bias_a, bias_m = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
    use_bias = bias_a or bias_m
    qkv = hf["model_type"] == "qwen2"  # q/k/v biases, no others
    keys = {"d_model": d, "n_layers": n, "n_heads": h, "n_kv_heads": 0 if kv == h else kv,
            "d_ff": f, "vocab_size": v, "pos_encoding": "rope", "rope_base": float(theta),
            "max_position": 0, "norm": "rmsnorm", "use_bias": use_bias, "qkv_bias": qkv,
            "activation": _act(hf.get("hidden_act", "silu"), LLAMA_ACT, source, "hidden_act"),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6))}
    blocks = []
    for i in range(n):
        pre = f"model.layers.{i}."
        at, ml = pre + "self_attn.", pre + "mlp."
        a = {"wq": get(at + "q_proj.weight", (h * hd, d)).T.reshape(d, h, hd),
             "wk": get(at + "k_proj.weight", (kv * hd, d)).T.reshape(d, kv, hd),
             "wv": get(at + "v_proj.weight", (kv * hd, d)).T.reshape(d, kv, hd),
             "wo": get(at + "o_proj.weight", (d, h * hd)).T.reshape(h, hd, d)}
        mlp = {"w_gate": get(ml + "gate_proj.weight", (f, d)).T,
               "w_up": get(ml + "up_proj.weight", (f, d)).T,
               "w_down": get(ml + "down_proj.weight", (d, f)).T}
        if qkv:
            a.update(q_bias=get(at + "q_proj.bias", (h * hd,)).reshape(h, hd),
                     k_bias=get(at + "k_proj.bias", (kv * hd,)).reshape(kv, hd),
                     v_bias=get(at + "v_proj.bias", (kv * hd,)).reshape(kv, hd))
        elif use_bias:

            def b(name, shape, on):
                return get(name, shape) if on else np.zeros(shape, np.float32)
            a.update(q_bias=b(at + "q_proj.bias", (h * hd,), bias_a).reshape(h, hd),
                     k_bias=b(at + "k_proj.bias", (kv * hd,), bias_a).reshape(kv, hd),
                     v_bias=b(at + "v_proj.bias", (kv * hd,), bias_a).reshape(kv, hd),
                     o_bias=b(at + "o_proj.bias", (d,), bias_a))
            mlp.update(gate_bias=b(ml + "gate_proj.bias", (f,), bias_m),
                       up_bias=b(ml + "up_proj.bias", (f,), bias_m),
                       down_bias=b(ml + "down_proj.bias", (d,), bias_m))
        blocks.append({"attn": a, "mlp": mlp,
                       "ln1": {"scale": get(pre + "input_layernorm.weight", (d,))},
                       "ln2": {"scale": get(pre + "post_attention_layernorm.weight", (d,))}})
    params = {"embed": {"embedding": get("model.embed_tokens.weight", (v, d))},
              "blocks": blocks, "ln_f": {"scale": get("model.norm.weight", (d,))}}
    return keys, params


def _check_window(hf, source, seq_len):
    """Mistral / Qwen2: a sliding window is exact only when it covers the sequence."""
    window = hf.get("sliding_window")
    if hf["model_type"] == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if window is not None and seq_len is not None and window < seq_len:
        raise ConfigError(f"{source}: sliding_window={window} is shorter than data.seq_len "
                          f"{seq_len}; jaxllm attends to the whole sequence (use "
                          f"--config.data.seq_len={window} or less)")


def _import_gpt2(hf, get, source):
    d, h, n = hf.get("n_embd", 768), hf.get("n_head", 12), hf.get("n_layer", 12)
    f, v, npos = hf.get("n_inner") or 4 * d, hf.get("vocab_size", 50257), hf.get(
        "n_positions", 1024)
    for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                     ("add_cross_attention", True)):
        if hf.get(key, not bad) == bad:
            raise ConfigError(f"{source}: {key}={bad} is not supported by jaxllm")
    hd = d // h
    keys = {"d_model": d, "n_layers": n, "n_heads": h, "n_kv_heads": 0, "d_ff": f,
            "vocab_size": v, "pos_encoding": "learned", "max_position": npos,
            "activation": _act(hf.get("activation_function", "gelu_new"), GPT2_ACT, source,
                               "activation_function"),
            "norm": "layernorm", "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
            "use_bias": True, "qkv_bias": False}
    blocks = []
    for i in range(n):
        pre = f"transformer.h.{i}."
        w = get(pre + "attn.c_attn.weight", (d, 3 * d))
        b = get(pre + "attn.c_attn.bias", (3 * d,))
        a = {"wq": w[:, :d].reshape(d, h, hd), "wk": w[:, d:2 * d].reshape(d, h, hd),
             "wv": w[:, 2 * d:].reshape(d, h, hd),
             "q_bias": b[:d].reshape(h, hd), "k_bias": b[d:2 * d].reshape(h, hd),
             "v_bias": b[2 * d:].reshape(h, hd),
             "wo": get(pre + "attn.c_proj.weight", (d, d)).reshape(h, hd, d),
             "o_bias": get(pre + "attn.c_proj.bias", (d,))}
        mlp = {"w_up": get(pre + "mlp.c_fc.weight", (d, f)),
               "up_bias": get(pre + "mlp.c_fc.bias", (f,)),
               "w_down": get(pre + "mlp.c_proj.weight", (f, d)),
               "down_bias": get(pre + "mlp.c_proj.bias", (d,))}
        ln = {f"ln{j}": {"scale": get(pre + f"ln_{j}.weight", (d,)),
                         "bias": get(pre + f"ln_{j}.bias", (d,))} for j in (1, 2)}
        blocks.append({"attn": a, "mlp": mlp, **ln})
    params = {"embed": {"embedding": get("transformer.wte.weight", (v, d))},
              "pos_embed": {"embedding": get("transformer.wpe.weight", (npos, d))},
              "blocks": blocks,
              "ln_f": {"scale": get("transformer.ln_f.weight", (d,)),
                       "bias": get("transformer.ln_f.bias", (d,))}}
    return keys, params


def _import_mpt(hf, get, source):
    d, h, n = hf.get("d_model", 2048), hf.get("n_heads", 16), hf.get("n_layers", 24)
    v, ac = hf.get("vocab_size", 50368), hf.get("attn_config") or {}
    hd = d // h
    checks = {"attn_config.alibi": (ac.get("alibi", True), True),
              "attn_config.alibi_bias_max": (ac.get("alibi_bias_max", 8), 8),
              "attn_config.clip_qkv": (ac.get("clip_qkv"), None),
              "attn_config.qk_ln": (ac.get("qk_ln", False), False),
              "attn_config.prefix_lm": (ac.get("prefix_lm", False), False),
              "no_bias": (hf.get("no_bias", True), True),
              "logit_scale": (hf.get("logit_scale"), None)}
    scale = ac.get("softmax_scale")
    if scale is not None and abs(scale - hd ** -0.5) > 1e-9:
        checks["attn_config.softmax_scale"] = (scale, None)
    for key, (got, want) in checks.items():
        if got != want:
            raise ConfigError(f"{source}: {key}={got!r} is not supported; jaxllm needs {want!r}")
    keys = {"d_model": d, "n_layers": n, "n_heads": h, "n_kv_heads": 0, "d_ff": 4 * d,
            "vocab_size": v, "pos_encoding": "alibi", "max_position": 0,
            "activation": "gelu_exact", "norm": "layernorm", "use_bias": False,
            "qkv_bias": False,
            "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5))}
    blocks = []
    for i in range(n):
        pre = f"transformer.blocks.{i}."
        w = get(pre + "attn.Wqkv.weight", (3 * d, d)).T
        blocks.append({
            "attn": {"wq": w[:, :d].reshape(d, h, hd), "wk": w[:, d:2 * d].reshape(d, h, hd),
                     "wv": w[:, 2 * d:].reshape(d, h, hd),
                     "wo": get(pre + "attn.out_proj.weight", (d, d)).T.reshape(h, hd, d)},
            "mlp": {"w_up": get(pre + "ffn.up_proj.weight", (4 * d, d)).T,
                    "w_down": get(pre + "ffn.down_proj.weight", (d, 4 * d)).T},
            "ln1": {"scale": get(pre + "norm_1.weight", (d,))},
            "ln2": {"scale": get(pre + "norm_2.weight", (d,))}})
    params = {"embed": {"embedding": get("transformer.wte.weight", (v, d))},
              "blocks": blocks, "ln_f": {"scale": get("transformer.norm_f.weight", (d,))}}
    return keys, params


_IMPORT = {"llama": _import_llama, "gpt2": _import_gpt2, "mpt": _import_mpt}
