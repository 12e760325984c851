"""Which context positions belong to which prompt word.

Cross-attention maps are indexed by *token position* in the text encoder's context; people
ask about *words*. CLIP's byte-pair tokenizer marks the last piece of every word with
``</w>``, so a word is a run of tokens ending in such a piece ("zebrafish" may be
``zebra``, ``fish</w>``). Punctuation is a word of its own, as CLIP's pre-tokenizer splits it
off ("circle," is ``circle</w>``, ``,</w>``).

A Hugging Face ``CLIPTokenizer`` (diffusers) gives one context of ``model_max_length`` (77)
positions; longer prompts are cut, and `PromptTruncatedWarning` names the words lost. (ComfyUI's
token lists are read by the node pack, ``nodes.prompt_tokens``, into the same types.)

Sentencepiece tokenizers (T5, the long text encoder of SD3 and Flux) mark the *first* piece of
every word with ``▁`` instead ("▁zebra", "fish"); `tokenize_prompt` detects them and splits words
there, with punctuation-only pieces a word of their own as in CLIP. T5 has no start token and
ends with ``</s>``.

The result is a `PromptTokens`: the token strings of the kept positions (start token through
the last end token) and the `Word` list. `concat_prompt_tokens` joins the token lists of a
context made of several text encoders' sequences side by side (SD3: CLIP then T5), so that a
word's positions cover all of them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

from explain.trace import Word

END_OF_WORD = "</w>"
WORD_START = "\u2581"  # sentencepiece's "▁"
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


class PromptTruncatedWarning(UserWarning):
    """The prompt was longer than the text encoder's context; its tail was not seen by the model."""


@dataclass
class PromptTokens:
    prompt: str
    tokens: list[str]  # one per kept context position: start token, prompt tokens, end token(s)
    words: list[Word]
    dropped_words: list[str] = field(default_factory=list)  # words (partly) cut off by the context limit

    @property
    def truncated(self) -> bool:
        return bool(self.dropped_words)


# ---------------------------------------------------------------------------- pure helpers
@lru_cache(maxsize=1)
def byte_alphabet() -> list[str]:
    """GPT-2 / CLIP's reversible byte-to-unicode table, in its canonical order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """CLIP's unicode-to-byte table (the inverse of the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_order = printable + [b for b in range(256) if b not in printable]
    return dict(zip(byte_alphabet(), byte_order))


def token_text(token: str) -> str:
    """Readable text of one BPE or sentencepiece token string (word markers removed, bytes decoded)."""
    piece = token[: -len(END_OF_WORD)] if token.endswith(END_OF_WORD) else token
    piece = piece[len(WORD_START) :] if piece.startswith(WORD_START) else piece
    decoder = _byte_decoder()
    if all(ch in decoder for ch in piece):
        return bytes(decoder[ch] for ch in piece).decode("utf-8", errors="replace")
    return piece


def is_special(token: str, specials: frozenset[str] | set[str] = frozenset()) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in specials


def _is_punctuation(piece: str) -> bool:
    text = token_text(piece)
    return bool(text) and all(not ch.isalnum() and not ch.isspace() for ch in text)


def words_from_tokens(tokens: Sequence[str], offset: int = 0, style: str = "bpe", specials: frozenset[str] | set[str] = frozenset()) -> list[Word]:
    """Merge a run of token strings into words: at their ``</w>`` markers (``style="bpe"``,
    CLIP) or before their ``▁`` markers (``"sentencepiece"``, T5; punctuation-only pieces are
    words of their own).

    Special tokens (``<|...|>`` and ``specials``) belong to no word. ``offset`` is added to every
    position, for token lists that start inside a longer context. A trailing run without
    ``</w>`` (a word cut by truncation) still becomes a word."""
    if style not in ("bpe", "sentencepiece"):
        raise ValueError(f"unknown tokenizer style {style!r}; expected 'bpe' or 'sentencepiece'")
    words: list[Word] = []
    pieces: list[str] = []
    positions: list[int] = []

    def flush():
        if positions:
            words.append(Word(text="".join(token_text(p) for p in pieces), token_indices=list(positions)))
            pieces.clear()
            positions.clear()

    for i, tok in enumerate(tokens):
        if is_special(tok, specials):
            flush()
            continue
        if style == "sentencepiece":
            if tok.startswith(WORD_START) or _is_punctuation(tok) or (pieces and _is_punctuation(pieces[-1])):
                flush()
            if tok == WORD_START:  # a bare marker before a piece the vocabulary splits off
                continue
            pieces.append(tok)
            positions.append(i + offset)
            continue
        pieces.append(tok)
        positions.append(i + offset)
        if tok.endswith(END_OF_WORD):
            flush()
    flush()
    return words


