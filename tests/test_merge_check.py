"""scripts/merge_check.py: its smoke run trains the base, the experts and the multitask model, merges the experts
with every method, scores every model on rows disjoint from training and validation, records the grid values it
chose, and writes its BENCHMARKS.md section in place; the grid choice and the summary sentence on their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script, requires_shared

REPO = Path(__file__).resolve().parents[1]


def _script():
    return load_script("merge_check")


@pytest.mark.slow  # ~60 s: the whole pipeline in one `--smoke` process
@pytest.mark.skipif(os.environ.get("MTF_SLOW_CHECKS") != "1",
                    reason="the 60 s smoke run of scripts/merge_check.py is opt-in (MTF_SLOW_CHECKS=1) to keep "
                           "make test well under 15 minutes on 2 cores")
@pytest.mark.shared
@requires_shared
def test_smoke_run_scores_every_model_on_disjoint_rows_and_writes_its_section(tmp_path):
    mc = _script()
    out, bench = tmp_path / "out", tmp_path / "BENCHMARKS.md"
    shutil.copy(REPO / "BENCHMARKS.md", bench)
    original = bench.read_text()
    proc = subprocess.run([sys.executable, "scripts/merge_check.py", "--smoke", "--out", str(out),
                           "--write-benchmarks", str(bench)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert json.loads(proc.stdout) == results

    names = ["base", *(f"expert_{t}" for t in mc.TASKS), "multitask", *(f"merged_{m}" for m in mc.METHODS)]
    assert list(results["models"]) == names
    for name, model in results["models"].items():
        assert set(model["accuracy"]) == set(mc.TASKS), name
        assert all(0 <= v <= 1 for v in [*model["accuracy"].values(), model["mean"]]), name
        assert model["rows_per_template"] == {t: mc.SMOKE["eval_max_examples"] for t in mc.TASKS}, name

    # The three row sets of every task, read back from the files the runs used: disjoint by normalised text.
    for task in mc.TASKS:
        keys = {split: {mc.lc._key(mc.TEXT[task](json.loads(line)))
                        for line in (out / "data" / f"{task}.{split}.jsonl").read_text().splitlines()}
                for split in mc.SPLITS}
        assert all(keys.values()), task
        assert not keys["train"] & keys["validation"] and not keys["train"] & keys["eval"], task
        assert not keys["validation"] & keys["eval"], task
        assert results["data"][task]["validation_rows"] == mc.SMOKE["validation_rows"]
    assert all(n == 0 for pairs in results["overlaps"].values() for n in pairs.values())

    # The chosen grid values: recorded in results.json, and in the merged model's merge_record.json.
    for method in mc.METHODS:
        grid = results["grid"][method]
        assert grid["chosen"] == mc.SMOKE_GRID[method][0] and 0 <= grid["validation_score"] <= 1
        record = json.loads((out / f"merged_{method}" / "merge_record.json").read_text())
        assert record["method"] == method and record["parameters"] == grid["merge_record_parameters"]
        assert all(record["parameters"][k] == v for k, v in grid["chosen"].items())
        assert results["models"][f"merged_{method}"]["parameters"] == grid["chosen"]

    # The section, between its markers, the rest of the file kept; rewriting it leaves one section.
    text = bench.read_text()
    assert text.count(mc.BEGIN) == 1 and text.count(mc.END) == 1
    def without_section(doc: str) -> str:
        if mc.BEGIN not in doc:
            return doc.strip()
        return (doc[:doc.index(mc.BEGIN)] + doc[doc.index(mc.END) + len(mc.END):]).strip()

    assert without_section(text) == without_section(original)
    section = text[text.index(mc.BEGIN):text.index(mc.END)]
    assert "| merged_ties (λ=1.0, density=0.5) |" in section and "| expert_trec |" in section
    assert results["summary"] and results["summary"] in section
    mc.main(["--tables-only", "--out", str(out), "--write-benchmarks", str(bench)])  # nothing runs
    assert bench.read_text().count(mc.BEGIN) == 1


def _model(acc: dict) -> dict:
    return {"accuracy": acc, "mean": sum(acc.values()) / len(acc)}


def test_grid_choice_and_summary_come_from_the_numbers():
    mc = _script()
    points = [{"parameters": {"lambda": 0.5}, "score": 0.4}, {"parameters": {"lambda": 1.0}, "score": 0.6},
              {"parameters": {"lambda": 1.5}, "score": 0.6}]
    assert mc.choose(points)["parameters"] == {"lambda": 1.0}  # the best; the first in grid order on a tie
    base = {"ag_news": 0.5, "trec": 0.5, "rotten_tomatoes": 0.5}
    models = {"multitask": _model({**base, "trec": 0.7}),
              **{f"expert_{t}": _model({**base, t: 0.8}) for t in mc.TASKS},
              **{f"merged_{m}": _model(base) for m in mc.METHODS}}
    models["merged_ties"] = _model({**base, "ag_news": 0.62})
    grid = {m: {"chosen": {}} for m in mc.METHODS}
    grid["ties"]["chosen"] = {"lambda": 1.0, "density": 0.2}
    text = mc.summary({"models": models, "grid": grid})
    assert text.startswith("ties (λ=1.0, density=0.2) won on the mean over tasks: 54.0% against 50.0% for linear "
                           "averaging (+4.0 points).")
    assert "ag_news: ties 62.0% (+12.0 points); trec: none beat averaging (50.0%)" in text
    assert "Multitask training on the same steps: 56.7% mean (+2.7 points against the best merge)" in text
