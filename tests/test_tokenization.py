"""Tokenization contract (eos, leading space) and the fingerprint cache (reuse, exact invalidation)."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer, ByT5Tokenizer

from train.errors import ConfigError, DataError
from train.data.tokenization import tokenize_prompted, tokenizer_fingerprint

# Published T5 ids (T5 docs / paper example), without and with the eos (id 1).
T5_INPUT = "translate English to German: The house is wonderful."
T5_INPUT_IDS = [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5]
T5_TARGET = "Das Haus ist wunderbar."
T5_TARGET_IDS = [644, 4598, 229, 19250, 5]


def _prompted(rows):
    return datasets.Dataset.from_dict(
        {
            "inputs": [r[0] for r in rows],
            "targets": [[r[1]] for r in rows],
            "task": ["t"] * len(rows),
            "template": ["tpl"] * len(rows),
        }
    )


@pytest.fixture(scope="module")
def byt5():
    return ByT5Tokenizer()  # needs no files: vocab 384, pad 0, eos 1, byte b -> b + 3


def test_byt5_encdec_appends_eos_to_both_sides(byt5):
    out = tokenize_prompted(_prompted([("hi", "ok")]), byt5, "encdec")
    assert out[0]["input_ids"] == [ord("h") + 3, ord("i") + 3, 1]
    assert out[0]["target_ids"] == [ord("o") + 3, ord("k") + 3, 1]
    assert out[0]["task"] == "t" and out[0]["template"] == "tpl"  # metadata columns kept


@pytest.mark.parametrize("kind", ["decoder", "prefix_lm"])
def test_byt5_decoder_target_gets_leading_space_and_eos_input_gets_none(byt5, kind):
    out = tokenize_prompted(_prompted([("hi", "ok")]), byt5, kind)
    assert out[0]["input_ids"] == [ord("h") + 3, ord("i") + 3]
    assert out[0]["target_ids"] == [ord(" ") + 3, ord("o") + 3, ord("k") + 3, 1]


@pytest.mark.shared
def test_t5_published_ids(shared_data):
    t5 = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "t5")
    out = tokenize_prompted(_prompted([(T5_INPUT, T5_TARGET)]), t5, "encdec")
    assert out[0]["input_ids"] == T5_INPUT_IDS + [1]
    assert out[0]["target_ids"] == T5_TARGET_IDS + [1]


@pytest.mark.shared
def test_gpt2_decoder_leading_space_is_one_bpe_token(shared_data):
    gpt2 = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    out = tokenize_prompted(_prompted([("Is it?", "Yes")]), gpt2, "decoder")
    assert out[0]["input_ids"] == [3792, 340, 30]  # no eos after the input
    assert out[0]["target_ids"] == [3363, 50256]  # " Yes" is one token; "Yes" alone would be 5297


def test_errors_name_the_problem(byt5):
    with pytest.raises(ConfigError, match="unknown model kind 'gpt'.*encdec, decoder, prefix_lm"):
        tokenize_prompted(_prompted([("a", "b")]), byt5, "gpt")
    with pytest.raises(DataError, match="no targets column"):
        tokenize_prompted(datasets.Dataset.from_dict({"inputs": ["a"]}), byt5, "encdec")
    empty = datasets.Dataset.from_dict({"inputs": ["a"], "targets": [[]], "task": ["rte"], "template": ["x"]})
    with pytest.raises(DataError, match="no target.*task='rte', template='x'"):
        tokenize_prompted(empty, byt5, "encdec")


def test_tokenizer_fingerprint_is_stable_across_processes(byt5):
    code = (
        "from transformers import ByT5Tokenizer; from train.data.tokenization import tokenizer_fingerprint;"
        "print(tokenizer_fingerprint(ByT5Tokenizer()))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == tokenizer_fingerprint(byt5)
    assert tokenizer_fingerprint(byt5) != tokenizer_fingerprint(ByT5Tokenizer(extra_ids=0))


# -- cache ------------------------------------------------------------------------------------------


def _render(example, template):
    """A stand-in for train.data.tasks' template rendering: the template string decides the prompt."""
    return {"inputs": template.format(**example), "targets": [example["label"]]}


