"""Packer: capacity, both-fit rule, every example once, over-long policies, exact resume, determinism."""

import json
import random

import pytest

from train.errors import ConfigError, DataError
from train.data.packing import Packer, build_row


def make_examples(n: int, seed: int = 0, max_in: int = 20, max_tgt: int = 8) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "input_ids": [rng.randrange(2, 500) for _ in range(rng.randint(1, max_in))],
            "target_ids": [rng.randrange(2, 500) for _ in range(rng.randint(1, max_tgt))],
            "task": f"task{i % 3}",
            "index": i,
        }
        for i in range(n)
    ]


class ResumableList:
    """A minimal resumable stream (what train.data.mixtures provides): position in a list."""

    def __init__(self, items: list[dict]) -> None:
        self.items, self.pos = items, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.pos >= len(self.items):
            raise StopIteration
        self.pos += 1
        return self.items[self.pos - 1]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


ENCDEC = dict(kind="encdec", max_input_tokens=32, max_target_tokens=10)
DECODER = dict(kind="decoder", max_tokens=40)


def test_golden_decoder_row():
    # The docstring's picture, as data.
    row = build_row(
        [
            {"input_ids": [11, 12, 13], "target_ids": [21, 1], "task": "a"},
            {"input_ids": [14, 15], "target_ids": [22, 23, 1], "task": "b"},
        ],
        "decoder",
    )
    assert row["input_ids"] == [11, 12, 13, 21, 1, 14, 15, 22, 23, 1]
    assert row["segment_ids"] == [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert row["positions"] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert row["prefix_mask"] == [1, 1, 1, 0, 0, 1, 1, 0, 0, 0]
    assert row["loss_mask"] == [0, 0, 0, 1, 1, 0, 0, 1, 1, 1]
    assert row["tasks"] == ["a", "b"]


@pytest.mark.parametrize("cfg", [ENCDEC, DECODER, dict(DECODER, kind="prefix_lm")])
def test_capacity_and_every_example_exactly_once(cfg):
    examples = make_examples(300)
    packer = Packer(**cfg, window=4, overlong_policy="drop")
    rows = list(packer.rows(iter(examples)))
    seen = [i for row in rows for i in row["indices"]]
    dropped = packer.stats["dropped_overlong"]
    assert sorted(seen) == sorted(set(seen)), "an example appears twice"
    assert len(seen) + dropped == len(examples)
    by_index = {ex["index"]: ex for ex in examples}
    for row in rows:
        if cfg["kind"] == "encdec":
            assert len(row["input_ids"]) <= cfg["max_input_tokens"]
            assert len(row["target_ids"]) <= cfg["max_target_tokens"]
            # Segments in order and the tokens are the examples' tokens, untouched.
            expected = [t for i in row["indices"] for t in by_index[i]["input_ids"]]
            assert row["input_ids"] == expected
            assert max(row["target_segment_ids"]) == len(row["indices"]) == max(row["input_segment_ids"])
        else:
            assert len(row["input_ids"]) <= cfg["max_tokens"]
            expected = [t for i in row["indices"] for t in by_index[i]["input_ids"] + by_index[i]["target_ids"]]
            assert row["input_ids"] == expected
    assert packer.stats["rows"] == len(rows)
    assert packer.efficiency()["examples_per_row"] > 1.5  # it really packs


def test_encdec_both_parts_must_fit():
    packer = Packer("encdec", max_input_tokens=10, max_target_tokens=4, window=4)
    examples = [
        {"input_ids": [5] * 3, "target_ids": [6] * 3, "task": "t", "index": 0},
        # The input would fit next to example 0 (3 + 3 <= 10) but the target would not (3 + 2 > 4).
        {"input_ids": [5] * 3, "target_ids": [6] * 2, "task": "t", "index": 1},
        # Both parts fit next to example 0.
        {"input_ids": [5] * 6, "target_ids": [6] * 1, "task": "t", "index": 2},
    ]
    rows = list(packer.rows(iter(examples)))
    assert sorted(r["indices"] for r in rows) == [[0, 2], [1]]


def test_best_fit_picks_tightest_row():
    packer = Packer("decoder", max_tokens=10, window=3)
    mk = lambda i, n: {"input_ids": [3] * (n - 1), "target_ids": [4], "task": "t", "index": i}  # noqa: E731
    # Open rows after three examples: A=[6 tokens], B=[8], C=[7]. A 3-token example fits A (-> 9) and
    # C (-> 10); C is tightest and, now full, is emitted at once. At the end the fullest row goes first.
    rows = list(packer.rows(iter([mk(0, 6), mk(1, 8), mk(2, 7), mk(3, 3)])))
    assert [r["indices"] for r in rows] == [[2, 3], [1], [0]]
    # With the window full, an example that fits nowhere evicts the fullest open row first.
    packer = Packer("decoder", max_tokens=10, window=2)
    rows = packer.rows(iter([mk(0, 6), mk(1, 8), mk(2, 7)]))
    assert next(rows)["indices"] == [1]
    assert [b[0]["index"] for b in packer.state_dict()["bins"]] == [0, 2]


@pytest.mark.parametrize(
    "policy, expect_in, expect_tgt, counter",
    [
        ("truncate_left", [3, 4, 5, 6], [7, 8], "truncated_inputs"),
        ("truncate_right", [1, 2, 3, 4], [7, 8], "truncated_inputs"),
        ("drop", None, None, "dropped_overlong"),
    ],
)
def test_overlong_policies_encdec(policy, expect_in, expect_tgt, counter):
    packer = Packer("encdec", max_input_tokens=4, max_target_tokens=3, overlong_policy=policy)
    rows = list(packer.rows(iter([{"input_ids": [1, 2, 3, 4, 5, 6], "target_ids": [7, 8], "task": "t", "index": 0}])))
    assert packer.stats[counter] == 1
    if expect_in is None:
        assert rows == []
    else:
        assert rows[0]["input_ids"] == expect_in and rows[0]["target_ids"] == expect_tgt
        assert packer.stats["truncated_tokens"] == 2


def test_overlong_truncate_target_and_unfixable_examples_are_dropped():
    packer = Packer("decoder", max_tokens=6, overlong_policy="truncate_target")
    examples = [
        {"input_ids": [1, 2, 3], "target_ids": [4, 5, 6, 7, 8], "task": "t", "index": 0},  # target cut to 3
        {"input_ids": [1] * 6, "target_ids": [4], "task": "t", "index": 1},  # no room left for a target: drop
    ]
    rows = list(packer.rows(iter(examples)))
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4, 5, 6]]
    assert packer.stats["truncated_targets"] == 1 and packer.stats["dropped_overlong"] == 1
    left = Packer("decoder", max_tokens=6, overlong_policy="truncate_left")
    rows = list(left.rows(iter([{"input_ids": [1, 2, 3, 4], "target_ids": [5, 6, 7], "task": "t", "index": 0}])))
    assert rows[0]["input_ids"] == [2, 3, 4, 5, 6, 7] and rows[0]["loss_mask"] == [0, 0, 0, 1, 1, 1]
    whole_target = Packer("decoder", max_tokens=6, overlong_policy="truncate_left")
    assert list(whole_target.rows(iter([{"input_ids": [1], "target_ids": [5] * 6, "task": "t"}]))) == []
    assert whole_target.stats["dropped_overlong"] == 1


