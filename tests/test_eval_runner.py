"""``mtf eval`` end to end on a real (tiny, random) T5 and the real demo eval mixture (SuperGLUE COPA, 12
templates): 3 shards merged with ``mtf eval-merge`` give exactly the whole run's numbers; a run checkpoint
scores like the Hugging Face export of the same weights; user errors exit 2 with a message, no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import fresh_accelerate, requires_shared

REPO = Path(__file__).resolve().parents[1]
DEMO_EVAL = str(REPO / "data_mixtures/demo_eval.yaml")
CAP = 8  # examples per template: 12 templates x 8 examples keep each run at a few seconds


def _run(model: Path, **kwargs) -> dict:
    """``run_eval_command`` in this process, with a fresh accelerate state (it creates an Accelerator)."""
    from train.evaluation.runner import run_eval_command

    with fresh_accelerate():
        return run_eval_command(model_dir=str(model), mixture=DEMO_EVAL, max_examples_per_template=CAP,
                                batch_size=16, **kwargs)


def _run_mixture(model: Path, mixture: str) -> dict:
    from train.evaluation.runner import run_eval_command

    with fresh_accelerate():
        return run_eval_command(model_dir=str(model), mixture=mixture, max_examples_per_template=2, batch_size=16)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> tuple[Path, object]:
    """A random tiny T5 (configs/models/t5_tiny.json) saved with the T5 tokenizer: (directory, model)."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    spec = json.loads((REPO / "configs/models/t5_tiny.json").read_text())
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config)
    out = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(REPO / "configs/tokenizers/t5").save_pretrained(out)
    return out, model


@pytest.fixture(scope="module")
def whole(hf_model) -> dict:
    return _run(hf_model[0])


def test_three_shards_merged_equal_the_whole_run(hf_model, whole, tmp_path):
    from train.cli import main
    from train.evaluation.runner import merge_results, mixture_pairs

    pairs = mixture_pairs(DEMO_EVAL)
    accuracies = [row["accuracy"] for row in whole["templates"]["super_glue/copa"].values()]
    assert len(accuracies) == 12 and len(set(accuracies)) > 1  # a random model: templates really differ
    # The cap takes the first CAP rows of the dataset before rendering: templates that apply to every row score
    # CAP examples, COPA's cause-only / effect-only ones the subset of those rows they apply to.
    scored = [row["n"] for row in whole["templates"]["super_glue/copa"].values()]
    assert max(scored) == CAP and 0 < min(scored) < CAP
    assert whole["meta"]["shard"] is None and whole["meta"]["num_examples"] == sum(scored)

    paths = []
    for index in range(3):
        path = tmp_path / f"shard-{index:05d}.json"
        shard = _run(hf_model[0], shard=f"{index}/3", output=str(path))
        assert shard["meta"]["shard"] == {"index": index, "count": 3, "pairs": [list(p) for p in pairs[index::3]]}
        assert list(shard["templates"]["super_glue/copa"]) == [t for _, t in pairs[index::3]]
        assert json.loads(path.read_text()) == json.loads(json.dumps(shard))
        paths.append(str(path))

    for merged in (merge_results(paths, mixture=DEMO_EVAL), merge_results(paths[::-1])):
        assert merged["templates"] == whole["templates"]  # every row: n, skips, accuracies, chance
        assert merged["datasets"]["super_glue/copa"]["median"] == whole["datasets"]["super_glue/copa"]["median"]
        assert merged["datasets"] == whole["datasets"] and merged["clusters"] == whole["clusters"]
        assert merged["clusters"]["sentence_completion"]["datasets"] == ["super_glue/copa"]
        assert merged["meta"]["num_examples"] == sum(scored) and merged["meta"]["kind"] == "encdec"
        assert merged["scoring"] == whole["scoring"]  # the convention, and the prompt set joined over the shards

    # the CLI: writes the merged JSON; a missing shard exits 2 naming its pairs and its array index
    out = tmp_path / "results.json"
    assert main(["eval-merge", "--mixture", DEMO_EVAL, "--output", str(out), "--json", *paths]) == 0
    assert json.loads(out.read_text())["templates"] == whole["templates"]
    assert main(["eval-merge", "--mixture", DEMO_EVAL, paths[0], paths[2]]) == 2


