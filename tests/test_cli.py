"""The `mtf` command: help texts, --json documents, exit codes and one-paragraph user errors."""

import json
from pathlib import Path

import pytest

from train.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["validate", "--help"], ["eval", "--help"],
                                  ["mixture", "show", "--help"], ["templates", "lint", "--help"]])
def test_every_command_describes_itself(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    assert "usage: mtf" in capsys.readouterr().out


def test_user_error_is_one_paragraph_with_exit_2(capsys):
    assert main(["train", "configs/demo.yaml", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtf train: error: configs/demo.yaml: unknown config key `optim.lrr`. Did you mean `optim.lr`?")
    assert "Traceback" not in err


def test_validate_lists_every_problem(capsys):
    assert main(["validate", "configs/demo.yaml", "trainer.precision=fp16", "eval.every_steps=0", "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert len(report["problems"]) == 2 and "model config loads" in report["checks"]


def test_mixture_show_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "mix.png"
    assert main(["mixture", "show", "data_mixtures/demo_train.yaml", "--max-examples-per-task", "20", "--steps", "10",
                 "--batch-tokens", "4096", "--samples", "2000", "--plot", str(plot), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    tasks = {t["task"]: t for t in report["tasks"]}
    assert set(tasks) == {"ai2_arc_easy", "common_gen", "commonsense_qa"}
    assert sum(t["rate"] for t in tasks.values()) == pytest.approx(1.0)
    for t in tasks.values():  # realised shares from the stream are close to the planned rates
        assert abs(t["realised_share"] - t["rate"]) < 0.05
    assert plot.stat().st_size > 1000


def test_templates_lint_and_tasks_preview_json(capsys):
    assert main(["templates", "lint", "data_mixtures/templates", "--json"]) == 0
    lint = json.loads(capsys.readouterr().out)
    # the 4 demo template files and the 12 XCOPA ones (English + 11 languages, xp3mt branch)
    assert lint["summary"]["files"] == 16 and lint["summary"]["load_errors"] == 0
    assert main(["tasks", "preview", "data_mixtures/demo_eval.yaml:super_glue_copa", "--n", "1", "--json"]) == 0
    examples = json.loads(capsys.readouterr().out)
    assert len(examples) == 12 and all(e["task"] == "super_glue_copa" for e in examples)
    assert examples[0]["targets"][0] in examples[0]["answer_choices"]
