import random

import numpy as np
import pytest
import torch

from explain.embedded import world


def test_same_seed_same_scene_and_pixels():
    a, b = world.scene_from_seed(5), world.scene_from_seed(5)
    assert a == b and a.caption == b.caption
    ia, ma = world.render(a)
    ib, mb = world.render(b)
    assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    assert world.scene_from_seed(6).caption != a.caption or world.scene_from_seed(6).objects != a.objects


def test_masks_match_the_pixels_drawn():
    for s in world.scenes(40, seed=1):
        img, masks = world.render(s, size=64)
        assert masks.shape == (len(s.objects), 64, 64)
        for obj, mask in zip(s.objects, masks):
            assert mask.sum() > 20
            inside = img[mask].astype(float) / 255
            # Pixels under the mask carry the object's colour (up to the shading), not the background.
            assert np.abs(inside.mean(0) - np.array(world.COLORS[obj.color])).max() < 0.12
            cy, cx = np.argwhere(mask).mean(0) / 64
            assert abs(cx - obj.cx) < 0.05 and abs(cy - obj.cy) < 0.06
        # objects never overlap
        assert masks.sum(0).max() <= 1


def test_captions_state_the_attributes():
    for s in world.scenes(60, seed=2):
        for o in s.objects:
            assert o.color in s.caption and o.shape in s.caption
        kind, _, name = s.layout.partition(":")
        if kind == "relation":
            a, b = s.objects
            if name == "above":
                assert a.cy < b.cy
            if name == "left of":
                assert a.cx < b.cx
        if kind == "row":
            assert [o.cx for o in s.objects] == sorted(o.cx for o in s.objects)


def test_background_is_not_flat_and_wording_varies():
    img, masks = world.render(world.scene_from_seed(3))
    bg = img[~masks.any(0)].astype(float)
    assert bg.std(0).max() > 3
    captions = {s.caption.split(" a ")[0] for s in world.scenes(200, seed=4)}
    assert len(captions) > 2  # prefixes and synonyms vary


def test_held_out_split_is_disjoint():
    train = world.scenes(300, seed=9, split="train")
    held = world.scenes(100, seed=9, split="held_out")
    assert not any(world.is_held_out(s.key) for s in train)
    assert all(world.is_held_out(s.key) for s in held)
    assert {s.key for s in train}.isdisjoint({s.key for s in held})


def test_vectorised_renderer_matches_reference():
    batch = world.scenes(16, seed=8)
    fast = world.render_batch(batch)
    slow = torch.stack([world.render_tensor(s)[0] for s in batch]) * 2 - 1
    assert torch.allclose(fast, slow, atol=1e-4)


def test_vectorised_coverage_matches_reference():
    batch = world.scenes(16, seed=9)
    cover = world.coverage_parameters(world.scene_parameters(batch))
    for scene, fast in zip(batch, cover):
        slow = world.render_tensor(scene)[1]
        k = len(scene.objects)
        assert torch.allclose(fast[:k], slow, atol=1e-4)
        assert not fast[k:].any()  # absent objects cover nothing


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        world.sample_scene(random.Random(0), split="test")
    with pytest.raises(ValueError, match="num_objects"):
        world.sample_scene(random.Random(0), num_objects=4)


def test_object_word_indices_name_each_object():
    for s in world.scenes(50, seed=12):
        words = world.caption_words(s.caption)
        spans = world.object_word_indices(s)
        assert len(spans) == len(s.objects)
        for obj, span in zip(s.objects, spans):
            named = [words[i] for i in span]
            assert obj.color in named and obj.shape in named
