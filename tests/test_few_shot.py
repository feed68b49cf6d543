"""Few-shot task sets (train/data/few_shot.py): the draw is pinned and reproducible, happens before rendering
(every template sees the same rows), is validated strictly, is recorded in few_shot.json exactly, and
shows in `mtf mixture show`; the held-out guard still applies.

The data is the demo SuperGLUE COPA sample (100 rows) shipped in data_mixtures/, with 3 of its templates (one of
them conditional: it renders only the "effect" rows).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import Config
from train.data import pipeline
from train.data.few_shot import RECORD_FILE, draw_indices, row_hash
from train.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
COPA = REPO / "data_mixtures/demo_data/super_glue/copa/validation.jsonl"
COPA_TEMPLATES = REPO / "data_mixtures/templates/super_glue/copa/templates.yaml"

# sorted(Generator(PCG64(seed)).permutation(100)[:8]): a change of algorithm must fail here, not silently
# change which rows every past run trained on.
SEED0_K8 = [5, 16, 20, 36, 52, 82, 93, 94]
SEED1_K8 = [5, 6, 8, 16, 38, 48, 81, 99]


def _mixture(tmp_path: Path, task_few_shot: str = "{k: 8, seed: 0}", members: str = "[copa]",
             name: str = "mix.yaml", extra: str = "") -> Path:
    path = tmp_path / name
    path.write_text(f"""
tasks:
  - name: copa
    source: {{type: jsonl, data_files: {{validation: {COPA}}}}}
    split: validation
    templates: {{file: {COPA_TEMPLATES}, names: [best_option, choose, "\\u2026As a result, C1 or C2?"]}}
    metadata: {{dataset: super_glue/copa, cluster: sentence_completion, language: en}}
    few_shot: {task_few_shot}
{extra}
mixture:
  rate: {{type: examples_proportional}}
  members: {members}
