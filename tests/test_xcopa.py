"""XCOPA (BLOOMZ/mT0-style crosslingual eval): shipped data and templates, the generated mixtures, rendering, and
text correctness: every language's prompts reach the byte tokenizer unchanged (no normalisation, no stripping).

The mixtures are ``data_mixtures/xcopa_eval.yaml`` (shipped validation files) and ``xcopa_test_eval.yaml``
(test files in ../shared), both written by ``scripts/make_xcopa_mixtures.py``.
"""

import hashlib
import json
import unicodedata
from collections import Counter
from pathlib import Path

import datasets
import pytest

from train.config import ModelConfig
from train.data.tasks import check_held_out, load_task_file
from train.data.tokenization import tokenize_prompted
from train.modeling.models import load_tokenizer

from conftest import REPO_ROOT, SHARED, SHARED_DATA, load_script

MIX = REPO_ROOT / "data_mixtures"
XCOPA_EVAL = MIX / "xcopa_eval.yaml"
XCOPA_TEST_EVAL = MIX / "xcopa_test_eval.yaml"
LANGUAGES = ("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh")
ROWS = 100  # validation rows per language
RENDER_ROWS = 40  # rows rendered per task (all 100: ~2.5x the time, no new template path)

# sha256[:16] of the shipped files, as shared/data/multilingual/SOURCES.md lists them for the source blobs:
# the copies are unmodified.
VALIDATION_SHA = {
    "et": "c6d8f33c11e968fe", "ht": "022462ff8730fa93", "id": "b3ac8c87c516d64c", "it": "f8389021d6595ef9",
    "qu": "9e3306acace7bb39", "sw": "e35fb416b7b9557b", "ta": "fd22e97aab22d431", "th": "b4c8ae4d5392e7e7",
    "tr": "879848162ac5f614", "vi": "6f804ec3c25b12a3", "zh": "8f638466c1963421",
}
TEMPLATES_SHA = {
    "en": "bafe275640b5e049", "et": "506a8e24710425a4", "ht": "fda6b88d0508ed45", "id": "9b57d71485b30b62",
    "it": "d2a1355efe40b7ae", "qu": "983e1c8cf0e6587d", "sw": "5469a51c2b327484", "ta": "789ecaea43f1669d",
    "th": "3ae91284ce1e1f4d", "tr": "db24bcdd60873175", "vi": "1729f82649f4de9a", "zh": "4ed846e59c9a8ce4",
}
# The English templates that render only one question type (PromptSource writes the whole prompt inside
# `{% if question == ... %}`); on other rows they render empty and the row is skipped, by design.
CAUSE_ONLY = ("…which may be caused by", "…why? C1 or C2")
EFFECT_ONLY = ("…What could happen next, C1 or C2?", "…As a result, C1 or C2?")
# Strings the ByT5 tokenizer reads as its special tokens even with add_special_tokens=False (it then drops
# the spaces around them): text containing one does not map to its bytes. XCOPA's text has none.
BYT5_SPECIAL = ("</s>", "<pad>", "<unk>", "<extra_id_")
SCRIPT_RANGES = {"ta": (0x0B80, 0x0BFF), "th": (0x0E00, 0x0E7F), "zh": (0x4E00, 0x9FFF)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(tokenizer="byt5"))  # the project's path to transformers.ByT5Tokenizer()


@pytest.fixture(scope="module")
def xcopa_eval():
    return load_task_file(XCOPA_EVAL)


@pytest.fixture(scope="module")
def rendered(xcopa_eval, cache):
    """Task name -> (task, prompted examples of the first RENDER_ROWS rows, RenderReport)."""
    return {name: (task, *task.prompted_with_report(RENDER_ROWS, cache_dir=cache))
            for name, task in xcopa_eval.tasks.items()}


def _rows(lang: str) -> list[dict]:
    path = MIX / "demo_data" / "xcopa" / lang / f"val.{lang}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _byt5(text: str) -> list[int]:
    """ByT5's ids of ``text``: each UTF-8 byte + 3 (ids 0-2 are pad, eos, unk)."""
    return [b + 3 for b in text.encode("utf-8")]


# ------------------------------------------------------------------------------ shipped files and mixtures


