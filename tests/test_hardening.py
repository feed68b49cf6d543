"""A corpus of bad input and faults, each through the `mtf` command as a user would hit it.

Every case asserts the exit code (2: the user can fix it), the absence of a traceback, the key phrase of
the one-paragraph message, and, for training faults, that the last good checkpoint is intact and resumes.
Training runs are in-process (one import of torch for the whole module) and 2-6 steps long.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_cli, user_error
from test_trainer import _losses
from train.cli import main
from train.loop.checkpointing import MARKER, list_complete
from train.loop.rundir import RunLock

REPO = Path(__file__).resolve().parents[1]
DEMO = "configs/demo.yaml"
QUIET = [*FAST, "logging.wandb.mode=disabled", "checkpoint.every_steps=2"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(autouse=True, scope="module")
def _quiet_libraries(quiet_libraries):
    yield


def _train_args(run: Path, steps: int, *extra: str) -> list[str]:
    return ["train", DEMO, *QUIET, f"trainer.max_steps={steps}", f"run.output_dir={run}", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 4-step run with checkpoints at steps 2 and 4, and an uninterrupted 6-step reference."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        base, full = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("full")
        assert run_cli(_train_args(base, 4))[0] == 0
        assert run_cli(_train_args(full, 6))[0] == 0
    finally:
        os.chdir(cwd)
    assert [p.name for p in list_complete(base)] == ["step-00000002", "step-00000004"]
    return {"base": base, "full": full}


@pytest.fixture
def run(runs, tmp_path) -> Path:
    """A private copy of the 4-step run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(runs["base"], copy)
    return copy


def _newest(run: Path) -> Path:
    return list_complete(run)[-1]


