"""Tests for train/data/tasks.py and train/data/preprocessors.py: task YAML, sources, overrides, rendering, guards."""

import csv
import json
from pathlib import Path

import pytest

from train.data import preprocessors as pp
from train.errors import ConfigError, DataError, TemplateError
from train.data.tasks import (PROMPTED_FEATURES, TaskRegistry, check_held_out, lint_data, load_task_file,
                         normalize_dataset_name, preview)
from train.data.templates import format_lint_report, lint_templates

from conftest import REPO_ROOT, requires_shared

MIX = REPO_ROOT / "data_mixtures"
COPA_TEMPLATES = MIX / "templates" / "super_glue" / "copa" / "templates.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


def _write_task_file(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def _copa_task_yaml(data_file: str, extra: str = "", templates: str = str(COPA_TEMPLATES)) -> str:
    return (f"tasks:\n  - name: copa\n    source: {{type: jsonl, data_files: {{validation: {data_file}}}}}\n"
            f"    split: validation\n{extra}    templates: {{file: {templates}, names: [exercise, best_option]}}\n"
            f"    metadata: {{dataset: super_glue/copa, cluster: sentence_completion}}\n")


# ------------------------------------------------------------------------------ shipped YAMLs


def test_every_shipped_yaml_parses_and_keeps_other_sections(xp3_root):
    files = sorted(f for f in MIX.glob("*.yaml") if not f.name.startswith("_"))  # "_*": scratch files
    assert {f.name for f in files} >= {"demo_train.yaml", "demo_eval.yaml", "local_train.yaml", "local_eval.yaml",
                                       "t0_train.yaml", "t0p_train.yaml", "t0pp_train.yaml", "t0_eval.yaml"}
    for f in files:
        tf = load_task_file(f)
        assert tf.tasks, f
        if "mixture" in tf.sections:
            members = [m["task"] if isinstance(m, dict) else m for m in tf.sections["mixture"]["members"]]
            sampled = {name for m in members for name in tf.groups.get(m, [m])}  # a prompted task: its languages
            assert set(tf.own_tasks) <= sampled <= set(tf.tasks), f  # every task of a mixture file is sampled
        if "eval" in tf.sections:
            assert tf.sections["eval"]["held_out"], f
    demo = load_task_file(MIX / "demo_train.yaml")
    assert demo.sections["mixture"]["rate"] == {"type": "examples_proportional", "maximum": 500000}
    assert len(demo.tasks) >= 3


def test_demo_tasks_render_with_contract(cache):
    for name in ("demo_train.yaml", "demo_eval.yaml"):
        for task in load_task_file(MIX / name).tasks.values():
            ds, report = task.prompted_with_report(max_examples=8, cache_dir=cache)
            assert ds.features == PROMPTED_FEATURES
            assert len(ds) > 0
            row = ds[0]
            assert row["inputs"] and row["targets"] and all(row["targets"])
            assert row["task"] == task.name and row["dataset"] == task.metadata.dataset
            assert set(ds["template"]) <= {t.name for t in task.select_templates()}
            total = sum(e["rows"] for e in report.to_dict())
            assert len(ds) == total - report.skipped()


def test_demo_copa_exact_counts_and_caching(cache):
    task = load_task_file(MIX / "demo_eval.yaml").tasks["super_glue_copa"]
    ds, report = task.prompted_with_report(cache_dir=cache)
    # 12 templates x 100 rows; 4 templates render only cause (48) or only effect (52) questions.
    entries = {e["template"]: e for e in report.to_dict()}
    assert entries["…which may be caused by"]["rendered"] == 52  # the 52 "cause" questions
    assert entries["…What could happen next, C1 or C2?"]["rendered"] == 48  # the 48 "effect" questions
    assert entries["…why? C1 or C2"]["skipped"] == {"empty_input": 48}
    assert len(ds) == 12 * 100 - 200
    again = task.prompted(cache_dir=cache)
    assert again._fingerprint == ds._fingerprint  # cached by fingerprint, tokenization can map on top
    assert again[:5] == ds[:5]


def test_demo_common_gen_preprocessing(cache):
    task = load_task_file(MIX / "demo_train.yaml").tasks["common_gen"]
    rows = task.load(cache_dir=cache)
    assert rows.column_names == ["concepts", "target"]
    assert rows[0] == {"concepts": ["field", "look", "stand"],
                       "target": "The player stood in the field looking at the batter."}
    assert len(rows) == 445  # 120 concept sets exploded into one row per scene


@requires_shared
def test_local_yamls_render(cache):
    for name in ("local_train.yaml", "local_eval.yaml"):
        tf = load_task_file(MIX / name)
        for task in tf.tasks.values():
            ds = task.prompted(max_examples=15, cache_dir=cache)
            assert len(ds) > 0, task.name
    assert len(load_task_file(MIX / "local_train.yaml").tasks) >= 8


@requires_shared
def test_local_preprocessors_reach_hf_schema(cache):
    train = load_task_file(MIX / "local_train.yaml").tasks
    trec = train["trec"].load(2, cache_dir=cache)[0]
    assert trec == {"text": "How did serfdom develop in and then leave Russia ?", "fine_label": 26, "coarse_label": 2}
    ag = train["ag_news"].load(1, cache_dir=cache)[0]
    assert ag["label"] == 2 and ag["text"].startswith("Fears for T N pension after talks Unions representing")
    dream = train["dream"].load(cache_dir=cache)
    assert len(dream) == 2040  # questions, as in HF dream validation
    assert set(dream.column_names) == {"dialogue", "dialogue_id", "question", "choice", "answer"}
    cose = train["cos_e"].load(1, cache_dir=cache)[0]
    assert cose["answer"] in cose["choices"] and len(cose["choices"]) == 5
    assert cose["abstractive_explanation"] and "explanation" not in cose
    wsc = load_task_file(MIX / "local_eval.yaml").tasks["super_glue_wsc"].load(1, cache_dir=cache)[0]
    assert wsc["span1_text"] == "anyone" and wsc["span2_index"] == 47 and wsc["label"] == 0


@requires_shared
def test_t0_train_lists_exactly_the_csv_do_train_datasets(shared_data):
    rows = list(csv.DictReader(open(shared_data / "promptsource_templates/t0_experiment_metadata/experiment_D4.csv")))
    ps = shared_data / "promptsource_templates"
    expected = set()
    for r in rows:
        if r["do_train"] == "TRUE" and not r["skip"]:
            ds = r["HF_name"] + (f"/{r['subset']}" if r["subset"] else "")
            # T0 walked PromptSource's collection: a dataset without templates (tydiqa) was never trained on.
            if (ps / ds / "templates.yaml").is_file():
                expected.add(ds)
    assert len(expected) == 38
    t0 = load_task_file(MIX / "t0_train.yaml")
    assert {t.metadata.dataset for t in t0.tasks.values()} == expected
    assert all(t.source.type == "hub" and t.split == "train" for t in t0.tasks.values())
    assert t0.sections["mixture"]["rate"] == {"type": "t0_per_template", "cap": 500000}
    t0p = {t.metadata.dataset for t in load_task_file(MIX / "t0p_train.yaml").tasks.values()}
    t0pp = {t.metadata.dataset for t in load_task_file(MIX / "t0pp_train.yaml").tasks.values()}
    assert expected < t0p < t0pp
    assert {"ai2_arc/ARC-Easy", "piqa", "openbookqa/main"} <= t0p - expected
    assert t0pp - t0p == {"super_glue/boolq", "super_glue/multirc", "super_glue/record"}


def test_t0_mixtures_pass_the_held_out_guard():
    ev = load_task_file(MIX / "t0_eval.yaml")
    held, clusters = ev.sections["eval"]["held_out"], ev.sections["eval"]["clusters"]
    assert len(ev.tasks) == 11  # T0's 11 held-out evaluation sets (ANLI R1-R3 count separately)
    # Every set T0 reports separately is its own eval group (dataset), so each gets its own median.
    t0_reported = {"anli/r1", "anli/r2", "anli/r3", "super_glue/cb", "super_glue/rte", "super_glue/wsc.fixed",
                   "winogrande/winogrande_xl", "super_glue/copa", "hellaswag", "story_cloze/2016", "super_glue/wic"}
    assert {t.metadata.dataset for t in ev.tasks.values()} == t0_reported
    assert {t.split for t in ev.tasks.values() if t.metadata.dataset.startswith("anli/")} == {"dev_r1", "dev_r2", "dev_r3"}
    assert all(any(h == d or d.startswith(h + "/") for h in held) for d in t0_reported)  # `anli` covers r1-r3
    for name in ("t0_train.yaml", "t0p_train.yaml", "t0pp_train.yaml"):
        assert check_held_out(load_task_file(MIX / name).tasks.values(), held, clusters) == []
    demo_ev = load_task_file(MIX / "demo_eval.yaml").sections["eval"]
    assert check_held_out(load_task_file(MIX / "demo_train.yaml").tasks.values(), **demo_ev) == []


# ------------------------------------------------------------------------------ held-out guard


def test_normalize_dataset_name_variants():
    assert normalize_dataset_name("super_glue/rte") == "super_glue/rte"
    assert normalize_dataset_name("Super_GLUE rte") == "super_glue/rte"
    assert normalize_dataset_name("glue/rte") == "super_glue/rte"
    assert normalize_dataset_name("super_glue/wsc.fixed") == normalize_dataset_name("super_glue/wsc")
    assert normalize_dataset_name("piqa/plain_text") == "piqa"
    assert normalize_dataset_name("glue/mrpc") != normalize_dataset_name("glue/rte")


def test_held_out_guard_fires_for_glue_rte_and_clusters(tmp_path):
    f = _write_task_file(tmp_path / "t.yaml", """
tasks:
  - {name: rte_train, source: {type: hub, path: glue, name: rte}, split: train,
     templates: {file: x.yaml}, metadata: {dataset: glue/rte, cluster: paraphrase}}
  - {name: anli_r1_train, source: {type: hub, path: anli}, split: train_r1,
     templates: {file: x.yaml}, metadata: {dataset: anli/r1, cluster: qa}}
  - {name: mnli, source: {type: hub, path: glue, name: mnli}, split: train,
     templates: {file: x.yaml}, metadata: {dataset: glue/mnli, cluster: NLI}}
  - {name: ok, source: {type: hub, path: sciq}, split: train,
     templates: {file: x.yaml}, metadata: {dataset: sciq, cluster: qa}}
""")
    tasks = load_task_file(f).tasks.values()
    with pytest.raises(ConfigError) as e:
        check_held_out(tasks, held_out=["super_glue/rte", "anli"], clusters=["nli"])
    msg = str(e.value)
    assert "rte_train (dataset glue/rte = held-out super_glue/rte)" in msg
    assert "anli_r1_train" in msg and "mnli (cluster NLI is held out)" in msg and "ok" not in msg.replace("allow", "")
    offenders = check_held_out(tasks, held_out=["super_glue/rte"], clusters=[], allow=True)
    assert offenders == ["rte_train (dataset glue/rte = held-out super_glue/rte)"]


# ------------------------------------------------------------------------------ overrides & paths


def test_relative_paths_resolve_from_the_yaml_dir(tmp_path, monkeypatch, cache):
    monkeypatch.chdir(tmp_path)
    task = load_task_file(MIX / "demo_eval.yaml").tasks["super_glue_copa"]
    assert Path(task.source.data_files["validation"][0]) == MIX / "demo_data/super_glue/copa/validation.jsonl"
    assert len(task.load(cache_dir=cache)) == 100


def test_data_files_override(tmp_path, cache):
    rows = [json.loads(x) for x in (MIX / "demo_data/super_glue/copa/validation.jsonl").read_text().splitlines()[:5]]
    local = tmp_path / "my_copa.jsonl"
    local.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tf = load_task_file(MIX / "demo_eval.yaml", data_files={"super_glue_copa": str(local)})
    task = tf.tasks["super_glue_copa"]
    assert task.source.data_files == {"validation": (str(local),)}
    assert task.load(cache_dir=cache)["premise"] == [r["premise"] for r in rows]
    with pytest.raises(ConfigError, match="did you mean 'super_glue_copa'"):
        load_task_file(MIX / "demo_eval.yaml", data_files={"super_glue_cop": str(local)})


def test_data_root_redirects_hub_sources(tmp_path, monkeypatch, cache):
    root = tmp_path / "root"
    (root / "super_glue/copa").mkdir(parents=True)
    (root / "super_glue/copa/validation.jsonl").write_text(
        "\n".join((MIX / "demo_data/super_glue/copa/validation.jsonl").read_text().splitlines()[:7]))
    f = _write_task_file(tmp_path / "hub.yaml", f"""
tasks:
  - {{name: copa, source: {{type: hub, path: super_glue, name: copa}}, split: validation,
     templates: {{file: {COPA_TEMPLATES}}}, metadata: {{dataset: super_glue/copa}}}}
""")
    assert len(load_task_file(f, data_root=str(root)).tasks["copa"].load(cache_dir=cache)) == 7
    monkeypatch.setenv("MTF_DATA_ROOT", str(root))
    assert len(load_task_file(f).tasks["copa"].load(cache_dir=cache)) == 7
    monkeypatch.setenv("MTF_DATA_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="MTF_DATA_ROOT.*validation"):
        load_task_file(f).tasks["copa"].load(cache_dir=cache)


def test_include_makes_tasks_visible_and_rejects_duplicates(tmp_path):
    inc = _write_task_file(tmp_path / "base.yaml", _copa_task_yaml(str(MIX / "demo_data/super_glue/copa/validation.jsonl")))
    top = _write_task_file(tmp_path / "top.yaml", "include: [base.yaml]\nmixture: {members: [copa]}\n")
    tf = load_task_file(top)
    assert list(tf.tasks) == ["copa"] and tf.own_tasks == [] and tf.sections == {"mixture": {"members": ["copa"]}}
    dup = _write_task_file(tmp_path / "dup.yaml", "include: [base.yaml]\n" + _copa_task_yaml("x.jsonl"))
    with pytest.raises(ConfigError, match="'copa' is defined twice"):
        load_task_file(dup)
    assert inc.exists()


# ------------------------------------------------------------------------------ config errors


def test_unknown_task_key_suggests_the_right_one(tmp_path):
    body = _copa_task_yaml("d.jsonl").replace("    templates:", "    templtes:")
    with pytest.raises(ConfigError, match=r"tasks\[copa\]: unknown key 'templtes'. Did you mean 'templates'"):
        load_task_file(_write_task_file(tmp_path / "t.yaml", body))


def test_unknown_preprocessor_and_argument(tmp_path):
    bad_name = _copa_task_yaml("d.jsonl", "    preprocessors: [{name: renam, args: {mapping: {a: b}}}]\n")
    with pytest.raises(ConfigError, match="unknown preprocessor 'renam'. Did you mean 'rename'"):
        load_task_file(_write_task_file(tmp_path / "a.yaml", bad_name))
    bad_arg = _copa_task_yaml("d.jsonl", "    preprocessors: [{name: rename, args: {maping: {a: b}}}]\n")
    with pytest.raises(ConfigError, match="no argument 'maping'. Did you mean 'mapping'"):
        load_task_file(_write_task_file(tmp_path / "b.yaml", bad_arg))


def test_invalid_task_yaml(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_task_file(_write_task_file(tmp_path / "t.yaml", "tasks: [\n"))


def test_task_registry_is_loud():
    reg = TaskRegistry()
    reg.add_file(load_task_file(MIX / "demo_train.yaml"))
    with pytest.raises(ConfigError, match="already registered"):
        reg.add(load_task_file(MIX / "demo_train.yaml").tasks["common_gen"])
    with pytest.raises(ConfigError, match=r"unknown task 'comon_gen'. Did you mean \['common_gen'.*Known tasks"):
        reg.get("comon_gen")
    reg.reset()
    assert reg.names() == []


# ------------------------------------------------------------------------------ data errors


def test_empty_dataset_names_file(tmp_path, cache):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    task = load_task_file(_write_task_file(tmp_path / "t.yaml", _copa_task_yaml(str(empty)))).tasks["copa"]
    with pytest.raises(DataError, match=rf"task 'copa'.*no rows in {empty}"):
        task.load(cache_dir=cache)


def test_non_utf8_line_names_file_and_line(tmp_path, cache):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"premise": "ok"}\n{"premise": "caf\xe9"}\n')
    task = load_task_file(_write_task_file(tmp_path / "t.yaml", _copa_task_yaml(str(bad)))).tasks["copa"]
    with pytest.raises(DataError, match=rf"task 'copa'.*{bad}:2: not valid UTF-8 \(byte 0xe9\)"):
        task.load(cache_dir=cache)


def test_invalid_json_line_names_line(tmp_path, cache):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"premise": "ok"}\n{"premise": \n')
    task = load_task_file(_write_task_file(tmp_path / "t.yaml", _copa_task_yaml(str(bad)))).tasks["copa"]
    with pytest.raises(DataError, match=rf"{bad}:2: invalid JSON"):
        task.load(cache_dir=cache)


def test_missing_data_file(tmp_path, cache):
    task = load_task_file(_write_task_file(tmp_path / "t.yaml", _copa_task_yaml("nope.jsonl"))).tasks["copa"]
    with pytest.raises(DataError, match=r"data file not found: .*nope.jsonl"):
        task.load(cache_dir=cache)


def test_missing_field_over_threshold_names_template_field_and_row(tmp_path, cache):
    data = tmp_path / "copa.jsonl"
    data.write_text("\n".join(json.dumps({"premise": f"p{i}", "choice1": "a", "choice2": "b", "label": 0})
                              for i in range(6)))  # no "question" field
    task = load_task_file(_write_task_file(tmp_path / "t.yaml", _copa_task_yaml(str(data)))).tasks["copa"]
    with pytest.raises(DataError, match=r"template 'exercise'.*failed on 6/6 rows.*missing_field 'question'"
                                        r" at example_index 0"):
        task.prompted(cache_dir=cache)


def test_missing_field_below_threshold_is_counted_and_skipped(tmp_path, cache):
    rows = [{"premise": f"p{i}", "choice1": "a", "choice2": "b", "label": 1, "question": "effect"} for i in range(5)]
    rows[4]["label"] = 7  # answer_choices[7] does not exist: counted like a missing field
    data = tmp_path / "copa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task_file(_write_task_file(tmp_path / "t.yaml", _copa_task_yaml(str(data)))).tasks["copa"]
    ds, report = task.prompted_with_report(cache_dir=cache)
    assert len(ds) == 8 and 4 not in ds["example_index"]
    entry = {e["template"]: e for e in report.to_dict()}["exercise"]
    assert entry["skipped"] == {"missing_field": 1}
    assert entry["first_skip"]["missing_field"] == {"example_index": 4, "detail": "[7] (an index out of range)"}
    assert set(ds["targets"][0]) == {"b"}


def test_preprocessor_missing_field_is_a_data_error(tmp_path, cache):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"premise": "p"}) + "\n")
    body = _copa_task_yaml(str(data), "    preprocessors: [{name: flatten, args: {field: target}}]\n")
    task = load_task_file(_write_task_file(tmp_path / "t.yaml", body)).tasks["copa"]
    with pytest.raises(DataError, match=r"task 'copa'.*preprocessor 'flatten' at source row 0: field 'target'"):
        task.load(cache_dir=cache)