def test_pack_false_is_one_example_per_row():
    examples = make_examples(20)
    packer = Packer(**DECODER, pack=False)
    rows = list(packer.rows(iter(examples)))
    assert [r["indices"] for r in rows] == [[i] for i in range(20)]
    assert packer.efficiency()["examples_per_row"] == 1.0


@pytest.mark.parametrize("cfg", [ENCDEC, DECODER])
def test_resume_at_three_points_equals_uninterrupted(cfg):
    examples = make_examples(200, seed=3)
    reference = list(Packer(**cfg, window=6).rows(ResumableList(examples)))
    assert len(reference) > 40
    for cut in (1, 17, 40):
        stream = ResumableList(examples)
        packer = Packer(**cfg, window=6)
        rows = packer.rows(stream)
        before = [next(rows) for _ in range(cut)]
        # What the trainer checkpoints: JSON round trip of both states.
        saved = json.loads(json.dumps({"packer": packer.state_dict(), "stream": stream.state_dict()}))
        assert len(saved["packer"]["bins"]) <= 6  # bounded
        fresh_stream = ResumableList(examples)
        fresh_stream.load_state_dict(saved["stream"])
        fresh = Packer(**cfg, window=6)
        fresh.load_state_dict(saved["packer"])
        after = list(fresh.rows(fresh_stream))
        assert before + after == reference, f"resume after {cut} rows differs"
        assert fresh.stats["rows"] == len(reference)


def test_resume_with_other_config_fails():
    packer = Packer(**DECODER)
    with pytest.raises(ConfigError, match="differs"):
        Packer("decoder", max_tokens=41).load_state_dict(packer.state_dict())


def test_deterministic():
    examples = make_examples(150, seed=5)
    a = list(Packer(**ENCDEC, window=5).rows(iter(examples)))
    b = list(Packer(**ENCDEC, window=5).rows(iter(examples)))
    assert a == b


def test_infinite_stream_bounded_memory():
    def forever():
        i = 0
        while True:
            yield {"input_ids": [2] * (1 + i % 13), "target_ids": [3] * (1 + i % 5), "task": "t", "index": i}
            i += 1

    packer = Packer(**DECODER, window=8)
    rows = packer.rows(forever())
    for _ in range(200):
        next(rows)
        assert len(packer.state_dict()["bins"]) <= 8
    assert packer.efficiency()["efficiency"] > 0.9


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="max_target_tokens"):
        Packer("encdec", max_input_tokens=8)
    with pytest.raises(ConfigError, match="overlong_policy"):
        Packer("decoder", max_tokens=8, overlong_policy="cut")
    with pytest.raises(ConfigError, match="unknown model kind"):
        Packer("seq2seq", max_tokens=8)
    with pytest.raises(DataError, match="task 'rte'.*empty 'target_ids'"):
        bad = {"input_ids": [1], "target_ids": [], "task": "rte", "index": 4}
        list(Packer("decoder", max_tokens=8).rows(iter([bad])))