def test_shipped_files_are_the_published_ones():
    for lang, sha in VALIDATION_SHA.items():
        path = MIX / "demo_data" / "xcopa" / lang / f"val.{lang}.jsonl"
        assert hashlib.sha256(path.read_bytes()).hexdigest()[:16] == sha, path
        assert [r["idx"] for r in _rows(lang)] == list(range(ROWS))
    for lang, sha in TEMPLATES_SHA.items():
        path = MIX / "templates" / "xp3mt" / "xcopa" / lang / "templates.yaml"
        assert hashlib.sha256(path.read_bytes()).hexdigest()[:16] == sha, path
    license_md = (MIX / "demo_data" / "xcopa" / "LICENSE.md").read_text(encoding="utf-8")
    assert license_md.startswith("Attribution 4.0 International")
    notice = (MIX / "templates" / "xp3mt" / "NOTICE.md").read_text(encoding="utf-8")
    assert "c1b46f874d5269b7af4679d3e25a3097a84a9ae1" in notice and "../LICENSE" in notice
    assert (MIX / "templates" / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_committed_mixtures_equal_the_generator_output():
    generator = load_script("make_xcopa_mixtures")
    written = generator.outputs()
    assert set(written) == {XCOPA_EVAL, XCOPA_TEST_EVAL}
    for path, text in written.items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale: run scripts/make_xcopa_mixtures.py"
    assert generator.main(["--check"]) == 0


def test_xcopa_eval_has_the_three_prompt_settings(xcopa_eval):
    tasks = xcopa_eval.tasks
    assert len(tasks) == 23 and xcopa_eval.own_tasks == list(tasks)
    assert Counter(t.metadata.prompts for t in tasks.values()) == {"en": 11, "mt": 11, "ht": 1}
    expected = {f"xcopa_{lang}_{p}" for lang in LANGUAGES for p in ("en", "mt")} | {"xcopa_zh_ht"}
    assert set(tasks) == expected
    for name, task in tasks.items():
        lang, prompts = name.split("_")[1:]
        assert task.metadata.dataset == f"xcopa/{lang}" and task.metadata.language == lang
        assert task.metadata.prompts == prompts and task.metadata.cluster == "sentence_completion"
        assert task.metadata.eval_group == f"xcopa/{lang}@{prompts}"
        assert task.split == "validation" and task.source.type == "jsonl"
        data = MIX / "demo_data" / "xcopa" / lang / f"val.{lang}.jsonl"
        assert task.source.data_files == {"validation": (str(data),)}
        prompt_lang = "en" if prompts == "en" else lang
        assert task.templates.file == str(MIX / "templates" / "xp3mt" / "xcopa" / prompt_lang / "templates.yaml")
    assert xcopa_eval.sections == {"eval": {"held_out": ["xcopa", "super_glue/copa"]}}
    # Held out: every XCOPA language and English COPA, which XCOPA translates.
    copa = load_task_file(MIX / "demo_eval.yaml").tasks.values()
    offenders = check_held_out([*tasks.values(), *copa], ["xcopa", "super_glue/copa"], allow=True)
    assert len(offenders) == 24


def test_tasks_select_the_templates_of_their_setting(xcopa_eval):
    for name, task in xcopa_eval.tasks.items():
        lang, prompts = name.split("_")[1:]
        templates = task.select_templates()
        names = [t.name for t in templates]
        if prompts == "en":
            assert len(templates) == 12 and not any(n.endswith("mt") or n.endswith("ht") for n in names)
            assert {t.dataset for t in templates} == {"xcopa/en"}
            assert all(t.metadata.languages == ("en",) for t in templates)  # xcopa/en declares its language
        else:
            assert len(templates) == 5 and all(n.endswith(f"_{lang}{prompts}") for n in names), names
            assert {t.dataset for t in templates} == {f"xcopa/{lang}"}
            # The machine-translated templates carry no language metadata; the human-translated ones say zh.
            expected = ("zh",) if prompts == "ht" else ()
            assert all(t.metadata.languages == expected for t in templates), (name, names)
    # zh's file holds both sets; the tasks split them.
    mt = {t.name for t in xcopa_eval.tasks["xcopa_zh_mt"].select_templates()}
    ht = {t.name for t in xcopa_eval.tasks["xcopa_zh_ht"].select_templates()}
    assert not mt & ht and {n.rsplit("_", 1)[0] for n in mt} == {n.rsplit("_", 1)[0] for n in ht}


# ------------------------------------------------------------------------------ rendering


def test_every_template_renders_every_row(rendered):
    """No failures; the only skips are the English one-question-type templates' empty renders, counted exactly."""
    for name, (task, ds, report) in rendered.items():
        lang, prompts = name.split("_")[1:]
        rows = _rows(lang)
        questions = Counter(r["question"] for r in rows[:RENDER_ROWS])
        entries = {e["template"]: e for e in report.to_dict()}
        assert len(entries) == (12 if prompts == "en" else 5)
        for template, e in entries.items():
            assert e["rows"] == RENDER_ROWS, (name, template)
            assert set(e["skipped"]) <= {"empty_input"}, (name, template, e["skipped"], e["first_skip"])
            if template in CAUSE_ONLY:  # skipped: the effect rows; th and tr (all `effect`) render none
                assert e["rendered"] == questions["cause"], (name, template)
            elif template in EFFECT_ONLY:
                assert e["rendered"] == questions["effect"], (name, template)
            else:
                assert e["rendered"] == RENDER_ROWS, (name, template, e["skipped"])
        assert len(ds) == sum(e["rendered"] for e in entries.values())
        # the examples' `dataset` is the eval group, so en / mt / ht prompts on the same data score separately
        assert set(ds["task"]) == {name} and set(ds["dataset"]) == {f"xcopa/{lang}@{prompts}"}
        # Each example's target is its row's correct choice; the choices are the row's two, in order.
        for index, targets, choices in zip(ds["example_index"], ds["targets"], ds["answer_choices"]):
            row = rows[index]
            assert choices == [row["choice1"], row["choice2"]], (name, index)
            assert targets == [choices[row["label"]]], (name, index)
    th = {e["template"]: e["rendered"] for e in rendered["xcopa_th_en"][2].to_dict()}
    assert [th[t] for t in CAUSE_ONLY] == [0, 0]  # as published, th's question field is `effect` on every row


def test_the_test_files_in_shared_load(cache):
    data = SHARED_DATA / "multilingual" / "xcopa" / "data"
    if not data.is_dir():
        pytest.skip(f"needs the XCOPA test files in {data} (the shared data folder; absent on a user's fresh clone)")
    # The YAML points at ../../shared, i.e. the shared folder next to the checkout; when MTF_SHARED_DIR names
    # another one, the data_files overrides the file's header describes do the same job.
    overrides = None
    if SHARED != (REPO_ROOT.parent / "shared").resolve():
        overrides = {f"xcopa_{lang}_{p}": str(data / lang / f"test.{lang}.jsonl")
                     for lang in LANGUAGES for p in ("en", "mt")}
        overrides["xcopa_zh_ht"] = str(data / "zh" / "test.zh.jsonl")
    test_eval = load_task_file(XCOPA_TEST_EVAL, data_files=overrides)
    validation = load_task_file(XCOPA_EVAL)
    assert list(test_eval.tasks) == list(validation.tasks) and test_eval.sections == validation.sections
    for name, task in test_eval.tasks.items():
        lang = name.split("_")[1]
        assert task.split == "test"
        assert task.source.data_files == {"test": (str((data / lang / f"test.{lang}.jsonl").resolve()),)}
        assert task.metadata == validation.tasks[name].metadata and task.templates == validation.tasks[name].templates
        if name.endswith("_mt"):
            assert len(task.load()) == 500
        ds, report = task.prompted_with_report(max_examples=8, cache_dir=cache)
        assert len(ds) > 0 and all(set(e["skipped"]) <= {"empty_input"} for e in report.to_dict()), name


# ------------------------------------------------------------------------------ text correctness


def test_byt5_round_trips_every_language(rendered, tokenizer):
    """Inputs, targets and every answer choice of every task (5 source rows each) encode to their UTF-8 bytes
    and decode back exactly: Tamil, Thai and Chinese included."""
    eos = tokenizer.eos_token_id
    assert eos == 1 and tokenizer("a")["input_ids"] == [100, eos]  # ByT5 appends eos unless told not to
    scripts_seen = Counter()
    for name, (_, ds, _) in rendered.items():
        lang = name.split("_")[1]
        texts = []
        columns = zip(ds["example_index"], ds["inputs"], ds["targets"], ds["answer_choices"])
        for index, inputs, targets, choices in columns:
            if index < 5:
                texts += [inputs, *targets, *choices]
        assert texts, name
        for text in texts:
            assert not any(s in text for s in BYT5_SPECIAL), (name, text)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert ids == _byt5(text), (name, text)
            assert tokenizer(text)["input_ids"] == ids + [eos]
            assert tokenizer.decode(ids) == text, (name, text)
            if lang in SCRIPT_RANGES:
                low, high = SCRIPT_RANGES[lang]
                scripts_seen[lang] += any(low <= ord(c) <= high for c in text)
    assert all(scripts_seen[lang] > 0 for lang in SCRIPT_RANGES), scripts_seen


@pytest.mark.parametrize("kind", ["encdec", "decoder"])
def test_project_tokenization_decodes_back(xcopa_eval, tokenizer, kind, cache):
    eos = tokenizer.eos_token_id
    for name in ("xcopa_ta_mt", "xcopa_th_mt", "xcopa_zh_ht", "xcopa_zh_en"):
        prompted = xcopa_eval.tasks[name].prompted(max_examples=3, cache_dir=cache)
        out = tokenize_prompted(prompted, tokenizer, kind)
        for ex in out:
            target = ex["targets"][0] if kind == "encdec" else " " + ex["targets"][0]  # decoders: leading space
            input_ids = ex["input_ids"]
            if kind == "encdec":  # the encoder input ends in eos; a decoder's prompt runs on into the target
                assert input_ids[-1] == eos
                input_ids = input_ids[:-1]
            assert input_ids == _byt5(ex["inputs"]) and tokenizer.decode(input_ids) == ex["inputs"]
            assert ex["target_ids"] == _byt5(target) + [eos] and tokenizer.decode(ex["target_ids"][:-1]) == target
            wrong = [c for c in ex["answer_choices"] if c != ex["targets"][0]]
            assert len(wrong) == 1 and ex["choice_lengths"] == [len(ex["choice_ids"])]
            wrong_text = wrong[0] if kind == "encdec" else " " + wrong[0]
            assert ex["choice_ids"] == _byt5(wrong_text) + [eos]
            assert tokenizer.decode(ex["choice_ids"][:-1]) == wrong_text


# Field values that normalisation or stripping would change: NFD "é" (e + U+0301), Thai with combining vowel
# and tone marks, zero-width joiner / non-joiner, no-break space, fullwidth letters and digits, a tab and a
# double space. None at a field's edge (the renderer strips the rendered input and each choice at their
# edges, as PromptSource does).
PREMISE = ("Cafe\u0301 au lait\u00a0! \u0e19\u0e49\u0e33\u0e41\u0e02\u0e47\u0e07 zw\u200dj zw\u200cnj "
           "\uff26\uff35\uff2c\uff2c\uff11\tend  x")
CHOICE1 = "re\u0301sume\u0301\u00a0\u0e01\u0e34\u0e4d o"
CHOICE2 = "\uff57\uff49\uff44\uff45\u200dz \u0915\u094d\u200d\u0937 man\u0303ana"


def test_rendering_keeps_field_text_byte_for_byte(tmp_path, tokenizer):
    for field in (PREMISE, CHOICE1, CHOICE2):  # the test can see a normalisation: each field changes under NFC and NFKC
        assert unicodedata.normalize("NFC", field) != field and unicodedata.normalize("NFKC", field) != field
    rows = [{"premise": PREMISE, "choice1": CHOICE1, "choice2": CHOICE2, "question": q, "label": label, "idx": i,
             "changed": False} for i, (q, label) in enumerate([("cause", 0), ("effect", 1)])]
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    templates = MIX / "templates" / "xp3mt" / "xcopa"
    (tmp_path / "tasks.yaml").write_text("tasks:\n" + "".join(  # every template of xcopa/en, xcopa/th and xcopa/zh
        f"  - name: {lang}\n    source: {{type: jsonl, data_files: {{validation: {data}}}}}\n    split: validation\n"
        f"    templates: {{file: {templates / lang / 'templates.yaml'}}}\n"
        f"    metadata: {{dataset: xcopa/{lang}, language: {lang}}}\n"
        for lang in ("en", "th", "zh")), encoding="utf-8")
    cache_dir = str(tmp_path / "cache")
    prompted = []
    for task in load_task_file(tmp_path / "tasks.yaml").tasks.values():
        ds, report = task.prompted_with_report(cache_dir=cache_dir)
        assert all(set(e["skipped"]) <= {"empty_input"} for e in report.to_dict())
        prompted.append(ds)
    ds = datasets.concatenate_datasets(prompted)
    assert len(ds) == 2 * (12 + 5 + 10) - 4  # each one-question-type English template renders one of the two rows
    for ex in ds:
        inputs = ex["inputs"].encode("utf-8")
        for field in (PREMISE, CHOICE1, CHOICE2):
            assert field.encode("utf-8") in inputs, (ex["template"], ex["inputs"])
        assert ex["answer_choices"] == [CHOICE1, CHOICE2]
        assert ex["targets"] == [[CHOICE1, CHOICE2][rows[ex["example_index"]]["label"]]]
        for text in (ex["inputs"], *ex["targets"], *ex["answer_choices"]):
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == _byt5(text)
            assert tokenizer.decode(_byt5(text)) == text
    out = tokenize_prompted(ds, tokenizer, "encdec")
    for ex in out:
        assert ex["input_ids"] == _byt5(ex["inputs"]) + [tokenizer.eos_token_id]
        assert ex["target_ids"] == _byt5(ex["targets"][0]) + [tokenizer.eos_token_id]
