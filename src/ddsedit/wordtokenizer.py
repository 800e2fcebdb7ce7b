"""Word-level CLIP tokenizers: a CLIPTokenizer in which every given word is one token; and the T5 tokenizer
of the tiny SD3 and Flux pipelines, built the same way (:func:`build_t5_tokenizer`).

The one builder of the small models' tokenizers: the tiny test pipelines' (`ddsedit.tiny`) and the
bundled shapes model's (built by ``shapes_training`` from the shapes world's words).

CLIP's tokenizer is byte-level BPE whose word-final symbols carry a ``</w>`` suffix. The vocabulary
here holds the two special tokens, every lowercase letter, digit and common punctuation mark (plain
and word-final, so an unknown word still tokenizes, letter by letter), every given word, and the
prefixes that its merges pass through.
Merges are added word by word until each given word is one token, e.g. for "red":
``r e`` -> ``re``, then ``re d</w>`` -> ``red</w>``.

transformers 5 builds a CLIPTokenizer from `vocab=dict, merges=list of pairs`; passing `vocab_file=` and
`merges_file=` to the constructor silently gives a 3-entry vocabulary, so do not.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer, T5TokenizerFast

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to a word's symbols: always merge the leftmost pair of lowest rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = zip(symbols, symbols[1:], strict=False)
        candidates = [(ranks[pair], i) for i, pair in enumerate(pairs) if pair in ranks]
        if not candidates:
            break
        _, i = min(candidates)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token -> id) and merge rules (highest priority first) for `words`.

    Words are taken in turn; while a word still splits into several tokens under the merges so far,
    a merge joining its first two tokens is appended (at the lowest priority). A finished word is one
    token, so merges appended later cannot change it.
    """
    tokens: list[str] = [BOS, EOS]
    chars = string.ascii_lowercase + string.digits + ",.!?'-:;"
    tokens += list(chars) + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces := _bpe(symbols, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in tokens:
                tokens.append(pair[0] + pair[1])
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tokenizer(words: tuple[str, ...]) -> CLIPTokenizer:
    """A CLIPTokenizer (max length 77, padded with the end token) where each of `words` is one token."""
    vocab, merges = _vocab_and_merges(words)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    check_tokenizer(tok, words)
    return tok


def check_tokenizer(tok: CLIPTokenizer, words: tuple[str, ...]) -> None:
    """Raise AssertionError unless every word encodes to exactly one token between BOS and EOS."""
    assert tok.bos_token == BOS and tok.eos_token == EOS and tok.pad_token == EOS, "special tokens"
    assert tok.model_max_length == MAX_LENGTH, f"model_max_length {tok.model_max_length}"
    for word in words:
        ids = tok(word).input_ids
        assert len(ids) == 3 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id, (word, ids)
        assert tok.convert_ids_to_tokens(ids[1]) == word + "</w>", (word, tok.convert_ids_to_tokens(ids))
    sentence = " ".join(words)
    assert len(tok(sentence).input_ids) == len(words) + 2, "words merge across spaces"


def save_tokenizer(tok: CLIPTokenizer, folder: str) -> None:
    """save_pretrained, plus vocab.json and merges.txt so older transformers' slow tokenizer loads it."""
    tok.save_pretrained(folder)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    Path(folder, "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


T5_SPACE = "\u2581"  # SentencePiece's word-start mark, which T5's tokenizer puts before every word
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5's config expects (pad 0, eos 1)


def build_t5_tokenizer(words: tuple[str, ...]) -> T5TokenizerFast:
    """A T5 tokenizer (SentencePiece-style Unigram, ``</s>`` appended, ``<pad>`` padding) where each of ``words``
    is one token; an unknown word still tokenizes, letter by letter. Built offline: real T5 tokenizers are
    downloaded, and the tiny pipelines must build without a network."""
    letters = string.ascii_lowercase + string.digits + ",.!?'-:;"
    vocab = [(token, 0.0) for token in T5_SPECIAL_TOKENS] + [(T5_SPACE, -2.0)]
    vocab += [(letter, -5.0) for letter in letters]  # a spelled-out word scores below any whole word
    vocab += [(T5_SPACE + word, -1.0) for word in words]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    for word in words:
        ids = tokenizer(word).input_ids
        assert len(ids) == 2 and ids[-1] == tokenizer.eos_token_id, (word, ids)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1), "special tokens"
    return tokenizer
