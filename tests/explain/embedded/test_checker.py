import numpy as np

from explain.embedded import checker, world


def test_checker_scores_generator_images():
    scores = checker.Scores()
    for s in world.scenes(150, seed=21, split="any"):
        scores.add(checker.check_scene(world.render(s)[0], s))
    d = scores.as_dict()
    for key in ("color", "shape", "size", "count", "position_relation"):
        assert d[key] >= 0.98, (key, d)


def test_checker_notices_wrong_images():
    scenes = world.scenes(40, seed=22, num_objects=2)
    scores = checker.Scores()
    for s, other in zip(scenes, scenes[1:] + scenes[:1]):
        scores.add(checker.check_scene(world.render(other)[0], s))  # the wrong image for each caption
    d = scores.as_dict()
    assert d["color"] < 0.7 and d["shape"] < 0.7


def test_empty_background_has_no_objects():
    s = world.scene_from_seed(0)
    flat = world.Scene((), "", "row", s.background)
    img = (world.render_tensor(flat)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert checker.detect_objects(img) == []


def test_relation_and_position_readout():
    s = world.scenes(1, seed=3, num_objects=1)[0]
    d = checker.detect_objects(world.render(s)[0])[0]
    assert checker.position_of(d) == s.layout.split(":")[1]
