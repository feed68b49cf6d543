"""T-Few's evaluation protocol beside T0's (train/evaluation/results.py): the T-Few aggregate equals a hand
computation on a small table of per-(example, template) correctness; the results JSON and the table name the
protocol; ``length_normalized`` switches the headline score; the evaluator keeps per-example correctness, so
``mtf eval-merge`` can re-aggregate shards under either protocol; config keys and CLI flags are checked.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

from train.cli import build_parser
from train.config import Config, problems
from train.errors import ConfigError, DataError
from train.evaluation import evaluator as ev
from train.evaluation import results as er
from train.evaluation.runner import merge_results

# Per-(example, template) correctness of one dataset: 4 examples (task "t", example_index 0..3), templates A,
# B, C; C did not render example 3 (a conditional template). LN = the length-normalised correctness.
TABLE = {"A": {0: 1, 1: 0, 2: 0, 3: 1}, "B": {0: 0, 1: 1, 2: 0, 3: 0}, "C": {0: 0, 1: 1, 2: 1}}
LN = {"A": {0: 1, 1: 1, 2: 1, 3: 1}, "B": {0: 0, 1: 0, 2: 0, 3: 0}, "C": {0: 1, 1: 1, 2: 1}}
# Generator(PCG64(seed)).integers(0, [3, 3, 3, 2]): the template position (A, B, C by name) of each example.
PICKS = {0: [2, 1, 1, 0], 1: [1, 1, 2, 1], 2: [2, 0, 0, 0]}


def _row(template: str) -> dict:
    ids = sorted(TABLE[template])
    correct = [TABLE[template][i] for i in ids]
    correct_ln = [LN[template][i] for i in ids]
    return {"task": "t", "n": len(ids), "skipped": {}, "num_skipped": 0, "metric": "accuracy",
            "accuracy": sum(correct) / len(ids), "accuracy_length_normalized": sum(correct_ln) / len(ids),
            "chance": 0.5, "score": sum(correct) / len(ids),
            "per_example": {"t": {"ids": ids, "correct": correct, "correct_length_normalized": correct_ln}}}


def _table() -> dict:
    return {"d": {t: _row(t) for t in TABLE}}


def test_tfew_aggregate_equals_the_hand_computation():
    for seed, picks in PICKS.items():  # the draw is pinned: a change of algorithm fails here
        assert er.tfew_choices([3, 3, 3, 2], seed).tolist() == picks
    # seed 0 picks C, B, B, A -> 0, 1, 0, 1 = 0.5; seed 1: B, B, C, B -> 0, 1, 1, 0 = 0.5;
    # seed 2: C, A, A, A -> 0, 0, 0, 1 = 0.25
    res = er.aggregate(_table(), {"d": "nli"}, protocol="tfew", protocol_seeds=3)
    d = res["datasets"]["d"]
    assert d["seed_scores"] == [0.5, 0.5, 0.25]
    assert (d["median"], d["min"], d["max"]) == (0.5, 0.25, 0.5) and d["mean"] == pytest.approx(1.25 / 3)
    assert (d["protocol"], d["num_seeds"], d["num_templates"], d["num_examples"]) == ("tfew", 3, 3, 4)
    # T0 on the same rows: accuracies A 2/4, B 1/4, C 2/3 -> median 0.5, mean 0.4722
    t0 = er.aggregate(_table(), {"d": "nli"}, protocol="t0")["datasets"]["d"]
    assert t0["median"] == d["t0_median"] == 0.5 and t0["mean"] == pytest.approx((0.5 + 0.25 + 2 / 3) / 3)
    assert t0["protocol"] == "t0" and "seed_scores" not in t0
    # length-normalised correctness: seed 0 C, B, B, A -> 1, 0, 0, 1; seed 1 B, B, C, B -> 0, 0, 1, 0;
    # seed 2 C, A, A, A -> 1, 1, 1, 1
    ln = er.aggregate(_table(), protocol="tfew", protocol_seeds=3, length_normalized=True)["datasets"]["d"]
    assert ln["seed_scores"] == [0.5, 0.25, 1.0] and ln["median"] == 0.5


def test_tfew_without_per_example_rows_gives_no_number_and_says_why():
    rows = {"d": {"gen": {"task": "t", "n": 3, "skipped": {}, "num_skipped": 0, "metric": "rougeL", "rougeL": 0.4,
                          "chance": None, "score": 0.4}}}
    d = er.aggregate(rows, protocol="tfew")["datasets"]["d"]
    assert d["median"] is None and d["t0_median"] == 0.4 and "no rank-classification template" in d["note"]
    with pytest.raises(ConfigError, match="unknown evaluation protocol 'tfw'"):
        er.aggregate(rows, protocol="tfw")
    with pytest.raises(ConfigError, match="seeds must be an int >= 1"):
        er.aggregate(rows, protocol="tfew", protocol_seeds=0)


def test_results_json_and_table_name_the_protocol(tmp_path):
    for protocol, words in (("t0", "median over 3 templates"), ("tfew", "tfew: median over 3 seeds")):
        res = er.aggregate(_table(), protocol=protocol, protocol_seeds=3)
        assert res["protocol"]["name"] == protocol and res["datasets"]["d"]["protocol"] == protocol
        doc = json.loads(er.write_results(tmp_path / f"{protocol}.json", res).read_text())
        assert doc == json.loads(json.dumps(res)) and doc["protocol"]["name"] == protocol
        table = er.format_results_table(res)
        assert words in table and table.splitlines()[-1].startswith(f"protocol {protocol}: ")
    text = (tmp_path / "tfew.json").read_text()
    assert '"ids": [0, 1, 2, 3]' in text  # per-example lists stay on one line
    assert er.aggregate(_table())["protocol"] == {  # the default
        "name": "t0", "seeds": None, "length_normalized": False,
        "description": "per dataset, the median over templates of each template's accuracy (or metric)"}


def test_length_normalized_switches_the_headline_score():
    plain = er.aggregate(_table())
    ln = er.aggregate(_table(), length_normalized=True)
    for t in TABLE:
        assert plain["templates"]["d"][t]["score"] == plain["templates"]["d"][t]["accuracy"]
        assert ln["templates"]["d"][t]["score"] == ln["templates"]["d"][t]["accuracy_length_normalized"]
    assert plain["datasets"]["d"]["median"] == 0.5  # accuracies 0.5, 0.25, 0.667
    assert ln["datasets"]["d"]["median"] == 1.0  # length-normalised 1.0, 0.0, 1.0
    assert ln["protocol"]["length_normalized"] is True
    assert "score = rank classification by mean token log-probability" in er.format_results_table(ln)
    assert er.flatten_for_logging(ln)["eval/d/median"] == 1.0


def _t5():
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=384, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def _examples() -> list[dict]:
    """2 tasks of one dataset (like ANLI's rounds), 3 templates; template z skips example 1 of task a."""
    out = []
    for task in ("a", "b"):
        for template in ("x", "y", "z"):
            for i, (prompt, gold, choices) in enumerate([("Is it?", "yes", ["yes", "no"]),
                                                         ("Colour of grass", "green", ["red", "green", "blue"]),
                                                         ("2+2=", "four", ["three", "four"])]):
                if template == "z" and task == "a" and i == 1:
                    continue
                out.append({"inputs": f"{template} {task} {prompt}", "targets": [gold], "answer_choices": choices,
                            "task": task, "dataset": "d", "template": template, "example_index": 10 + i})
    return out


def test_the_evaluator_keeps_per_example_correctness_for_tfew():
    tok = ByT5Tokenizer()
    model = _t5()
    res = ev.evaluate(model, tok, _examples(), kind="encdec", protocol="tfew", protocol_seeds=4)
    rows = res["templates"]["d"]
    assert set(rows["z"]["per_example"]) == {"a", "b"} and rows["z"]["per_example"]["a"]["ids"] == [10, 12]
    for row in rows.values():  # per-example correctness agrees with the template's accuracy
        flat = [c for e in row["per_example"].values() for c in e["correct"]]
        assert sum(flat) / len(flat) == pytest.approx(row["accuracy"])
    d = res["datasets"]["d"]
    assert d["protocol"] == "tfew" and d["num_examples"] == 6 and d["num_seeds"] == 4
    assert d["median"] == statistics.median(er.tfew_scores(rows, 4)["seed_scores"])
    ln = ev.evaluate(model, tok, _examples(), kind="encdec", length_normalized=True)
    assert all(r["score"] == r["accuracy_length_normalized"] for r in ln["templates"]["d"].values())
    assert ln["protocol"]["name"] == "t0" and ln["protocol"]["length_normalized"] is True


def _shard(tmp_path, index: int, templates: list[str], protocol: str = "t0") -> str:
    res = er.aggregate({"d": {t: _row(t) for t in templates}}, protocol=protocol, protocol_seeds=3)
    res["meta"] = {"shard": {"index": index, "count": 2, "pairs": [["d", t] for t in templates]}}
    return str(er.write_results(tmp_path / f"shard-{index}.json", res))


def test_merged_shards_can_be_aggregated_under_either_protocol(tmp_path):
    paths = [_shard(tmp_path, 0, ["A", "C"]), _shard(tmp_path, 1, ["B"])]
    assert merge_results(paths)["datasets"]["d"]["median"] == 0.5  # the shards' protocol: t0
    merged = merge_results(paths, protocol="tfew", protocol_seeds=3)
    whole = er.aggregate(_table(), protocol="tfew", protocol_seeds=3)
    assert merged["datasets"]["d"] == whole["datasets"]["d"] and merged["protocol"] == whole["protocol"]
    mixed = [_shard(tmp_path, 0, ["A", "C"], "tfew"), _shard(tmp_path, 1, ["B"], "t0")]
    with pytest.raises(DataError, match="different protocol settings.*pass --protocol"):
        merge_results(mixed)
    assert merge_results(mixed, protocol="tfew")["datasets"]["d"]["seed_scores"] == [0.5, 0.5, 0.25]


def test_config_keys_and_cli_flags():
    cfg = Config()
    assert (cfg.eval.protocol, cfg.eval.protocol_seeds, cfg.eval.length_normalized) == ("t0", 5, False)
    cfg.eval.protocol_seeds = 0
    assert any("`eval.protocol_seeds` is 0" in p for p in problems(cfg))
    args = build_parser().parse_args(["eval", "m", "--mixture", "x.yaml", "--protocol", "tfew", "--protocol-seeds",
                                      "3", "--length-normalized"])
    assert (args.protocol, args.protocol_seeds, args.length_normalized) == ("tfew", 3, True)
    args = build_parser().parse_args(["eval", "m", "--mixture", "x.yaml"])
    assert (args.protocol, args.protocol_seeds, args.length_normalized) == ("t0", 5, False)
    args = build_parser().parse_args(["eval-merge", "s.json", "--no-length-normalized"])
    assert (args.protocol, args.protocol_seeds, args.length_normalized) == (None, None, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "m", "--mixture", "x.yaml", "--protocol", "t1"])
