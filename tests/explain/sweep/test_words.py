from explain.embedded import world
from explain.sweep.words import contrast, lexicon_class


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
