"""scripts/write_benchmarks.py pools independent invocations of a benchmark and checks a rerun against the spreads."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

wb = load_script("write_benchmarks")


def _eval_run(naive: list[float], fast: list[float]) -> dict:
    bb = wb.bb
    ratio = bb.ratio(fast, naive)
    return {"batch_size": 8, "copa": {"repeats": len(naive), "naive_examples_per_s": bb.spread(naive),
                                      "encoder_once_examples_per_s": bb.spread(fast), "ratio": ratio["ratio"],
                                      "ratio_min": ratio["min"], "ratio_max": ratio["max"],
                                      "ratio_per_round": ratio["per_round"], "max_abs_score_diff": 1e-6}}


def test_pooling_two_invocations_takes_every_round_of_both():
    first, second = _eval_run([10, 11, 12], [20, 21, 22]), _eval_run([5, 6, 7], [15, 16, 30])
    pooled = wb.pool_eval([first, second])["copa"]
    assert pooled["repeats"] == 6 and pooled["invocations"] == 2
    assert pooled["naive_examples_per_s"]["values"] == [10, 11, 12, 5, 6, 7]
    assert pooled["ratio"] == pytest.approx(statistics.median([20, 21, 22, 15, 16, 30]) / statistics.median([10, 11, 12, 5, 6, 7]))
    # the spread is the pooled per-round ratios: the second process's 30/7 widens it beyond the first's own
    assert pooled["ratio_min"] == pytest.approx(min(20 / 10, 21 / 11, 22 / 12, 15 / 5, 16 / 6, 30 / 7))
    assert pooled["ratio_max"] == pytest.approx(30 / 7) and pooled["ratio_max"] > first["copa"]["ratio_max"]


def test_a_figure_that_does_not_depend_on_timing_must_agree_between_invocations():
    with pytest.raises(SystemExit, match="differs between invocations"):
        wb._same([0.98, 0.97], "packing decoder packed_efficiency")


def test_the_rerun_check_counts_the_ratios_inside_the_earlier_spreads():
    def results(runs: list[dict], commit: str) -> dict:
        return {"packing": {"train": {}}, "eval": wb.pool_eval(runs), "commit": commit, "date": "2026-12-03",
                "command": "python scripts/write_benchmarks.py", "data_ranks": {"table": []}}

    before = results([_eval_run([10, 11, 12], [20, 21, 22]), _eval_run([10, 11, 12], [20, 24, 22])], "aaa")
    inside = results([_eval_run([10, 10, 10], [21, 21, 21])], "bbb")  # 2.1x, inside 1.83-2.18
    outside = results([_eval_run([10, 10, 10], [30, 30, 30])], "ccc")  # 3.0x
    section, n_inside, total = wb.rerun_check(before, inside)
    assert (n_inside, total) == (1, 1) and "1 of 1 ratios" in section and "| yes |" in section
    section, n_inside, total = wb.rerun_check(before, outside)
    assert (n_inside, total) == (0, 1) and "**no**" in section
    assert section.startswith(wb.RERUN_BEGIN) and section.rstrip().endswith(wb.RERUN_END)


def test_pooling_two_whole_runs_as_one(tmp_path):
    """Two real `make bench` results (132dc05, 3 processes x 3 rounds each) pooled: 6 processes, 18 rounds, and
    every spread covers both runs' per-round figures."""
    fixtures = Path(__file__).parent / "fixtures" / "bench"
    docs = [json.loads((fixtures / name).read_text(encoding="utf-8"))
            for name in ("results_132dc05_a.json", "results_132dc05_b.json")]
    pooled = wb.pool_results(docs)
    assert pooled["invocations"] == 6 and pooled["eval"]["cosmos_qa (4 choices)"]["invocations"] == 6
    cosmos = [d["eval"]["cosmos_qa (4 choices)"] for d in docs]
    assert len(pooled["eval"]["cosmos_qa (4 choices)"]["ratio_per_round"]) == 18
    before, after = [wb.ratio_spreads(d) for d in docs], wb.ratio_spreads(pooled)
    for name, spread in after.items():
        assert spread["min"] <= min(b[name]["min"] for b in before) + 1e-9, name
        assert spread["max"] >= max(b[name]["max"] for b in before) - 1e-9, name
    assert min(c["ratio_min"] for c in cosmos) == pytest.approx(pooled["eval"]["cosmos_qa (4 choices)"]["ratio_min"])
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, str(Path(wb.__file__)), "--pool", *(str(fixtures / n) for n in (
        "results_132dc05_a.json", "results_132dc05_b.json")), "--out", str(out), "--json-out", str(tmp_path / "r.json")],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text(encoding="utf-8")
    assert "6 independent processes per benchmark, 3 rounds each, pooled" in text and "--pool" in text
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["invocations"] == 6
    docs[1]["repeats_per_invocation"] = 5
    with pytest.raises(SystemExit, match="different --repeats"):
        wb.pool_results(docs)
