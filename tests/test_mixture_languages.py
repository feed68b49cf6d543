"""Language-aware mixing (``mixture.languages:``): hand-computed rates, realised shares, validation errors."""

import json

import datasets
import numpy as np
import pytest
from scipy.stats import chisquare

from train.data.mixture_report import format_mixture_report, mixture_report
from train.data.mixtures import MixtureStream, PlannedSource, count_examples, load_mixture_spec, plan_mixture
from train.errors import ConfigError

COUNTS = {"a": 900, "b": 100, "c": 100, "d": 10}
LANGUAGES = {"a": "en", "b": "en", "c": "zh", "d": "sw"}  # n_en = 1000, n_zh = 100, n_sw = 10


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _mixture(tmp_path, languages, rate="{type: examples_proportional}", name="m.yaml"):
    return _write(tmp_path, name, f"mixture:\n  rate: {rate}\n  members: [a, b, c, d]\n  languages: {languages}\n")


def _probs(plan):
    return {s.name: s.probability for s in plan.sources}


def _tokenized(task, n, templates=None):
    cols = {"input_ids": [[i, 5, 6] for i in range(n)], "target_ids": [[7]] * n, "task": [task] * n}
    if templates:
        cols["template"] = [templates[i * len(templates) // n] for i in range(n)]
    return datasets.Dataset.from_dict(cols)


# -- rates ------------------------------------------------------------------------------------------


def test_temperature_with_alpha_is_n_to_the_alpha(tmp_path):
    plan = plan_mixture(load_mixture_spec(_mixture(tmp_path, "{type: temperature, alpha: 0.3}")), COUNTS, LANGUAGES)
    # 1000 ** 0.3, 100 ** 0.3, 10 ** 0.3, by hand
    r = {"en": 7.943282347, "zh": 3.981071706, "sw": 1.995262315}
    total = sum(r.values())  # 13.919616368
    assert plan.language_shares() == pytest.approx({k: v / total for k, v in r.items()})
    # within English, a and b keep their examples_proportional shares 900 : 100
    assert _probs(plan) == pytest.approx(
        {"a": r["en"] / total * 0.9, "b": r["en"] / total * 0.1, "c": r["zh"] / total, "d": r["sw"] / total}
    )
    assert plan.task_language_shares() == pytest.approx(
        {("a", "en"): r["en"] / total * 0.9, ("b", "en"): r["en"] / total * 0.1, ("c", "zh"): r["zh"] / total,
         ("d", "sw"): r["sw"] / total}
    )
    assert {s.task: s.language for s in plan.sources} == LANGUAGES


def test_temperature_caps_first(tmp_path):
    spec = load_mixture_spec(_mixture(tmp_path, "{type: temperature, temperature: 2, maximum: 500}"))
    r = {"en": 22.360679775, "zh": 10.0, "sw": 3.162277660}  # sqrt(500) (en capped), sqrt(100), sqrt(10)
    total = sum(r.values())
    assert plan_mixture(spec, COUNTS, LANGUAGES).language_shares() == pytest.approx(
        {k: v / total for k, v in r.items()})


def test_weights_and_equal(tmp_path):
    weights = "{type: weights, weights: {en: 3, zh: 1, sw: 0.5}}"
    spec = load_mixture_spec(_mixture(tmp_path, weights, rate="{type: equal}"))
    plan = plan_mixture(spec, COUNTS, LANGUAGES)
    # task rates are equal, so a and b split English's 3 / 4.5 evenly
    assert _probs(plan) == pytest.approx({"a": 1.5 / 4.5, "b": 1.5 / 4.5, "c": 1 / 4.5, "d": 0.5 / 4.5})
    equal = load_mixture_spec(_mixture(tmp_path, "{type: equal}", name="e.yaml"))
    assert plan_mixture(equal, COUNTS, LANGUAGES).language_shares() == pytest.approx(
        {"en": 1 / 3, "zh": 1 / 3, "sw": 1 / 3})


def test_examples_proportional_with_a_cap(tmp_path):
    spec = load_mixture_spec(_mixture(tmp_path, "{type: examples_proportional, maximum: 100}", rate="{type: equal}"))
    plan = plan_mixture(spec, COUNTS, LANGUAGES)
    # en: min(1000, 100) = 100, zh: 100, sw: 10; within en the equal task rates split it in half
    assert _probs(plan) == pytest.approx({"a": 50 / 210, "b": 50 / 210, "c": 100 / 210, "d": 10 / 210})
    uncapped = load_mixture_spec(_mixture(tmp_path, "{type: examples_proportional}", name="u.yaml"))
    assert plan_mixture(uncapped, COUNTS, LANGUAGES).language_shares() == pytest.approx(
        {"en": 1000 / 1110, "zh": 100 / 1110, "sw": 10 / 1110})


def test_nested_mixture_under_languages(tmp_path):
    _write(tmp_path, "sub.yaml", "mixture:\n  rate: {type: examples_proportional}\n  members: [b, c]\n")
    top = _write(tmp_path, "top.yaml", "mixture:\n  rate: {type: weights}\n  members:\n"
                 "    - {task: a, weight: 3}\n    - {mixture: sub.yaml, weight: 1}\n"
                 "  languages: {type: weights, weights: {en: 1, zh: 1}}\n")
    plan = plan_mixture(load_mixture_spec(top), {"a": 900, "b": 100, "c": 100}, LANGUAGES)
    # before languages: a 0.75, b 0.25 * 0.5 = 0.125, c 0.125. en = {a, b} (0.875 in all), zh = {c}
    assert _probs(plan) == pytest.approx({"a": 0.5 * 0.75 / 0.875, "b": 0.5 * 0.125 / 0.875, "c": 0.5})


def test_t0_per_template_leaves_keep_their_shares_within_a_language(tmp_path):
    path = _write(tmp_path, "t0.yaml", "mixture:\n  rate: {type: t0_per_template, cap: 600}\n  members: [a, b]\n"
                  "  languages: {type: examples_proportional}\n")
    counts = {"a": {"t1": 400, "t2": 400, "t3": 100}, "b": 50}
    plan = plan_mixture(load_mixture_spec(path), counts, {"a": "en", "b": "zh"})
    # templates of a: min(n_t, 600 / 3) = 200, 200, 100 (500 in all); n_en = 900, n_zh = 50
    en, zh = 900 / 950, 50 / 950
    assert _probs(plan) == pytest.approx(
        {"a::t1": en * 200 / 500, "a::t2": en * 200 / 500, "a::t3": en * 100 / 500, "b": zh})
    assert [s.language for s in plan.sources] == ["en", "en", "en", "zh"]


def test_without_languages_the_plan_and_stream_are_unchanged(tmp_path):
    path = _write(tmp_path, "m.yaml", "mixture:\n  rate: {type: temperature, temperature: 2}\n  members: [a, b, c]\n")
    dsets = {"a": _tokenized("a", 40), "b": _tokenized("b", 300, templates=["x", "y"]), "c": _tokenized("c", 7)}
    spec = load_mixture_spec(path)
    assert spec.languages is None
    old = plan_mixture(spec, count_examples(dsets))
    labelled = plan_mixture(spec, count_examples(dsets), {"a": "en", "b": "zh", "c": None})
    assert old == plan_mixture(spec, count_examples(dsets), None)
    assert all(s.language is None for s in old.sources)
    assert [(s.name, s.examples, s.probability) for s in labelled.sources] == [
        (s.name, s.examples, s.probability) for s in old.sources]  # bit-identical, only labelled
    assert labelled.language_shares() == pytest.approx({"en": 40 ** 0.5 / (40 ** 0.5 + 300 ** 0.5 + 7 ** 0.5),
                                                        "zh": 300 ** 0.5 / (40 ** 0.5 + 300 ** 0.5 + 7 ** 0.5),
                                                        None: 7 ** 0.5 / (40 ** 0.5 + 300 ** 0.5 + 7 ** 0.5)})
    one = MixtureStream.from_plan(old, dsets, seed=3).take(500)
    two = MixtureStream.from_plan(labelled, dsets, seed=3).take(500)
    assert one == two
    assert PlannedSource("a", None, 4, 1.0).language is None  # positional construction still works


# -- the stream -------------------------------------------------------------------------------------


def test_realised_language_shares_match_planned_chi_square(tmp_path):
    dsets = {"a": _tokenized("a", 40), "b": _tokenized("b", 300, templates=["x", "y", "z"]),
             "c": _tokenized("c", 7), "d": _tokenized("d", 1000)}
    path = _write(tmp_path, "m.yaml", "mixture:\n  rate: {type: examples_proportional}\n  members: [a, b, c, d]\n"
                  "  languages: {type: temperature, alpha: 0.3}\n")
    languages = {"a": "en", "b": "zh", "c": "en", "d": "sw"}
    plan = plan_mixture(load_mixture_spec(path), count_examples(dsets), languages)
    r = {"en": 47 ** 0.3, "zh": 300 ** 0.3, "sw": 1000 ** 0.3}
    assert plan.language_shares() == pytest.approx({k: v / sum(r.values()) for k, v in r.items()})
    n = 60_000
    counts = dict.fromkeys(r, 0)
    task_counts = dict.fromkeys(dsets, 0)
    for item in MixtureStream.from_plan(plan, dsets, seed=1234).take(n):
        counts[languages[item["task"]]] += 1
        task_counts[item["task"]] += 1
    codes = sorted(counts)
    assert chisquare([counts[c] for c in codes], [plan.language_shares()[c] * n for c in codes]).pvalue > 0.01
    tasks = sorted(task_counts)
    shares = plan.task_language_shares()
    expected = [shares[(t, languages[t])] * n for t in tasks]
    assert chisquare([task_counts[t] for t in tasks], expected).pvalue > 0.01


def test_report_shows_languages(tmp_path):
    dsets = {"a": _tokenized("a", 100), "b": _tokenized("b", 300), "c": _tokenized("c", 50)}
    path = _write(tmp_path, "m.yaml", "mixture:\n  rate: {type: examples_proportional}\n  members: [a, b, c]\n"
                  "  languages: {type: weights, weights: {en: 1, zh: 3}}\n")
    plan = plan_mixture(load_mixture_spec(path), count_examples(dsets), {"a": "en", "b": "en", "c": "zh"})
    report = mixture_report(plan, dsets, realised_samples=4000, seed=0)
    json.dumps(report)
    assert report["languages"] == {"type": "weights", "weights": {"en": 1.0, "zh": 3.0}}
    per_language = {e["language"]: e for e in report["per_language"]}
    assert per_language["en"]["tasks"] == 2 and per_language["en"]["examples"] == 400
    assert per_language["en"]["rate"] == pytest.approx(0.25) and per_language["zh"]["rate"] == pytest.approx(0.75)
    assert abs(per_language["zh"]["realised_share"] - 0.75) < 0.03
    per_task = {(e["task"], e["language"]): e for e in report["per_task_language"]}
    assert per_task[("a", "en")]["rate"] == pytest.approx(0.25 * 100 / 400)
    task_rows = {t["task"]: t for t in report["tasks"]}
    assert per_task[("b", "en")]["realised_share"] == task_rows["b"]["realised_share"]
    table = format_mixture_report(report)
    lines = table.splitlines()
    start = lines.index("languages (type=weights, weights={'en': 1.0, 'zh': 3.0})")
    assert lines[start + 1].split() == ["language", "tasks", "examples", "rate", "realised"]
    assert lines[start + 2].split()[:4] == ["en", "2", "400", "0.2500"]
    assert lines[start + 3].split()[:3] == ["a", "100", "0.0625"]
    # one language and no `languages:`: the report is the task table alone, as before
    mono_path = _write(tmp_path, "e.yaml", "mixture:\n  rate: {type: equal}\n  members: [a]\n")
    mono = plan_mixture(load_mixture_spec(mono_path), count_examples(dsets), {"a": "en"})
    assert "per_language" not in mixture_report(mono, dsets, realised_samples=10)


# -- validation errors ------------------------------------------------------------------------------

BAD_SPECS = [
    ("langauges: {type: equal}", r"mixture: unknown key 'langauges'.*Did you mean 'languages'"),
    ("languages: temperature", r"mixture.languages must be a mapping with a 'type'"),
    ("languages: {type: tempreature, alpha: 0.3}",
     r"mixture.languages.type: unknown rate type 'tempreature'.*Did you mean 'temperature'"),
    ("languages: {type: t0_per_template}", r"mixture.languages.type: unknown rate type 't0_per_template'"),
    ("languages: {type: temperature, alpah: 0.3}", r"mixture.languages: unknown key 'alpah'.*Did you mean 'alpha'"),
    ("languages: {type: temperature, alpha: 0.3, temperature: 2}", r"mixture.languages: .*exactly one of 'alpha'"),
    ("languages: {type: temperature}", r"mixture.languages: .*exactly one of 'alpha'"),
    ("languages: {type: temperature, alpha: 0}", r"mixture.languages.alpha must be a number > 0, got 0"),
    ("languages: {type: examples_proportional, maximum: -1}", r"mixture.languages.maximum must be a number > 0"),
    ("languages: {type: weights}", r"mixture.languages.weights must be a mapping language -> weight"),
    ("languages: {type: weights, weights: {en: 1, zh: 0}}", r"mixture.languages.weights.zh must be a number > 0"),
    ("languages: {type: weights, weights: {en: 1, no: 2}}", r"mixture.languages.weights: language False .*quote it"),
    ("languages: {type: equal, weights: {en: 1}}", r"mixture.languages: unknown key 'weights'"),
]


@pytest.mark.parametrize("section,message", BAD_SPECS)
def test_bad_languages_sections_name_the_file_and_key(tmp_path, section, message):
    path = _write(tmp_path, "bad.yaml", f"mixture:\n  rate: {{type: equal}}\n  members: [a]\n  {section}\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_mixture_spec(path)
    assert str(path) in str(info.value)


def test_languages_in_a_nested_mixture_is_an_error(tmp_path):
    sub = _write(tmp_path, "sub.yaml", "mixture:\n  rate: {type: equal}\n  members: [b]\n  languages: {type: equal}\n")
    top = _write(tmp_path, "top.yaml", "mixture:\n  rate: {type: equal}\n  members: [a, {mixture: sub.yaml}]\n")
    with pytest.raises(ConfigError, match=r"sub.yaml: mixture.languages: only the top-level mixture's 'languages:' "
                                          r"applies, and this file is nested in .*top.yaml"):
        load_mixture_spec(top)
    assert load_mixture_spec(sub).languages is not None  # on its own it is a top-level mixture


BAD_PLANS = [
    ("{type: equal}", {**LANGUAGES, "d": None},
     r"mixture.languages: task 'd' has no language. Set `metadata.language`"),
    ("{type: weights, weights: {en: 1, zho: 1, sw: 1}}", LANGUAGES,
     r"mixture.languages.weights.zho: no task of the mixture has language 'zho'. Did you mean 'zh'\? "
     r"The mixture's languages: en, sw, zh"),
    ("{type: weights, weights: {en: 1, zh: 1, sw: 1, xx: 1}}", LANGUAGES,
     r"mixture.languages.weights.xx: no task of the mixture has language 'xx'. The mixture's languages: en, sw, zh"),
    ("{type: weights, weights: {en: 1}}", LANGUAGES,
     r"mixture.languages.weights: no weight for the mixture's language\(s\) sw, zh"),
]


@pytest.mark.parametrize("section,languages,message", BAD_PLANS)
def test_bad_languages_at_plan_time_name_the_file_and_key(tmp_path, section, languages, message):
    path = _mixture(tmp_path, section)
    with pytest.raises(ConfigError, match=message) as info:
        plan_mixture(load_mixture_spec(path), COUNTS, languages)
    assert str(path) in str(info.value)


def test_a_languages_section_needs_the_task_languages(tmp_path):
    spec = load_mixture_spec(_mixture(tmp_path, "{type: equal}"))
    with pytest.raises(ConfigError, match=r"task 'a' has no language"):
        plan_mixture(spec, COUNTS)  # a caller that does not pass the languages
    assert np.isclose(sum(_probs(plan_mixture(spec, COUNTS, LANGUAGES)).values()), 1.0)
