"""ComfyUI's token lists as the core's `PromptTokens`: which context positions belong to which
prompt word.

``clip.tokenize(text, return_word_ids=True)`` lists ``[(token, weight, word_id)]`` in chunks of
77 that ComfyUI concatenates into one longer context (nothing is cut), so positions count across
chunks."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from explain.tokens import END_OF_WORD, PromptTokens, token_text
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
    embedding tensors (textual inversion) are named ``<embedding>``."""
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
