"""Tests for train/data/templates.py: safe loading, golden renders, seeded `choice`, sandbox, errors, lint."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from train.errors import TemplateError
from train.data.templates import (PIPE_PROTECTOR, MissingFieldError, Template, format_lint_report,
                             lint_templates, load_templates, parse_templates)

from conftest import REPO_ROOT, requires_shared

DEMO_TEMPLATES = REPO_ROOT / "data_mixtures" / "templates"


def _ps(shared_data: Path, dataset: str):
    return load_templates(shared_data / "promptsource_templates" / dataset / "templates.yaml")


# ------------------------------------------------------------------------------ golden renders
# Expected strings are written by hand from each template's text (printed in the comment).


@requires_shared
def test_golden_rte(shared_data):
    # '{{premise}} Using only the above description and what you know about the world, is "{{hypothesis}}"
    #  definitely correct? Yes or no? ||| {% if label != -1 %}{{ answer_choices[label] }}{% endif %}'
    t = _ps(shared_data, "super_glue/rte")["MNLI crowdsource"]
    r = t.render({"premise": "Cats purr.", "hypothesis": "Dogs purr.", "label": 1, "idx": 0}, seed_key=0)
    assert r.inputs == ('Cats purr. Using only the above description and what you know about the world, '
                        'is "Dogs purr." definitely correct? Yes or no?')
    assert r.targets == ["No"]
    assert r.answer_choices == ["Yes", "No"]


@requires_shared
def test_golden_cb(shared_data):
    # '{{premise}}\nQuestion: {{hypothesis}} True, False, or Neither? ||| {% if label !=-1 %}...'
    t = _ps(shared_data, "super_glue/cb")["GPT-3 style"]
    r = t.render({"premise": "It rained.", "hypothesis": "The sun shone.", "label": 2}, seed_key=0)
    assert r.inputs == "It rained.\nQuestion: The sun shone. True, False, or Neither?"
    assert r.targets == ["Neither"]
    assert r.answer_choices == ["True", "False", "Neither"]


def test_golden_copa_demo_template():
    # shipped copy; '{{ premise }} \n\nWhat's the best option?\n- {{choice1}}\n- {{choice2}}\n\n
    #  We are looking for {% if question == "cause" %} a cause {% else %} an effect {% endif %}\n||| ...'
    t = load_templates(DEMO_TEMPLATES / "super_glue/copa/templates.yaml")["best_option"]
    ex = {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
          "choice2": "The grass was cut.", "question": "cause", "label": 0, "idx": 0}
    r = t.render(ex, seed_key=0)
    assert r.inputs == ("My body cast a shadow over the grass. \n\nWhat's the best option?\n"
                        "- The sun was rising.\n- The grass was cut.\n\nWe are looking for  a cause")
    assert r.targets == ["The sun was rising."]  # no leading space (T0 strip_whitespace)
    assert r.answer_choices == ["The sun was rising.", "The grass was cut."]


@requires_shared
def test_golden_ag_news(shared_data):
    # 'What label best describes this news article?\n{{text}} ||| \n{{answer_choices[label] }}'
    t = _ps(shared_data, "ag_news")["classify_question_first"]
    r = t.render({"text": "NASA launches a probe.", "label": 3}, seed_key=0)
    assert r.inputs == "What label best describes this news article?\nNASA launches a probe."
    assert r.targets == ["Science and technology"]


@requires_shared
def test_golden_trec(shared_data):
    # "Categories: {{', '.join(answer_choices)}}\n\nWhat category best describes: {{text}} \nAnswer: |||
    #  {{ answer_choices [coarse_label] }}"
    t = _ps(shared_data, "trec")["what_category_best_describe"]
    r = t.render({"text": "How far is it from Denver to Aspen ?", "coarse_label": 5, "fine_label": 40}, seed_key=0)
    assert r.inputs == ("Categories: Abbreviation, Entity, Description, Person, Location, Quantity\n\n"
                        "What category best describes: How far is it from Denver to Aspen ? \nAnswer:")
    assert r.targets == ["Quantity"]


@requires_shared
def test_golden_sciq(shared_data):
    # 'Q: {{question}}\n\n\nA:|||{{answer_choices[3]}}\n'; answer_choices '{{distractor1}} ||| ... ||| {{correct_answer}}'
    t = _ps(shared_data, "sciq")["Direct Question (Closed Book)"]
    ex = {"question": "What gas do plants absorb?", "distractor1": "oxygen", "distractor2": "helium",
          "distractor3": "neon", "correct_answer": "carbon dioxide", "support": "Plants ..."}
    r = t.render(ex, seed_key=0)
    assert r.inputs == "Q: What gas do plants absorb?\n\n\nA:"
    assert r.targets == ["carbon dioxide"]
    assert r.answer_choices == ["oxygen", "helium", "neon", "carbon dioxide"]


# ------------------------------------------------------------------------------ rendering rules


def test_pipe_in_field_value_is_escaped_and_restored():
    t = Template(id="t", name="pipes", jinja="{{ a }} ||| {{ b }}", answer_choices="{{ a }} ||| no")
    r = t.render({"a": "x ||| y", "b": "z"}, seed_key=0)
    assert r.inputs == "x ||| y"
    assert r.targets == ["z"]
    assert r.answer_choices == ["x ||| y", "no"]
    assert PIPE_PROTECTOR not in r.inputs


def test_multiple_targets_and_answer_choices_variable():
    t = Template(id="t", name="multi", jinja="{{ q }} ||| {{ answer_choices[0] }} ||| {{ answer_choices[1] }}",
                 answer_choices="{{ c | join(' ||| ') }}")
    r = t.render({"q": "Q", "c": ["one", "two"]}, seed_key=0)
    assert r.targets == ["one", "two"]
    assert r.answer_choices == ["one", "two"]


def test_truncation_matches_promptsource_and_can_be_disabled():
    t = Template(id="t", name="long", jinja="{{ x }} ||| y")
    long = "word " * 1000  # 5000 chars
    truncated = t.render({"x": long}, seed_key=0).inputs
    assert len(truncated) <= 2048 and truncated.endswith("...")
    assert t.render({"x": long}, seed_key=0, max_field_chars=None).inputs == long.strip()
    assert t.render({"x": "abcdefghij klmnop"}, seed_key=0, max_field_chars=5).inputs == "ab..."  # jinja truncate: keeps words, adds "..."


def test_example_is_not_mutated_by_template():
    t = Template(id="t", name="mut", jinja="{{ xs.append(4) or '' }}{{ xs | length }} ||| ok")
    ex = {"xs": [1, 2, 3]}
    assert t.render(ex, seed_key=0).inputs == "4"
    assert ex["xs"] == [1, 2, 3]


# ------------------------------------------------------------------------------ seeded choice

_CHOICE = Template(id="c1", name="pick", dataset="demo/x",
                   jinja="{{ ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'] | choice }} {{ range(100) | random }} ||| t")


def test_choice_is_deterministic_per_example_and_varies_across_examples():
    first = [_CHOICE.render({}, seed_key=i).inputs for i in range(40)]
    again = [_CHOICE.render({}, seed_key=i).inputs for i in range(40)]
    assert first == again
    assert len(set(first)) > 10  # different examples get different draws


def test_choice_is_identical_in_a_fresh_interpreter():
    here = [_CHOICE.render({}, seed_key=i).inputs for i in range(5)]
    code = textwrap.dedent("""
        from train.data.templates import Template
        t = Template(id="c1", name="pick", dataset="demo/x",
                     jinja="{{ ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'] | choice }} {{ range(100) | random }} ||| t")
        print(repr([t.render({}, seed_key=i).inputs for i in range(5)]))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == repr(here)


