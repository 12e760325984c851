import warnings

import pytest

from explain.testing import tiny_tokenizer
from explain.tokens import (
    PromptTruncatedWarning,
    comfy_prompt_tokens,
    pad_token_list,
    token_text,
    tokenize_prompt,
    words_from_tokens,
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _pairs(words):
    return [(w.text, w.token_indices) for w in words]


def test_words_merge_bpe_pieces_at_end_of_word_markers():
    tokens = ["<|startoftext|>", "a</w>", "zeb", "ra</w>", ",</w>", "<|endoftext|>", "<|endoftext|>"]
    assert _pairs(words_from_tokens(tokens)) == [("a", [1]), ("zebra", [2, 3]), (",", [4])]
    assert _pairs(words_from_tokens(["x", "y</w>"], offset=5)) == [("xy", [5, 6])]


def test_token_text_decodes_clip_byte_alphabet():
    assert token_text("caf\u00c3\u00a9</w>") == "café"  # é is two bytes, shown as Ã© in CLIP's vocabulary
    assert token_text("red</w>") == "red"


def test_hf_tokenizer_single_and_multi_token_words(tokenizer):
    pt = tokenize_prompt(tokenizer, "a red circle above a zebrafish, hello-world")
    assert pt.tokens[0] == "<|startoftext|>" and pt.tokens[-1] == "<|endoftext|>"
    words = _pairs(pt.words)
    assert words[:5] == [("a", [1]), ("red", [2]), ("circle", [3]), ("above", [4]), ("a", [5])]
    zebrafish = dict((w.text, w.token_indices) for w in pt.words)["zebrafish"]
    assert zebrafish == list(range(6, 6 + len("zebrafish")))  # unknown word: one token per character
    assert [w.text for w in pt.words][-4:] == [",", "hello", "-", "world"]
    assert not pt.truncated
    # Every word position is a real token position, and each position belongs to at most one word.
    flat = [i for w in pt.words for i in w.token_indices]
    assert len(flat) == len(set(flat)) == len(pt.tokens) - 2


def test_truncation_warns_naming_the_dropped_words(tokenizer):
    prompt = "a red circle " * 25 + "blue square"
    with pytest.warns(PromptTruncatedWarning, match="blue square") as rec:
        pt = tokenize_prompt(tokenizer, prompt)
    assert "Shorten the prompt" in str(rec[0].message)
    assert len(pt.tokens) == tokenizer.model_max_length == 77
    assert pt.tokens[-1] == "<|endoftext|>"
    assert pt.dropped_words[-2:] == ["blue", "square"] and pt.truncated
    assert max(i for w in pt.words for i in w.token_indices) == 75


def test_prompt_at_the_limit_does_not_warn(tokenizer):
    prompt = " ".join(["red"] * 75)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        pt = tokenize_prompt(tokenizer, prompt)
    assert len(pt.tokens) == 77 and len(pt.words) == 75


def test_bad_prompt_type_is_a_clear_error(tokenizer):
    with pytest.raises(TypeError, match="prompt must be a string"):
        tokenize_prompt(tokenizer, ["a", "b"])


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


def test_pad_token_list():
    assert pad_token_list(["a", "b"], 4) == ["a", "b", "<|endoftext|>", "<|endoftext|>"]
    assert pad_token_list(["a", "b", "c"], 2) == ["a", "b"]


def test_sentencepiece_words_start_at_their_marker_and_punctuation_stands_alone():
    from explain.testing import tiny_t5_tokenizer

    t5 = tiny_t5_tokenizer()
    pieces = tokenize_prompt(t5, "a red circle, above", max_length=16)
    assert pieces.tokens == ["\u2581a", "\u2581red", "\u2581circle", ",", "\u2581above", "</s>"]  # no start token
    assert _pairs(pieces.words) == [("a", [0]), ("red", [1]), ("circle", [2]), (",", [3]), ("above", [4])]
    assert _pairs(words_from_tokens(["\u2581zeb", "ra", "\u2581a"], style="sentencepiece")) == [("zebra", [0, 1]), ("a", [2])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut = tokenize_prompt(t5, "a red circle above a blue square", max_length=4)
    assert cut.tokens[-1] == "</s>" and len(cut.tokens) == 4 and "square" in cut.dropped_words
    assert any(issubclass(w.category, PromptTruncatedWarning) for w in caught)


def test_concatenated_contexts_join_a_words_positions_across_encoders(tokenizer):
    from explain.testing import tiny_t5_tokenizer
    from explain.tokens import concat_prompt_tokens

    clip = tokenize_prompt(tokenizer, "a red circle")
    t5 = tokenize_prompt(tiny_t5_tokenizer(), "a red circle", max_length=16)
    joined = concat_prompt_tokens([clip, t5], [6, 5], ["<|endoftext|>", "<pad>"])
    assert joined.tokens == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>", "<|endoftext|>",
                             "\u2581a", "\u2581red", "\u2581circle", "</s>", "<pad>"]
    assert _pairs(joined.words) == [("a", [1, 6]), ("red", [2, 7]), ("circle", [3, 8])]
    with pytest.raises(ValueError, match="lengths"):
        concat_prompt_tokens([clip], [6, 5])