def test_unknown_template_name_in_task(tmp_path):
    body = _copa_task_yaml("d.jsonl").replace("names: [exercise, best_option]", "names: [excercise]")
    task = load_task_file(_write_task_file(tmp_path / "t.yaml", body)).tasks["copa"]
    with pytest.raises(TemplateError, match="no template named 'excercise'. Did you mean"):
        task.select_templates()


# ------------------------------------------------------------------------------ preview, lint, preprocessors


def test_preview_and_lint_data():
    rows = preview(MIX / "demo_eval.yaml", n=2)
    assert len(rows) == 2 * 12
    assert rows[0]["task"] == "super_glue_copa" and rows[0]["example_index"] == 0
    assert rows[0]["targets"] == ["Water flowed from the spout."]
    data = lint_data(MIX / "demo_eval.yaml", max_examples=100)
    report = lint_templates([COPA_TEMPLATES], data=data)
    rates = {k: v["success_rate"] for k, v in report["files"][0]["render"].items()}
    assert rates["exercise"] == 1.0 and rates["…which may be caused by"] == 0.52
    assert "super_glue/copa" in format_lint_report(report)


def test_preprocessors_are_pure():
    ex = {"text": "x", "target": {"span1_text": "a", "span2_index": 3}, "label": False, "questions": [{"q": 1}, {"q": 2}]}
    frozen = json.dumps(ex, sort_keys=True)
    assert pp.flatten(ex, field="target") == {"text": "x", "span1_text": "a", "span2_index": 3, "label": False,
                                              "questions": [{"q": 1}, {"q": 2}]}
    assert pp.map_values(ex, field="label", mapping={False: 0, True: 1})["label"] == 0
    assert pp.map_values({"label": "true"}, field="label", mapping={False: 0, True: 1})["label"] == 1
    assert [r["q"] for r in pp.explode(ex, field="questions")] == [1, 2]
    assert pp.explode({"s": [], "k": 1}, field="s") == []
    assert pp.lookup({"c": {"text": ["x", "y"], "label": ["A", "B"]}, "k": "B"}, values="c.text", keys="c.label",
                     key="k", into="answer")["answer"] == "y"
    assert json.dumps(ex, sort_keys=True) == frozen
    with pytest.raises(ValueError, match="not in the mapping"):
        pp.map_values({"label": "maybe"}, field="label", mapping={"yes": 1})
    with pytest.raises(ConfigError, match="already registered"):
        pp.PREPROCESSORS.register("rename")(lambda ex: ex)


