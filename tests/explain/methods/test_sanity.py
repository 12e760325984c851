import json

import pytest

from explain.methods import defaults
from explain.methods.sanity import (
    MethodVerdict,
    known_verdict,
    load_verdicts,
    verdict_passes,
    write_verdicts,
)


def test_pass_rule_needs_low_randomisation_rho_and_no_null_explanation():
    assert verdict_passes(0.1, 0.2)
    assert verdict_passes(0.1, None)  # no null model applies
    assert not verdict_passes(0.3, 0.0)  # the limit itself fails
    assert not verdict_passes(0.05, 0.5)  # explained by the null model
    assert not verdict_passes(None, 0.0)
    assert not verdict_passes(float("nan"), 0.0)


def test_verdicts_round_trip_and_are_found_by_id_or_folder(tmp_path):
    path = tmp_path / "verdicts.json"
    v = MethodVerdict("df_rise", True, {"randomization_rho": 0.04, "null_rho": 0.1}, "30 prompts", "ok", "m/shapes")
    bad = MethodVerdict("df_rise:paper", False, {"randomization_rho": 0.8, "null_rho": 0.9}, "30 prompts", "identity path")
    write_verdicts([v, bad], "m/shapes", aliases=["shapes-64"], path=path)
    write_verdicts([v], "other/model", path=path)  # another model's entry leaves the first alone
    assert known_verdict("df_rise", "m/shapes", path=path) == v
    assert known_verdict("df_rise:paper", "/some/where/shapes-64/", path=path) == bad
    assert known_verdict("df_rise", "unknown", path=path) is None
    assert known_verdict("df_cam", "m/shapes", path=path) is None
    assert set(load_verdicts(path)) == {"m/shapes", "other/model"}
    assert json.loads(path.read_text())["version"] == 1
    assert known_verdict("df_rise", "m/shapes", path=tmp_path / "missing.json") is None


def test_verdict_line_says_pass_or_fail_with_numbers():
    v = MethodVerdict("df_rise", False, {"randomization_rho": 0.81, "null_rho": 0.93}, note="a do-nothing network gives the same map")
    line = v.line()
    assert line.startswith("FAILS") and "0.81" in line and "0.93" in line and "do-nothing" in line
    assert MethodVerdict("x", True, {"randomization_rho": 0.01}).line().startswith("passes")


def test_method_ids_name_the_presets():
    assert defaults.method_id(defaults.RISE) == "df_rise"
    assert defaults.method_id(defaults.PAPER_RISE.with_masks(64)) == "df_rise:paper"
    assert defaults.method_id(defaults.RiseSettings(similarity="cosine", p=0.3)) == "df_rise:custom"
