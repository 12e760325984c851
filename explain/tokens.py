"""Which context positions belong to which prompt word.

Cross-attention maps are indexed by *token position* in the text encoder's context; people
ask about *words*. CLIP's byte-pair tokenizer marks the last piece of every word with
``</w>``, so a word is a run of tokens ending in such a piece ("zebrafish" may be
``zebra``, ``fish</w>``). Punctuation is a word of its own, as CLIP's pre-tokenizer splits it
off ("circle," is ``circle</w>``, ``,</w>``).

A Hugging Face ``CLIPTokenizer`` (diffusers) gives one context of ``model_max_length`` (77)
positions; longer prompts are cut, and `PromptTruncatedWarning` names the words lost. (ComfyUI's
token lists are read by the node pack, ``nodes.prompt_tokens``, into the same types.)

The result is a `PromptTokens`: the token strings of the kept positions (start token through
the last end token) and the `Word` list.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

from explain.trace import Word

END_OF_WORD = "</w>"
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
    """Readable text of one BPE token string (end-of-word marker removed, bytes decoded)."""
    piece = token[: -len(END_OF_WORD)] if token.endswith(END_OF_WORD) else token
    decoder = _byte_decoder()
    if all(ch in decoder for ch in piece):
        return bytes(decoder[ch] for ch in piece).decode("utf-8", errors="replace")
    return piece


def is_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def words_from_tokens(tokens: Sequence[str], offset: int = 0) -> list[Word]:
    """Merge a run of BPE token strings into words at their ``</w>`` markers.

    Special tokens (``<|...|>``) belong to no word. ``offset`` is added to every position, for
    token lists that start inside a longer context. A trailing run without ``</w>`` (a word cut
    by truncation) still becomes a word."""
    words: list[Word] = []
    pieces: list[str] = []
    positions: list[int] = []

    def flush():
        if positions:
            words.append(Word(text="".join(token_text(p) for p in pieces), token_indices=list(positions)))
            pieces.clear()
            positions.clear()

    for i, tok in enumerate(tokens):
        if is_special(tok):
            flush()
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
    has_start = bool(full) and is_special(full[0])
    has_end = bool(full) and is_special(full[-1])
    body = full[int(has_start) : len(full) - int(has_end)]
    room = limit - int(has_start) - int(has_end)
    kept_body, cut_body = body[:room], body[room:]
    tokens = ([full[0]] if has_start else []) + kept_body + ([full[-1]] if has_end else [])
    words = words_from_tokens(tokens)

    dropped: list[str] = []
    if cut_body:
        all_words = words_from_tokens(body, offset=int(has_start))
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
