import json

import pytest

from explain.embedded import world
from explain.sweep import shapes
from explain.sweep.prompts import read_prompts


# Scenes no benchmark uses: docs/sweep's 200-scene report is --world-seed 0, bench_sweep.py's 7.
TEST_SEEDS = (9, 5)


def test_the_tests_scenes_are_not_the_benchmarks():
    benchmark = {r.prompt for r in shapes.scene_rows(200, "held_out", seed=0)} | {r.prompt for r in shapes.scene_rows(16, "held_out", seed=7)}
    used = {r.prompt for r in shapes.scene_rows(5, "held_out", seed=TEST_SEEDS[0])} | {r.prompt for r in shapes.scene_rows(2, "held_out", seed=TEST_SEEDS[1])}
    assert not used & benchmark


def test_scenes_round_trip_through_json_and_a_prompt_file(tmp_path):
    rows = shapes.scene_rows(5, "held_out", seed=TEST_SEEDS[0])
    assert [r.id for r in rows] == [f"scene-heldout-{TEST_SEEDS[0]}-{i:05d}" for i in range(5)]
    assert [r.id for r in shapes.scene_rows(2, "held_out", seed=TEST_SEEDS[0])] == [r.id for r in rows[:2]]  # a prefix is stable
    originals = world.scenes(5, seed=TEST_SEEDS[0], split="held_out")
    for row, scene in zip(rows, originals):
        back = shapes.scene_from_json(json.loads(json.dumps(row.truth["scene"])))
        assert back == scene and back.background == scene.background and row.prompt == scene.caption
        assert row.truth["scene"]["held_out"] is True
    again = read_prompts(shapes.write_rows(rows, tmp_path / "scenes.jsonl"))
    assert [(r.id, r.prompt, r.truth) for r in again] == [(r.id, r.prompt, json.loads(json.dumps(r.truth))) for r in rows]


@pytest.mark.parametrize(
    "scene, message",
    [
        ({"caption": "x", "layout": "row"}, "not a shapes-world scene (KeyError"),
        ({"caption": "x", "layout": "row", "objects": [{"shape": "star", "color": "red", "size": "small", "cx": 0.5, "cy": 0.5}]}, "does not know: small red star"),
        ({"caption": "x", "layout": "row", "objects": []}, "has 1 to 3 objects"),
    ],
)
def test_a_malformed_scene_says_what_is_wrong(scene, message):
    with pytest.raises(ValueError) as info:
        shapes.scene_from_json(scene)
    assert message in str(info.value)


def test_ground_truth_mode_scores_the_embedded_model_against_the_checker(tmp_path):
    from explain import embedded

    if not embedded.is_available():
        pytest.skip("the embedded model's weights are not in explain/models/")
    from explain.adapters.diffusers.loading import load_model
    from explain.sweep import protocol
    from explain.sweep.manifest import SweepFolder
    from explain.sweep.runner import run_sweep

    pipe, name = load_model(None, "cpu", "float32")
    rows = shapes.scene_rows(2, "held_out", seed=TEST_SEEDS[1])
    settings = protocol.resolve("default", model="embedded", embedded=True, analyses=("concepts", "recovery", "pointing", "layers", "settle"))
    run_sweep(rows, tmp_path, settings, device="cpu", progress=False, load_model=lambda *a: (pipe, name))
    records = {r["id"]: r for r in SweepFolder(tmp_path).read_records()}
    assert all(r["status"] == "ok" for r in records.values()), [r["error"] for r in records.values()]
    for row in rows:
        r = records[row.id]
        objects = {}
        for o in r["tables"]["objects"]:
            objects.setdefault(o["object"], {}).update(o)
        scene = shapes.scene_from_json(row.truth["scene"])
        assert len(objects) == len(scene.objects) == r["columns"]["gt_objects"]
        for k, o in objects.items():
            assert (o["shape"], o["color"]) == (scene.objects[k].shape, scene.objects[k].color)
            assert o["found"] and o["pointing_all_raw"] is True  # the shipped model's word maps find these objects
            assert 0 < o["iou_all_raw"] <= 1 and 0 < o["mask_area"] < 0.5
            assert o["settle_color"] is not None and 0 <= o["settle_color"] < 20
        layers = r["tables"]["layers"]
        assert len(layers) == r["columns"]["attention_layers"] > 0
        assert all(0 < x["word_share"] < 1 and 0 <= x["pointing"] <= 1 for x in layers)
        assert "recovered_objects" in r["details"]["r1_curves"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ground_truth"]["found"] == sum(len(shapes.scene_from_json(r.truth["scene"]).objects) for r in rows)
    assert report["timing_truth"]["objects"] == report["ground_truth"]["objects"]
    assert (tmp_path / "objects.csv").read_text().count("\n") == report["ground_truth"]["objects"] + 1
