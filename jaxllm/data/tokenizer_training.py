"""Train a tokenizer on the user's corpus: SentencePiece BPE / unigram, or byte-level BPE.

SentencePiece (Kudo & Richardson 2018; unigram: Kudo 2018; BPE: Sennrich et al. 2016) is
trained with byte fallback, the identity normalizer, no dummy-prefix space, no whitespace
collapsing, split digits and whitespace-only pieces (code indentation), plus a newline
piece, so decode(encode(text)) == text for any UTF-8 text (CJK, emoji, combining marks) and
every piece stands for fixed bytes. Ids: 0 unk, 1 bos, 2 eos, 3 pad.

Byte-level BPE (GPT-2 / GPT-NeoX style, Radford et al. 2019) uses the `tokenizers` library
with the ByteLevel pre-tokenizer (GPT-2 regex, no prefix space) and decoder, the full
256-byte initial alphabet, and specials `<|endoftext|>` (id 0; BOS and EOS) and
`<|padding|>` (id 1).
"""

from __future__ import annotations

import io
import itertools
import pathlib
import sys

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from jaxllm.data.corpus import BadRecords, iter_texts

KINDS = ("sentencepiece_bpe", "sentencepiece_unigram", "byte_bpe")


def _progress(total_bytes: int | None, desc: str, enabled: bool):

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=not enabled,
                file=sys.stderr)


def _chunks(texts, max_bytes: int | None, bar, max_len: int = 4096):
    """Split documents into lines (SentencePiece trains on sentences) up to `max_bytes`."""
    seen = 0
    for _, text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            for i in range(0, len(line), max_len):
                piece = line[i:i + max_len]
                n = len(piece.encode("utf-8")) + 1
                if max_bytes and seen + n > max_bytes:
                    return
                seen += n
                bar.update(n)
                yield piece


def train_tokenizer(files: list[str], kind: str, vocab_size: int, output: str, *,
                    text_field: str = "text", blank_line_docs: bool = False,
                    max_bytes: int | None = None, progress: bool = True,
                    bad: BadRecords | None = None) -> str:
    """Train on `files` (see corpus.expand_inputs) and write `output`; return its path.

    `output` gets the suffix `data.tokenizer` expects: `.model` (SentencePiece) or `.json`.
    `max_bytes` caps the training text (the rest of the corpus is not read).
    """
    if kind not in KINDS:
        raise ValueError(f"--kind: got {kind!r}; allowed: {', '.join(KINDS)}")
    out = pathlib.Path(output)
    out = out.with_suffix(".json" if kind == "byte_bpe" else ".model")
    out.parent.mkdir(parents=True, exist_ok=True)
    bad = bad if bad is not None else BadRecords()
    texts = iter_texts(files, text_field=text_field, blank_line_docs=blank_line_docs, bad=bad)
    with _progress(max_bytes, f"reading for {kind}", progress) as bar:
        if kind == "byte_bpe":
            if vocab_size < 256 + 2:
                raise ValueError(f"--vocab_size: byte_bpe needs at least 258, got {vocab_size}")
            _train_byte_bpe(_chunks(texts, max_bytes, bar), vocab_size, out, progress)
        else:
            if vocab_size < 256 + 5:
                raise ValueError(f"--vocab_size: SentencePiece with byte fallback needs at least "
                                 f"261, got {vocab_size}")
            _train_sentencepiece(_chunks(texts, max_bytes, bar), kind.split("_")[1], vocab_size,
                                 out)
    return str(out)


def _train_sentencepiece(lines, model_type: str, vocab_size: int, out: pathlib.Path) -> None:

    first = next(lines, None)
    if first is None:
        raise ValueError("input: no training text found")
    lines = itertools.chain([first], lines)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            max_sentence_length=1 << 16, hard_vocab_limit=False, minloglevel=2,
            num_threads=2)
    except RuntimeError as e:
        raise ValueError(f"--vocab_size: SentencePiece training failed ({e})") from e
    out.write_bytes(buf.getvalue())


def _train_byte_bpe(lines, vocab_size: int, out: pathlib.Path, progress: bool) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress,
        min_frequency=2)
    # Lines lose their "\n"; give it back so newline merges are learnt too.
    tok.train_from_iterator((line + "\n" for line in lines), trainer=trainer)
    if tok.get_vocab_size() < 258:
        raise ValueError("input: no training text found")
    tok.save(str(out))
