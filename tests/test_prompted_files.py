"""Prompted-file tasks (xP3's jsonl: rows that already hold ``inputs`` and ``targets``), split by language.

The equivalence test writes what a templated task renders into xP3's layout (``<lang>/<file>.jsonl``) and
checks that reading it back as a ``prompted:`` task gives the same tokenized examples.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import ByT5Tokenizer

from train.data.mixtures import plan_mixture
from train.data.pipeline import _expand_groups, check_held_out_languages, load_mixture_tasks
from train.data.tasks import check_held_out, load_task_file
from train.data.tokenization import tokenize_prompted
from train.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
XCOPA = REPO / "data_mixtures" / "demo_data" / "xcopa"
TEMPLATES = REPO / "data_mixtures" / "templates" / "xp3mt" / "xcopa"
LANGUAGES = ("sw", "ta", "zh")


def _write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def _templated_file(tmp_path: Path) -> Path:
    """One templated XCOPA task per language, with its machine-translated prompts."""
    tasks = [{"name": f"xcopa_{code}", "source": {"type": "jsonl", "data_files": str(XCOPA / code / f"val.{code}.jsonl")},
              "split": "validation", "templates": {"file": str(TEMPLATES / code / "templates.yaml")},
              "metadata": {"dataset": f"xcopa/{code}", "language": code}} for code in LANGUAGES]
    return _write_yaml(tmp_path / "templated.yaml", {"tasks": tasks})


def _export_xp3(templated: Path, root: Path, max_examples: int = 20) -> None:
    """xP3's layout: one folder per language, one jsonl per prompt, rows {inputs, targets, template, ...}."""
    for task in load_task_file(templated).tasks.values():
        rows = task.prompted(max_examples).to_list()
        for template in dict.fromkeys(r["template"] for r in rows):
            folder = root / task.metadata.language
            folder.mkdir(parents=True, exist_ok=True)
            stem = "".join(c if c.isalnum() else "_" for c in template)
            with open(folder / f"xcopa_{stem}.jsonl", "w", encoding="utf-8") as fh:
                for r in rows:
                    if r["template"] == template:
                        fh.write(json.dumps({"inputs": r["inputs"], "targets": r["targets"][0], "template": template,
                                             "answer_choices": r["answer_choices"], "lang": task.metadata.language},
                                            ensure_ascii=False) + "\n")


def _prompted_file(tmp_path: Path, language, *, files="xp3/*/*.jsonl", name="xp3", **prompted) -> Path:
    task = {"name": name, "source": {"type": "jsonl", "data_files": {"train": files}}, "split": "train",
            "prompted": {"template": {"column": "template"}, "answer_choices": "answer_choices", **prompted},
            "metadata": {"dataset": "xcopa"}}
    if language is not None:
        task["prompted"]["language"] = language
    return _write_yaml(tmp_path / f"{name}.yaml", {"tasks": [task]})


def _token_rows(dataset, tokenizer) -> list[tuple]:
    out = tokenize_prompted(dataset, tokenizer, "encdec")
    return sorted((r["template"], r["input_ids"], r["target_ids"], json.dumps(r["choice_ids"]))
                  for r in out.to_list())


@pytest.fixture(scope="module")
def xp3(tmp_path_factory):
    if not (XCOPA / "sw").is_dir():
        pytest.skip("data_mixtures/demo_data/xcopa is not in this checkout")
    tmp = tmp_path_factory.mktemp("xp3")
    templated = _templated_file(tmp)
    _export_xp3(templated, tmp / "xp3")
    return tmp, templated


@pytest.mark.parametrize("language", ["path", {"column": "lang"}])
def test_prompted_files_give_the_templated_tokens(xp3, language):
    tmp, templated = xp3
    prompted = load_task_file(_prompted_file(tmp, language))
    assert prompted.groups == {"xp3": [f"xp3.{code}" for code in LANGUAGES]}
    tokenizer = ByT5Tokenizer()
    rendered = load_task_file(templated).tasks
    for code in LANGUAGES:
        task = prompted.tasks[f"xp3.{code}"]
        assert task.metadata.language == code
        expected = _token_rows(rendered[f"xcopa_{code}"].prompted(20), tokenizer)
        got = _token_rows(task.prompted(), tokenizer)
        assert len(got) == len(expected) > 0
        assert got == expected  # same prompt text, targets and answer choices, token for token


def test_file_stems_name_the_prompts_and_the_cap_counts_rows(xp3):
    tmp, _ = xp3
    task_file = load_task_file(_prompted_file(tmp, "path", name="stems", template=None))
    task = task_file.tasks["stems.sw"]
    stems = task.template_names()
    assert len(stems) == 5 and all(s.startswith("xcopa_") for s in stems)
    rows = task.prompted(7)
    assert len(rows) == 7 and set(rows["template"]) == {stems[0]}
    assert rows["example_index"] == list(range(7))
    assert set(rows["dataset"]) == {"xcopa"}


