"""Bad input to the model, tokenizer and preprocessor layers: each case through `mtf` (or the loader) as a user
would hit it, asserting exit code 2, no traceback, and the message that names the file/key/task and the fix.

Also: a random-init model's config takes the tokenizer's special token ids, so the export generates right.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import SHARED_DATA, requires_shared, user_error
from train.cli import main
from train.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
DEMO = "configs/demo.yaml"
GPT2 = SHARED_DATA / "tokenizers" / "gpt2"
OLMO_JSON = SHARED_DATA / "tokenizers" / "olmo_gpt-neox-dolma-v1_5" / "tokenizer.json"
EVAL = ["--mixture", "data_mixtures/demo_eval.yaml", "--max-examples-per-template", "2"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(autouse=True, scope="module")
def _quiet_libraries(quiet_libraries):
    yield


def _llama(tmp_path: Path, name: str, **fields) -> Path:
    cfg = json.loads((REPO / "configs/models/llama_tiny.json").read_text())
    cfg.update(fields)
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


def _olmo_tokenizer(tmp_path: Path, config: dict | None = None) -> Path:
    """A folder with OLMo's bare tokenizer.json (no eos, no pad), plus a tokenizer_config.json when given."""
    folder = tmp_path / "olmo_tok"
    folder.mkdir()
    shutil.copy(OLMO_JSON, folder / "tokenizer.json")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _t5_export(tmp_path: Path) -> Path:
    """A tiny T5 (384 embedding rows) saved with the ByT5 tokenizer."""
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    out = tmp_path / "export"
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=384, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                        decoder_start_token_id=0)).save_pretrained(out)
    ByT5Tokenizer().save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer without an eos token (gap 1)
# --------------------------------------------------------------------------------------------------

NO_EOS = ["names no eos token", 'Add a tokenizer_config.json naming "eos_token" (and "pad_token")',
          '{"eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}']


@requires_shared
def test_a_tokenizer_without_eos_is_refused_with_the_file_to_add(tmp_path, capsys):
    tok = _olmo_tokenizer(tmp_path)
    model = _llama(tmp_path, "llama_olmo.json", vocab_size=50304)
    args = [f"model.config={model}", f"model.tokenizer={tok}"]
    user_error(["validate", DEMO, *args], capsys, "tokenizer loads:", f"`model.tokenizer` = '{tok}'", *NO_EOS)
    user_error(["train", DEMO, *args, "logging.wandb.mode=disabled", f"run.output_dir={tmp_path / 'run'}"],
               capsys, f"`model.tokenizer` = '{tok}'", *NO_EOS)
    # The fix the message gives works.
    (tok / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}')
    assert main(["validate", DEMO, *args]) == 0, capsys.readouterr().out[-2000:]


@requires_shared
def test_eval_with_a_tokenizer_without_eos_is_refused(tmp_path, capsys):
    export, tok = _t5_export(tmp_path), _olmo_tokenizer(tmp_path)
    user_error(["eval", export, *EVAL, "--tokenizer", tok], capsys, f"{export}: the tokenizer at {tok}", *NO_EOS)


# --------------------------------------------------------------------------------------------------
# A random-init model's special token ids come from the tokenizer (gap 2)
# --------------------------------------------------------------------------------------------------


def _built(model_json: Path, tokenizer: str):
    from train.config import ModelConfig
    from train.modeling.models import build_model, load_model_config, load_tokenizer, model_info

    spec = ModelConfig(config=str(model_json), tokenizer=tokenizer)
    model_config = load_model_config(spec)
    tok = load_tokenizer(spec)
    info = model_info(spec, model_config, tok)  # the trainer's order: config, tokenizer, info, then build
    return build_model(spec, model_config, info.kind), spec, model_config, tok


@requires_shared
def test_a_random_init_config_takes_the_tokenizers_ids_and_exports_them(tmp_path, capsys):
    from train.modeling.models import model_info

    model, spec, model_config, tok = _built(_llama(tmp_path, "llama_gpt2.json", vocab_size=50257), str(GPT2))
    err = capsys.readouterr().err
    assert err.count("[mtf] note") == 1, err
    assert ("replaced pad_token_id 0 -> 50256, eos_token_id 1 -> 50256, bos_token_id 1 -> 50256 with the ids of "
            f"the tokenizer '{GPT2}'") in err
    for config in (model.config, model.generation_config):
        assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (50256, 50256, 50256)
    model.save_pretrained(tmp_path / "final")
    for name in ("config.json", "generation_config.json"):
        saved = json.loads((tmp_path / "final" / name).read_text())
        assert (saved["pad_token_id"], saved["eos_token_id"], saved["bos_token_id"]) == (50256, 50256, 50256), name
    model_info(spec, model_config, tok)  # already aligned: nothing more to say
    assert "[mtf] note" not in capsys.readouterr().err


