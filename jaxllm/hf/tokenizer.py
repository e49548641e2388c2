"""Hugging Face tokenizer files that encode text exactly as jaxllm training does.

Training puts the tokenizer's EOS before every document (the document separator, see
`data/pipeline.py`) and `jaxllm-sample` prepends it to the prompt, so the exported
tokenizer names that token `bos_token` and prepends it (`add_bos_token` and, for
`tokenizer.json` files, a TemplateProcessing post-processor). Text is encoded with special
tokens *split* (`split_special_tokens`), as jaxllm encodes documents: a literal "</s>" or
"<|endoftext|>" in user text is ordinary text on both sides, never a special id.

- `byte`: a `tokenizers` byte-level BPE with no merges whose ids equal jaxllm's
  ByteTokenizer (byte b -> id b, then <pad> 256, <s> 257, </s> 258).
- SentencePiece `.model`: copied as `tokenizer.model` (LlamaTokenizer, no dummy prefix,
  as jaxllm loads it).
- byte-level BPE `.json`: copied as `tokenizer.json`, with the post-processor added and a
  ByteLevel `add_prefix_space` switched off (as jaxllm loads it).
"""

from __future__ import annotations

import json
import pathlib
import shutil

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from jaxllm.config import ConfigError
from jaxllm.data.tokenizers import ByteTokenizer, bytes_to_unicode, load_tokenizer

BYTE_SPECIALS = {"<pad>": 256, "<s>": 257, "</s>": 258}  # jaxllm ByteTokenizer ids


def byte_tokenizer():
    """The `tokenizers.Tokenizer` of jaxllm's byte ids (no post-processor)."""
    byte_of = bytes_to_unicode()  # GPT-2's {char: byte} map
    assert sorted(pre_tokenizers.ByteLevel.alphabet()) == sorted(byte_of)
    tok = Tokenizer(models.BPE(vocab=dict(byte_of), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BYTE_SPECIALS))
    assert all(tok.token_to_id(t) == i for t, i in BYTE_SPECIALS.items())
    return tok


def byte_tokenizer_json() -> str:
    return byte_tokenizer().to_str()


def _with_document_start(tok, start: str, start_id: int) -> str:
    """tokenizer.json text of `tok` with `start` prepended to every encoded text."""
    template = processors.TemplateProcessing(
        single=f"{start} $A", pair=f"{start} $A {start} $B:1",
        special_tokens=[(start, start_id)])
    old = json.loads(tok.to_str()).get("post_processor") or {}
    # jaxllm encodes without any post-processor: keep only ByteLevel's offset trimming
    tok.post_processor = (processors.Sequence([tok.post_processor, template])
                          if old.get("type") == "ByteLevel" else template)
    return tok.to_str()


def _load(spec: str):
    src = pathlib.Path(spec).expanduser()
    if not src.is_file():
        raise ConfigError(f"data.tokenizer: {src} not found; pass --tokenizer=PATH")
    try:
        return src, load_tokenizer(str(src))
    except (OSError, ValueError) as e:
        raise ConfigError(str(e) if str(e).startswith("data.tokenizer") else
                          f"data.tokenizer: {e}") from None


def write_tokenizer(spec: str, out: pathlib.Path, max_length: int) -> dict:
    """Write the tokenizer files for jaxllm tokenizer `spec` into `out`; returns the ids
    {bos (= the document-start EOS), eos, pad, vocab (the tokenizer's size)}."""
    tcfg = {"add_bos_token": True, "add_eos_token": False, "model_max_length": max_length,
            "split_special_tokens": True, "clean_up_tokenization_spaces": False}
    if spec == "byte":
        ours = ByteTokenizer()
        names = {v: k for k, v in BYTE_SPECIALS.items()}
        (out / "tokenizer.json").write_text(
            _with_document_start(byte_tokenizer(), names[ours.eos_id], ours.eos_id))
        tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        src, ours = _load(spec)
        if src.suffix == ".model":
            shutil.copyfile(src, out / "tokenizer.model")
            names = {i: ours.sp.id_to_piece(i) for i in (ours.eos_id, ours.pad_id)}
            # jaxllm encodes with the identity normalizer and no dummy-prefix space
            tcfg.update(tokenizer_class="LlamaTokenizer", add_prefix_space=False, legacy=False)
        else:
            tok = ours.tok  # as jaxllm loaded it (a ByteLevel prefix space off)
            names = {i: tok.id_to_token(i) for i in (ours.eos_id, ours.pad_id)}
            (out / "tokenizer.json").write_text(
                _with_document_start(tok, names[ours.eos_id], ours.eos_id))
            tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    special = {"bos_token": names[ours.eos_id], "eos_token": names[ours.eos_id],
               "pad_token": names[ours.pad_id]}
    (out / "tokenizer_config.json").write_text(json.dumps({**tcfg, **special}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return {"bos": ours.eos_id, "eos": ours.eos_id, "pad": ours.pad_id,
            "vocab": ours.vocab_size}