def test_eval_merge_errors_exit_2_with_a_message(tmp_path, capsys):
    from train.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["eval-merge", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    bad.write_text("[1, 2]")
    assert main(["eval-merge", str(bad)]) == 2
    assert "is not an `mtf eval` result" in capsys.readouterr().err
    assert main(["eval-merge", str(tmp_path / "shard-*.json")]) == 2
    err = capsys.readouterr().err
    assert "does not exist; did every `mtf eval --shard` job finish?" in err and "Traceback" not in err


def test_shard_arguments_are_checked_before_anything_loads(tmp_path, capsys):
    from train.cli import main

    assert main(["eval", "--count-shards", "--mixture", DEMO_EVAL]) == 0
    assert capsys.readouterr().out.strip() == "12"
    assert main(["eval", str(tmp_path), "--mixture", DEMO_EVAL, "--shard", "12/12"]) == 2
    assert "--array=0-11" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--mixture", DEMO_EVAL, "--shard", "0/20"]) == 2
    assert "has only 12 (dataset, template) pairs, so COUNT must be at most 12" in capsys.readouterr().err


def _fake_checkpoint(root: Path, model) -> Path:
    """runs/x/checkpoints/step-00000001 as the trainer lays it out (DDP): weights + trainer_state + run config."""
    from safetensors.torch import save_model

    from train.config import load_config, save_config

    step = root / "runs/x/checkpoints/step-00000001"
    (step / "accelerate").mkdir(parents=True)
    save_model(model, str(step / "accelerate/model.safetensors"))  # drops the tied copies of shared.weight
    (step / "trainer_state.json").write_text(json.dumps({"step": 1}))
    cfg = load_config(REPO / "configs/demo.yaml", [f"model.config={REPO / 'configs/models/t5_tiny.json'}",
                                                   f"model.tokenizer={REPO / 'configs/tokenizers/t5'}",
                                                   f"data.train_mixture={REPO / 'data_mixtures/demo_train.yaml'}",
                                                   f"eval.mixture={DEMO_EVAL}"])
    save_config(cfg, root / "runs/x/config.yaml")
    return step


def test_a_run_checkpoint_scores_like_the_hf_export(hf_model, whole, tmp_path):
    from train.evaluation.runner import resolve_model_path

    step = _fake_checkpoint(tmp_path, hf_model[1])
    results = _run(step)
    assert results["templates"] == whole["templates"]
    assert results["datasets"] == whole["datasets"]
    assert results["meta"]["model"] == str(step)

    # a run directory means its final/ export
    (tmp_path / "runs/x/final").symlink_to(hf_model[0], target_is_directory=True)
    assert resolve_model_path(str(tmp_path / "runs/x")) == tmp_path / "runs/x/final"


@pytest.mark.parametrize("writer", ["accelerate", "save_model"])
def test_checkpoint_weights_load_whichever_tied_alias_was_kept(hf_model, tmp_path, writer):
    import torch
    from safetensors.torch import save_file

    from train.evaluation.runner import load_model_for_eval

    model = hf_model[1]
    step = _fake_checkpoint(tmp_path, model)  # safetensors.torch.save_model kept decoder.embed_tokens.weight
    if writer == "accelerate":  # accelerator.save_state keeps the first alias (shared.weight), as here
        state, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.untyped_storage().data_ptr() not in seen:
                seen.add(tensor.untyped_storage().data_ptr())
                state[name] = tensor
        assert "shared.weight" in state and "lm_head.weight" not in state
        save_file({k: v.contiguous() for k, v in state.items()}, str(step / "accelerate/model.safetensors"))
    loaded, tokenizer, kind = load_model_for_eval(str(step))
    assert kind == "encdec" and tokenizer.eos_token_id == 1
    reference = model.state_dict()
    assert set(loaded.state_dict()) == set(reference)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_a_path_without_a_model_exits_2_naming_what_it_looked_for(hf_model, tmp_path, capsys):
    from train.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty), "--mixture", DEMO_EVAL]) == 2
    err = capsys.readouterr().err
    assert f"mtf eval: error: {empty}: no model found; looked for config.json" in err
    assert "final/config.json" in err and "trainer_state.json" in err and "Traceback" not in err

    step = _fake_checkpoint(tmp_path, hf_model[1])
    (step / "accelerate/model.safetensors").unlink()
    assert main(["eval", str(step), "--mixture", DEMO_EVAL, "--max-examples-per-template", "1"]) == 2
    assert "no model weights under accelerate/" in capsys.readouterr().err
    (tmp_path / "runs/x/config.yaml").unlink()
    assert main(["eval", str(step), "--mixture", DEMO_EVAL, "--max-examples-per-template", "1"]) == 2
    assert "needs its run's config.yaml" in capsys.readouterr().err