def test_t5_keeps_its_decoder_start_and_an_agreeing_config_prints_nothing(tmp_path, capsys):
    model, *_ = _built(REPO / "configs/models/t5_tiny.json", "configs/tokenizers/t5")  # the demo's pairing
    assert "[mtf] note" not in capsys.readouterr().err
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.decoder_start_token_id) == (0, 1, 0)
    cfg = json.loads((REPO / "configs/models/t5_tiny.json").read_text())
    cfg.update(pad_token_id=5, eos_token_id=7)
    (tmp_path / "t5.json").write_text(json.dumps(cfg))
    model, *_ = _built(tmp_path / "t5.json", "configs/tokenizers/t5")
    assert "replaced pad_token_id 5 -> 0, eos_token_id 7 -> 1 with" in capsys.readouterr().err
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.decoder_start_token_id) == (0, 1, 0)
    assert getattr(model.config, "bos_token_id", None) is None  # the T5 tokenizer has no bos: nothing to set


# --------------------------------------------------------------------------------------------------
# mtf eval checks the vocabulary (gap 3)
# --------------------------------------------------------------------------------------------------


@requires_shared
def test_eval_with_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, capsys):
    export = _t5_export(tmp_path)
    user_error(["eval", export, *EVAL, "--tokenizer", GPT2], capsys,
               f"{export} with --tokenizer {GPT2}: the tokenizer has 50257 tokens but the model's vocab_size is 384",
               "Use the model's own tokenizer")


def test_check_vocab_names_where():
    from types import SimpleNamespace

    from train.modeling.models import check_vocab

    tok = ["t"] * 10
    check_vocab(SimpleNamespace(vocab_size=10), tok, "m")  # as many rows as tokens: fine
    check_vocab(SimpleNamespace(), tok, "m")  # no vocab_size to compare: nothing to check
    with pytest.raises(ConfigError, match="^runs/x/final: the tokenizer has 10 tokens but the model's vocab_size is 8"):
        check_vocab(SimpleNamespace(vocab_size=8), tok, "runs/x/final")


# --------------------------------------------------------------------------------------------------
# Preprocessor arguments: names and shapes at load time, data errors at read time (gaps 4-6)
# --------------------------------------------------------------------------------------------------

TEMPLATES = """dataset: toy
templates:
  a3: !Template
    answer_choices: neg ||| pos
    id: a3
    jinja: 'Review: {{ text }} ||| {{ answer_choices[label] }}'
    name: good
"""
ROWS = [{"id": "r1", "text": "good movie", "label": 1, "words": "abc"},
        {"id": "r2", "text": "bad movie", "label": 0, "words": "de"}]


def _mixture(tmp_path: Path, *preprocessors: str) -> Path:
    """A one-task mixture whose chain is a harmless rename round trip followed by ``preprocessors`` (YAML)."""
    (tmp_path / "templates.yaml").write_text(TEMPLATES)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    chain = "".join(f"      - {p}\n" for p in ("{name: rename, args: {mapping: {text: body}}}",
                                                "{name: rename, args: {mapping: {body: text}}}", *preprocessors))
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"""tasks:
  - name: toy
    source: {{type: jsonl, data_files: {{train: data.jsonl}}}}
    split: train
    preprocessors:
{chain}    templates: {{file: templates.yaml, names: [good]}}
    metadata: {{dataset: toy}}
""")
    return mix


AT = "task 'toy'.preprocessors[2]: "


