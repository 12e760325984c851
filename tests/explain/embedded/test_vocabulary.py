import pytest
from transformers import CLIPTokenizer

from explain.embedded.vocabulary import build_merges, unknown_words, write_clip_tokenizer
from explain.embedded.world import vocabulary


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = write_clip_tokenizer(vocabulary(), tmp_path_factory.mktemp("tok"))
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def test_every_grammar_word_is_one_token_and_round_trips(tokenizer):
    for word in vocabulary():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, word
        assert tokenizer.decode(ids).strip() == word


def test_caption_round_trip(tokenizer):
    caption = "a picture of a small red circle, a blue square and a green triangle from left to right"
    ids = tokenizer(caption).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",") == caption


def test_out_of_vocabulary_words_are_reported(tokenizer):
    assert unknown_words(tokenizer, "a red dog above a Zebra", vocabulary()) == ["dog", "zebra"]
    assert unknown_words(tokenizer, "a red circle above a blue square", vocabulary()) == []
    # unknown words still tokenize, as characters
    assert len(tokenizer("dog", add_special_tokens=False).input_ids) == 3


def test_conflicting_merges_are_repaired():
    words = ["ab", "bc", "abc", "cab", "bca"]
    from explain.embedded.vocabulary import _bpe

    ranks = {m: i for i, m in enumerate(build_merges(words))}
    for w in words:
        assert _bpe(w, ranks) == [w + "</w>"]


def test_bad_words_rejected(tmp_path):
    with pytest.raises(ValueError, match="lower-case"):
        write_clip_tokenizer(["Red"], tmp_path)
