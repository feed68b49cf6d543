"""Strict config: unknown keys, wrong types, overrides, cross-field checks, every shipped YAML loads."""

from pathlib import Path

import pytest
import yaml

from train.config import Config, all_keys, load_config, parse_override, save_config, to_dict
from train.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths are relative to the repository root


def test_misspelled_key_suggests_the_valid_one():
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", ["optim.lrr=1"])
    message = str(err.value)
    assert "configs/demo.yaml" in message
    assert "unknown config key `optim.lrr`" in message
    assert "Did you mean `optim.lr`?" in message


def test_key_in_the_wrong_section_is_found(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {config: configs/models/t5_tiny.json}\ntrainer: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown config key `trainer.lr`"):
        load_config(path)


def test_wrong_type_names_the_expected_type():
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", ["trainer.max_steps=many"])
    assert "`trainer.max_steps` is 'many' (str), but it must be int" in str(err.value)
    with pytest.raises(ConfigError, match=r"must be one of 'fp32', 'bf16', 'fp16'"):
        load_config("configs/demo.yaml", ["trainer.precision=fp64"])


def test_override_reaches_the_resolved_config(tmp_path):
    cfg = load_config("configs/demo.yaml", ["optim.lr=3e-4", "trainer.max_steps=17", "eval.mixture=null",
                                            f"run.output_dir={tmp_path}"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.trainer.max_steps == 17
    assert cfg.eval.mixture is None
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["optim"]["lr"] == pytest.approx(3e-4) and saved["trainer"]["max_steps"] == 17
    # the saved file loads back to the same config
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_impossible_combinations_fail_before_any_work():
    with pytest.raises(ConfigError, match="T5 overflows in fp16"):
        load_config("configs/demo.yaml", ["trainer.precision=fp16"])
    with pytest.raises(ConfigError, match=r"`eval.every_steps` is 0; it must be at least 1"):
        load_config("configs/demo.yaml", ["eval.every_steps=0"])
    with pytest.raises(ConfigError, match="exactly one of `trainer.global_batch_size`"):
        load_config("configs/demo.yaml", ["trainer.global_batch_tokens=4096"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/demo.yaml", ["data.train_mixture=nope.yaml"])


def test_all_problems_are_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", ["eval.every_steps=0", "optim.lr=-1"])
    assert "eval.every_steps" in str(err.value) and "optim.lr" in str(err.value)


def test_bad_override_and_bad_file():
    with pytest.raises(ConfigError, match="has no `=`"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/missing.yaml")


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{path}: invalid YAML"):
        load_config(path)


def test_every_run_config_loads_and_validates():
    run_configs = sorted((REPO / "configs").rglob("*.yaml"))
    run_configs = [p for p in run_configs if "accelerate" not in p.parts and "merges" not in p.parts]  # merges: tests/test_merge.py
    assert run_configs, "no run configs found"
    for path in run_configs:
        cfg = load_config(path.relative_to(REPO))
        assert isinstance(cfg, Config), path


def test_keys_listing_covers_public_names():
    keys = set(all_keys())
    for key in ("run.output_dir", "trainer.max_steps", "trainer.seed", "trainer.resume", "checkpoint.every_steps",
                "checkpoint.keep_last", "logging.every_steps", "eval.every_steps", "optim.lr"):
        assert key in keys


def test_every_mixture_file_loads_with_its_mixture_section(xp3_root):
    from train.data.pipeline import load_mixture_tasks
    from train.data.tasks import load_task_file

    files = sorted((REPO / "data_mixtures").glob("*.yaml"))
    assert len(files) >= 8
    with_mixture = 0
    for path in files:
        task_file = load_task_file(path)
        assert task_file.tasks, path
        if "mixture" in task_file.sections:
            spec, tasks = load_mixture_tasks(path)  # prompted tasks split by language expand to their languages
            assert set(spec.task_names()) <= set(task_file.tasks) == set(tasks), path
            with_mixture += 1
    assert with_mixture >= 5  # demo, local and the three T0 training mixtures


def test_readme_config_reference_lists_every_key():
    """The README's config reference must stay true: every leaf key of the config appears in it."""
    readme = (REPO / "README.md").read_text()
    leaves = [k for k in all_keys() if not any(other.startswith(k + ".") for other in all_keys())]
    missing = [k for k in leaves if f"`{k}`" not in readme]
    assert not missing, f"README.md's configuration reference lacks {missing}"