class _Planted:
    """Unpickling this creates ``marker``: proof that code from a checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _assert_resumes_from_step_4(run: Path, runs: dict, capsys) -> None:
    code, out = run_cli(_train_args(run, 6), capsys)
    assert code == 0 and "resumed from" in out and "step-00000004" in out, out[-2000:]
    reference = _losses(runs["full"])
    assert all(_losses(run)[s] == reference[s] for s in (5, 6))


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, phrase", [
    ("optim.lr=.nan", "`optim.lr` is nan; it must be a finite number"),
    ("optim.lr=.inf", "`optim.lr` is inf; it must be a finite number"),
    ("optim.lr=0", "`optim.lr` is 0.0; it must be greater than 0"),
    ("trainer.global_batch_size=-8", "`trainer.global_batch_size` is -8; it must be at least 1, or null to use trainer.global_batch_tokens"),
    ("trainer.micro_batch_size=0", "`trainer.micro_batch_size` is 0; it must be at least 1"),
    ("optim.betas=[0.9,1.5]", "`optim.betas` is [0.9, 1.5]; it must be two values in [0, 1)"),
    ("trainer.max_time=-1", "`trainer.max_time` is -1.0; it must be greater than 0, or null"),
    ("optim.weight_decay=-0.1", "`optim.weight_decay` is -0.1; it must be at least 0"),
    ("data.max_tokens=0", "`data.max_tokens` is 0; it must be at least 1"),
    ("optim.lrr=1", "unknown config key `optim.lrr`. Did you mean `optim.lr`?"),
    ("optim={lr: 1.0e-3, lr: 0.1}", "found the key 'lr' twice"),
])
def test_bad_config_values_are_refused_before_any_work(override, phrase, capsys):
    user_error(["train", DEMO, override], capsys, phrase)


@pytest.mark.parametrize("argv, hint", [
    (["train", DEMO, "--max-steps", "5"], "Did you mean `trainer.max_steps=5`?"),
    (["train", DEMO, "--lr=3e-4"], "Did you mean `optim.lr=3e-4`?"),
    (["validate", DEMO, "--output-dir", "x"], "Did you mean `run.output_dir=x`?"),
])
def test_a_flag_instead_of_an_override_points_to_the_override(argv, hint, capsys):
    user_error(argv, capsys, "config values are set as dotted key=value overrides", hint)


def test_an_empty_output_dir_would_write_into_the_current_directory(capsys):
    user_error(["train", DEMO, "run.output_dir="], capsys, "`run.output_dir` is an empty string")


def test_validate_lists_every_bound_problem_at_once(capsys):
    user_error(["validate", DEMO, "trainer.global_batch_size=-8", "optim.eps=0", "logging.every_steps=0"], capsys,
               "`trainer.global_batch_size` is -8", "`optim.eps` is 0.0", "`logging.every_steps` is 0", "3 problem(s) found")


def test_validate_checks_the_data_lanes_against_the_batch_and_the_ranks(capsys, monkeypatch):
    user_error(["validate", DEMO, "data.lanes=3"], capsys, "data.lanes=3 must divide the global batch of 8 rows",
               "[1, 2, 4, 8]")
    from train.loop.validation import validate_run

    monkeypatch.setenv("WORLD_SIZE", "16")  # as accelerate sets it (the CLI itself would os._exit under it)
    problems = validate_run(DEMO, ["trainer.global_batch_size=32", "data.lanes=8"])["problems"]
    assert len(problems) == 1 and "split over 16 rank(s)" in problems[0], problems
    assert "data.lanes=8 does not split over 16 ranks" in problems[0] and "[16, 32]" in problems[0]


def test_duplicate_keys_in_a_config_file_name_both_lines(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  config: configs/models/t5_tiny.json\noptim:\n  lr: 1.0e-3\n  lr: 0.1\n")
    user_error(["validate", path], capsys, "found the key 'lr' twice (first on line 4)", str(path), "line 5")


def test_a_section_pasted_twice_is_refused(tmp_path, capsys):
    path = tmp_path / "dup_section.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\ntrainer:\n  max_steps: 5\noptim:\n  lr: 0.1\n")
    user_error(["train", path], capsys, "found the key 'optim' twice (first on line 1)")


def test_python_tags_in_a_config_run_nothing(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.yaml"
    path.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    user_error(["train", path], capsys, "invalid YAML", "python/object/apply")
    assert not marker.exists()


def test_a_config_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    user_error(["train", path], capsys, "not UTF-8", "Save the file as UTF-8")


@pytest.mark.parametrize("content, phrase", [
    ('{"zero_optimization": {', "is not valid JSON: Expecting property name enclosed in double quotes at line 1"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_a_malformed_deepspeed_json_is_named_with_its_line(tmp_path, content, phrase, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(content)
    user_error(["train", DEMO, f"trainer.deepspeed={ds}"], capsys, phrase, str(ds))


def test_every_numeric_key_has_a_lower_bound():
    import typing

    from train.config import MINIMUMS, Config, all_keys, get_key

    cfg = Config()
    numeric = []
    for key in all_keys():
        if dataclasses.is_dataclass(get_key(cfg, key)):
            continue
        section, _, name = key.rpartition(".")
        owner = get_key(cfg, section) if section else cfg
        hint = typing.get_type_hints(type(owner))[name]
        if typing.get_origin(hint) is not list and {int, float} & {hint, *typing.get_args(hint)}:  # (Optional) int/float
            numeric.append(key)
    assert sorted(numeric) == sorted(MINIMUMS), "add the new numeric key to train.config.MINIMUMS"


# --------------------------------------------------------------------------------------------------
# Mixtures, tasks and templates
# --------------------------------------------------------------------------------------------------

TEMPLATES = """dataset: toy
templates:
  a1: !Template
    answer_choices: neg ||| pos
    id: a1
    jinja: '{{ nonexistent_field }} ||| {{ answer_choices[label] }}'
    name: missing_field
  a3: !Template
    answer_choices: neg ||| pos
    id: a3
    jinja: 'Review: {{ text }} ||| {{ answer_choices[label] }}'
    name: good
  a4: !Template
    answer_choices: neg ||| pos
    id: a4
    jinja: 'Review: {{ text }} ||| {{ ["negative", "positive"][label] }}'
    name: gold_outside
  a5: !Template
    answer_choices: neg ||| pos
    id: a5
    jinja: 'Review: {{ text }}'
    name: no_target