""")
    return path


def _task(path: Path):
    _, tasks = pipeline.load_mixture_tasks(path)
    return tasks["copa"]


def _cfg(path: Path, tmp_path: Path, **data) -> Config:
    cfg = Config()
    cfg.data.train_mixture, cfg.data.cache_dir = str(path), str(tmp_path / "cache")
    cfg.eval.mixture = None
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_the_draw_is_pinned_nested_and_capped():
    assert draw_indices(100, 8, 0) == SEED0_K8
    assert draw_indices(100, 8, 1) == SEED1_K8
    assert set(draw_indices(100, 4, 0)) < set(SEED0_K8)  # a larger k with the same seed: a superset
    assert draw_indices(100, 8, 0, cap=3) == draw_indices(100, 3, 0) == [20, 36, 82]  # the cap = k=min(N, k)
    with pytest.raises(ValueError):
        draw_indices(7, 8, 0)


def test_the_draw_ignores_hash_randomisation():
    code = "from train.data.few_shot import draw_indices; print(draw_indices(100, 8, 0))"
    outs = set()
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        outs.add(subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                                check=True).stdout.strip())
    assert outs == {str(SEED0_K8)}


def test_rows_are_drawn_before_rendering_and_reproducible(tmp_path):
    path = _mixture(tmp_path)
    first, report = _task(path).prompted_with_report(cache_dir=str(tmp_path / "a"))
    again = _task(path).prompted(cache_dir=str(tmp_path / "b"))  # a fresh cache: same rows
    assert report.few_shot.indices == tuple(SEED0_K8)
    assert sorted(set(first["example_index"])) == SEED0_K8 == sorted(set(again["example_index"]))
    per_template: dict[str, set] = {}
    for i, t in zip(first["example_index"], first["template"]):
        per_template.setdefault(t, set()).add(i)
    assert len(per_template) == 3  # every template renders the same 8 rows (the conditional one a subset)
    assert per_template["best_option"] == per_template["choose"] == set(SEED0_K8)
    assert set() < per_template["\u2026As a result, C1 or C2?"] < set(SEED0_K8)
    raw = _task(path).load(cache_dir=str(tmp_path / "a"))  # the drawn rows, in split order, their own content
    whole = dataclasses.replace(_task(path), few_shot=None).load(cache_dir=str(tmp_path / "a"))
    assert raw.to_list() == [whole[i] for i in SEED0_K8]
    other = _task(_mixture(tmp_path, "{k: 8, seed: 1}", name="seed1.yaml")).prompted(cache_dir=str(tmp_path / "a"))
    assert sorted(set(other["example_index"])) == SEED1_K8
    capped = _task(path).prompted(3, cache_dir=str(tmp_path / "a"))  # data.max_examples_per_task = 3
    assert sorted(set(capped["example_index"])) == [20, 36, 82]


def test_tokenizing_with_several_processes_keeps_the_rows(tmp_path):
    from transformers import ByT5Tokenizer

    from train.data.tokenization import tokenize_prompted

    prompted = _task(_mixture(tmp_path)).prompted(cache_dir=str(tmp_path / "c"))
    one = tokenize_prompted(prompted, ByT5Tokenizer(), "encdec")
    two = tokenize_prompted(prompted, ByT5Tokenizer(), "encdec", num_proc=2)
    assert one["example_index"] == two["example_index"] and one["input_ids"] == two["input_ids"]


def test_few_shot_json_lists_exactly_the_rows_trained_on(tmp_path):
    path = _mixture(tmp_path)
    cfg = _cfg(path, tmp_path, max_examples_per_task=5)
    written = pipeline.write_few_shot_record(cfg, tmp_path / "run")
    assert written == tmp_path / "run" / RECORD_FILE
    doc = json.loads(written.read_text())
    entry = doc["tasks"]["copa"]
    # the rows the run renders: the same call build_training_data makes
    _, tasks = pipeline.load_train_tasks(cfg)
    trained = tasks["copa"].prompted(cfg.data.max_examples_per_task, cache_dir=cfg.data.cache_dir)
    assert entry["indices"] == sorted(set(trained["example_index"])) == draw_indices(100, 8, 0, cap=5)
    assert (entry["k"], entry["seed"], entry["split"], entry["rows_in_split"], entry["used"]) == (8, 0, "validation",
                                                                                                  100, 5)
    assert entry["max_examples_per_task"] == 5 and entry["dataset"] == "super_glue/copa"
    whole = dataclasses.replace(tasks["copa"], few_shot=None).load(cache_dir=cfg.data.cache_dir)
    assert entry["row_sha256"] == [row_hash(whole[i]) for i in entry["indices"]]
    assert "PCG64" in doc["algorithm"] and doc["format"] == 1
    # no few-shot task: no file
    plain = _mixture(tmp_path, "null", name="plain.yaml")
    assert pipeline.write_few_shot_record(_cfg(plain, tmp_path), tmp_path / "plain") is None
    assert not (tmp_path / "plain" / RECORD_FILE).exists()


def test_a_member_overrides_its_task(tmp_path):
    path = _mixture(tmp_path, members="[{task: copa, few_shot: {k: 8, seed: 1}}]")
    assert _task(path).few_shot.to_dict() == {"k": 8, "seed": 1}
    assert _task(_mixture(tmp_path, members="[{task: copa, few_shot: null}]", name="all.yaml")).few_shot is None
    nested = _mixture(tmp_path, "null", members="[{task: copa, few_shot: {k: 4, seed: 0}}]", name="nested.yaml")
    outer = tmp_path / "outer.yaml"
    outer.write_text(f"mixture:\n  rate: {{type: equal}}\n  members: [{{mixture: {nested.name}}}]\n")
    assert _task_from(outer).few_shot.k == 4
    clash = tmp_path / "clash.yaml"
    clash.write_text(f"mixture:\n  rate: {{type: equal}}\n  members: [{{mixture: {nested.name}}}, "
                     "{mixture: seed1b.yaml}]\n")
    _mixture(tmp_path, "null", members="[{task: copa, few_shot: {k: 4, seed: 1}}]", name="seed1b.yaml")
    with pytest.raises(ConfigError, match=r"task 'copa' gets two different few_shot settings.*seed: 0.*seed: 1"):
        pipeline.load_mixture_tasks(clash)


def _task_from(path: Path):
    _, tasks = pipeline.load_mixture_tasks(path)
    return tasks["copa"]


@pytest.mark.parametrize("value,message", [
    ("{k: 0, seed: 0}", r"few_shot\.k must be an int >= 1, got 0"),
    ("{k: '32', seed: 0}", r"few_shot\.k must be an int >= 1, got '32'"),
    ("{k: 8, seed: -1}", r"few_shot\.seed must be an int >= 0, got -1"),
    ("{k: 8, seed: true}", r"few_shot\.seed must be an int >= 0, got True"),
    ("{kk: 8, seed: 0}", r"few_shot: unknown key 'kk'\. Did you mean 'k'\?"),
    ("{k: 8}", r"few_shot: missing seed"),
    ("32", r"few_shot must be a mapping with k and seed"),
])
def test_bad_few_shot_names_file_task_and_key(tmp_path, value, message):
    path = _mixture(tmp_path, value)
    with pytest.raises(ConfigError, match=message) as err:
        pipeline.load_mixture_tasks(path)
    assert str(path) in str(err.value) and "task 'copa'" in str(err.value)
    member = _mixture(tmp_path, "null", members=f"[{{task: copa, few_shot: {value}}}]", name="member.yaml")
    with pytest.raises(ConfigError, match=message) as err:
        pipeline.load_mixture_tasks(member)
    assert str(member) in str(err.value) and "members[0] (task 'copa')" in str(err.value)


def test_few_shot_on_a_nested_mixture_member_is_refused(tmp_path):
    _mixture(tmp_path, name="inner.yaml")
    outer = tmp_path / "outer.yaml"
    outer.write_text("mixture:\n  rate: {type: equal}\n  members: [{mixture: inner.yaml, few_shot: {k: 2, seed: 0}}]\n")
    with pytest.raises(ConfigError, match="few_shot applies to a task member"):
        pipeline.load_mixture_tasks(outer)


def test_k_larger_than_the_split_is_a_data_error(tmp_path):
    path = _mixture(tmp_path, "{k: 101, seed: 0}")
    with pytest.raises(DataError, match=r"few_shot\.k = 101 .*split 'validation' has only 100 rows") as err:
        _task(path).prompted(3, cache_dir=str(tmp_path / "c"))  # the cap does not hide it
    assert "task 'copa'" in str(err.value) and str(path) in str(err.value)


def test_the_held_out_guard_applies_to_few_shot_tasks(tmp_path):
    cfg = _cfg(_mixture(tmp_path), tmp_path)
    cfg.eval.mixture = str(REPO / "data_mixtures/demo_eval.yaml")  # holds out super_glue/copa
    with pytest.raises(ConfigError, match="overlap the held-out evaluation set: copa"):
        pipeline.build_training_data(cfg, tokenizer=None, kind="encdec")


def test_mixture_show_prints_k(tmp_path):
    from transformers import ByT5Tokenizer

    from train.data.mixture_report import format_mixture_report, show_mixture

    report = show_mixture(_mixture(tmp_path), tokenizer=ByT5Tokenizer(), samples=100, steps=100, batch_tokens=4096,
                          cache_dir=str(tmp_path / "cache"))
    (row,) = report["tasks"]
    assert row["few_shot"] == {"k": 8, "seed": 0} and 16 < row["examples"] < 8 * 3
    table = format_mixture_report(report)
    assert table.splitlines()[1].split()[:4] == ["task", "tmpl", "k", "examples"]
    assert "8 (seed 0)" in table.splitlines()[2]
    assert "few-shot task 'copa' (k=8) would be seen" in table  # repeats are expected, not "cap it lower"
