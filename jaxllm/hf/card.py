"""The files that describe an export: `generation_config.json` and a model card `README.md`
(architecture, tokenizer, training tokens, eval bits per byte, how to load it)."""

from __future__ import annotations

import pathlib

from jaxllm.runfiles import read_rows


def generation_config(ids: dict, vocab: int) -> dict:
    """transformers' GenerationConfig fields: the document-start/end/pad ids, and the
    padding ids (>= the tokenizer's size, present when the padding is kept) suppressed."""
    gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    if vocab > ids["vocab"]:
        gen["suppress_tokens"] = list(range(ids["vocab"], vocab))
    return gen


def run_summary(workdir, step: int) -> dict:
    """Training tokens and the latest eval bits per byte up to `step` (metrics.jsonl)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    tokens = bpb = None
    for row in read_rows(str(path)) if path.exists() else []:
        if row.get("step", step + 1) > step:
            continue
        if row.get("split") == "train" and row.get("tokens_seen") is not None:
            tokens = row["tokens_seen"]
        if row.get("split") == "eval" and row.get("bpb") is not None:
            bpb = row["bpb"]
    return {"tokens": tokens, "bpb": bpb}


def model_card(cfg, hf: dict, step: int, tokenizer: str, summary: dict) -> str:
    """A short README.md for the export directory."""
    m = cfg.model
    arch = hf["architectures"][0]
    tokens = "unknown" if summary["tokens"] is None else f"{summary['tokens']:,}"
    bpb = "not evaluated" if summary["bpb"] is None else f"{summary['bpb']:.4f}"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
---
# {arch} exported from jaxllm

| | |
|---|---|
| architecture | {arch}: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads \
({m.n_kv_heads or m.n_heads} kv), {m.activation}, {m.norm}, {m.pos_encoding} positions |
| vocabulary | {hf["vocab_size"]} ids (tokenizer `{tokenizer}`) |
| trained | step {step}, {tokens} tokens, sequence length {cfg.data.seq_len} |
| eval bits per byte | {bpb} |
| dtype | {hf["torch_dtype"]} |

Every text is encoded after the document separator the model was trained with
(`bos_token`, the tokenizer's end-of-text token), as `jaxllm-sample` does:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(PATH)
model = AutoModelForCausalLM.from_pretrained(PATH)
out = model.generate(**tok("def main():", return_tensors="pt"), max_new_tokens=50,
                     do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
```
"""
