"""Data lanes: the global rows do not depend on the rank count, each rank builds only its own, and the
merged state resumes on any rank count (the trainer-level proofs are in test_trainer.py)."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from train.data.lanes import DataLanes, merge_states, resolve_lanes
from train.data.mixtures import MixtureStream, count_examples, load_mixture_spec, plan_mixture
from train.data.packing import Packer
from train.errors import ConfigError


def _tokenized(task: str, n: int, seed: int) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict({
        "input_ids": [[i] + rng.integers(5, 300, size=int(rng.integers(1, 30))).tolist() for i in range(n)],
        "target_ids": [[7] * (1 + i % 5) for i in range(n)],
        "task": [task] * n,
    })


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> MixtureStream:
    path = tmp_path_factory.mktemp("lanes") / "m.yaml"
    path.write_text("mixture:\n  rate: {type: weights}\n  members:\n    - {task: a, weight: 1}\n    - {task: b, weight: 3}\n")
    tasks = {"a": _tokenized("a", 50, 0), "b": _tokenized("b", 400, 1)}
    return MixtureStream.from_plan(plan_mixture(load_mixture_spec(path), count_examples(tasks)), tasks, seed=3, block_size=64)


def _packer() -> Packer:
    return Packer("decoder", max_tokens=48, window=4)


def _global_rows(stream, lanes: int, world_size: int, steps: int, global_rows: int = 8) -> list[list[dict]]:
    ranks = [DataLanes(stream, _packer, lanes=lanes, global_rows=global_rows, rank=r, world_size=world_size)
             for r in range(world_size)]
    return [[row for data in ranks for row in data.next_rows()] for _ in range(steps)]


def test_the_global_rows_do_not_depend_on_the_rank_count(stream):
    one = _global_rows(stream, lanes=8, world_size=1, steps=12)
    for world_size in (2, 4, 8):
        assert _global_rows(stream, lanes=8, world_size=world_size, steps=12) == one
    assert len({json.dumps(r["input_ids"]) for step in one for r in step}) == 12 * 8  # rows differ: lanes are not copies


def test_each_rank_builds_only_its_lanes(stream):
    data = DataLanes(stream, _packer, lanes=8, global_rows=16, rank=3, world_size=4)
    assert list(data.mine) == [6, 7] and data.rows_per_lane == 2
    assert len(data.next_rows()) == 4  # 16 global rows / 4 ranks
    assert data.stats["rows"] == 4


def test_a_merged_checkpoint_resumes_on_another_rank_count(stream):
    reference = _global_rows(stream, lanes=4, world_size=1, steps=10)
    two = [DataLanes(stream, _packer, lanes=4, global_rows=8, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):
        for data in two:
            data.next_rows()
    saved = json.loads(json.dumps(merge_states([data.state_dict() for data in two])))  # what the checkpoint holds
    assert sorted(saved["lane_states"], key=int) == ["0", "1", "2", "3"]
    for world_size in (1, 4):
        ranks = [DataLanes(stream, _packer, lanes=4, global_rows=8, rank=r, world_size=world_size) for r in range(world_size)]
        for data in ranks:
            data.load_state_dict(saved)
        resumed = [[row for data in ranks for row in data.next_rows()] for _ in range(4)]
        assert resumed == reference[6:]


def test_a_state_of_another_layout_is_refused(stream):
    data = DataLanes(stream, _packer, lanes=4, global_rows=8)
    state = data.state_dict()
    with pytest.raises(ConfigError, match="lanes=4, this run 2.*same `data.lanes`"):
        DataLanes(stream, _packer, lanes=2, global_rows=8).load_state_dict(state)
    partial = dict(state, lane_states={k: v for k, v in state["lane_states"].items() if k != "3"})
    with pytest.raises(ConfigError, match=r"lacks lane\(s\) \[3\]"):
        DataLanes(stream, _packer, lanes=4, global_rows=8).load_state_dict(partial)


@pytest.mark.parametrize("lanes, global_rows, world_size, expected", [
    ("auto", 8, 1, 8), ("auto", 8, 8, 8), ("auto", 1024, 64, 64), ("auto", 48, 6, 48), ("auto", 96, 1, 48),
    (4, 8, 2, 4), (1, 8, 1, 1),
])
def test_resolve_lanes(lanes, global_rows, world_size, expected):
    assert resolve_lanes(lanes, global_rows, world_size) == expected


def test_lanes_that_do_not_fit_name_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"data.lanes=3 must divide the global batch of 8 rows; choose one of \[1, 2, 4, 8\]"):
        resolve_lanes(3, 8, 1)
    with pytest.raises(ConfigError, match=r"data.lanes=auto resolved to 64 .* does not split over 128 ranks.*\[128, 256, 512\]"):
        resolve_lanes("auto", 512, 128)
