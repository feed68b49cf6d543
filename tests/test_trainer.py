"""The training loop end to end on the shipped demo mixture: loss goes down, resume after kill -9 is
exact, half-written checkpoints are skipped, SIGTERM checkpoints and exits with the preemption code,
a NaN stops the run with the last good checkpoint intact, the export reloads, and 2 processes train
exactly like 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, fresh_accelerate
from train.loop.checkpointing import MARKER, find_resume_checkpoint, list_complete
from train.errors import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable



def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _mtf(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "train.cli", *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600, **kwargs)


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of that step; a step logged twice (before a kill and after resume) keeps the last."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss_last" in record:
            out[record["step"]] = record["train/loss_last"]
    return out


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full")
    proc = _mtf(["train", "configs/demo.yaml", *FAST, "trainer.max_steps=12", f"run.output_dir={run}",
                 "checkpoint.every_steps=6"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict[int, float]:
    losses = _losses(uninterrupted_run)
    assert sorted(losses) == list(range(1, 13))
    return losses


def test_demo_trains_and_loss_goes_down(uninterrupted):
    first = sum(uninterrupted[s] for s in (1, 2, 3)) / 3
    last = sum(uninterrupted[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.5, uninterrupted


def _wait_for_checkpoint(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    target = run / "checkpoints" / f"step-{step:08d}" / MARKER
    deadline = time.time() + timeout
    while not target.exists():
        assert proc.poll() is None, f"trainer exited early: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "checkpoint never appeared"
        time.sleep(0.05)


def test_kill_9_then_resume_gives_the_same_losses(tmp_path, uninterrupted):
    """kill -9 at three different points (after the checkpoints at steps 3, 6 and 9), resume each time."""
    run = tmp_path / "killed"
    args = ["train", "configs/demo.yaml", *FAST, "trainer.max_steps=12", f"run.output_dir={run}",
            "checkpoint.every_steps=3", "checkpoint.keep_last=5", "trainer.resume=auto"]
    for kill_after in (3, 6, 9):
        proc = subprocess.Popen([PY, "-m", "train.cli", *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        _wait_for_checkpoint(run, kill_after, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    final = _mtf(args)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed from" in final.stdout + final.stderr
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):  # fp32 on CPU: bit-identical
        assert resumed[step] == uninterrupted[step], (step, resumed[step], uninterrupted[step])


def test_half_written_checkpoint_is_never_loaded(tmp_path):
    ckpts = tmp_path / "checkpoints"
    good = ckpts / "step-00000004"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text("{}")
    (good / MARKER).write_text("step 4\n")
    half = ckpts / "step-00000008"  # newer, but no marker: a process died while writing it
    half.mkdir()
    (half / "trainer_state.json").write_text("{}")
    tmp = ckpts / ".tmp-step-00000010"
    tmp.mkdir()
    assert list_complete(tmp_path) == [good]
    from train.errors import CheckpointError, ConfigError

    # "auto" considers only step 4 (the half-written step 8 is never looked at); this fake one has an
    # empty trainer state, so verification names it (tests/test_hardening.py covers real checkpoints).
    with pytest.raises(CheckpointError, match=r"step-00000004: trainer_state.json is damaged"):
        find_resume_checkpoint("auto", tmp_path)

    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        find_resume_checkpoint(str(half), tmp_path)


def test_sigterm_checkpoints_and_exits_with_the_preemption_code(tmp_path):
    run = tmp_path / "preempt"
    args = ["train", "configs/demo.yaml", *FAST, "trainer.max_steps=500", f"run.output_dir={run}",
            "checkpoint.every_steps=2"]
    proc = subprocess.Popen([PY, "-m", "train.cli", *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    newest = list_complete(run)[-1]
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["step"] >= 2 and state["step"] < 500
    assert max(_losses(run)) == state["step"]  # the checkpoint is of the last finished step


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import train.modeling.losses as losses_mod
    from train.config import load_config
    from train.errors import TrainingError
    from train.loop.trainer import train as run_training

    monkeypatch.chdir(REPO)
    real = losses_mod.local_numerator
    calls = {"n": 0}

    def poisoned(nll, batch, mode):
        calls["n"] += 1
        value = real(nll, batch, mode)
        return value * float("nan") if calls["n"] > 6 else value  # steps 1-3 fine (2 micro-batches each)

    monkeypatch.setattr(losses_mod, "local_numerator", poisoned)
    cfg = load_config("configs/demo.yaml", [*FAST, "trainer.max_steps=10", f"run.output_dir={tmp_path}",
                                            "checkpoint.every_steps=2"])
    with fresh_accelerate():
        with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 4.*last good checkpoint"):
            run_training(cfg)
    done = list_complete(tmp_path)
    assert [p.name for p in done] == ["step-00000002"]
    state = json.loads((done[-1] / "trainer_state.json").read_text())
    assert state["step"] == 2
    record = json.loads((tmp_path / "run.json").read_text())  # what `mtf report` shows as the run's status
    assert record["status"] == "failed" and "non-finite loss" in record["error"]


def test_export_reloads_with_from_pretrained(tmp_path):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    run = tmp_path / "export"
    proc = _mtf(["train", "configs/demo.yaml", *FAST, "trainer.max_steps=2", f"run.output_dir={run}",
                 "checkpoint.export_final=true", "logging.wandb.mode=offline", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["steps"] == 2
    model = AutoModelForSeq2SeqLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert tok("translate English to German: The house is wonderful.").input_ids[:3] == [13959, 1566, 12]
    # the exported weights are the trained ones: they differ from a fresh init with the same seed
    ckpt = list_complete(run)[-1] / "accelerate"
    from safetensors.torch import load_file

    trained = load_file(next(ckpt.glob("model*.safetensors")))
    exported = model.state_dict()
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name
    # and it computes the same logits as the trained model rebuilt from the checkpoint
    from train.evaluation.runner import load_model_for_eval

    rebuilt, _, kind = load_model_for_eval(str(list_complete(run)[-1]))
    assert kind == "encdec"
    batch = tok(["premise: The man turned on the faucet."], return_tensors="pt")
    decoder_input_ids = torch.tensor([[0, 37, 629]])
    with torch.no_grad():
        a = model(**batch, decoder_input_ids=decoder_input_ids).logits
        b = rebuilt.eval()(**batch, decoder_input_ids=decoder_input_ids).logits
    assert torch.equal(a, b)
    # wandb in offline mode wrote its run directory, with no network and no API key
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def _two_processes(run: Path, port: int, *extra: str) -> str:
    env = _env()
    env["ACCELERATE_USE_CPU"] = "1"
    proc = subprocess.run(
        [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         "-m", "train.cli", "train", "configs/demo.yaml", *FAST, "trainer.max_steps=12", f"run.output_dir={run}",
         *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _resume_copy(checkpoint: Path, run: Path) -> None:
    """A new run directory holding only ``checkpoint`` (so resume=auto starts from it)."""
    import shutil

    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, run / "checkpoints" / checkpoint.name)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, uninterrupted_run, uninterrupted):
    run = tmp_path / "ddp"
    output = _two_processes(run, 29517, "checkpoint.every_steps=6")
    assert "= 2 ranks x 1 accumulation x 2 rows" in output  # really 2 processes (FIELD_NOTES: --cpu alone gives 1)
    digests = sorted(line.split("digest ")[1].strip() for line in output.splitlines() if "rows digest" in line)
    assert len(digests) == 2 and digests[0] != digests[1], "both ranks saw the same rows"
    # each rank builds only its own data lanes (its 2 rows of the 4-row global batch), not the whole batch
    assert "rank 0/2 builds data lanes 0-1 of 4 (2 rows per step)" in output
    assert "rank 1/2 builds data lanes 2-3 of 4 (2 rows per step)" in output
    two = _losses(run)
    assert sorted(two) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(two[step] - uninterrupted[step]) <= 1e-5, (step, two[step], uninterrupted[step])
    # the logs describe the global batch: the ranks' data counts are summed, so they equal 1 process's
    def data_records(run_dir: Path) -> dict:
        keys = ("tokens", "tokens_seen", "examples_seen", "packing/efficiency", "packing/tensor_efficiency",
                "packing/examples_per_row", "packing/truncated_inputs")
        return {r["step"]: {k: r.get(k) for k in keys} for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if "packing/efficiency" in r}
    one_records, two_records = data_records(uninterrupted_run), data_records(run)
    assert one_records and one_records == two_records


@pytest.mark.parametrize("kind", ["decoder", "prefix_lm"])
def test_decoder_kinds_train_and_evaluate_end_to_end(tmp_path, kind):
    """The same loop trains a Llama-style decoder, causal or prefix-LM, on packed rows and runs the eval hook."""
    run = tmp_path / kind
    # The final eval's cap keeps COPA rows 0-4, which hold both questions (rows 0-3 are all "effect"): 12 templates.
    proc = _mtf(["train", "configs/demo.yaml", *FAST, "model.config=configs/models/llama_tiny.json", f"model.kind={kind}",
                 "data.max_tokens=256", "trainer.max_steps=6", f"run.output_dir={run}", "trainer.seed=3",
                 "eval.mixture=data_mixtures/demo_eval.yaml", "eval.final_max_examples_per_template=5", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert f"model kind {kind}" in proc.stdout + proc.stderr
    assert summary["packing"]["efficiency"] > 0.9 and summary["packing"]["examples_per_row"] > 2
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]
    copa = summary["eval"]["datasets"]["super_glue/copa"]
    assert copa["num_templates"] == 12 and 0.0 <= copa["median"] <= 1.0
    assert (run / "eval" / "step-00000006.json").exists()


def test_max_time_stops_cleanly_with_a_checkpoint_and_the_switches_work(tmp_path):
    """trainer.max_time exits with the preemption code after a checkpoint; on the way it exercises
    Adafactor, bf16 autocast, gradient checkpointing and the tensorboard sink."""
    run = tmp_path / "max_time"
    proc = _mtf(["train", "configs/demo.yaml", *FAST, "trainer.max_steps=100000", "trainer.max_time=3",
                 f"run.output_dir={run}", "optim.name=adafactor", "trainer.precision=bf16",
                 "model.gradient_checkpointing=true", "logging.tensorboard=true"])
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert "stopped early (max_time)" in proc.stdout
    state = json.loads((list_complete(run)[-1] / "trainer_state.json").read_text())
    losses = _losses(run)
    assert state["step"] == max(losses) >= 1 and state["step"] < 100000
    assert all(loss == loss and loss < 20 for loss in losses.values())  # finite under bf16
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_pad_to_auto_is_longest_and_capacity_stays_available(monkeypatch):
    from train.config import load_config
    from train.loop.trainer import plan_batch

    monkeypatch.chdir(REPO)
    plan = lambda *overrides: plan_batch(load_config("configs/demo.yaml", list(overrides)), "encdec", 1)  # noqa: E731
    assert plan().pad_to == "longest" and "(at most 2,048 token slots, each micro-batch" in plan().describe()
    assert plan("data.pad_to=capacity").pad_to == "capacity" and "(2,048 token slots)" in plan("data.pad_to=capacity").describe()
    assert plan("data.packing=false").pad_to == "longest"
    described = plan("data.packing=false").describe()
    assert "at most 2,048 token slots, each micro-batch padded to its longest row" in described
    assert plan("data.packing=false", "data.pad_to=capacity").pad_to == "capacity"
    assert plan("data.pad_to=longest").pad_to == "longest"


def test_unpacked_run_pads_to_longest_and_resumes_exactly_from_a_capacity_checkpoint(tmp_path):
    """data.packing=false: a run padded to the capacity and one padded to each micro-batch's longest row
    (the default) train the same losses; a capacity checkpoint resumes under the new default."""
    capacity, longest = tmp_path / "capacity", tmp_path / "longest"
    unpacked = ["train", "configs/demo.yaml", *FAST, "data.packing=false", "trainer.max_steps=4"]
    proc = _mtf([*unpacked, "data.pad_to=capacity", "checkpoint.every_steps=2", f"run.output_dir={capacity}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 4 rows (512 token slots)" in proc.stdout
    _resume_copy(capacity / "checkpoints" / "step-00000002", longest)
    proc = _mtf([*unpacked, f"run.output_dir={longest}"])  # data.pad_to may change on resume
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "each micro-batch padded to its longest row" in proc.stdout
    before, after = _losses(capacity), _losses(longest)
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        assert abs(after[step] - before[step]) <= 1e-5, (step, after[step], before[step])
    records = {name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for name, run in (("capacity", capacity), ("longest", longest))}
    for name, rows in records.items():
        for r in (r for r in rows if "packing/efficiency" in r):
            if name == "capacity":
                assert r["packing/tensor_efficiency"] == r["packing/efficiency"]
            else:  # same rows, fewer computed slots; packing/efficiency still divides by the capacity
                assert r["packing/tensor_efficiency"] > 1.5 * r["packing/efficiency"]  # demo rows: ~1.9x
                assert r["packing/tensor_target_efficiency"] > r["packing/target_efficiency"]


def test_mfu_estimate():
    from train.loop.loggers import estimate_mfu

    assert estimate_mfu(6e9, 1000.0, 8, None) is None
    assert estimate_mfu(6e9, 1000.0, 2, 3.0) == pytest.approx(6e9 * 1000 / (2 * 3e12))


@pytest.mark.slow
def test_resume_on_a_different_number_of_processes(tmp_path, uninterrupted_run, uninterrupted):
    """A 1-process checkpoint resumes on 2 processes (and a 2-process one on 1) with the same losses:
    the data position is the global stream's, not a per-rank count."""
    one_to_two = tmp_path / "one_to_two"
    _resume_copy(uninterrupted_run / "checkpoints" / "step-00000006", one_to_two)
    output = _two_processes(one_to_two, 29519, "checkpoint.every_steps=3")
    assert "resumed from" in output and "= 2 ranks x 1 accumulation x 2 rows" in output
    two = _losses(one_to_two)
    assert sorted(two) == list(range(7, 13))
    for step in range(7, 13):
        assert abs(two[step] - uninterrupted[step]) <= 1e-5, (step, two[step], uninterrupted[step])

    two_to_one = tmp_path / "two_to_one"
    _resume_copy(one_to_two / "checkpoints" / "step-00000009", two_to_one)  # written by 2 processes
    proc = _mtf(["train", "configs/demo.yaml", *FAST, "trainer.max_steps=12", f"run.output_dir={two_to_one}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _losses(two_to_one)
    assert sorted(one) == [10, 11, 12]
    for step in (10, 11, 12):
        assert abs(one[step] - uninterrupted[step]) <= 1e-5, (step, one[step], uninterrupted[step])