@requires_shared
def test_local_real_eval_sets_report_per_template_accuracy_and_dataset_medians(hf_model):
    """RTE, CB, COPA, WSC and BoolQ from ../shared with their PromptSource templates (a random model:
    chance-level accuracy is expected; the point is that every dataset and template is scored)."""
    results = _run_mixture(hf_model[0], str(REPO / "data_mixtures/local_eval.yaml"))
    datasets = results["datasets"]
    assert {"super_glue/rte", "super_glue/cb", "super_glue/copa", "super_glue/boolq"} <= set(datasets)
    assert any(name.startswith("super_glue/wsc") for name in datasets)
    for name, summary in datasets.items():
        assert summary["num_templates"] >= 5, name
        assert 0.0 <= summary["median"] <= 1.0
        for row in results["templates"][name].values():
            assert row["n"] == 2 and 0.0 < row["chance"] < 1.0


def test_the_cap_is_applied_before_rendering_and_agrees_with_the_training_evaluator(hf_model, whole):
    """``--max-examples-per-template N`` renders only rows 0..N-1; the evaluator given every rendered row and the same
    cap (what a capped eval during training does) keeps exactly those examples, so both score the same thing."""
    from transformers import AutoTokenizer

    from train.evaluation.evaluator import ZeroShotEvaluator
    from train.evaluation.runner import load_examples

    capped, _, _ = load_examples(DEMO_EVAL, max_examples_per_template=CAP)
    every, _, _ = load_examples(DEMO_EVAL)
    assert {ex["example_index"] for ex in capped} == set(range(CAP))  # only the first CAP source rows were rendered
    assert len(every) > 10 * len(capped)
    tok = AutoTokenizer.from_pretrained(hf_model[0])
    a = ZeroShotEvaluator(tok, capped, kind="encdec")
    b = ZeroShotEvaluator(tok, every, kind="encdec", max_examples_per_template=CAP)
    assert [(i.prompt_ids, i.choice_ids, i.gold) for i in a.rank_items] == \
        [(i.prompt_ids, i.choice_ids, i.gold) for i in b.rank_items]
    assert {k: len(g.indices) for k, g in a.groups.items()} == {k: len(g.indices) for k, g in b.groups.items()}
    assert sum(len(g.indices) for g in a.groups.values()) == whole["meta"]["num_examples"]


@requires_shared
def test_anli_rounds_are_reported_separately(hf_model, tmp_path):
    """t0_eval.yaml's layout (one task and one dataset per ANLI round, same templates): ``mtf eval`` reports r1, r2
    and r3 as three datasets with their own medians instead of pooling them (and capping the pool from r1)."""
    from conftest import SHARED_DATA

    rows = [{"uid": f"r{r}-{i}", "premise": f"Round {r} premise number {i} about a town.", "reason": "",
             "hypothesis": f"The town in premise {i} is large.", "label": (i + r) % 3} for r in (1, 2, 3) for i in range(3)]
    tasks = []
    for r in (1, 2, 3):
        path = tmp_path / f"dev_r{r}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows if row["uid"].startswith(f"r{r}-")))
        tasks.append(f"""  - name: anli_r{r}
    source: {{type: jsonl, data_files: {{dev_r{r}: {path}}}}}
    split: dev_r{r}
    templates: {{file: {SHARED_DATA}/promptsource_templates/anli/templates.yaml, original_task: true}}
    metadata: {{dataset: anli/r{r}, cluster: nli, language: en}}
""")
    mixture = tmp_path / "anli_eval.yaml"
    mixture.write_text("tasks:\n" + "".join(tasks) + "eval:\n  held_out: [anli]\n  clusters: [nli]\n")
    res = _run_mixture(hf_model[0], str(mixture))
    assert sorted(res["datasets"]) == ["anli/r1", "anli/r2", "anli/r3"]
    for r in (1, 2, 3):
        summary = res["datasets"][f"anli/r{r}"]
        assert summary["median"] is not None and summary["num_templates"] == len(res["templates"][f"anli/r{r}"]) > 1
        assert all(row["n"] == 2 for row in res["templates"][f"anli/r{r}"].values())  # the cap, per round
    assert res["clusters"]["nli"]["datasets"] == ["anli/r1", "anli/r2", "anli/r3"]
