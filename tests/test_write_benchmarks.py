"""scripts/write_benchmarks.py pools independent invocations of a benchmark and checks a rerun against the spreads."""

from __future__ import annotations

import statistics

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
