"""ComfyUI's token lists as the core's `PromptTokens`: which context positions belong to which
prompt word.

``clip.tokenize(text, return_word_ids=True)`` lists ``[(token, weight, word_id)]`` in chunks of
77 that ComfyUI concatenates into one longer context (nothing is cut), so positions count across
chunks."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, Sequence

from explain.tokens import END_OF_WORD, WORD_START, PromptTokens, concat_prompt_tokens, token_text, words_from_tokens
from explain.trace import Word


def comfy_prompt_tokens(
    chunks: Sequence[Sequence[Sequence[Any]]],
    id_to_token: Mapping[int, str] | Callable[[int], str] | None = None,
    prompt: str = "",
) -> PromptTokens:
    """Token strings and words from ComfyUI's ``[(token, weight, word_id), ...]`` chunks.

    The chunks are concatenated (ComfyUI feeds long prompts as several 77-token contexts
    side by side), so positions count across chunks. ``id_to_token`` (e.g. ComfyUI's
    ``tokenizer.clip_l.inv_vocab``) gives token strings; with it, words are split at ``</w>``
    markers as well as at word-id changes (ComfyUI's word id marks a weighted prompt segment,
    which may hold several words). Without it, each word id is one word named from the
    prompt's whitespace-separated words when they line up, else ``word<id>``. Tokens that are
    embedding tensors (textual inversion) are named ``<embedding>``. Sentencepiece token lists
    (T5, whose pieces mark a word's *start* with ``▁`` and have no start token) are split into
    words at those markers."""
    if not chunks or any(len(chunk) == 0 for chunk in chunks):
        raise ValueError("ComfyUI token list is empty; tokenize with clip.tokenize(text, return_word_ids=True)")
    lookup = _as_lookup(id_to_token)
    flat: list[tuple[str, int, bool]] = []  # (token string, word id, is end-of-text)
    for c, chunk in enumerate(chunks):
        for entry in chunk:
            if len(entry) < 3:
                raise ValueError(
                    f"chunk {c} has an entry {tuple(entry)!r} without a word id; "
                    "tokenize with clip.tokenize(text, return_word_ids=True)"
                )
            token, word_id = entry[0], int(entry[2])
            flat.append((_comfy_token_string(token, word_id, lookup), word_id, False))

    # Keep positions through the last non-padding token of the last chunk (its end token).
    last_chunk_start = len(flat) - len(chunks[-1])
    last_word_at = max((i for i, (_, wid, _) in enumerate(flat) if wid != 0), default=0)
    end = max(last_word_at + 1, last_chunk_start + 1)
    if end < len(flat):
        end += 1  # the end token after the last word
    tokens = [t for t, _, _ in flat[:end]]

    if lookup is not None and any(t.startswith(WORD_START) for t, _, _ in flat[:end]):
        return PromptTokens(prompt=prompt, tokens=tokens, words=_sentencepiece_words(flat[:end]))
    words: list[Word] = []
    open_word: Word | None = None  # a word still collecting pieces
    open_id = 0
    for i, (tok, wid, _) in enumerate(flat[:end]):
        if wid == 0:
            continue  # start/end/padding; a long word that ComfyUI broke across chunks goes on after them
        if open_word is None or wid != open_id:
            open_word = Word(text="", token_indices=[])
            open_id = wid
            words.append(open_word)
        open_word.token_indices.append(i)
        if lookup is not None:
            open_word.text += token_text(tok)
            if tok.endswith(END_OF_WORD):
                open_word = None
    names = prompt.split() if prompt else []
    if lookup is None:
        if len(names) == len(words):
            for w, name in zip(words, names):
                w.text = name
        else:
            ids = sorted({wid for _, wid, _ in flat[:end] if wid})
            for w, wid in zip(words, ids):
                w.text = f"word{wid}"
    return PromptTokens(prompt=prompt, tokens=tokens, words=words)


def _sentencepiece_words(flat: list[tuple[str, int, bool]]) -> list[Word]:
    """Words of a sentencepiece (T5) token list: split where a piece starts with ``▁`` (and at
    punctuation), as the core splits them, within each of ComfyUI's word-id runs."""
    words: list[Word] = []
    i = 0
    while i < len(flat):
        wid = flat[i][1]
        if wid == 0:
            i += 1
            continue
        j = i
        while j < len(flat) and flat[j][1] == wid:
            j += 1
        words += words_from_tokens([t for t, _, _ in flat[i:j]], offset=i, style="sentencepiece")
        i = j
    return words


def _as_lookup(id_to_token) -> Callable[[int], str] | None:
    if id_to_token is None:
        return None
    if callable(id_to_token) and not isinstance(id_to_token, Mapping):
        return id_to_token
    table = id_to_token
    return lambda i: table.get(i, f"<{i}>")


def _comfy_token_string(token, word_id: int, lookup) -> str:
    if not isinstance(token, int):
        try:
            token = int(token)
        except (TypeError, ValueError):
            return "<embedding>"  # a textual-inversion vector in place of a token id
    if lookup is not None:
        return str(lookup(token))
    return f"<{token}>" if word_id == 0 else str(token)


def joint_context_tokens(
    streams: Mapping[str, PromptTokens],
    lengths: Mapping[str, int],
    parts: Sequence[Sequence[str]],
    context_length: int,
) -> tuple[PromptTokens, list[int], list[list]] | None:
    """Which of a prompt's token streams make up a context of ``context_length`` positions.

    ``parts`` lists, in context order, the streams that may provide each part (SD3:
    ``[("l", "g"), ("t5xxl",)]``: the CLIP part, then T5); ``lengths`` is each stream's length as
    encoded (every chunk, padding included). The parts present are the longest run, in order,
    whose lengths add up to the context (SD3 loaded without T5 has the CLIP part only). Returns
    the `PromptTokens` of the kept positions (each part through its end token, side by side, a
    word keeping its positions in every part), those positions in the context, and the layout
    ``[[stream, kept], ...]``; None when no combination fits."""
    available = []
    for alternatives in parts:
        name = next((n for n in alternatives if n in streams and n in lengths), None)
        if name is not None:
            available.append(name)
    for count in range(len(available), 0, -1):
        for combo in itertools.combinations(available, count):
            if sum(int(lengths[n]) for n in combo) != int(context_length):
                continue
            positions: list[int] = []
            offset = 0
            for n in combo:
                positions += range(offset, offset + len(streams[n].tokens))
                offset += int(lengths[n])
            tokens = concat_prompt_tokens([streams[n] for n in combo], [len(streams[n].tokens) for n in combo])
            return tokens, positions, [[n, len(streams[n].tokens)] for n in combo]
    return None
