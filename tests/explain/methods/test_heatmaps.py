import pytest
import torch

from explain.methods import heatmaps
from explain.methods.heatmaps import (
    UnknownWordError,
    parse_steps,
    select_steps,
    word_heatmap,
    word_heatmaps,
)

from tests.explain.synthetic import synthetic_trace


def quadrant_of_max(heat: torch.Tensor) -> tuple[int, int]:
    h, w = heat.shape
    idx = int(heat.flatten().argmax())
    return int(idx // w >= h // 2), int(idx % w >= w // 2)


def test_word_heatmap_points_at_the_words_region_and_has_image_size():
    tr = synthetic_trace()
    red = word_heatmap(tr, "red")
    blue = word_heatmap(tr, "blue")
    assert red.shape == (32, 32) == blue.shape
    assert quadrant_of_max(red) == (0, 0)
    assert quadrant_of_max(blue) == (1, 1)
    assert red.min() == 0 and red.max() == pytest.approx(1.0)


def test_multi_token_word_is_merged_over_its_tokens():
    tr = synthetic_trace()
    maps = heatmaps.attention_maps(tr)
    merged = word_heatmap(tr, "circle", size="latent", normalize="none")
    assert torch.allclose(merged, maps[[3, 4]].mean(0))
    summed = word_heatmap(tr, "circle", size="latent", normalize="none", merge="sum")
    assert torch.allclose(summed, maps[3] + maps[4])


def test_phrase_and_list_merge_words():
    tr = synthetic_trace()
    maps = heatmaps.attention_maps(tr)
    phrase = word_heatmap(tr, "red circle", size="latent", normalize="none")
    listed = word_heatmap(tr, ["red", "circle"], size="latent", normalize="none")
    assert torch.allclose(phrase, maps[[2, 3, 4]].mean(0))
    assert torch.allclose(phrase, listed)


def test_step_range_changes_the_map():
    tr = synthetic_trace(steps=6)
    early = word_heatmap(tr, "blue", "0:2", size="latent", normalize="none")
    late = word_heatmap(tr, "blue", slice(4, None), size="latent", normalize="none")
    # the blue square's logits shrink with the step
    assert early.max() > late.max() * 1.2
    assert torch.allclose(word_heatmap(tr, "blue", [0, 1], size="latent", normalize="none"), early)
    assert torch.allclose(word_heatmap(tr, "blue", 5, size="latent", normalize="none"), heatmaps.attention_maps(tr, -1)[7])


def test_parse_and_select_steps():
    tr = synthetic_trace(steps=6)
    assert select_steps(tr, None) == list(range(6))
    assert select_steps(tr, "2:4") == [2, 3]
    assert select_steps(tr, "-2:") == [4, 5]
    assert select_steps(tr, "0,3,5") == [0, 3, 5]
    assert select_steps(tr, "::2") == [0, 2, 4]
    assert select_steps(tr, -1) == [5]
    assert parse_steps("all") is None
    with pytest.raises(ValueError, match="selects no steps; the trace has steps 0..5"):
        select_steps(tr, "4:2")
    with pytest.raises(IndexError, match="outside the trace"):
        select_steps(tr, 6)
    with pytest.raises(ValueError, match="cannot read the step selection"):
        select_steps(tr, "one:two")


def test_word_lists_split_on_commas_and_keep_phrases():
    assert heatmaps.parse_words(" red, blue square ,, ") == ["red", "blue square"]
    assert heatmaps.parse_words("") == [] and heatmaps.parse_words(None) == []


def test_unknown_word_lists_the_prompt_words():
    tr = synthetic_trace()
    with pytest.raises(UnknownWordError, match="'green' is not in the prompt; its words are: 'a', 'red', 'circle'") as err:
        word_heatmap(tr, "green")
    assert isinstance(err.value, ValueError) and not str(err.value).startswith('"')


def test_duplicate_words_get_unique_labels_and_indices_pick_them():
    tr = synthetic_trace()
    maps = word_heatmaps(tr, size="latent", normalize="none")
    assert list(maps) == ["a", "red", "circle", "above", "a (2)", "blue", "square"]
    second_a = word_heatmap(tr, 4, size="latent", normalize="none")
    assert torch.allclose(second_a, maps["a (2)"])
    assert list(word_heatmaps(tr, skip=("a", "above"))) == ["red", "circle", "blue", "square"]


def test_layer_and_resolution_subsets():
    tr = synthetic_trace(layers=True)
    fine = word_heatmap(tr, "red", resolutions=8)
    coarse = word_heatmap(tr, "red", resolutions=4)
    assert quadrant_of_max(fine) == (0, 0)
    assert quadrant_of_max(coarse) == (1, 0)  # the coarse layer sees it at the bottom left
    by_prefix = word_heatmap(tr, "red", layers="up_blocks")
    assert torch.allclose(by_prefix, coarse)
    both = heatmaps.attention_maps(tr, layers=list(tr.attention_layers))
    assert both.shape == tr.attention.shape[2:]
    with pytest.raises(ValueError, match="no attention layer named 'mid'; the trace has: down_blocks"):
        word_heatmap(tr, "red", layers="mid")
    with pytest.raises(ValueError, match=r"resolution \[2\]; the trace's layers have 8x8, 4x4"):
        word_heatmap(tr, "red", resolutions=2)
    with pytest.raises(ValueError, match="keep_layers=True"):
        word_heatmap(synthetic_trace(), "red", resolutions=8)


def test_resolutions_on_a_non_square_latent_match_either_side_or_the_pair():
    tr = synthetic_trace(layers=True)
    fine, coarse = list(tr.attention_layers)
    tr.attention_layers = {
        fine: torch.zeros(*tr.attention_layers[fine].shape[:3], 8, 12),
        coarse: torch.zeros(*tr.attention_layers[coarse].shape[:3], 4, 6),
    }
    assert heatmaps._layer_names(tr, None, 12) == heatmaps._layer_names(tr, None, 8) == [fine]
    assert heatmaps._layer_names(tr, None, (4, 6)) == [coarse]
    assert heatmaps._layer_names(tr, None, [6, 8]) == [fine, coarse]
    with pytest.raises(ValueError, match="layers have 8x12, 4x6"):
        heatmaps._layer_names(tr, None, (6, 4))


def test_negative_prompt_heatmap():
    tr = synthetic_trace(negative=True)
    green = word_heatmap(tr, "green", negative=True)
    assert quadrant_of_max(green) == (0, 1)
    with pytest.raises(UnknownWordError, match="not in the negative prompt; its words are: 'green', 'triangle'"):
        word_heatmap(tr, "red", negative=True)
    with pytest.raises(ValueError, match="no negative prompt; generate with a negative prompt"):
        word_heatmap(synthetic_trace(), "green", negative=True)


def test_normalisations_and_errors():
    tr = synthetic_trace()
    s = word_heatmap(tr, "red", normalize="sum", size="latent")
    assert s.sum() == pytest.approx(1.0, abs=1e-5)
    flat = heatmaps.normalize_map(torch.ones(4, 4))
    assert torch.count_nonzero(flat) == 0
    with pytest.raises(ValueError, match="unknown normalisation"):
        word_heatmap(tr, "red", normalize="zscore")
    with pytest.raises(ValueError, match="unknown merge"):
        word_heatmap(tr, "circle", merge="median")
    with pytest.raises(IndexError, match="item 1 is outside the batch"):
        word_heatmap(tr, "red", item=1)
    assert word_heatmap(tr, "red", size=(10, 12)).shape == (10, 12)
    assert word_heatmap(tr, "red", size=64, mode="bicubic").min() >= 0


def test_step_thirds_cover_every_step_once():
    for n in (1, 2, 3, 7, 20):
        covered = [i for _, s in heatmaps.step_thirds(n) for i in range(n)[s]]
        assert covered == list(range(n))


def test_pointing_and_iou_against_masks():
    heat = torch.zeros(8, 8)
    heat[1:3, 1:3] = 1.0
    heat[1, 1] = 2.0
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[0:4, 0:4] = True
    assert heatmaps.pointing_hit(heat, inside)
    assert not heatmaps.pointing_hit(heat, ~inside)
    exact = torch.zeros(8, 8, dtype=torch.bool)
    exact[1:3, 1:3] = True
    assert heatmaps.mask_iou(heat, exact, threshold=0.4) == pytest.approx(1.0)  # 1/2 and 2/2 after min-max
    assert heatmaps.mask_iou(heat, inside, threshold=0.4) == pytest.approx(4 / 16)
    assert heatmaps.mask_iou(heat, exact, threshold=0.9) == pytest.approx(1 / 4)
    # a low-resolution map is upsampled to the mask
    big = torch.zeros(32, 32, dtype=torch.bool)
    big[:16, :16] = True
    assert heatmaps.pointing_hit(heat, big)


def test_relative_maps_divide_by_the_words_total_at_each_pixel():
    tr = synthetic_trace()
    maps = heatmaps.attention_maps(tr)
    words = [1, 2, 3, 4, 5, 6, 7, 8]
    rel = word_heatmap(tr, "red", size="latent", normalize="none", relative=True)
    assert torch.allclose(rel, maps[2] / maps[words].sum(0))
    # relative maps of all words sum to one at every pixel (sub-word tokens summed)
    total = sum(word_heatmap(tr, w, size="latent", normalize="none", relative=True, merge="sum") for w in range(7))
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    both = word_heatmaps(tr, ["red", "blue"], relative=True)
    assert quadrant_of_max(both["red"]) == (0, 0) and quadrant_of_max(both["blue"]) == (1, 1)
