import pytest

from explain.embedded import world
from explain.sweep.words import contrast, counterfactual_prompts, edited_prompt, lexicon_class, word_spans


def test_contrast_gives_a_value_of_the_same_kind():
    for word in ("red", "white", "small", "big", "circle", "star", "above", "left", "top"):
        other = contrast(word)
        assert other is not None and other != word
        assert lexicon_class(other) == lexicon_class(word), (word, other)


def test_contrast_of_a_world_colour_is_the_opposite_hue_not_in_the_prompt():
    assert contrast("red") == "cyan" and contrast("cyan") == "red" and contrast("blue") == "yellow"
    # the opposite hue is taken by another object: the nearest free one
    assert contrast("red", avoid=["red", "cyan", "circle"]) == "green"
    assert contrast("red", avoid=list(world.COLORS)) is None


def test_contrast_keeps_the_embedded_world_in_its_own_vocabulary():
    assert contrast("circle", avoid=["circle", "square"]) == "triangle"
    # every world shape already in the prompt: still a world shape, never "star"
    assert contrast("circle", avoid=list(world.SHAPES)) in world.SHAPES
    assert contrast("under") == "above" and contrast("big") == "small"


def test_words_without_a_contrast():
    for word in ("a", "the", "in", "row", "center", "dog", ","):
        assert contrast(word) is None


def test_edited_prompt_keeps_the_users_punctuation_and_case():
    prompt = "A Red circle, a red triangle and a blue square."
    words = ["a", "red", "circle", ",", "a", "red", "triangle", "and", "a", "blue", "square", "."]
    assert edited_prompt(prompt, words, 1, "green") == "A green circle, a red triangle and a blue square."
    # the second "red" is the sixth word, not the first match
    assert edited_prompt(prompt, words, 5, "cyan") == "A Red circle, a cyan triangle and a blue square."
    assert edited_prompt(prompt, words, 2) == "A Red, a red triangle and a blue square."
    assert edited_prompt(prompt, words, 0) == "Red circle, a red triangle and a blue square."
    assert edited_prompt(prompt, words, 11) == "A Red circle, a red triangle and a blue square"
    # punctuation removed between two words leaves one space, not a run-together word
    assert edited_prompt(prompt, words, 3) == "A Red circle a red triangle and a blue square."
    assert edited_prompt("red,blue", ["red", ",", "blue"], 1) == "red blue"


def test_edited_prompt_falls_back_to_the_words_when_the_prompt_does_not_hold_them():
    # a tokenizer normalised "Café" to "cafe": the words cannot be located, so they are joined
    assert word_spans("a Café sign", ["a", "cafe", "sign"]) is None
    assert edited_prompt("a Café sign", ["a", "cafe", "sign"], 2, "door") == "a cafe door"
    assert edited_prompt("a Café sign", ["a", "cafe", "sign"], 0) == "cafe sign"
    with pytest.raises(IndexError, match="outside the prompt's 3 words"):
        edited_prompt("a Café sign", ["a", "cafe", "sign"], 3)


def test_counterfactual_prompts_swap_what_has_a_contrast_and_remove_the_rest():
    prompt = "A red circle, in the center."
    words = ["a", "red", "circle", ",", "in", "the", "center", "."]
    got = counterfactual_prompts(prompt, words)
    assert got[1] == ("swap: cyan", "A cyan circle, in the center.")
    assert got[2] == ("swap: square", "A red square, in the center.")
    assert got[6] == ("removed", "A red circle, in the.")
    assert [edit for edit, _ in got].count("removed") == 6
