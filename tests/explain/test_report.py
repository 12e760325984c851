import json
import re

import pytest

from explain.report import build_report
from explain.trace import Trace

from tests.explain.synthetic import synthetic_trace


def test_report_writes_every_part_and_a_self_contained_page(tmp_path):
    tr = synthetic_trace(steps=6, negative=True)
    tr.prompts = ["a red circle above a blue square <b>"]  # markup in the prompt must be escaped
    messages = []
    rep = build_report(tr, tmp_path / "out", progress=messages.append, extra_settings={"generation seconds": 1.25})
    out = tmp_path / "out"
    for name in ("index.html", "final.png", "step_grid.png", "heatmaps.png", "heatmaps_by_step.png", "concepts.png",
                 "concepts_share.png", "recovery.png", "recovery_curves.png", "negative_heatmaps.png",
                 "concepts.json", "recovery.json", "trace.safetensors"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 100
    words = sorted(p.name for p in (out / "words").iterdir())
    assert words == ["00_red.png", "01_circle.png", "02_above.png", "03_blue.png", "04_square.png"]  # "a" is skipped

    page = rep.html_path.read_text()
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert "generation seconds" in page and "1.25" in page
    # self-contained: images are embedded, nothing is fetched from elsewhere
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 9 + len(words)  # 9 figures and one overlay per word
    assert "http://" not in page and "https://" not in page
    # the score table has one row per prompt word, duplicates included
    for label in ("red", "circle", "above", "a (2)", "blue", "square"):
        assert f"<td>{label}</td>" in page
    assert "Spearman" in page and "emergence" in page and "ours" in page
    assert messages[0].startswith("rendering") and "writing the HTML" in messages
    assert rep.seconds["total"] > 0

    scores = json.loads((out / "concepts.json").read_text())
    assert scores["labels"][:3] == ["a", "red", "circle"] and len(scores["share"]) == 6
    rec = json.loads((out / "recovery.json").read_text())
    assert rec["space"] == "latent" and len(rec["recovered_fraction"][0]) == 6
    again = Trace.load(out / "trace.safetensors")
    assert again.prompts == tr.prompts and again.num_steps == 6


def test_report_can_link_images_instead_of_embedding(tmp_path):
    rep = build_report(synthetic_trace(steps=3), tmp_path, embed_images=False, save_trace=False)
    page = rep.html_path.read_text()
    assert '<img src="step_grid.png"' in page and "base64" not in page
    assert not (tmp_path / "trace.safetensors").exists()
    assert "negative_heatmaps.png" not in rep.files


def test_report_needs_attention(tmp_path):
    tr = synthetic_trace(steps=3)
    tr.attention = None
    with pytest.raises(ValueError, match="no cross-attention, so there is nothing to explain"):
        build_report(tr, tmp_path)
    with pytest.raises(IndexError, match="item 2 is outside the batch"):
        build_report(synthetic_trace(steps=3), tmp_path, item=2)


def test_report_without_prompt_words_still_shows_steps_and_recovery(tmp_path):
    tr = synthetic_trace(steps=3)
    tr.words = [[]]  # prompts given as embeddings: positions have no words
    rep = build_report(tr, tmp_path, save_trace=False)
    page = rep.html_path.read_text()
    assert "names no prompt words" in page
    assert "step_grid.png" in rep.files and "recovery.png" in rep.files
    assert "heatmaps.png" not in rep.files and "concepts.json" not in rep.files