def test_a_mixture_member_naming_the_task_samples_every_language(xp3, tmp_path):
    tmp, _ = xp3
    doc = yaml.safe_load(_prompted_file(tmp, "path").read_text(encoding="utf-8"))
    doc["mixture"] = {"rate": {"type": "examples_proportional"}, "members": ["xp3"]}
    path = _write_yaml(tmp / "mix.yaml", doc)
    spec, tasks = load_mixture_tasks(path)
    assert spec.task_names() == [f"xp3.{code}" for code in LANGUAGES]
    counts = {name: len(task.prompted()) for name, task in tasks.items()}
    plan = plan_mixture(spec, counts)
    assert sum(s.probability for s in plan.sources) == pytest.approx(1.0)
    # expanding twice changes nothing: the expanded names are plain tasks
    assert _expand_groups(spec, {"xp3": []}).members == spec.members


def test_held_out_guards_see_prompted_tasks(xp3, tmp_path):
    tmp, _ = xp3
    tasks = load_task_file(_prompted_file(tmp, "path")).tasks.values()
    with pytest.raises(ConfigError, match=r"xp3\.sw \(dataset xcopa = held-out xcopa\)"):
        check_held_out(tasks, ["xcopa"])
    eval_file = load_task_file(_write_yaml(tmp_path / "eval.yaml", {
        "tasks": [{"name": "ev", "source": {"type": "jsonl", "data_files": str(XCOPA / "ta" / "val.ta.jsonl")},
                   "split": "validation", "templates": {"file": str(TEMPLATES / "ta" / "templates.yaml")},
                   "metadata": {"dataset": "xcopa/ta", "language": "ta", "prompts": "mt"}}],
        "eval": {"held_out": ["xcopa"], "held_out_languages": ["ta"]}}))
    with pytest.raises(ConfigError, match=r"xp3\.ta \(.*xp3\.yaml, metadata\.language ta\).*eval\.held_out_languages"):
        check_held_out_languages(tasks, eval_file)
    eval_file.sections["eval"]["held_out_languages"] = ["tx"]
    with pytest.raises(ConfigError, match=r"eval\.held_out_languages: no task of this eval mixture is in language 'tx'"):
        check_held_out_languages(tasks, eval_file)


def test_missing_inputs_or_targets_name_the_file_and_key(tmp_path):
    folder = tmp_path / "xp3" / "fr"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text('{"prompt": "Bonjour ?", "targets": "oui"}\n', encoding="utf-8")
    task = load_task_file(_prompted_file(tmp_path, "path", template=None, answer_choices=None)).tasks["xp3.fr"]
    with pytest.raises(DataError, match=r"a\.jsonl has no column 'inputs' \(prompted\.inputs\).*prompted: \{inputs: COLUMN\}"):
        task.prompted()
    (folder / "a.jsonl").write_text('{"inputs": "Bonjour ?", "answer": "oui"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"no column 'targets' \(prompted\.targets\)"):
        load_task_file(_prompted_file(tmp_path, "path", template=None, answer_choices=None)).tasks["xp3.fr"].prompted()
    renamed = _prompted_file(tmp_path, "path", template=None, answer_choices=None, targets="answer")
    assert load_task_file(renamed).tasks["xp3.fr"].prompted()["targets"] == [["oui"]]
    (folder / "a.jsonl").write_text('{"inputs": "Bonjour ?", "targets": "oui"}\n{"inputs": "Salut"}\n',
                                    encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl:2: fields differ from the first row \(missing \['targets'\]"):
        load_task_file(_prompted_file(tmp_path, "path", template=None, answer_choices=None)).tasks["xp3.fr"].prompted()


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(templates={"file": "x.yaml"}), "exactly one of `templates`"),
    (lambda t: t.pop("prompted"), "exactly one of `templates`"),
    (lambda t: t["prompted"].update(language="folder"), r"prompted\.language: `path`"),
    (lambda t: t["prompted"].update(input="text"), r"prompted: unknown key 'input'. Did you mean 'inputs'"),
    (lambda t: t["metadata"].update(language="fr"), r"from `prompted\.language` \(path\) and from `metadata\.language`"),
    (lambda t: t.update(few_shot={"k": 4}), "a prompted-file task has no few-shot draw"),
    (lambda t: t.update(source={"type": "hub", "path": "bigscience/xP3"}), r"prompted\.language: `path` takes each"),
    (lambda t: t.update(source={"type": "hub", "path": "bigscience/xP3"}, prompted={"language": {"column": "lang"}}),
     r"prompted\.language: the languages of a column are read from the task's files"),
])
def test_bad_prompted_sections_are_config_errors(tmp_path, change, message):
    folder = tmp_path / "xp3" / "fr"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text('{"inputs": "Bonjour ?", "targets": "oui"}\n', encoding="utf-8")
    doc = yaml.safe_load(_prompted_file(tmp_path, "path").read_text(encoding="utf-8"))
    change(doc["tasks"][0])
    with pytest.raises(ConfigError, match=message):
        load_task_file(_write_yaml(tmp_path / "bad.yaml", doc))
