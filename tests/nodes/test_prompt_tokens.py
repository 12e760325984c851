"""ComfyUI token lists ([(token, weight, word_id)] chunks of 77) as PromptTokens."""

import pytest

from explain.testing import tiny_tokenizer
from nodes.prompt_tokens import comfy_prompt_tokens


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _pairs(words):
    return [(w.text, w.token_indices) for w in words]


def _comfy_chunks(tokenizer, prompt, word_ids):
    """ComfyUI-style chunks: one list per 77 positions, start / end / padding have word id 0."""
    ids = tokenizer(prompt).input_ids[1:-1]
    assert len(ids) == len(word_ids)
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks, body = [], list(zip(ids, word_ids))
    while True:
        part, body = body[:75], body[75:]
        chunk = [(start, 1.0, 0)] + [(t, 1.0, w) for t, w in part] + [(end, 1.0, 0)]
        chunks.append(chunk + [(end, 1.0, 0)] * (77 - len(chunk)))
        if not body:
            return chunks


def test_comfy_tokens_with_vocabulary_split_words_inside_a_weighted_segment(tokenizer):
    vocab = {v: k for k, v in tokenizer.get_vocab().items()}
    ids = tokenizer("a red zebra").input_ids[1:-1]
    # New ComfyUI gives one word id per weighted segment: the whole prompt is word 1 here.
    chunks = _comfy_chunks(tokenizer, "a red zebra", [1] * len(ids))
    pt = comfy_prompt_tokens(chunks, vocab, "a red zebra")
    assert _pairs(pt.words) == [("a", [1]), ("red", [2]), ("zebra", list(range(3, 3 + len(ids) - 2)))]
    assert pt.tokens[0] == "<|startoftext|>" and pt.tokens[-1] == "<|endoftext|>" and len(pt.tokens) == len(ids) + 2
    # Without a vocabulary each word id is one word, named from the prompt when the counts agree.
    per_word = [1, 2] + [3] * (len(ids) - 2)
    pt = comfy_prompt_tokens(_comfy_chunks(tokenizer, "a red zebra", per_word), None, "a red zebra")
    assert _pairs(pt.words) == [("a", [1]), ("red", [2]), ("zebra", list(range(3, len(ids) + 1)))]


def test_comfy_long_prompt_spans_chunks_with_global_positions(tokenizer):
    vocab = {v: k for k, v in tokenizer.get_vocab().items()}
    prompt = " ".join(["red"] * 80 + ["circle"])
    chunks = _comfy_chunks(tokenizer, prompt, list(range(1, 82)))
    assert len(chunks) == 2
    pt = comfy_prompt_tokens(chunks, vocab, prompt)
    assert len(pt.words) == 81 and not pt.truncated
    assert pt.words[75].token_indices == [77 + 1]  # first word of the second chunk, after its start token
    assert pt.words[-1].text == "circle" and pt.tokens[pt.words[-1].token_indices[0]] == "circle</w>"
    assert pt.tokens[-1] == "<|endoftext|>" and len(pt.tokens) == 77 + 1 + 6 + 1


def test_comfy_word_broken_across_chunks_stays_one_word(tokenizer):
    vocab = {v: k for k, v in tokenizer.get_vocab().items()}
    prompt = " ".join(["red"] * 70) + " zebrafishes"  # 11 character tokens, broken at the chunk edge
    n = 70 + len("zebrafishes")
    chunks = _comfy_chunks(tokenizer, prompt, list(range(1, 71)) + [71] * len("zebrafishes"))
    pt = comfy_prompt_tokens(chunks, vocab, prompt)
    last = pt.words[-1]
    assert last.text == "zebrafishes" and len(last.token_indices) == len("zebrafishes")
    assert last.token_indices[4] == 75 and last.token_indices[5] == 78  # skips end, start tokens
    assert len(pt.words) == 71 and n == 81


def test_comfy_embeddings_and_bad_input():
    import torch

    chunk = [(1, 1.0, 0), (torch.zeros(4), 1.0, 1), (2, 1.0, 0)]
    pt = comfy_prompt_tokens([chunk], None, "embedding:x")
    assert pt.tokens[1] == "<embedding>" and _pairs(pt.words) == [("embedding:x", [1])]
    with pytest.raises(ValueError, match="return_word_ids=True"):
        comfy_prompt_tokens([[(1, 1.0), (2, 1.0)]])
    with pytest.raises(ValueError, match="empty"):
        comfy_prompt_tokens([])
