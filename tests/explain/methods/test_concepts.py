import json
import math

import pytest
import torch

from explain.methods.concepts import (
    ConceptScores,
    concept_scores,
    emergence_step,
    per_step_minmax,
    spearman,
    token_mass,
)

from tests.explain.synthetic import synthetic_trace


def test_mass_is_the_pixel_mean_of_the_words_tokens_summed():
    tr = synthetic_trace()
    sc = concept_scores(tr)
    per_token = tr.attention[:, 0].double().mean(dim=(-2, -1))
    j = sc.index("circle")
    assert torch.allclose(sc.mass[:, j], per_token[:, 3] + per_token[:, 4])
    assert sc.labels == ["a", "red", "circle", "above", "a (2)", "blue", "square"]


def test_share_excludes_special_tokens_and_sums_to_one_over_prompt_words():
    tr = synthetic_trace()
    sc = concept_scores(tr)
    assert torch.allclose(sc.share.sum(-1), torch.ones(tr.num_steps, dtype=torch.float64))
    # the start token takes a large part of the raw mass, so mass sums to less than one
    assert float(sc.mass.sum(-1).max()) < 0.9
    assert sc.token_mass.shape == (tr.num_steps, len(tr.tokens[0]))
    assert torch.allclose(sc.token_mass.sum(-1), torch.ones(tr.num_steps, dtype=torch.float64))


def test_normalized_is_per_step_minmax_across_words():
    tr = synthetic_trace()
    sc = concept_scores(tr)
    assert torch.allclose(sc.normalized.amax(-1), torch.ones(tr.num_steps, dtype=torch.float64))
    assert torch.allclose(sc.normalized.amin(-1), torch.zeros(tr.num_steps, dtype=torch.float64))
    assert sc.step_sum[sc.index("red")] == pytest.approx(float(sc.normalized[:, sc.index("red")].sum()))
    # asking for fewer words does not change their scores
    few = concept_scores(tr, ["red", "blue"])
    assert torch.allclose(few.normalized[:, 0], sc.normalized[:, sc.index("red")])
    assert torch.allclose(few.share[:, 1], sc.share[:, sc.index("blue")])


def test_trends_rising_and_falling_words():
    tr = synthetic_trace(steps=10)
    sc = concept_scores(tr)
    assert sc.spearman_rho[sc.index("red")] == pytest.approx(1.0)
    assert sc.spearman_rho[sc.index("blue")] == pytest.approx(-1.0)
    assert sc.peak_step[sc.index("red")] == 9 and sc.peak_step[sc.index("blue")] == 0
    assert sc.emergence_step[sc.index("blue")] == 0
    assert 2 <= sc.emergence_step[sc.index("red")] <= 7


def test_merged_phrase_and_step_subset():
    tr = synthetic_trace(steps=10)
    sc = concept_scores(tr, ["red circle", "blue square"], steps="5:")
    assert sc.steps == [5, 6, 7, 8, 9]
    assert sc.labels == ["red circle", "blue square"]
    assert (sc.normalized >= 0).all() and (sc.normalized <= 1).all()
    assert sc.emergence_step[0] >= 5 and sc.peak_step[0] == 9
    assert sc.timesteps == [float(t) for t in tr.timesteps[5:]]


def test_steps_given_out_of_order_are_read_in_denoising_order():
    tr = synthetic_trace(steps=10)
    shuffled = concept_scores(tr, ["red", "blue"], steps=[8, 2, 5, 2])
    ordered = concept_scores(tr, ["red", "blue"], steps=[2, 5, 8])
    assert shuffled.steps == [2, 5, 8]
    assert torch.equal(shuffled.share, ordered.share)
    assert shuffled.spearman_rho == ordered.spearman_rho == pytest.approx([1.0, -1.0])


def test_emergence_definition():
    c = torch.tensor([0.0, 0.1, 0.6, 0.2, 0.7, 0.8, 0.9, 1.0])
    assert emergence_step(c, 0.5, persist=3) == 4  # the blip at 2 does not last
    assert emergence_step(c, 0.5, persist=1) == 2
    assert emergence_step(torch.tensor([0.0, 0.0, 1.0]), 0.5, persist=3) == 2  # run cut by the end
    assert emergence_step(torch.full((5,), 0.3)) == 0


def test_spearman_against_known_values():
    x = torch.arange(6.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    y = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0, 6.0])
    # 1 - 6 sum d^2 / (n (n^2 - 1)) with d = (0, 1, -1, 1, -1, 0)
    assert spearman(x, y) == pytest.approx(1 - 6 * 4 / (6 * 35))
    ties = torch.tensor([1.0, 1.0, 2.0, 2.0])
    scipy_stats = pytest.importorskip("scipy.stats")
    assert spearman(torch.arange(4.0), ties) == pytest.approx(scipy_stats.spearmanr(range(4), ties.tolist())[0])
    assert spearman(x, torch.ones(6)) is None
    assert spearman(x[:1], x[:1]) is None


def test_per_step_minmax_ties_and_token_mass():
    v = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    assert per_step_minmax(v).tolist() == [[0.0, 0.5, 1.0], [1.0, 1.0, 1.0]]
    att = torch.zeros(1, 2, 2, 2)
    att[0, 0, 0, 0] = 1.0
    assert token_mass(att).tolist() == [[0.25, 0.0]]


def test_json_round_trip_and_table():
    sc = concept_scores(synthetic_trace())
    data = json.loads(json.dumps(sc.to_json()))
    back = ConceptScores.from_json(data)
    assert back.labels == sc.labels and torch.allclose(back.share, sc.share)
    assert "Spearman" in data["definitions"]["spearman_rho"] and data["definitions"]["spearman_rho"].startswith("ours")
    rows = sc.table()
    assert [r["word"] for r in rows] == sc.labels
    assert rows[sc.index("circle")]["tokens"] == [3, 4]
    assert all(r["spearman_rho"] is None or -1 <= r["spearman_rho"] <= 1 for r in rows)


def test_negative_prompt_and_errors():
    tr = synthetic_trace(negative=True)
    sc = concept_scores(tr, negative=True)
    assert sc.labels == ["green", "triangle"] and sc.negative
    with pytest.raises(ValueError, match="no negative-prompt attention; generate with a negative prompt"):
        concept_scores(synthetic_trace(), negative=True)
    with pytest.raises(ValueError, match="threshold must be in"):
        concept_scores(tr, threshold=0)
    with pytest.raises(KeyError, match="the scores cover"):
        concept_scores(tr).index("green")
    single = concept_scores(synthetic_trace(), steps=2)
    assert single.spearman_rho == [None] * 7 and all(math.isfinite(v) for v in single.step_sum)
