"""Mixture rates, the seeded/resumable/shardable stream, validation errors and the report."""

import json
import math
import time

import datasets
import numpy as np
import pytest
from scipy.stats import chisquare

from train.data import mixtures
from train.errors import ConfigError, DataError
from train.data.mixture_report import format_mixture_report, mixture_report, plot_mixture_report
from train.data.mixtures import MixtureStream, count_examples, load_mixture_spec, plan_mixture


def _tokenized(task, n, templates=None, seed=0):
    """A synthetic tokenized task: row i has input_ids [i, ...] so items can be traced to rows."""
    rng = np.random.default_rng(seed)
    cols = {
        "input_ids": [[i] + rng.integers(5, 300, size=int(rng.integers(1, 6))).tolist() for i in range(n)],
        "target_ids": [[7] * (1 + i % 3) for i in range(n)],
        "task": [task] * n,
    }
    if templates:  # contiguous runs of equal size, as a task renders template after template
        cols["template"] = [templates[i * len(templates) // n] for i in range(n)]
    return datasets.Dataset.from_dict(cols)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _probs(plan):
    return {s.name: s.probability for s in plan.sources}


# -- rates ------------------------------------------------------------------------------------------


def test_examples_proportional_cap(tmp_path):
    path = _write(tmp_path, "m.yaml", """
mixture:
  rate: {type: examples_proportional, maximum: 1000}
  members: [{task: a}, {task: b}, {task: c}]
""")
    plan = plan_mixture(load_mixture_spec(path), {"a": 100, "b": 1000, "c": 10000})
    assert _probs(plan) == pytest.approx({"a": 100 / 2100, "b": 1000 / 2100, "c": 1000 / 2100})


def test_temperature_caps_first_then_takes_the_root(tmp_path):
    path = _write(tmp_path, "m.yaml", """
mixture:
  rate: {type: temperature, temperature: 2.0, maximum: 1000}
  members: [{task: a}, {task: b}, {task: c}]
""")
    plan = plan_mixture(load_mixture_spec(path), {"a": 100, "b": 1000, "c": 10000})
    r = {"a": 10.0, "b": math.sqrt(1000), "c": math.sqrt(1000)}  # c capped at 1000 before the root
    assert _probs(plan) == pytest.approx({k: v / sum(r.values()) for k, v in r.items()})


def test_members_may_be_plain_task_names(tmp_path):
    path = _write(tmp_path, "m.yaml", "tasks: []\neval: {held_out: [x]}\nmixture:\n"
                  "  rate: {type: examples_proportional, maximum: 500000}\n  members: [a, b]\n")
    assert _probs(plan_mixture(load_mixture_spec(path), {"a": 1, "b": 3})) == pytest.approx({"a": 0.25, "b": 0.75})


def test_weights_and_equal(tmp_path):
    weights = _write(tmp_path, "w.yaml", "mixture:\n  rate: {type: weights}\n  members:\n"
                     "    - {task: a, weight: 3}\n    - {task: b, weight: 1}\n")
    equal = _write(tmp_path, "e.yaml", "mixture:\n  rate: {type: equal}\n  members: [{task: a}, {task: b}]\n")
    counts = {"a": 5, "b": 500}
    assert _probs(plan_mixture(load_mixture_spec(weights), counts)) == pytest.approx({"a": 0.75, "b": 0.25})
    assert _probs(plan_mixture(load_mixture_spec(equal), counts)) == pytest.approx({"a": 0.5, "b": 0.5})


def test_t0_per_template_min_and_step_rules(tmp_path):
    counts = {"a": {"t1": 400, "t2": 400, "t3": 100}, "b": 50}
    # min rule, cap 600: a's templates get min(n_t, 600/3) = 200, 200, 100; b (one template) min(50, 600)
    path = _write(tmp_path, "m.yaml", "mixture:\n  rate: {type: t0_per_template, cap: 600}\n"
                  "  members: [{task: a}, {task: b}]\n")
    assert _probs(plan_mixture(load_mixture_spec(path), counts)) == pytest.approx(
        {"a::t1": 200 / 550, "a::t2": 200 / 550, "a::t3": 100 / 550, "b": 50 / 550}
    )
    # t-zero's released rule: a has 400 rows per template <= cap 600 -> every template keeps n_t ...
    step = _write(tmp_path, "s.yaml", "mixture:\n  rate: {type: t0_per_template, cap: 600, rule: step}\n"
                  "  members: [{task: a}, {task: b}]\n")
    assert _probs(plan_mixture(load_mixture_spec(step), counts)) == pytest.approx(
        {"a::t1": 400 / 950, "a::t2": 400 / 950, "a::t3": 100 / 950, "b": 50 / 950}
    )
    # ... and above the cap every template gets cap / k = 100
    step300 = _write(tmp_path, "s3.yaml", "mixture:\n  rate: {type: t0_per_template, cap: 300, rule: step}\n"
                     "  members: [{task: a}, {task: b}]\n")
    assert _probs(plan_mixture(load_mixture_spec(step300), counts)) == pytest.approx(
        {"a::t1": 100 / 350, "a::t2": 100 / 350, "a::t3": 100 / 350, "b": 50 / 350}
    )


def test_nested_mixtures_compose_multiplicatively(tmp_path):
    _write(tmp_path, "sub.yaml", "tasks: []\nmixture:\n  rate: {type: examples_proportional}\n"
           "  members: [{task: b}, {task: c}]\n")
    top = _write(tmp_path, "top.yaml", "mixture:\n  rate: {type: weights}\n  members:\n"
                 "    - {task: a, weight: 3}\n    - {mixture: sub.yaml, weight: 1}\n")
    spec = load_mixture_spec(top)
    assert spec.task_names() == ["a", "b", "c"]
    plan = plan_mixture(spec, {"a": 10, "b": 100, "c": 300})
    assert _probs(plan) == pytest.approx({"a": 0.75, "b": 0.25 * 0.25, "c": 0.25 * 0.75})
    # a nested mixture under examples_proportional counts as its total examples (400, capped to 200)
    capped = _write(tmp_path, "capped.yaml", "mixture:\n  rate: {type: examples_proportional, maximum: 200}\n"
                    "  members: [{task: a}, {mixture: sub.yaml}]\n")
    plan = plan_mixture(load_mixture_spec(capped), {"a": 10, "b": 100, "c": 300})
    assert _probs(plan) == pytest.approx({"a": 10 / 210, "b": 200 / 210 * 0.25, "c": 200 / 210 * 0.75})


# -- validation errors ------------------------------------------------------------------------------

BAD_INPUTS = [
    ("mixture:\n  rate: {type: equal}\n  membres: [{task: a}]\n", ConfigError, r"unknown key 'membres'.*Did you mean 'members'"),
    ("mixture:\n  rate: {type: examples_proportional, maximun: 5}\n  members: [{task: a}]\n", ConfigError,
     r"mixture.rate: unknown key 'maximun'.*Did you mean 'maximum'"),
    ("mixture:\n  rate: {type: temprature, temperature: 2}\n  members: [{task: a}]\n", ConfigError,
     r"unknown rate type 'temprature'.*Did you mean 'temperature'"),
    ("mixture:\n  rate: {type: examples_proportional, maximum: 0}\n  members: [{task: a}]\n", ConfigError,
     r"mixture.rate.maximum must be a number > 0, got 0"),
    ("mixture:\n  rate: {type: temperature, temperature: -1}\n  members: [{task: a}]\n", ConfigError,
     r"rate.temperature must be a number > 0"),
    ("mixture:\n  rate: {type: t0_per_template, cap: 0.5}\n  members: [{task: a}]\n", ConfigError,
     r"rate.cap must be a number >= 1, got 0.5"),
    ("mixture:\n  rate: {type: weights}\n  members: [{task: a, weight: 0}]\n", ConfigError,
     r"members\[0\].weight must be a number > 0"),
    ("mixture:\n  rate: {type: weights}\n  members: [{task: a}]\n", ConfigError, r"needs a 'weight' on every member"),
    ("mixture:\n  rate: {type: equal}\n  members: [{task: a, weight: 2}]\n", ConfigError,
     r"weight is only used with rate type 'weights'"),
    ("mixture:\n  rate: {type: equal}\n  members: [{task: a, mixture: x.yaml}]\n", ConfigError,
     r"exactly one of 'task' or 'mixture'"),
    ("mixture:\n  rate: {type: equal}\n  members: [{task: a}, {task: a}]\n", ConfigError, r"listed twice"),
    ("mixture:\n  rate: {type: equal}\n  members: []\n", ConfigError, r"non-empty list"),
    ("mixtures:\n  rate: {type: equal}\n", ConfigError, r"no 'mixture:' section"),
    ("mixture:\n  rate: {type: equal}\n  members: [{mixture: missing.yaml}]\n", ConfigError, r"missing.yaml does not exist"),
]


@pytest.mark.parametrize("text,error,message", BAD_INPUTS)
def test_bad_mixture_files_fail_with_file_and_key(tmp_path, text, error, message):
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(error, match=message) as info:
        load_mixture_spec(path)
    assert str(path) in str(info.value)


def test_cycle_of_nested_mixtures(tmp_path):
    _write(tmp_path, "x.yaml", "mixture:\n  rate: {type: equal}\n  members: [{task: a}, {mixture: y.yaml}]\n")
    _write(tmp_path, "y.yaml", "mixture:\n  rate: {type: equal}\n  members: [{mixture: x.yaml}]\n")
    with pytest.raises(ConfigError, match=r"cycle: .*x.yaml -> .*y.yaml -> .*x.yaml"):
        load_mixture_spec(tmp_path / "x.yaml")


def test_unknown_task_lists_known_ones_and_zero_examples_is_a_data_error(tmp_path):
    path = _write(tmp_path, "m.yaml", "mixture:\n  rate: {type: equal}\n  members: [{task: ag_nwes}, {task: trec}]\n")
    spec = load_mixture_spec(path)
    with pytest.raises(ConfigError, match=r"members\[0\].task: unknown task 'ag_nwes'. Did you mean 'ag_news'.*"
                                          r"Known tasks: ag_news, trec"):
        plan_mixture(spec, {"ag_news": 5, "trec": 5})
    with pytest.raises(DataError, match=r"m.yaml: mixture.members\[1\].task: task 'trec' has no examples"):
        plan_mixture(spec, {"ag_nwes": 5, "trec": 0})


# -- the stream -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_tasks():
    return {
        "a": _tokenized("a", 40),
        "b": _tokenized("b", 300, templates=["x", "y", "z"]),
        "c": _tokenized("c", 7),
        "d": _tokenized("d", 1000),
    }


@pytest.fixture
def plan(tmp_path, four_tasks):
    path = _write(tmp_path, "m.yaml", "mixture:\n  rate: {type: weights}\n  members:\n"
                  "    - {task: a, weight: 1}\n    - {task: b, weight: 2}\n    - {task: c, weight: 0.5}\n"
                  "    - {task: d, weight: 4}\n")
    return plan_mixture(load_mixture_spec(path), count_examples(four_tasks))


def _key(item):
    return (item["task"], item["index"], tuple(item["input_ids"]), tuple(item["target_ids"]))


def test_items_follow_the_contract(plan, four_tasks):
    item = next(MixtureStream.from_plan(plan, four_tasks, seed=1))
    assert set(item) == {"task", "index", "input_ids", "target_ids"}
    row = four_tasks[item["task"]][item["index"]]
    assert item["input_ids"] == row["input_ids"] and item["target_ids"] == row["target_ids"]


def test_realised_shares_match_planned_rates_chi_square(plan, four_tasks):
    n = 60_000
    stream = MixtureStream.from_plan(plan, four_tasks, seed=1234)
    counts = dict.fromkeys(plan.task_shares(), 0)
    for _ in range(n):
        counts[next(stream)["task"]] += 1
    tasks = sorted(counts)
    expected = [plan.task_shares()[t] * n for t in tasks]
    assert plan.task_shares() == pytest.approx({"a": 1 / 7.5, "b": 2 / 7.5, "c": 0.5 / 7.5, "d": 4 / 7.5})
    assert chisquare([counts[t] for t in tasks], expected).pvalue > 0.01


def test_same_seed_same_stream_other_seed_differs(plan, four_tasks):
    one = [_key(x) for x in MixtureStream.from_plan(plan, four_tasks, seed=5).take(500)]
    two = [_key(x) for x in MixtureStream.from_plan(plan, four_tasks, seed=5).take(500)]
    other = [_key(x) for x in MixtureStream.from_plan(plan, four_tasks, seed=6).take(500)]
    assert one == two and one != other


def test_every_epoch_is_a_fresh_permutation(plan, four_tasks):
    stream = MixtureStream.from_plan(plan, four_tasks, seed=3, block_size=64)
    seen = [x["index"] for x in stream.take(3000) if x["task"] == "c"]  # c has 7 rows, drawn ~200 times
    epochs = [seen[i : i + 7] for i in range(0, 21, 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    assert stream.epochs()["c"] == len(seen) // 7
    b_rows = {x["index"] for x in MixtureStream.from_plan(plan, four_tasks, seed=3).take(4000) if x["task"] == "b"}
    assert b_rows == set(range(300))  # per-template sub-sources cover all their rows


@pytest.mark.parametrize("block_size", [64, 1000])
def test_resume_at_three_points_equals_uninterrupted(plan, four_tasks, block_size):
    full = [_key(x) for x in MixtureStream.from_plan(plan, four_tasks, seed=9, block_size=block_size).take(2600)]
    for stop in (1, 640, 2000):  # early, on a 64-block boundary, deep into later epochs of small tasks
        first = MixtureStream.from_plan(plan, four_tasks, seed=9, block_size=block_size)
        first.take(stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
        resumed = MixtureStream.from_plan(plan, four_tasks, seed=9, block_size=block_size)
        resumed.load_state_dict(state)
        assert [_key(x) for x in resumed.take(600)] == full[stop : stop + 600]


def test_t0_per_template_sub_sources_stream_their_own_rows(tmp_path, four_tasks):
    path = _write(tmp_path, "t0.yaml", "mixture:\n  rate: {type: t0_per_template, cap: 60}\n"
                  "  members: [{task: a}, {task: b}]\n")
    plan = plan_mixture(load_mixture_spec(path), count_examples(four_tasks))
    assert [s.name for s in plan.sources] == ["a", "b::x", "b::y", "b::z"]
    assert _probs(plan) == pytest.approx({"a": 40 / 100, "b::x": 20 / 100, "b::y": 20 / 100, "b::z": 20 / 100})
    items = MixtureStream.from_plan(plan, four_tasks, seed=0).take(2000)
    b_rows = [x["index"] for x in items if x["task"] == "b"]
    assert set(b_rows) == set(range(300))
    # within one epoch of template x (rows 0..99) every row comes once
    x_rows = [r for r in b_rows if r < 100][:100]
    assert sorted(x_rows) == list(range(100))


def test_restore_is_constant_time(plan, four_tasks, monkeypatch):
    calls = []
    original = MixtureStream._block_sources
    monkeypatch.setattr(MixtureStream, "_block_sources", lambda self, b: calls.append(b) or original(self, b))
    states = []
    stream = MixtureStream.from_plan(plan, four_tasks, seed=2, block_size=64)
    for stop in (10, 20_000):
        stream.take(stop - (stream.position))
        states.append(stream.state_dict())
    assert len(json.dumps(states[0])) == pytest.approx(len(json.dumps(states[1])), abs=20)
    for state in states:
        resumed = MixtureStream.from_plan(plan, four_tasks, seed=2, block_size=64)
        calls.clear()
        resumed.load_state_dict(state)
        assert len(calls) <= 2  # at most the current and next block, whatever the position
    # the same in wall time: restoring deep into the stream costs what restoring early costs
    timings = []
    for state in states:
        resumed = MixtureStream.from_plan(plan, four_tasks, seed=2, block_size=64)
        start = time.perf_counter()
        resumed.load_state_dict(state)
        timings.append(time.perf_counter() - start)
    assert timings[1] < 0.05


@pytest.mark.parametrize("lanes", [2, 3])
def test_lanes_interleave_every_epoch_shuffle(plan, four_tasks, lanes):
    """Lane l's k-th draw of a source is the source's global draw k * lanes + l: within an epoch, no two
    lanes take the same row, and the lanes together take the first rows of the 1-lane epoch shuffle."""
    base = MixtureStream.from_plan(plan, four_tasks, seed=4, block_size=64)
    streams = [base.lane_stream(lane, lanes) for lane in range(lanes)]
    items = [s.take(2000) for s in streams]
    assert items[0] != items[1]
    one_lane = [x["index"] for x in base.take(20_000) if x["task"] == "d"]  # d: 1000 rows, the largest share
    per_lane = [[x["index"] for x in lane if x["task"] == "d"] for lane in items]
    k = min(len(rows) for rows in per_lane)
    interleaved = [per_lane[i % lanes][i // lanes] for i in range(k * lanes)]
    assert interleaved == one_lane[:k * lanes]
    assert k * lanes > 1000 and sorted(interleaved[:1000]) == list(range(1000))  # epoch 1: every row once, all lanes


def test_lane_draws_its_own_sources_at_the_planned_rates(plan, four_tasks):
    n = 30_000
    lane = MixtureStream.from_plan(plan, four_tasks, seed=1234).lane_stream(5, 8)
    counts = dict.fromkeys(plan.task_shares(), 0)
    for x in lane.take(n):
        counts[x["task"]] += 1
    tasks = sorted(counts)
    assert chisquare([counts[t] for t in tasks], [plan.task_shares()[t] * n for t in tasks]).pvalue > 0.01


def test_lane_resume(plan, four_tasks):
    base = MixtureStream.from_plan(plan, four_tasks, seed=4, block_size=64)
    lane1 = base.lane_stream(1, 2)
    expected = [_key(x) for x in base.lane_stream(1, 2).take(500)]
    lane1.take(123)
    resumed = base.lane_stream(1, 2)
    resumed.load_state_dict(json.loads(json.dumps(lane1.state_dict())))
    assert [_key(x) for x in resumed.take(377)] == expected[123:]
    with pytest.raises(ConfigError, match="saved lane=1 but this run has 0"):
        base.lane_stream(0, 2).load_state_dict(lane1.state_dict())
    with pytest.raises(ConfigError, match="saved lanes=2 but this run has 4.*data.lanes"):
        base.lane_stream(1, 4).load_state_dict(lane1.state_dict())


def test_state_of_another_mixture_or_seed_is_refused(plan, four_tasks, tmp_path):
    state = MixtureStream.from_plan(plan, four_tasks, seed=1).state_dict()
    with pytest.raises(ConfigError, match="saved seed=1 but this run has 2"):
        MixtureStream.from_plan(plan, four_tasks, seed=2).load_state_dict(state)
    path = _write(tmp_path, "o.yaml", "mixture:\n  rate: {type: equal}\n  members: [{task: a}, {task: d}]\n")
    other = plan_mixture(load_mixture_spec(path), count_examples(four_tasks))
    with pytest.raises(ConfigError, match=r"sources changed.*differences: b, c\)"):
        MixtureStream.from_plan(other, four_tasks, seed=1).load_state_dict(state)


def test_missing_dataset_and_untokenized_dataset(plan, four_tasks):
    with pytest.raises(ConfigError, match="no tokenized dataset for task 'd'"):
        MixtureStream.from_plan(plan, {k: v for k, v in four_tasks.items() if k != "d"}, seed=0)
    raw = {**four_tasks, "a": four_tasks["a"].remove_columns("target_ids")}
    with pytest.raises(DataError, match="task 'a': the dataset has no 'target_ids' column"):
        MixtureStream.from_plan(plan, raw, seed=0)


def test_filtered_dataset_rows_are_looked_up_through_its_indices(tmp_path):
    ds = _tokenized("a", 100).filter(lambda row: row["input_ids"][0] % 2 == 1)
    path = _write(tmp_path, "m.yaml", "mixture:\n  rate: {type: equal}\n  members: [{task: a}]\n")
    plan = plan_mixture(load_mixture_spec(path), count_examples({"a": ds}))
    items = MixtureStream.from_plan(plan, {"a": ds}, seed=0).take(50)
    assert sorted(x["input_ids"][0] for x in items) == list(range(1, 100, 2))  # one epoch, odd rows only


# -- report -----------------------------------------------------------------------------------------


def test_report_shares_epochs_and_repeat_flag(tmp_path):
    dsets = {"a": _tokenized("a", 100), "b": _tokenized("b", 1000)}
    path = _write(tmp_path, "m.yaml", "mixture:\n  rate: {type: equal}\n  members: [{task: a}, {task: b}]\n")
    plan = plan_mixture(load_mixture_spec(path), count_examples(dsets))
    report = mixture_report(plan, dsets, steps=10, batch_tokens=1000, realised_samples=2000, seed=0)
    json.dumps(report)
    rows = {r["task"]: r for r in report["tasks"]}
    tokens = {t: float(np.mean([len(r["input_ids"]) + len(r["target_ids"]) for r in d])) for t, d in dsets.items()}
    per_sample = 0.5 * tokens["a"] + 0.5 * tokens["b"]
    for t, n in (("a", 100), ("b", 1000)):
        assert rows[t]["rate"] == pytest.approx(0.5)
        assert rows[t]["mean_tokens"] == pytest.approx(tokens[t])
        assert rows[t]["token_share"] == pytest.approx(0.5 * tokens[t] / per_sample)
        assert rows[t]["expected_epochs"] == pytest.approx(10_000 / per_sample * 0.5 / n)
        assert abs(rows[t]["realised_share"] - 0.5) < 0.05
    assert rows["a"]["repeats"] and not rows["b"]["repeats"]  # ~6 epochs of a, ~0.6 of b
    assert len(report["warnings"]) == 1 and "task 'a'" in report["warnings"][0]
    table = format_mixture_report(report)
    assert "REPEATS" in table and table.count("\n") == 4  # title, header, 2 tasks, 1 warning
    plot_mixture_report(report, tmp_path / "mix.png")
    assert (tmp_path / "mix.png").read_bytes()[:4] == b"\x89PNG"


def test_report_without_steps_has_no_epochs(tmp_path):
    dsets = {"a": _tokenized("a", 10)}
    path = _write(tmp_path, "m.yaml", "mixture:\n  rate: {type: equal}\n  members: [{task: a}]\n")
    report = mixture_report(plan_mixture(load_mixture_spec(path), count_examples(dsets)), dsets, realised_samples=10)
    assert report["tasks"][0]["expected_epochs"] is None and report["warnings"] == []
    assert report["tasks"][0]["realised_share"] == 1.0


def test_permutation_is_a_bijection_for_awkward_sizes():
    for n in (1, 2, 3, 5, 64, 65, 1000, 4097):
        keys = np.full(n, 99, dtype=np.uint64)
        assert sorted(mixtures._permute(np.arange(n), np.full(n, n), keys).tolist()) == list(range(n))
