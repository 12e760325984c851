import math

import numpy as np
import pytest

from explain.sweep import aggregate as agg


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = list(np.random.default_rng(1).normal(3.0, 1.0, 200))
    a, b = agg.bootstrap_mean(values), agg.bootstrap_mean(values)
    assert a == b and a["n"] == 200
    lo, hi = a["ci"]
    assert lo < a["mean"] < hi and hi - lo < 0.5  # ~ 4 standard errors of 1/sqrt(200)
    assert agg.bootstrap_mean([True, False, None, float("nan"), True])["mean"] == pytest.approx(2 / 3)
    assert agg.bootstrap_mean([]) == {"n": 0, "mean": None, "ci": [None, None]}


def test_bootstrap_curve_is_stepwise():
    curves = [[0.0, 1.0, 2.0], [0.0, 3.0, 2.0]]
    c = agg.bootstrap_curve(curves)
    assert c["mean"] == [0.0, 2.0, 2.0]
    assert c["lo"][0] == c["hi"][0] == 0.0 and c["lo"][1] >= 1.0 and c["hi"][1] <= 3.0


def test_describe_steps_counts_never_in_the_last_bin():
    d = agg.describe_steps([0, 1, 1, 3, None], steps=4)
    assert d["hist"] == [1, 2, 0, 1, 0] and d["median"] == 1.0 and d["n"] == 4


def rec(i, **columns):
    return {"id": f"p{i}", "index": i, "status": "ok", "columns": columns, "details": {}, "tables": {}, "run": {"total_seconds": 2.0, "seconds": {"generate": 1.0}}}


def test_auc_beats_are_compared_prompt_by_prompt_in_the_right_direction():
    records = []
    for i, (ins, rnd_ins, dele, rnd_del) in enumerate([(0.1, 0.5, 0.9, 0.5), (0.6, 0.5, 0.4, 0.5), (0.2, 0.3, 0.8, 0.2)]):
        r = rec(i, rise_insertion_latent_auc=ins, baseline_random_insertion_latent_auc=rnd_ins, rise_deletion_latent_auc=dele, baseline_random_deletion_latent_auc=rnd_del)
        r["details"] = {
            "rise_curves": {"insertion_latent": [1.0, 0.2, 0.0], "deletion_latent": [0.0, 0.8, 1.0]},
            "baseline_random_curves": {"insertion_latent": [1.0, 0.5, 0.0], "deletion_latent": [0.0, 0.5, 1.0]},
        }
        records.append(r)
    out = agg.aggregate(records, total=3)
    ins = out["auc"]["methods"]["rise"]["insertion_latent"]
    assert ins["beats"]["random"]["mean"] == pytest.approx(2 / 3)  # lower insertion AUC is better
    assert out["auc"]["methods"]["rise"]["deletion_latent"]["beats"]["random"]["mean"] == pytest.approx(2 / 3)  # higher deletion is better
    assert ins["mean"] == pytest.approx(0.3)
    assert ins["paper_auc"] == pytest.approx(0.35)  # mean curve [1, .2, 0] is already min-max: trapezoid 0.35
    assert out["auc"]["baselines"]["random"]["insertion_latent"]["paper_auc"] == pytest.approx(0.5)
    assert out["timing"]["prompts_per_hour_per_process"] == pytest.approx(1800)


def test_order_agreement_of_word_timing_with_settle_steps():
    objects = [
        # colour settles before shape, and its word emerges first: agree
        {"id": "p0", "object": 0, "settle_color": 0, "settle_shape": 5, "settle_size": 2, "emergence_color": 1, "emergence_shape": 4, "emergence_size": None},
        # colour settles first, but its word emerges last: disagree
        {"id": "p1", "object": 0, "settle_color": 1, "settle_shape": 9, "settle_size": 9, "emergence_color": 8, "emergence_shape": 2, "emergence_size": 3},
        # same settle step: not counted; a tie in word timing: a miss
        {"id": "p2", "object": 0, "settle_color": 3, "settle_shape": 3, "settle_size": 6, "emergence_color": 2, "emergence_shape": 2, "emergence_size": 2},
    ]
    t = agg._timing_truth([], objects, steps=10)
    pairs = t["order_agreement"]["emergence"]["pairs"]
    assert pairs["color<>shape"]["n"] == 2 and pairs["color<>shape"]["mean"] == 0.5
    assert pairs["color<>size"]["n"] == 2 and pairs["color<>size"]["mean"] == 0.0  # p1 disagrees, p2 ties
    assert pairs["shape<>size"]["n"] == 1 and pairs["shape<>size"]["mean"] == 0.0
    assert "decision" not in t["order_agreement"]
    assert t["settle"]["color"]["median"] == 1.0


def test_secondary_tables_merge_one_row_per_object():
    r = rec(0)
    r["tables"] = {
        "objects": [{"id": "p0", "analysis": "pointing", "object": 0, "found": True}, {"id": "p0", "analysis": "settle", "object": 0, "settle_color": 2}],
        "words": [{"id": "p0", "analysis": "concepts", "word": "red"}],
    }
    tables = agg.other_tables([r])
    assert tables["objects"] == [{"id": "p0", "object": 0, "found": True, "settle_color": 2}]
    assert tables["words"][0]["word"] == "red"
    assert agg.columns_of([{"b": 1, "id": 2}, {"a": 3}]) == ["id", "a", "b"]
    assert math.isclose(agg.paper_auc([[0, 1], [0, 1]]), 0.5)


def test_r3_class_sums_and_their_paired_difference_from_uniform():
    def r3(i, uniform, early):
        r = rec(i, r3_early_final_change=0.1 * (i + 1))
        r["details"] = {
            "r3_schedules": {
                "uniform": {"classes": ["shape", "colour", "shape"], "step_sum": uniform, "normalized": [[0, 1], [1, 0], [0.5, 0.5]]},
                "early": {"classes": ["shape", "colour", "shape"], "step_sum": early, "normalized": [[1, 0], [0, 1], [0.5, 0.5]]},
            }
        }
        return r

    out = agg.aggregate([r3(0, [1.0, 2.0, 3.0], [2.0, 1.0, 3.0]), r3(1, [0.0, 1.0, 1.0], [0.0, 3.0, 2.0])], total=2)["r3"]
    shape, colour = out["classes"]["shape"], out["classes"]["colour"]
    assert shape["uniform"]["tally"] == 5.0 and shape["early"]["tally"] == 7.0
    assert shape["early"]["minus_uniform"]["mean"] == pytest.approx(((5 - 4) + (2 - 1)) / 2)  # paired, prompt by prompt
    assert colour["early"]["minus_uniform"]["mean"] == pytest.approx(((1 - 2) + (3 - 1)) / 2)
    assert "minus_uniform" not in shape["uniform"]
    assert shape["uniform"]["share_of_tally"] == pytest.approx(5 / 8)
    assert out["curves"]["early"]["shape"]["mean"] == [0.75, 0.25]  # two shape words per prompt, both prompts
    assert out["numbers"]["r3_early_final_change"]["mean"] == pytest.approx(0.15)