@requires_shared
def test_real_choice_template_sciq_is_deterministic(shared_data):
    t = _ps(shared_data, "sciq")["Multiple Choice"]  # `{% set order = [...] | choice %}`
    ex = {"question": "Q?", "support": "S.", "distractor1": "d1", "distractor2": "d2", "distractor3": "d3",
          "correct_answer": "right"}
    renders = [t.render(ex, seed_key=k).inputs for k in range(30)]
    assert renders == [t.render(ex, seed_key=k).inputs for k in range(30)]
    assert len(set(renders)) > 1  # the option order really is drawn
    assert all(t.render(ex, seed_key=k).targets == ["right"] for k in range(3))


# ------------------------------------------------------------------------------ sandbox & errors


@pytest.mark.parametrize("jinja", ["{{ ''.__class__.__mro__ }}", "{{ x.__class__.__base__.__subclasses__() }}",
                                   "{{ cycler.__init__.__globals__ }}"])
def test_sandbox_refuses_escapes(jinja):
    t = Template(id="t", name="evil", jinja=jinja, file="evil.yaml")
    with pytest.raises(TemplateError, match=r"'evil'.*evil.yaml.*refused by the Jinja sandbox"):
        t.render({"x": "s"}, seed_key=0)


def test_invalid_yaml_names_file(tmp_path):
    f = tmp_path / "templates.yaml"
    f.write_text("dataset: x\ntemplates:\n  a: !Template\n    name: [unclosed\n")
    with pytest.raises(TemplateError, match=str(f)):
        load_templates(f)


