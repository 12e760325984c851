"""A CLIP byte-pair tokenizer whose vocabulary is a fixed word list, written by our own code.

`write_clip_tokenizer` produces the ``vocab.json`` / ``merges.txt`` pair that
``transformers.CLIPTokenizer`` reads, such that every listed word is exactly one token and
any other word falls apart into single characters (so it still tokenizes, and
`unknown_words` can say which words the model never saw).
"""

from __future__ import annotations

import json
from pathlib import Path

from explain.tokens import byte_alphabet

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that join ``word`` (with CLIP's end-of-word marker) into one symbol."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    acc = symbols[0]
    for s in symbols[1:]:
        merges.append((acc, s))
        acc = acc + s
    return merges


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one pre-tokenized word (same algorithm as the reference tokenizer)."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges under which each of ``words`` becomes a single token.

    Merges of one word can fire inside another and leave it in pieces; each such word gets
    extra merges for the pieces it ends in, added at the lowest priority, until all words are
    whole."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(pair):
        if pair not in seen:
            seen.add(pair)
            merges.append(pair)

    for w in words:
        if len(w) > 1:
            for m in _word_merges(w):
                add(m)
    for _ in range(50):
        ranks = {m: i for i, m in enumerate(merges)}
        broken = [(w, _bpe(w, ranks)) for w in words if len(w) > 1]
        broken = [(w, pieces) for w, pieces in broken if len(pieces) > 1]
        if not broken:
            return merges
        for _, pieces in broken:
            acc = pieces[0]
            for p in pieces[1:]:
                add((acc, p))
                acc = acc + p
    raise RuntimeError("could not build merges that keep every word whole")  # pragma: no cover


def write_clip_tokenizer(words: list[str], folder: str | Path, model_max_length: int = 77) -> Path:
    """Write a ``CLIPTokenizer`` for ``words`` (lower-case, no spaces) into ``folder``."""
    for w in words:
        if not w or w != w.lower() or any(c.isspace() for c in w):
            raise ValueError(f"vocabulary words must be non-empty, lower-case and without spaces: {w!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = byte_alphabet()
    merges = build_merges(words)
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    known = set(vocab)
    for a, b in merges:
        if a + b not in known:
            known.add(a + b)
            vocab.append(a + b)
    vocab += [START_TOKEN, END_TOKEN]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {
        "model_max_length": model_max_length,
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "unk_token": END_TOKEN,
        "pad_token": END_TOKEN,
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": END_TOKEN}, indent=2)
    )
    return folder


def unknown_words(tokenizer, prompt: str, words: list[str]) -> list[str]:
    """The words of ``prompt`` that are not single known tokens of ``tokenizer``'s vocabulary ``words``."""
    known = set(words)
    unknown = []
    for piece in prompt.lower().replace(",", " , ").split():
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        text = tokenizer.convert_ids_to_tokens(ids)
        if len(ids) != 1 or text[0].removesuffix("</w>") not in known:
            if piece not in unknown:
                unknown.append(piece)
    return unknown
