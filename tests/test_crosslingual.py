"""Crosslingual MTF end to end: prompt settings and per-language results, the multilingual ByT5 demo, byte-level
packing, the zero-shot-language guard, and the xP3 presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import ByT5Tokenizer

from conftest import SHARED_DATA, fresh_accelerate, requires_shared, run_cli, user_error
from train.config import load_config
from train.data.mixtures import MixtureStream, count_examples, load_mixture_spec, plan_mixture
from train.data.packing import Packer
from train.data.pipeline import load_mixture_tasks
from train.data.tasks import load_task_file
from train.data.tokenization import tokenize_prompted
from train.errors import ConfigError
from train.evaluation.results import aggregate, format_results_table
from train.reports.page import write_report

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "xmtf_demo.yaml"
TINY = ["trainer.max_steps=3", "schedule.warmup_steps=0", "data.max_input_tokens=512", "data.max_target_tokens=128",
        "eval.at_end=false", "logging.progress_bar=false", "logging.every_steps=1"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _row(score: float) -> dict:
    return {"metric": "accuracy", "score": score, "accuracy": score, "n": 10, "num_skipped": 0, "chance": 0.5}


def test_prompt_settings_are_separate_groups_with_a_language_grid():
    per_template = {
        "xcopa/sw@en": {"a": _row(0.5), "b": _row(0.7), "c": _row(0.6)},
        "xcopa/sw@mt": {"a_swmt": _row(0.4), "b_swmt": _row(0.8)},
        "xcopa/zh@en": {"a": _row(0.9)},
        "xcopa/zh@ht": {"a_zhht": _row(0.3), "b_zhht": _row(0.5), "c_zhht": _row(0.1)},
        "super_glue/copa": {"a": _row(0.55)},
    }
    languages = {"xcopa/sw@en": "sw", "xcopa/sw@mt": "sw", "xcopa/zh@en": "zh", "xcopa/zh@ht": "zh"}
    results = aggregate(per_template, language_of=languages)
    datasets = results["datasets"]
    assert datasets["xcopa/sw@en"]["median"] == pytest.approx(0.6)  # median over its own templates only
    assert datasets["xcopa/sw@mt"]["median"] == pytest.approx(0.6)
    assert datasets["xcopa/zh@ht"]["median"] == pytest.approx(0.3)
    assert [datasets[d]["prompts"] for d in sorted(datasets)] == [None, "en", "mt", "en", "ht"]
    assert set(results["languages"]) == {"en", "sw@en", "sw@mt", "zh@en", "zh@ht"}
    settings = results["prompt_settings"]
    assert settings["en"]["median"] == pytest.approx((0.6 + 0.9) / 2) and settings["en"]["datasets"] == [
        "xcopa/sw@en", "xcopa/zh@en"]
    assert settings["ht"]["mean"] == pytest.approx(0.3) and "super_glue/copa" not in str(settings)
    results["zero_shot_languages"] = ["zh"]
    table = format_results_table(results)
    assert "[other, sw, mt prompts]" in table and "[other, en]" in table
    grid = table[table.index("per language"):].splitlines()
    assert grid[1].split() == ["language", "en", "prompts", "ht", "prompts", "mt", "prompts", "zero-shot"]
    assert grid[3].split() == ["sw", "60.00", "-", "60.00", "no"]
    assert grid[4].split() == ["zh", "90.00", "30.00", "-", "yes"]


def test_byte_rows_pack_full_and_overlong_counts_bytes():
    """ByT5 tokens are UTF-8 bytes: the demo mixture's rows still pack to >= 99%, and a Tamil example that fits
    by its characters but not by its bytes is truncated: the over-long policy sees byte lengths."""
    spec, tasks = load_mixture_tasks(REPO / "data_mixtures" / "xmtf_demo_train.yaml")
    tokenizer = ByT5Tokenizer()
    tokenized = {name: tokenize_prompted(tasks[name].prompted(), tokenizer, "encdec") for name in spec.task_names()}
    languages = {name: tasks[name].metadata.language for name in tokenized}
    stream = MixtureStream.from_plan(plan_mixture(spec, count_examples(tokenized), languages), tokenized, seed=0)
    data = load_config(DEMO).data  # the demo run's rows
    packer = Packer("encdec", max_input_tokens=data.max_input_tokens, max_target_tokens=data.max_target_tokens,
                    window=data.pack_window)
    for _ in range(400):
        packer.next_row(stream)
    assert packer.efficiency()["input_efficiency"] >= 0.99, packer.efficiency()
    assert packer.stats["truncated_inputs"] == 0 and packer.stats["dropped_overlong"] == 0

    text = "அவள் கதவைத் திறந்தாள். " * 6
    ids = tokenizer(text)["input_ids"]
    assert len(text) < 200 < len(text.encode("utf-8")) == len(ids) - 1  # + eos
    small = Packer("encdec", max_input_tokens=200, max_target_tokens=32, overlong_policy="truncate_left")
    row = small.next_row(iter([{"task": "ta", "index": 0, "input_ids": ids, "target_ids": [100, 1]}]))
    assert small.stats["truncated_inputs"] == 1 and len(row["input_ids"]) == 200


def test_the_guard_refuses_xcopa_in_training_unless_asked(tmp_path, capsys):
    user_error(["train", DEMO, "eval.allow_held_out_overlap=false", f"run.output_dir={tmp_path}",
                *TINY], capsys,
               "xp3_sample.et (dataset xcopa = held-out xcopa)", "eval.allow_held_out_overlap=true")


def test_a_zero_shot_language_in_training_is_refused(tmp_path, capsys):
    eval_file = tmp_path / "eval.yaml"
    eval_file.write_text(f"include: [{REPO / 'data_mixtures' / 'xcopa_eval.yaml'}]\n"
                         "eval: {held_out: [xcopa], held_out_languages: [sw, qu]}\n", encoding="utf-8")
    user_error(["validate", DEMO, f"eval.mixture={eval_file}"], capsys,
               "xp3_sample.sw (", "metadata.language sw", "eval.held_out_languages: qu, sw")
    eval_file.write_text(f"include: [{REPO / 'data_mixtures' / 'xcopa_eval.yaml'}]\n"
                         "eval: {held_out: [xcopa], held_out_languages: [sv]}\n", encoding="utf-8")
    user_error(["validate", DEMO, f"eval.mixture={eval_file}"], capsys,
               "eval.held_out_languages: no task of this eval mixture is in language 'sv'")


@requires_shared
def test_the_byt5_demo_checkpoint_evaluates_on_the_shared_xcopa_test(tmp_path, capsys):
    out = tmp_path / "run"
    with fresh_accelerate():
        code, log = run_cli(["train", DEMO, f"run.output_dir={out}", *TINY], capsys)
    assert code == 0, log[-3000:]
    assert "training on held-out data (eval.allow_held_out_overlap=true): xp3_sample.et" in log
    results_path = tmp_path / "xcopa_test.json"
    with fresh_accelerate():
        code, log = run_cli(["eval", out / "final", "--mixture", REPO / "data_mixtures" / "xcopa_test_eval.yaml",
                             "--max-examples-per-template", "3", "--output", results_path], capsys)
    assert code == 0, log[-3000:]
    results = json.loads(results_path.read_text(encoding="utf-8"))
    assert set(results["prompt_settings"]) == {"en", "mt", "ht"}
    assert len(results["prompt_settings"]["mt"]["datasets"]) == 11
    assert {name.partition("@")[0] for name in results["languages"]} == {
        "et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh"}
    assert "per language, mean of dataset medians" in log and "zh@ht" not in log.split("per language")[1]
    # the run report shows the same per-language grid when the run's eval holds these results
    (out / "eval").mkdir(exist_ok=True)
    (out / "eval" / "step-00000003.json").write_text(json.dumps({**results, "step": 3}), encoding="utf-8")
    page = Path(write_report([out], tmp_path / "report")["html"]).read_text(encoding="utf-8")
    assert "Per language and prompt setting" in page and "<th>ht prompts</th>" in page
    assert "<td>xcopa/zh@ht</td><td>ht</td>" in page
    assert (SHARED_DATA / "multilingual" / "xcopa" / "data" / "ta" / "test.ta.jsonl").is_file()


@pytest.mark.parametrize("preset", ["configs/runs/mt0_base.yaml", "configs/runs/bloomz_560m.yaml"])
def test_xmtf_presets_train_on_xp3_from_local_files(preset, xp3_root, monkeypatch):
    cfg = load_config(preset)
    assert cfg.data.train_mixture == "data_mixtures/xp3_train.yaml"
    assert cfg.eval.mixture == "data_mixtures/xcopa_eval.yaml"
    spec = load_mixture_spec(cfg.data.train_mixture)
    assert spec.rate.type == "examples_proportional" and spec.languages.rate.type == "examples_proportional"
    spec, tasks = load_mixture_tasks(cfg.data.train_mixture)
    assert spec.task_names() == ["xp3.code", "xp3.en", "xp3.zh"]
    assert tasks["xp3.zh"].metadata.language == "zh" and len(tasks["xp3.zh"].prompted()) == 1
    assert load_task_file(cfg.eval.mixture).sections["eval"]["held_out"] == ["xcopa", "super_glue/copa"]
    monkeypatch.delenv("MTF_DATA_ROOT")
    with pytest.raises(ConfigError, match=r"starts from \$MTF_DATA_ROOT, which is not set"):
        load_mixture_tasks(cfg.data.train_mixture)