def test_python_object_tags_are_refused(tmp_path):
    f = tmp_path / "templates.yaml"
    f.write_text("dataset: x\ntemplates:\n  a: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(TemplateError, match="invalid templates YAML"):
        load_templates(f)


def test_jinja_syntax_error_names_file_and_template():
    coll = parse_templates("dataset: d\ntemplates:\n  u1: !Template\n    id: u1\n    name: broken\n"
                           "    jinja: '{{ premise ||| x'\n", path="bad/templates.yaml")
    with pytest.raises(TemplateError, match=r"'broken'.*bad/templates.yaml.*Jinja error"):
        coll["broken"].render({"premise": "p"}, seed_key=0)


def test_unknown_filter_named_even_inside_a_branch():
    t = Template(id="u", name="filt", jinja="{% if x %}{{ x | shout }}{% endif %} ||| y", file="f.yaml")
    with pytest.raises(TemplateError, match=r"'filt'.*f.yaml.*unknown filter 'shout'"):
        t.render({"x": 1}, seed_key=0)


def test_missing_field_names_field_template_and_file():
    t = Template(id="u", name="needs_hyp", jinja="{{ premise }} {{ hypothesis }} ||| y", file="rte.yaml")
    with pytest.raises(MissingFieldError, match=r"'needs_hyp'.*rte.yaml.*field 'hypothesis' is missing") as e:
        t.render({"premise": "p"}, seed_key=0)
    assert e.value.field == "hypothesis"
    nested = Template(id="v", name="nested", jinja="{{ choices.text }} ||| y")
    with pytest.raises(MissingFieldError) as e2:
        nested.render({"choices": {"label": ["A"]}}, seed_key=0)
    assert e2.value.field == "text"


def test_render_or_skip_classifies_data_problems():
    t = Template(id="u", name="cond", jinja="{% if label == 1 %}{{ text }} ||| yes{% endif %}")
    assert t.render_or_skip({"label": 0, "text": "a"}, seed_key=0)[1] == "empty_input"
    assert t.render_or_skip({"label": 1}, seed_key=0)[1:] == ("missing_field", "text")
    r, reason, _ = t.render_or_skip({"label": 1, "text": "a"}, seed_key=0)
    assert reason == "" and r.targets == ["yes"]
    empty_target = Template(id="w", name="et", jinja="{{ text }} ||| {{ '' }}")
    assert empty_target.render_or_skip({"text": "a"}, seed_key=0)[1] == "empty_target"


# ------------------------------------------------------------------------------ selection & lint


def test_selection_filters_and_unknown_name():
    coll = load_templates(DEMO_TEMPLATES / "super_glue/copa/templates.yaml")
    assert len(coll) == 12
    assert [t.name for t in coll.select(names=["choose", "exercise"])] == ["exercise", "choose"]
    assert all(t.metadata.original_task for t in coll.select(original_task=True))
    assert len(coll.select(languages=["fr"])) == 0
    assert coll.dataset == "super_glue/copa"
    with pytest.raises(TemplateError, match="Did you mean.*choose"):
        coll.select(names=["chose"])


@requires_shared
def test_lint_all_shared_templates_loads_without_errors(shared_data):
    report = lint_templates([shared_data / "promptsource_templates"])
    assert report["summary"]["files"] == 279
    assert report["summary"]["templates"] == 2085
    assert report["summary"]["load_errors"] == 0, report["summary"]["files_with_errors"]
    assert "279 files, 2085 templates, 0 load errors" in format_lint_report(report)


def test_lint_with_data_reports_success_rate(tmp_path):
    f = tmp_path / "templates.yaml"
    f.write_text("dataset: toy\ntemplates:\n"
                 "  a: !Template\n    id: a\n    name: ok\n    jinja: '{{ x }} ||| {{ y }}'\n"
                 "    metadata: !TemplateMetadata {original_task: true, languages: [en]}\n"
                 "  b: !Template\n    id: b\n    name: broken\n    jinja: '{{ x | nope }}'\n"
                 "    metadata: !TemplateMetadata {original_task: true, languages: [en]}\n")
    rows = [{"x": "1", "y": "2"}, {"x": "3"}]
    report = lint_templates([f], data={"toy": rows})
    entry = report["files"][0]
    assert entry["templates"] == 2 and len(entry["load_errors"]) == 1 and "nope" in entry["load_errors"][0]
    assert entry["render"]["ok"]["success_rate"] == 0.5
    assert entry["render"]["ok"]["skipped"] == {"missing_field": 1}
    assert "0.0" in str(entry["render"]["broken"]["success_rate"])
    text = format_lint_report(report)
    assert "toy" in text and "ERROR" in text