@pytest.fixture
def raw_tasks(tmp_path):
    """Two file-backed raw datasets (cached under tmp_path, never ~/.cache)."""
    out = {}
    for name in ("alpha", "beta"):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{name} {i}", "label": str(i % 2)}) + "\n" for i in range(50)))
        out[name] = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    return out


def _prompt_and_tokenize(raw_tasks, templates, tokenizer, kind="encdec"):
    out = {}
    for name, raw in raw_tasks.items():
        prompted = raw.map(_render, fn_kwargs={"template": templates[name]})
        out[name] = tokenize_prompted(prompted, tokenizer, kind)
    return out


def _files(tokenized):
    return {name: ds.cache_files[0]["filename"] for name, ds in tokenized.items()}


def test_cache_is_reused_and_invalidated_exactly(raw_tasks, byt5, tmp_path):
    templates = {"alpha": "Q: {text}", "beta": "Review: {text}"}
    first = _prompt_and_tokenize(raw_tasks, templates, byt5)
    arrow_files = set((tmp_path / "hf").rglob("*.arrow"))

    # same inputs: the tokenized files are reused and nothing new is written
    second = _prompt_and_tokenize(raw_tasks, templates, byt5)
    assert _files(second) == _files(first)
    assert set((tmp_path / "hf").rglob("*.arrow")) == arrow_files
    assert second["alpha"]["input_ids"] == first["alpha"]["input_ids"]

    # change one task's template: only that task is re-tokenized (one new prompted + one new tokenized file)
    changed = _prompt_and_tokenize(raw_tasks, {**templates, "beta": "Movie review: {text}"}, byt5)
    assert changed["alpha"].cache_files == first["alpha"].cache_files
    assert changed["beta"].cache_files != first["beta"].cache_files
    assert len(set((tmp_path / "hf").rglob("*.arrow")) - arrow_files) == 2
    assert changed["beta"][0]["input_ids"][:5] == [ord(c) + 3 for c in "Movie"]

    # changing the kind invalidates both tasks
    decoder = _prompt_and_tokenize(raw_tasks, templates, byt5, kind="decoder")
    assert all(decoder[n].cache_files != first[n].cache_files for n in templates)
    assert decoder["alpha"][0]["target_ids"][0] == ord(" ") + 3


@pytest.mark.shared
def test_cache_invalidated_by_tokenizer(raw_tasks, byt5, shared_data):
    templates = {"alpha": "Q: {text}", "beta": "Review: {text}"}
    t5 = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "t5")
    with_byt5 = _prompt_and_tokenize(raw_tasks, templates, byt5)
    with_t5 = _prompt_and_tokenize(raw_tasks, templates, t5)
    again = _prompt_and_tokenize(raw_tasks, templates, AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "t5"))
    assert all(with_t5[n].cache_files != with_byt5[n].cache_files for n in templates)
    assert _files(again) == _files(with_t5)  # a freshly loaded identical tokenizer hits the cache


def test_explicit_cache_dir_caches_in_memory_datasets(byt5, tmp_path):
    prompted = _prompted([("hi", "ok"), ("yo", "no")])
    first = tokenize_prompted(prompted, byt5, "encdec", cache_dir=tmp_path / "tok")
    files = sorted((tmp_path / "tok").glob("tokenized-*.arrow"))
    assert len(files) == 1 and first.cache_files[0]["filename"] == str(files[0])
    second = tokenize_prompted(prompted, byt5, "encdec", cache_dir=tmp_path / "tok")
    assert second.cache_files == first.cache_files
    assert sorted((tmp_path / "tok").glob("tokenized-*.arrow")) == files