@pytest.mark.parametrize("entry, phrases", [
    ("{name: set, args: [field, value]}",
     [AT + "`args` of preprocessor 'set' must be a mapping of argument names to values, not a list "
      "(['field', 'value']); write `args: {field: ..., value: ...}`."]),
    ("{args: {mapping: {a: b}}}", [AT + "missing 'name', the preprocessor to apply (one of ['add',"]),
    ("{name: renam, args: {mapping: {a: b}}}",
     [AT + "unknown preprocessor 'renam'. Did you mean 'rename'? Known: ['add',"]),
    ("{name: rename, args: {mapping: [a, b]}}",
     [AT + "preprocessor 'rename' argument 'mapping' must be a YAML mapping, not the list ['a', 'b']",
      "write `mapping: {from: to, ...}`"]),
    ("{name: regex_replace, args: {field: text, pattern: '(ab'}}",
     [AT + "preprocessor 'regex_replace' argument 'pattern': '(ab' is not a valid Python regular expression",
      "escape special characters with a backslash"]),
    ("{name: select, args: {fields: id}}",
     [AT + "preprocessor 'select' argument 'fields' must be a YAML list, not the str 'id'; write `fields: [id]`"]),
    ("{name: drop, args: {fields: id}}",
     [AT + "preprocessor 'drop' argument 'fields' must be a YAML list, not the str 'id'; write `fields: [id]`"]),
    ("{name: join, args: {fields: id, into: text}}",
     [AT + "preprocessor 'join' argument 'fields' must be a YAML list, not the str 'id'; write `fields: [id]`"]),
    ("{name: add, args: {field: label, value: '1'}}",
     [AT + "preprocessor 'add' argument 'value' must be a number, not the str '1'"]),
    ("{name: split, args: {field: text, separator: 1}}",
     [AT + "preprocessor 'split' argument 'separator' must be a string, not the int 1; quote it"]),
], ids=["args-list", "no-name", "unknown-name", "mapping-list", "bad-regex", "select-str", "drop-str", "join-str",
        "number-str", "string-int"])
def test_preprocessor_arguments_are_checked_when_the_file_loads(tmp_path, capsys, entry, phrases):
    mix = _mixture(tmp_path, entry)
    user_error(["tasks", "preview", mix], capsys, f"{mix}: ", *phrases)


def test_preprocessors_must_be_a_list(tmp_path, capsys):
    mix = _mixture(tmp_path)
    lines = mix.read_text().splitlines()
    lines = [("    preprocessors: {name: drop, args: {fields: [id]}}" if line == "    preprocessors:" else line)
             for line in lines if not line.startswith("      - ")]
    mix.write_text("\n".join(lines) + "\n")
    user_error(["tasks", "preview", mix], capsys,
               f"{mix}: task 'toy'.preprocessors: must be a list of {{name, args}} entries, not a dict")


def test_explode_of_a_string_is_a_data_error_not_one_row_per_character(tmp_path, capsys):
    mix = _mixture(tmp_path, "{name: explode, args: {field: words, into: word}}")
    user_error(["tasks", "preview", mix], capsys,
               f"task 'toy' ({mix}): preprocessor 'explode' at source row 0: field 'words' is a str ('abc'), "
               "not a list; turn it into one first (e.g. with split) or drop the explode")


def test_a_missing_field_lists_the_fields_the_preprocessor_received(tmp_path, capsys):
    mix = _mixture(tmp_path, "{name: rename, args: {mapping: {text: body}}}",
                   "{name: select, args: {fields: [id, text]}}")
    user_error(["tasks", "preview", mix], capsys, "preprocessor 'select' at source row 0: field 'text' is missing "
               "(fields: ['body', 'id', 'label', 'words'])")


@pytest.fixture
def registry():
    from train.data.preprocessors import PREPROCESSORS

    yield PREPROCESSORS
    PREPROCESSORS.reset()


def test_any_preprocessor_failure_on_data_is_a_data_error(tmp_path, capsys, registry):
    import re

    registry.register("upper_field")(lambda example, field: {**example, field: example[field].upper()})
    registry.register("match_field")(lambda example, field: {**example, "m": bool(re.match(example[field], "x"))})
    mix = _mixture(tmp_path, "{name: upper_field, args: {field: label}}")
    user_error(["tasks", "preview", mix], capsys,
               "preprocessor 'upper_field' at source row 0: 'int' object has no attribute 'upper'")
    mix = _mixture(tmp_path, "{name: match_field, args: {field: text}}")
    (tmp_path / "data.jsonl").write_text(json.dumps({**ROWS[0], "text": "(unclosed"}) + "\n")
    user_error(["tasks", "preview", mix], capsys, "preprocessor 'match_field' at source row 0: missing ), "
               "unterminated subpattern")


def test_explode_raises_on_a_string_field_directly():
    from train.data.preprocessors import explode

    assert explode({"a": [1, 2], "b": 0}, "a") == [{"b": 0, "a": 1}, {"b": 0, "a": 2}]
    with pytest.raises(TypeError, match="field 'a' is a str"):
        explode({"a": "xy"}, "a")


def test_a_data_error_type_is_raised_by_the_loader(tmp_path):
    from train.data.tasks import load_task_file

    task = load_task_file(_mixture(tmp_path, "{name: explode, args: {field: words}}")).tasks["toy"]
    with pytest.raises(DataError, match="field 'words' is a str"):
        task.load(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"preprocessors\[2\]: unknown preprocessor 'nope'"):
        load_task_file(_mixture(tmp_path, "{name: nope}"))
