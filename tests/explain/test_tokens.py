import warnings

import pytest

from explain.testing import tiny_tokenizer
from explain.tokens import (
    PromptTruncatedWarning,
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