# ---------------------------------------------------------------------------- Hugging Face tokenizers
def tokenize_prompt(tokenizer, prompt: str, max_length: int | None = None, warn: bool = True, what: str = "prompt") -> PromptTokens:
    """Token strings and words of ``prompt`` as a diffusers pipeline feeds it to ``tokenizer``
    (start token, at most ``max_length - 2`` prompt tokens, end token).

    Warns with `PromptTruncatedWarning` naming the words that were cut off (``what`` names the
    text in the message: "prompt", "negative prompt")."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    limit = int(max_length or tokenizer.model_max_length)
    if limit < 2 or limit > 100_000:
        raise ValueError(f"the tokenizer's context length {limit} is not usable; pass max_length= (77 for CLIP)")
    full_ids = list(tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids)
    full = list(tokenizer.convert_ids_to_tokens(full_ids))
    specials = frozenset(getattr(tokenizer, "all_special_tokens", ()) or ())
    style = "sentencepiece" if any(t.startswith(WORD_START) for t in full) else "bpe"
    has_start = bool(full) and is_special(full[0], specials) and len(full) > 1
    has_end = bool(full) and is_special(full[-1], specials)
    body = full[int(has_start) : len(full) - int(has_end)]
    room = limit - int(has_start) - int(has_end)
    kept_body, cut_body = body[:room], body[room:]
    tokens = ([full[0]] if has_start else []) + kept_body + ([full[-1]] if has_end else [])
    words = words_from_tokens(tokens, style=style, specials=specials)

    dropped: list[str] = []
    if cut_body:
        all_words = words_from_tokens(body, offset=int(has_start), style=style, specials=specials)
        kept_positions = set(range(int(has_start), int(has_start) + len(kept_body)))
        dropped = [w.text for w in all_words if not set(w.token_indices) <= kept_positions]
        if warn:
            warnings.warn(
                f"the {what} has {len(body)} tokens but the text encoder reads at most {room}; "
                f"these words were cut off and have no effect or attention maps: {' '.join(dropped)!r}. "
                f"Shorten the {what}.",
                PromptTruncatedWarning,
                stacklevel=2,
            )
    return PromptTokens(prompt=prompt, tokens=tokens, words=words, dropped_words=dropped)


def pad_token_list(tokens: Sequence[str], length: int, pad: str = END_TOKEN) -> list[str]:
    """``tokens`` cut or padded to ``length`` positions (to line up with an attention axis)."""
    out = list(tokens[:length])
    return out + [pad] * (length - len(out))


def concat_prompt_tokens(parts: Sequence[PromptTokens], lengths: Sequence[int], pads: Sequence[str] | None = None) -> PromptTokens:
    """One `PromptTokens` for a context made of several encoders' sequences side by side.

    Part ``k`` is cut or padded (with ``pads[k]``, default the CLIP end token) to ``lengths[k]``
    positions and placed after the parts before it. Words are joined in order by their text: a
    word of a later part that matches the next unmatched word of the same text in the parts
    before it adds its positions to that word (SD3's "circle" is one word with a CLIP and a T5
    position), otherwise it is a word of its own."""
    if len(parts) != len(lengths):
        raise ValueError(f"{len(parts)} token lists for {len(lengths)} lengths")
    pads = list(pads) if pads is not None else [END_TOKEN] * len(parts)
    tokens: list[str] = []
    words: list[Word] = []
    dropped: list[str] = []
    offset = 0
    for part, length, pad in zip(parts, lengths, pads):
        tokens += pad_token_list(part.tokens, length, pad)
        cursor = 0
        for w in part.words:
            kept = [i + offset for i in w.token_indices if i < length]
            if not kept:
                continue
            match = next((j for j in range(cursor, len(words)) if words[j].text.lower() == w.text.lower()), None)
            if match is None or offset == 0:
                words.append(Word(text=w.text, token_indices=kept))
            else:
                words[match].token_indices = sorted(words[match].token_indices + kept)
                cursor = match + 1
        dropped += [d for d in part.dropped_words if d not in dropped]
        offset += length
    prompt = parts[0].prompt if parts else ""
    return PromptTokens(prompt=prompt, tokens=tokens, words=words, dropped_words=dropped)
