"""`mtf report`: every section and figure, on real tiny runs (with eval, without, stopped early, two at once)
and on what a killed run leaves behind (a cut-off metrics line, no eval/, an empty directory).

The runs are real `mtf train` runs in this process (tiny T5, 4 steps), shared by the module.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import FAST
from test_hardening import _quiet_libraries, run_cli  # noqa: F401  (module fixture: quiet transformers logs)
from train.reports.page import SECTIONS, write_report
from train.reports.plots import PIXELS, smooth
from train.reports.rundata import mixture_table, read_run

REPO = Path(__file__).resolve().parents[1]
EVAL = ["eval.mixture=data_mixtures/demo_eval.yaml", "eval.every_steps=2", "eval.max_examples_per_template=4",
        "eval.final_max_examples_per_template=4", "eval.batch_size=16"]


def _train(run: Path, *extra: str) -> int:
    args = ["train", "configs/demo.yaml", *FAST, "logging.wandb.mode=disabled", "trainer.max_steps=4",
            "checkpoint.every_steps=2", f"run.output_dir={run}", *extra]
    return run_cli(args)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        out = {name: tmp_path_factory.mktemp(name) for name in ("with_eval", "no_eval", "stopped")}
        assert _train(out["with_eval"], *EVAL) == 0
        assert _train(out["no_eval"]) == 0
        # trainer.max_time=0.001 stops after the first step with a checkpoint, through the same path as a
        # preemption signal (PreemptionHook): exit 3, stop_reason recorded.
        assert _train(out["stopped"], "trainer.max_time=0.001") == 3
    finally:
        os.chdir(cwd)
    return out


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _check_report(report: dict, *, eval_rows: bool) -> str:
    page = Path(report["html"]).read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f"<section id='{section}'>" in page, section
    assert len(report["pngs"]) == 3
    for png in map(Path, report["pngs"]):
        assert png_size(png) == PIXELS, png
        assert png.stat().st_size > 5_000, png
        pixels = imread(png)  # drawn on, not an empty canvas: many distinct colours
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50, png
    # Self-contained: every image is embedded, nothing is fetched.
    assert page.count("src='data:image/png;base64,") == 3
    assert not re.search(r"(src|href)=['\"]https?:", page)
    assert ("Final results per template" in page) is eval_rows
    return page


def test_report_of_a_run_with_eval(runs, tmp_path):
    report = write_report([runs["with_eval"]], tmp_path / "r")
    page = _check_report(report, eval_rows=True)
    assert "super_glue/copa" in page and "best_option" in page  # the final per-template table
    run = read_run(runs["with_eval"])
    assert run.status == "completed"
    assert [e["step"] for e in run.evals] == [2, 4]
    assert "checkpoints" in page and "step-00000004" in page
    assert "config.yaml" in page and "loss_normalization" in page
    # The mixture: planned shares from run.json, realised from the counters; they sum to 1.
    table = mixture_table(run)
    assert {r["task"] for r in table} == {"commonsense_qa", "ai2_arc_easy", "common_gen"}
    for key in ("planned_examples", "realised_examples", "planned_tokens", "realised_tokens"):
        assert sum(r[key] for r in table) == pytest.approx(1.0)
    assert sum(r["examples_seen"] for r in table) == run.train[-1]["examples_seen"]
    assert sum(r["tokens_seen"] for r in table) == run.train[-1]["tokens_seen"]


def test_report_of_a_run_without_eval(runs, tmp_path):
    report = write_report([runs["no_eval"]], tmp_path / "r")
    page = _check_report(report, eval_rows=False)
    assert "no eval/ folder" in page
    assert any("no eval/ folder" in n for n in report["notes"][read_run(runs["no_eval"]).name])


def test_report_of_a_run_stopped_early(runs, tmp_path):
    run = read_run(runs["stopped"])
    assert run.status == "max_time" and run.last_step == 1 and run.max_steps == 4
    page = _check_report(write_report([runs["stopped"]], tmp_path / "r"), eval_rows=False)
    assert "1 of 4" in page and "max_time" in page and "resumes from the newest complete checkpoint" in page


def test_report_of_two_runs_side_by_side(runs, tmp_path):
    report = write_report([runs["with_eval"], runs["no_eval"]], tmp_path / "r")
    page = _check_report(report, eval_rows=True)
    assert report["runs"] == [read_run(runs["with_eval"]).name, read_run(runs["no_eval"]).name]
    assert "Where the runs differ" in page and "eval.mixture" in page
    for name in report["runs"]:
        assert page.count(name) >= 3  # run table, training table, mixture heading


def test_cli_report_and_its_default_folder(runs, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(runs["with_eval"], run)
    code, out = run_cli(["report", run], capsys)
    assert code == 0, out
    assert (run / "report" / "index.html").is_file() and "report:" in out
    code, out = run_cli(["report", tmp_path / "missing"], capsys)
    assert code == 2 and "is not a directory" in out and "Traceback" not in out


def test_a_killed_run_is_reported_as_far_as_it_got(runs, tmp_path, capsys):
    """kill -9 mid-write: a cut-off last metrics line, run.json still 'running', no eval/ yet."""
    run = tmp_path / "killed"
    shutil.copytree(runs["with_eval"], run)
    shutil.rmtree(run / "eval")
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(metrics[:3]) + "\n" + metrics[3][:40])  # cut mid-line
    record = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**record, "status": "running"}))
    code, out = run_cli(["report", run, "--out", tmp_path / "r"], capsys)
    assert code == 0 and "Traceback" not in out, out
    assert "not JSON" in out and "no eval/ folder" in out
    data = read_run(run)
    assert data.status.startswith("stopped (killed")
    assert [m["step"] for m in data.train] == [1, 2]  # the lines before the cut (line 3 is an eval line)
    _check_report({"html": str(tmp_path / "r" / "index.html"), "pngs": [str(p) for p in (tmp_path / "r").glob("*.png")]},
                  eval_rows=False)


def test_an_empty_directory_and_damaged_files_give_a_report_with_notes(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = run_cli(["report", empty, "--out", tmp_path / "r"], capsys)
    assert code == 0 and "Traceback" not in out, out
    assert "holds no run files" in out
    page = Path(tmp_path / "r" / "index.html").read_text()
    for section in SECTIONS:
        assert f"<section id='{section}'>" in page
    damaged = tmp_path / "damaged"
    (damaged / "eval").mkdir(parents=True)
    (damaged / "config.yaml").write_text("run: [unclosed\n")
    (damaged / "run.json").write_text("{not json")
    (damaged / "eval" / "step-00000002.json").write_text('{"datasets": 1}')
    (damaged / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n[1, 2]\n')
    data = read_run(damaged)
    assert [m["step"] for m in data.train] == [1] and data.evals == [] and data.config == {}
    text = " ".join(data.notes)
    assert "config.yaml does not parse" in text and "run.json is not valid JSON" in text and "lacks `datasets`" in text
    report = write_report([damaged], tmp_path / "r2")
    assert Path(report["html"]).is_file()


def test_smoothing_is_centred_and_keeps_short_curves():
    assert smooth([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]  # fewer than 2 x 10 points: the raw values
    values = [float(i % 2) for i in range(40)]  # 0, 1, 0, 1, ...: a window of 5 averages it flat
    assert all(0.3 < v < 0.7 for v in smooth(values)[2:-2])
