"""The README's sweep section matches what is committed: its command parses, and the numbers it
quotes are the committed docs/sweep report's (regenerate the report, and this says what to update)."""

import json
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
README = (REPO / "README.md").read_text(encoding="utf-8")
REPORT = REPO / "docs" / "sweep" / "shapes-200-heldout.json"


def section() -> str:
    start = README.index("## Dataset-scale sweeps")
    return README[start : README.index("\n## ", start + 10)]


def test_the_paper_protocol_command_parses_into_the_paper_settings():
    from explain.cli import build_parser
    from explain.sweep import analyses

    text = section()
    command = re.search(r"accelerate launch (.*?\\\n.*?)\n", text).group(1).replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:4] == ["--multi_gpu", "--num_processes", "N", "-m"] and argv[4] == "explain"
    args = build_parser().parse_args(argv[5:])
    assert args.protocol == "paper" and args.model == "CompVis/stable-diffusion-v1-4"
    assert analyses.parse_analyses(args.analyses, ground_truth=False, protocol=args.protocol) == ("concepts", "rise", "cam", "sanity")


def pct(stats) -> str:
    return f"{100 * stats['mean']:.1f} %"


@pytest.mark.skipif(not REPORT.is_file(), reason="docs/sweep/shapes-200-heldout.json is not in this checkout")
def test_the_quoted_numbers_are_the_committed_reports():
    d = json.loads(REPORT.read_text())
    text = " ".join(section().split())
    g, auc = d["ground_truth"], d["auc"]
    quoted = {
        "prompts": f"{d['counts']['ok']} prompts ok",
        "found": f"found {g['found']} of {g['objects']} objects",
        "colour": f"colour correct {pct(g['attributes']['color'])}",
        "pointing": f"point at their object {pct(g['pointing']['all_raw'])}",
        "chance": f"(chance {pct(g['chance_pointing'])})",
        "iou": f"IoU@0.5 {g['iou']['all_raw']['mean']:.3f}",
        "r1": f"recovered by step {d['recovery']['numbers']['r1_step_50']['mean']:.1f}",
        "rise insertion": f"DF-RISE {auc['methods']['rise']['insertion_latent']['mean']:.3f}",
        "rise deletion": f"DF-RISE {auc['methods']['rise']['deletion_latent']['mean']:.3f}",
        "random insertion": f"random {auc['baselines']['random']['insertion_latent']['mean']:.3f}",
        "paper auc": f"DF-RISE {auc['methods']['rise']['insertion_latent']['paper_auc']:.3f} insertion",
        "sanity rise": f"DF-RISE passes {100 * d['sanity']['rise']['pass_rate']['mean']:.0f} %",
        "sanity cam": f"DF-CAM {100 * d['sanity']['cam']['pass_rate']['mean']:.0f} %",
        "emergence order": f"only {pct(d['timing_truth']['order_agreement']['emergence']['pooled'])}",
    }
    missing = {k: v for k, v in quoted.items() if v not in text}
    assert not missing, f"the README's sweep section does not quote the committed report: {missing}"


R3_REPORT = REPO / "docs" / "sweep" / "shapes-200-heldout-r3.json"


@pytest.mark.skipif(not R3_REPORT.is_file(), reason="docs/sweep/shapes-200-heldout-r3.json is not in this checkout")
def test_the_quoted_r3_numbers_are_the_committed_reports():
    r = json.loads(R3_REPORT.read_text())["r3"]
    text = " ".join(section().split())
    share = lambda cls: " → ".join(f"{100 * r['classes'][cls][n]['share_of_tally']:.1f}" for n in ("uniform", "early", "latter"))
    diff = lambda cls, n, sign=1: "{:.2f} [{:.2f}, {:.2f}]".format(sign * r["classes"][cls][n]["minus_uniform"]["mean"], *sorted(sign * x for x in r["classes"][cls][n]["minus_uniform"]["ci"]))
    change = lambda n: "{:.3f} [{:.3f}, {:.3f}]".format(r["numbers"][f"r3_{n}_final_change"]["mean"], *r["numbers"][f"r3_{n}_final_change"]["ci"])
    quoted = [
        f"shape {share('shape')} %", f"colour {share('colour')} %", f"words {share('function')} %",
        f"colour sum by {diff('colour', 'early')}", f"function words' by {diff('function', 'early', -1)}",
        f"raises colour by {diff('colour', 'latter')}", f"shape by {diff('shape', 'latter')}",
        f"moves by {change('early')}", f"and {change('latter')} under latter",
    ]
    assert r["prompts"] == 200
    missing = [q for q in quoted if q not in text]
    assert not missing, f"the README's R3 numbers are not the committed report's: {missing}"
