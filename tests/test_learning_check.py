"""scripts/learning_check.py without its long runs: the held-back rows never overlap training rows, its
mixtures load through the real task loader, and its BENCHMARKS.md section is replaced in place."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_script, requires_shared

REPO = Path(__file__).resolve().parents[1]


def _script():
    return load_script("learning_check")


@requires_shared
def test_split_is_disjoint_and_the_mixtures_load(tmp_path):
    from train.data.tasks import load_task_file

    lc = _script()
    rows = lc.split_rows(lc.SHARED, seed=42, held_back=500)
    assert {t: len(p["eval"]) for t, p in rows.items()} == {"ag_news": 500, "trec": 500, "rotten_tomatoes": 500}
    for task, parts in rows.items():
        text = lc._ag_text if task == "ag_news" else (lambda r: r["text"])
        train = {lc._key(text(r)) for r in parts["train"]}
        assert not train & {lc._key(text(r)) for r in parts["eval"]}, task
    assert rows["trec"]["removed_overlap"] > 0  # TREC's official splits share a few questions: removed
    assert rows == lc.split_rows(lc.SHARED, seed=42, held_back=500)  # reproducible
    train_yaml, eval_yaml = lc.write_mixtures(tmp_path, rows)
    tasks = load_task_file(train_yaml).tasks
    assert [len(t.select_templates()) for t in tasks.values()] == [7, 5, 10]  # ag_news, trec (coarse), rotten_tomatoes
    prompted = tasks["trec"].prompted(max_examples=20)
    assert set(prompted["answer_choices"][0]) >= {"Abbreviation", "Quantity"}
    assert load_task_file(eval_yaml).tasks["ag_news"].load().num_rows == 500


def test_benchmarks_section_is_replaced_in_place(tmp_path):
    lc = _script()
    arm = {"accuracy": {"ag_news": 0.8, "trec": 0.7, "rotten_tomatoes": 0.66},
           "accuracy_min_max": {"ag_news": [0.7, 0.9], "trec": [0.6, 0.8], "rotten_tomatoes": [0.6, 0.7]},
           "templates": {"ag_news": 7, "trec": 5, "rotten_tomatoes": 10}, "steps": 10, "examples_seen": 100,
           "wall_seconds": 60.0, "train_seconds": 50.0, "final_train_loss": 0.5}
    results = {"chance": lc.CHANCE, "data": {t: {"train_rows": 10, "eval_rows": 5} for t in lc.CHANCE},
               "arms": {"learning": arm, "packed": arm, "unpacked_equal_examples": {**arm, "train_seconds": 150.0}}}
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\nother section\n")
    lc.benchmarks_md.write_section(bench, lc.markdown(results, "test machine", "cmd"), lc.BEGIN, lc.END)
    lc.benchmarks_md.write_section(bench, lc.markdown(results, "test machine", "cmd"), lc.BEGIN, lc.END)  # twice: still one section
    text = bench.read_text()
    assert text.count(lc.BEGIN) == 1 and "other section" in text
    assert "**80.0**" in text and "| unpacked_equal_examples | 80.0 | 70.0 | 66.0 |" in text and "3.00x time" in text


@pytest.mark.parametrize("arm", ["unpacked_equal_examples"])
def test_unpacked_arms_need_the_packed_one(tmp_path, arm, monkeypatch):
    lc = _script()
    monkeypatch.setattr(lc, "split_rows", lambda *a: {t: {"train": [], "eval": [], "removed_overlap": 0}
                                                     for t in lc.CHANCE})
    monkeypatch.setattr(lc, "write_mixtures", lambda work, rows: (work / "t.yaml", work / "e.yaml"))
    shared = tmp_path / "shared"
    (shared / "tasks" / "ag_news").mkdir(parents=True)
    args = type("A", (), {"shared": str(shared), "out": str(tmp_path / "out"), "seed": 1, "held_back": 5,
                          "only": [arm], "learning_steps": 1, "steps": 1})()
    with pytest.raises(SystemExit, match="sized from the `packed` arm"):
        lc.run_all(args)