def test_csv_source_with_preprocessors_and_inconsistent_rows(tmp_path, cache):
    ag_templates = tmp_path / "templates.yaml"
    ag_templates.write_text("dataset: ag_news\ntemplates:\n  a: !Template\n    id: a\n    name: topic\n"
                            "    answer_choices: World ||| Sports ||| Business ||| Sci/Tech\n"
                            "    jinja: '{{ text }} Topic? ||| {{ answer_choices[label] }}'\n")
    data = tmp_path / "ag.csv"
    data.write_text('Class Index,Title,Description\n2,"Cup final","Team wins, fans cheer"\n4,Chips,Faster\n')
    f = _write_task_file(tmp_path / "t.yaml", """
tasks:
  - name: ag
    source: {type: csv, data_files: ag.csv}
    split: test
    preprocessors:
      - {name: join, args: {fields: [Title, Description], into: text, separator: ". "}}
      - {name: cast, args: {field: Class Index, to: int}}
      - {name: add, args: {field: Class Index, value: -1}}
      - {name: rename, args: {mapping: {Class Index: label}}}
      - {name: drop, args: {fields: [Title, Description]}}
    templates: {file: templates.yaml}
    metadata: {dataset: ag_news}
""")
    ds = load_task_file(f).tasks["ag"].prompted(cache_dir=cache)
    assert ds["inputs"] == ["Cup final. Team wins, fans cheer Topic?", "Chips. Faster Topic?"]
    assert ds["targets"] == [["Sports"], ["Sci/Tech"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"premise": "a", "label": 0}\n{"premise": "b"}\n')
    task = load_task_file(_write_task_file(tmp_path / "b.yaml", _copa_task_yaml(str(bad)))).tasks["copa"]
    with pytest.raises(DataError, match=rf"{bad}:2: fields differ from the first row \(missing \['label'\]"):
        task.load(cache_dir=cache)


def test_rows_preprocessor_keeps_schema_when_a_whole_batch_explodes_to_nothing():
    import datasets

    from train.data.tasks import _preprocess_batch

    ds = datasets.Dataset.from_list([{"k": i, "s": [] if i < 3 else [i * 10]} for i in range(5)])
    out = ds.map(_preprocess_batch, batched=True, batch_size=2, with_indices=True, remove_columns=ds.column_names,
                 fn_kwargs={"calls": [("explode", {"field": "s"})], "join_rows": None, "join_on": None,
                            "where": "w", "out_keys": ["k", "s"]})
    assert out.to_list() == [{"k": 3, "s": 30}, {"k": 4, "s": 40}]