"""


def _task_dir(tmp_path: Path, rows: list, *, names: list[str], data_name: str = "data.jsonl",
              raw: bytes | None = None, source_type: str = "jsonl", templates: str = TEMPLATES) -> Path:
    (tmp_path / "templates.yaml").write_text(templates)
    data = tmp_path / data_name
    if raw is not None:
        data.write_bytes(raw)
    else:
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"""tasks:
  - name: toy
    source: {{type: {source_type}, data_files: {{train: {data_name}}}}}
    split: train
    templates: {{file: templates.yaml, names: {json.dumps(names)}}}
    metadata: {{dataset: toy}}
mixture:
  rate: {{type: equal}}
  members: [toy]
""")
    return mix


ROWS = [{"text": "good movie", "label": 1}, {"text": "bad movie", "label": 0}, {"text": "fine film", "label": 1}]


def test_preview_of_a_missing_field_names_the_template_and_the_field(tmp_path, capsys):
    mix = _task_dir(tmp_path, ROWS, names=["missing_field", "good"])
    out = user_error(["tasks", "preview", mix], capsys, "template 'missing_field'", "'nonexistent_field'",
                     "Add the field with a preprocessor")
    assert "skipped: missing_field: nonexistent_field" in out and "input:   Review: good movie" in out


def test_preview_of_a_string_label_says_to_cast_it(tmp_path, capsys):
    mix = _task_dir(tmp_path, [{"text": "good", "label": "1"}, {"text": "bad", "label": "0"}], names=["good"])
    user_error(["tasks", "preview", mix], capsys, "template 'good'", "a list indexed with the string '1'",
               "{name: cast, args: {field: label, to: int}}")


def test_preview_of_a_label_out_of_range(tmp_path, capsys):
    mix = _task_dir(tmp_path, [{"text": "good", "label": 5}, {"text": "bad", "label": 7}], names=["good"])
    user_error(["tasks", "preview", mix], capsys, "template 'good'", "[5] (an index out of range)")


def test_preview_of_null_labels(tmp_path, capsys):
    mix = _task_dir(tmp_path, [{"text": "good", "label": None}, {"text": "bad", "label": None}], names=["good"])
    user_error(["tasks", "preview", mix], capsys, "a list indexed with a null field")


def test_a_null_field_is_not_rendered_as_the_text_none(tmp_path, capsys):
    mix = _task_dir(tmp_path, [{"text": None, "label": 1}, {"text": None, "label": 0}, {"text": "ok", "label": 0}],
                    names=["good"])
    out = user_error(["tasks", "preview", mix], capsys, "template 'good'", "(a null value)")
    assert "Review: None" not in out and "input:   Review: ok" in out


def test_training_on_a_template_without_a_target_is_refused(tmp_path, capsys):
    mix = _task_dir(tmp_path, ROWS, names=["no_target", "good"])
    user_error(["train", DEMO, *QUIET, f"data.train_mixture={mix}", f"run.output_dir={tmp_path / 'r'}",
                "trainer.max_steps=1"], capsys, "template 'no_target'", "has no `|||`", "Write `input ||| target`")


def test_lint_reports_no_target_as_a_load_error(tmp_path, capsys):
    _task_dir(tmp_path, ROWS, names=["good"])
    user_error(["templates", "lint", tmp_path / "templates.yaml"], capsys, "ERROR", "no_target", "has no `|||`")


def test_lint_with_data_reports_gold_targets_outside_the_choices(tmp_path, capsys):
    templates = TEMPLATES.split("  a5:")[0]
    mix = _task_dir(tmp_path, ROWS, names=["good"], templates=templates)
    code = main(["templates", "lint", str(tmp_path / "templates.yaml"), "--data", str(mix), "--json"])
    report = json.loads(capsys.readouterr().out)
    render = report["files"][0]["render"]
    assert render["gold_outside"]["gold_not_in_choices"] == 3 and render["good"]["gold_not_in_choices"] == 0
    assert report["summary"]["failing_templates"] == ["toy / missing_field"] and code == 2
    code, out = run_cli(["templates", "lint", tmp_path / "templates.yaml", "--data", mix], capsys)
    assert "GOLD  toy / gold_outside: 3/3 rendered rows have a target outside answer_choices" in out


def test_duplicate_keys_in_a_templates_file(tmp_path, capsys):
    path = tmp_path / "templates.yaml"
    path.write_text(TEMPLATES.replace("    name: good\n", "    name: good\n    name: better\n"))
    user_error(["templates", "lint", path], capsys, "found the key 'name' twice", str(path))


def test_duplicate_keys_in_a_mixture_file(tmp_path, capsys):
    mix = _task_dir(tmp_path, ROWS, names=["good"])
    mix.write_text(mix.read_text().replace("  rate: {type: equal}\n", "  rate: {type: equal}\n  rate: {type: equal}\n"))
    user_error(["validate", DEMO, f"data.train_mixture={mix}"], capsys, "found the key 'rate' twice")


def test_duplicate_keys_in_a_task_definition(tmp_path, capsys):
    mix = _task_dir(tmp_path, ROWS, names=["good"])
    mix.write_text(mix.read_text().replace("    split: train\n", "    split: train\n    split: validation\n"))
    user_error(["tasks", "preview", mix], capsys, "found the key 'split' twice")


@pytest.mark.parametrize("name, raw, source_type, phrase", [
    ("empty.jsonl", b"", "jsonl", "no rows in"),
    ("malformed.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": \n{"text": "c", "label": 0}\n', "jsonl",
     "malformed.jsonl:2: invalid JSON"),
    ("latin1.jsonl", b'{"text": "caf\xe9", "label": 1}\n', "jsonl", "not valid UTF-8"),
    ("ragged.csv", b"text,label\na,1\nb,0,extra\n", "csv", "ragged.csv:3: fields differ from the first row"),
    ("fields.jsonl", b'{"text": "a", "label": 1}\n{"label": 0}\n', "jsonl", "fields.jsonl:2: fields differ"),
    ("garbage.parquet", b"not parquet at all", "parquet", "garbage.parquet: not a readable Parquet file"),
    ("strings.csv", b"text,label\ngood,1\nbad,0\n", "csv", "cast it to int"),  # CSV values are strings
])
def test_bad_data_files_name_the_file_and_line(tmp_path, name, raw, source_type, phrase, capsys):
    mix = _task_dir(tmp_path, [], names=["good"], data_name=name, raw=raw, source_type=source_type)
    user_error(["tasks", "preview", mix], capsys, phrase)


def test_a_byte_order_mark_is_not_part_of_the_first_field(tmp_path, capsys):
    mix = _task_dir(tmp_path, [], names=["good"], data_name="bom.jsonl",
                    raw=b'\xef\xbb\xbf{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    code, out = run_cli(["tasks", "preview", mix], capsys)
    assert code == 0 and "input:   Review: good" in out, out


def test_held_out_as_one_name_is_not_split_into_letters(tmp_path, capsys):
    from train.data.pipeline import held_out_of
    from train.data.tasks import load_task_file

    path = tmp_path / "eval.yaml"
    path.write_text(f"include: [{REPO / 'data_mixtures/demo_eval.yaml'}]\neval: {{held_out: super_glue/copa}}\n")
    assert held_out_of(load_task_file(path)) == (["super_glue/copa"], [])
    path.write_text(f"include: [{REPO / 'data_mixtures/demo_eval.yaml'}]\neval: {{held_out: 5}}\n")
    user_error(["validate", DEMO, f"eval.mixture={path}"], capsys, "eval.held_out must be a list of names")


@pytest.mark.parametrize("policy, counter", [("truncate_left", "truncated_inputs"), ("truncate_right", "truncated_inputs"),
                                             ("truncate_target", "dropped_overlong"), ("drop", "dropped_overlong")])
def test_a_100k_token_example_follows_each_overlong_policy(policy, counter):
    from train.data import Packer

    packer = Packer("encdec", max_input_tokens=64, max_target_tokens=16, overlong_policy=policy)
    giant = {"input_ids": list(range(3, 100_003)), "target_ids": [5, 6, 1], "task": "giant"}
    small = {"input_ids": [7, 8, 1], "target_ids": [9, 1], "task": "small"}
    rows = list(packer.rows(iter([giant, small, small])))
    assert packer.stats[counter] == 1
    assert all(len(r["input_ids"]) <= 64 and len(r["target_ids"]) <= 16 for r in rows)
    kept = sum(r["tasks"].count("giant") for r in rows)
    assert kept == (0 if counter == "dropped_overlong" else 1)


def test_a_stream_where_every_example_is_dropped_stops_with_an_error():
    import itertools

    from train.data import Packer
    from train.errors import DataError

    packer = Packer("encdec", max_input_tokens=4, max_target_tokens=4, overlong_policy="drop")
    forever = itertools.repeat({"input_ids": list(range(3, 40)), "target_ids": [5, 1], "task": "long"})
    with pytest.raises(DataError, match=r"all dropped as over-long .*4 input \+ 4 target tokens.*truncate_\* policy"):
        packer.next_row(forever)


# --------------------------------------------------------------------------------------------------
# Training faults
# --------------------------------------------------------------------------------------------------


def test_truncated_weights_in_the_newest_checkpoint_are_named_and_kept(run, runs, capsys):
    newest = _newest(run)
    weights = newest / "accelerate" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    user_error(_train_args(run, 6), capsys, str(weights), "is damaged", "It was left in place",
               "trainer.resume_fallback=true", "step-00000002")
    assert weights.exists() and list_complete(run)[-1] == newest


def test_resume_fallback_skips_the_bad_checkpoint_and_is_exact(run, runs, capsys):
    newest = _newest(run)
    (newest / "accelerate" / "model.safetensors").write_bytes(b"\x00" * 16)
    code, out = run_cli(_train_args(run, 6, "trainer.resume_fallback=true"), capsys)
    assert code == 0, out[-2000:]
    assert "skipped" in out and "resumed from" in out and "step-00000002" in out
    assert (run / "checkpoints" / "rejected-step-00000004" / MARKER).exists()  # moved aside, never deleted
    reference = _losses(runs["full"])
    assert [_losses(run)[s] for s in (3, 4, 5, 6)] == [reference[s] for s in (3, 4, 5, 6)]


@pytest.mark.parametrize("content, phrase", [
    ("{not json", "trainer_state.json is damaged (Expecting property name"),
    ('{"step": 4, "tokens_seen": 1, "examples_seen": 1}', "`data` missing"),
    ('{"step": "four", "tokens_seen": 1, "examples_seen": 1, "data": {}}', "`step` is not int"),
    ('{"step": 4, "tokens_seen": 1, "examples_seen": 1, "stream": {}, "packer": {}}',
     "written before data lanes (one global stream and packer)"),
    ("[1, 2]", "trainer_state.json is damaged (not a mapping)"),
])
def test_a_damaged_trainer_state_is_refused(run, content, phrase, capsys):
    (_newest(run) / "trainer_state.json").write_text(content)
    user_error(_train_args(run, 6), capsys, "step-00000004", phrase)


def test_a_tampered_stream_position_is_refused(run, capsys):
    state_file = _newest(run) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    lane = state["data"]["lane_states"]["0"]
    lane["stream"] = {"format": lane["stream"]["format"], "bogus": 1}
    state_file.write_text(json.dumps(state))
    user_error(_train_args(run, 6), capsys, "mixture stream")


@pytest.mark.parametrize("victim", ["optimizer.bin", "random_states_0.pkl"])
def test_a_planted_pickle_is_refused_and_never_runs(run, tmp_path, victim, capsys):
    marker = tmp_path / "PWNED"
    target = _newest(run) / "accelerate" / victim
    assert target.exists()
    torch.save({"state": _Planted(marker)}, target)
    out = user_error(_train_args(run, 6), capsys, str(target), "would run arbitrary code", "Refused",
                     "trainer.trust_checkpoint=true")
    assert "weights_only=False" not in out  # never the unsafe advice
    assert not marker.exists()


def test_a_planted_pickle_in_a_deepspeed_state_file_is_refused(run, tmp_path):
    from train.errors import CheckpointError
    from train.loop.checkpointing import verify_checkpoint

    marker = tmp_path / "PWNED"
    shards = _newest(run) / "accelerate" / "pytorch_model"
    shards.mkdir()
    torch.save({"optimizer_state_dict": {"loss_scaler": _Planted(marker)}}, shards / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states.pt holds .*\(io.open\)"):
        verify_checkpoint(_newest(run))
    assert not marker.exists()
    verify_checkpoint(_newest(run), trust=True)  # the documented opt-out skips the scan (and loads nothing here)
    assert not marker.exists()


def test_resume_with_a_changed_batch_size_is_refused(run, capsys):
    user_error(_train_args(run, 6, "trainer.global_batch_size=8"), capsys,
               "the config changed since checkpoint", "trainer.global_batch_size: 4 -> 8", "trainer.resume_allow_changes")


def test_resume_with_a_changed_mixture_is_refused(run, capsys):
    user_error(_train_args(run, 6, "data.train_mixture=data_mixtures/tfew_tiny_train.yaml"), capsys,
               "data.train_mixture: 'data_mixtures/demo_train.yaml' -> 'data_mixtures/tfew_tiny_train.yaml'")


def test_an_accepted_change_resumes(run, capsys):
    code, out = run_cli(_train_args(run, 6, "optim.lr=5e-4", "trainer.resume_allow_changes=[optim.lr]"), capsys)
    assert code == 0 and "resumed from" in out, out[-2000:]


def test_more_steps_need_no_permission_and_resume_exactly(run, runs, capsys):
    _assert_resumes_from_step_4(run, runs, capsys)


def test_another_micro_batch_size_needs_no_permission(run, capsys):
    code, out = run_cli(_train_args(run, 5, "trainer.micro_batch_size=1"), capsys)
    assert code == 0 and "4 accumulation x 1 rows" in out and "resumed from" in out, out[-2000:]


def test_disk_full_during_a_checkpoint_keeps_the_last_one(run, runs, capsys, monkeypatch):
    from accelerate import Accelerator

    def full_disk(self, output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    user_error(_train_args(run, 6), capsys, "could not write the checkpoint of step 6", "No space left on device",
               "step-00000004, is intact")
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert _newest(run).name == "step-00000004"
    monkeypatch.undo()
    _assert_resumes_from_step_4(run, runs, capsys)


def test_a_kill_during_a_checkpoint_write_resumes_from_the_one_before(run, runs, capsys):
    # kill -9 while writing step 4 leaves .tmp-step-00000004 (no COMPLETE, never renamed) behind.
    newest = _newest(run)
    (newest / MARKER).unlink()
    os.replace(newest, newest.parent / f".tmp-{newest.name}")
    code, out = run_cli(_train_args(run, 6), capsys)
    assert code == 0 and "resumed from" in out and "step-00000002" in out, out[-2000:]
    reference = _losses(runs["full"])
    assert [_losses(run)[s] for s in (3, 4, 5, 6)] == [reference[s] for s in (3, 4, 5, 6)]
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the next save cleaned it up


def test_an_output_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "a_file"
    path.write_text("x")
    user_error(_train_args(path, 1), capsys, "is a file, not a directory")
    user_error(_train_args(path / "below", 1), capsys, "cannot be written to")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_an_unwritable_output_dir(tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        user_error(_train_args(locked, 1), capsys, "cannot be written to")
    finally:
        locked.chmod(0o700)


def test_a_second_run_on_the_same_directory_refuses(run, runs, capsys):
    holder = RunLock(run)
    holder.acquire()
    try:
        user_error(_train_args(run, 6), capsys, "is in use by another `mtf train` (pid", "choose another `run.output_dir`")
        assert _newest(run).name == "step-00000004"
    finally:
        holder.release()
    # What a crashed run leaves behind (the file, no lock held) does not block.
    assert (run / ".mtf-train.lock").read_text().startswith("pid ")
    _assert_resumes_from_step_4(run, runs, capsys)


def test_ctrl_c_checkpoints_and_exits_with_the_preemption_code(tmp_path):
    import signal
    import subprocess
    import sys

    from test_trainer import _env, _wait_for_checkpoint

    run = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "train.cli", *_train_args(run, 500)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    assert "Ctrl-C: stopping after this step with a checkpoint" in err and "stopped early (interrupted)" in out
    state = json.loads((_newest(run) / "trainer_state.json").read_text())
    assert max(_losses(run)) == state["step"] < 500  # the checkpoint is of the last finished step


@pytest.mark.parametrize("damage, phrase", [("remove", "has config.json but no model weights"),
                                            ("truncate", "is damaged")])
def test_training_from_a_damaged_pretrained_model(tmp_path, damage, phrase, capsys):
    export = _export(tmp_path)
    weights = export / "model.safetensors"
    if damage == "remove":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:200])
    args = ["model.config=null", f"model.name_or_path={export}", "model.tokenizer=null"]
    user_error(["validate", DEMO, *args], capsys, "model weights are present and whole", phrase)
    user_error(_train_args(tmp_path / "r", 1, *args), capsys, str(export), phrase)


def test_a_misspelled_best_metric_is_refused_before_training(tmp_path, capsys):
    args = ["train", DEMO, *[o for o in FAST if not o.startswith("eval.mixture")], "logging.wandb.mode=disabled", "trainer.max_steps=1",
            f"run.output_dir={tmp_path}", "eval.best_metric=eval/super_glue/cop/median"]
    user_error(args, capsys, "is not a metric of the eval mixture", "Did you mean eval/super_glue/copa/median")
    assert not list_complete(tmp_path)


# --------------------------------------------------------------------------------------------------
# Eval misuse
# --------------------------------------------------------------------------------------------------


def _export(tmp_path: Path) -> Path:
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    out = tmp_path / "export"
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=384, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                        decoder_start_token_id=0)).save_pretrained(out)
    ByT5Tokenizer().save_pretrained(out)
    return out


EVAL = ["--mixture", "data_mixtures/demo_eval.yaml", "--max-examples-per-template", "2"]


def test_eval_of_a_missing_model(tmp_path, capsys):
    user_error(["eval", tmp_path / "nowhere", *EVAL], capsys, "cannot load a model config")


def test_eval_of_a_directory_with_config_but_no_weights(tmp_path, capsys):
    export = _export(tmp_path)
    (export / "model.safetensors").unlink()
    user_error(["eval", export, *EVAL], capsys, "has config.json but no model weights")


def test_eval_of_corrupted_weights(tmp_path, capsys):
    export = _export(tmp_path)
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    user_error(["eval", export, *EVAL], capsys, str(weights), "is damaged")


def test_eval_of_a_checkpoint_with_corrupted_weights(run, capsys):
    weights = _newest(run) / "accelerate" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    user_error(["eval", _newest(run), *EVAL], capsys, str(weights), "is damaged")


def test_eval_shard_out_of_range(runs, capsys):
    user_error(["eval", _newest(runs["base"]), *EVAL, "--shard", "3/2"], capsys, "--shard")


def test_eval_merge_refuses_duplicated_and_missing_shards(tmp_path, capsys):
    export = _export(tmp_path)
    shard = tmp_path / "shard-0.json"
    code, out = run_cli(["eval", export, *EVAL, "--shard", "0/12", "--output", shard], capsys)
    assert code == 0, out[-2000:]
    twin = tmp_path / "shard-0-again.json"
    shutil.copy(shard, twin)
    user_error(["eval-merge", shard, twin], capsys, "are both shard 0/12; merge each shard once")
    user_error(["eval-merge", shard, "--mixture", "data_mixtures/demo_eval.yaml"], capsys, "missing")
