"""Data prefetch (``data.prefetch_steps``, train/data/prefetch.py): same rows and losses at every depth, the
loop's wait for data logged, a checkpoint holding the last *trained* step's data position, failures raised."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import FAST, fresh_accelerate
from test_trainer import _losses
from train.config import load_config
from train.data.prefetch import PreparedStep, StepFeed

STEPS = 6


def _train(run: Path, *extra: str) -> dict:
    from train.loop.trainer import train

    cfg = load_config("configs/demo.yaml", [*FAST, f"trainer.max_steps={STEPS}", f"run.output_dir={run}",
                                            "logging.wandb.mode=disabled", *extra])
    with fresh_accelerate():
        return train(cfg)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def depth_runs(tmp_path_factory) -> dict[int, tuple[Path, dict]]:
    out = {}
    for depth in (0, 4):
        run = tmp_path_factory.mktemp(f"depth{depth}")
        out[depth] = (run, _train(run, f"data.prefetch_steps={depth}", "checkpoint.every_steps=3"))
    return out


def test_depth_0_and_4_give_bit_identical_losses_and_data(depth_runs):
    (run0, s0), (run4, s4) = depth_runs[0], depth_runs[4]
    losses0, losses4 = _losses(run0), _losses(run4)
    assert sorted(losses0) == list(range(1, STEPS + 1))
    assert losses0 == losses4  # exact equality, every step
    # the same rows: the same token counts and packer counters per step, the same checkpointed data position
    tokens = lambda run: [(m["step"], m["tokens_seen"], m.get("packing/efficiency")) for m in _metrics(run)
                          if "train/loss_last" in m]
    assert tokens(run0) == tokens(run4)
    for step in ("step-00000003", "step-00000006"):
        state0 = json.loads((run0 / "checkpoints" / step / "trainer_state.json").read_text())
        state4 = json.loads((run4 / "checkpoints" / step / "trainer_state.json").read_text())
        assert state0["data"] == state4["data"], step  # the consumed step's position, not the thread's
    assert s0["prefetch_steps"] == 0 and s4["prefetch_steps"] == 4


def test_the_wait_for_data_is_logged_every_step_and_summed_in_run_json(depth_runs):
    for depth, (run, summary) in depth_runs.items():
        rows = [m for m in _metrics(run) if "train/loss_last" in m]
        assert len(rows) == STEPS and all(m["time/data_wait_s"] >= 0 and m["time/step_s"] > 0 for m in rows)
        assert all(m["time/data_wait_s"] <= m["time/step_s"] for m in rows)
        record = json.loads((run / "run.json").read_text())
        assert record["data_wait_seconds"] == pytest.approx(summary["data_wait_seconds"])
        assert 0 < summary["data_wait_seconds"] < summary["train_loop_seconds"]
    # at depth 0 the whole data time is inside the step; ahead of the loop, the loop waits less for it
    assert depth_runs[4][1]["data_wait_seconds"] < depth_runs[0][1]["data_wait_seconds"]


def test_a_checkpoint_of_a_prefetching_run_resumes_exactly_at_another_depth(tmp_path, depth_runs):
    """Stop a depth-4 run at step 3 (its thread had built steps 4-6 already), resume it at depth 0: the losses of
    steps 4-6 are those of the uninterrupted run."""
    run = tmp_path / "run"
    _train(run, "data.prefetch_steps=4", "trainer.max_steps=3", "checkpoint.every_steps=3")
    _train(run, "data.prefetch_steps=0", "checkpoint.every_steps=3")
    assert _losses(run) == _losses(depth_runs[4][0])


# ------------------------------------------------------------------------------------------ the feed itself


def _step(n: int) -> PreparedStep:
    return PreparedStep(step=n, micro_batches=[], counts={"n": n}, data_state={"after": n})


def test_the_feed_hands_steps_in_order_and_its_state_is_the_last_consumed_one():
    for depth in (0, 1, 3):
        with StepFeed(_step, initial_state={"after": 0}, first_step=1, last_step=5, depth=depth) as feed:
            assert feed.state_dict() == {"after": 0}
            for n in range(1, 6):
                prepared, waited = feed.next()
                assert prepared.step == n and feed.state_dict() == {"after": n} and waited >= 0
            with pytest.raises(RuntimeError, match="past its last step"):
                feed.next()


def test_an_error_while_preparing_is_raised_in_the_loop_after_the_steps_before_it():
    def prepare(n: int) -> PreparedStep:
        if n == 3:
            raise ValueError("template 'x' of task 'y' failed on row 7")
        return _step(n)

    feed = StepFeed(prepare, initial_state={}, first_step=1, last_step=5, depth=2)
    assert [feed.next()[0].step for _ in range(2)] == [1, 2]
    with pytest.raises(ValueError, match="template 'x' of task 'y'"):
        feed.next()
    assert feed.state_dict() == {"after": 2}  # the last step handed over
    feed.close()


def test_close_stops_a_thread_blocked_on_a_full_queue():
    prepared = []

    def prepare(n: int) -> PreparedStep:
        prepared.append(n)
        return _step(n)

    feed = StepFeed(prepare, initial_state={}, first_step=1, last_step=10**6, depth=2)
    deadline = time.time() + 10
    while len(prepared) < 3 and time.time() < deadline:  # 2 queued, the third waiting for room
        time.sleep(0.01)
    feed.close()
    assert not any(t.name == "mtf-data-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(prepared) <= 4  # it stopped instead of running on


def test_a_negative_depth_is_refused_by_the_config(tmp_path):
    from train.errors import ConfigError

    with pytest.raises(ConfigError, match="data.prefetch_steps"):
        load_config("configs/demo.yaml", ["data.prefetch_steps=-1"])
