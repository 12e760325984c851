import csv
import io

import pytest

from explain.sweep import report
from explain.sweep.aggregate import aggregate
from explain.sweep.manifest import SweepFolder


def records():
    out = []
    for i in range(4):
        out.append(
            {
                "id": f"p{i}",
                "index": i,
                "line": i + 1,
                "status": "ok",
                "prompt": f"a red circle {i}",
                "seed": i,
                "truth": {"subject": "circle", "scene": {"objects": []}},
                "columns": {"r1_step_50": i, "rise_insertion_latent_auc": 0.1 * i, "baseline_random_insertion_latent_auc": 0.2},
                "details": {
                    "r1_curves": {"recovered_fraction": [0.0, 0.5, 1.0], "mean_change": [0.3, 0.1]},
                    "rise_curves": {"insertion_latent": [1.0, 0.3, 0.0]},
                    "baseline_random_curves": {"insertion_latent": [1.0, 0.5, 0.0]},
                    "concept_curves": {"classes": ["colour", "shape"], "normalized": [[0, 1, 1], [1, 0, 0]], "share": [[0.2, 0.5, 0.6], [0.8, 0.5, 0.4]]},
                },
                "tables": {"words": [{"id": f"p{i}", "word": "red", "word_class": "colour", "emergence_step": 1, "peak_step": 2, "step_sum": 2.0, "mean_share": 0.4}]},
                "run": {"total_seconds": 1.0, "seconds": {"generate": 0.5}, "cpu_seconds": {"generate": 0.4}},
            }
        )
    out.append({"id": "bad", "index": 4, "line": 5, "status": "invalid", "prompt": "<script>alert(1)</script>", "error": "line 5 has the seed '<b>'", "columns": {}, "truth": {}})
    return out


def test_tables_hold_one_row_per_prompt_with_scalar_truth_only(tmp_path):
    folder = SweepFolder(tmp_path)
    written = report.write_tables(folder, records())
    assert {"results.csv", "words.csv"} <= set(written)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3", "bad"]
    assert rows[0]["truth_subject"] == "circle" and "truth_scene" not in rows[0]
    assert rows[4]["status"] == "invalid" and rows[4]["rise_insertion_latent_auc"] == ""


def test_html_report_has_every_section_and_escapes_prompt_text():
    summary = aggregate(records(), total=6, settings={"protocol": "default", "steps": 3, "analyses": ["concepts", "recovery", "rise"]})
    page = report.render_html(summary)
    for heading in ("Sweep", "Faithfulness: insertion / deletion", "Concepts over the steps", "R1: what each step recovers", "Definitions"):
        assert f"<h2>{heading}</h2>" in page
    assert "<script>" not in page and "&lt;script&gt;" not in page  # invalid rows' prompts are not shown, their errors escaped
    assert "&lt;b&gt;" in page
    assert "<svg" in page and "1 pending" in page
    assert summary["concepts"]["classes"]["colour"]["normalized_per_step"]["mean"] == [0.0, 1.0, 1.0]


def test_parquet_tables_when_pyarrow_is_installed(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet output is optional: pip install 'diffusion-explain[sweep]' (pyarrow)")

    report.write_tables(SweepFolder(tmp_path), records())
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.num_rows == 5 and "rise_insertion_latent_auc" in table.column_names
