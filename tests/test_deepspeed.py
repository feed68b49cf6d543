"""DeepSpeed ZeRO-2 and ZeRO-3 with 2 processes on CPU (gloo): train, checkpoint, resume with the same
subsequent losses, and export gathered (not sharded-empty) weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST
from test_trainer import _env, _losses

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install -e .[deepspeed])")


def _launch(run: Path, zero: str, port: int, extra: list[str]) -> str:
    env = _env()
    # DeepSpeed builds a comm op on first use (~29 s); reuse the build across runs and CI (FIELD_NOTES).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         "-m", "train.cli", "train", "configs/demo.yaml", *FAST, f"run.output_dir={run}",
         f"trainer.deepspeed=configs/deepspeed/{zero}.json", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "= 2 ranks x 1 accumulation x 2 rows" in output  # both ranks joined
    return output


@pytest.mark.slow
@pytest.mark.parametrize("zero,port", [("zero2", 29541), ("zero3", 29543)])
def test_zero_trains_checkpoints_and_resumes_exactly(tmp_path, zero, port):
    first = tmp_path / "first"
    output = _launch(first, zero, port, ["trainer.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=5",
                                         "checkpoint.export_final=true"])
    digests = {line.split("digest ")[1] for line in output.splitlines() if "rows digest" in line}
    assert len(digests) == 2, "the two ranks did not train on different rows"
    full = _losses(first)
    assert sorted(full) == [1, 2, 3, 4] and full[4] < full[1]

    # a second run that starts from the step-2 checkpoint only
    second = tmp_path / "second"
    (second / "checkpoints").mkdir(parents=True)
    shutil.copytree(first / "checkpoints" / "step-00000002", second / "checkpoints" / "step-00000002")
    output = _launch(second, zero, port + 1, ["trainer.max_steps=4", "checkpoint.every_steps=100"])
    assert "resumed from" in output
    resumed = _losses(second)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - full[step]) <= 1e-6, (zero, step, resumed[step], full[step])

    # the export holds the gathered weights (under ZeRO-3 unsharded ones, not empty placeholders)
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(first / "final")
    config = json.loads((REPO / "configs/models/t5_tiny.json").read_text())
    assert tuple(model.shared.weight.shape) == (config["vocab_size"], config["d_model"])
    assert float(model.shared.weight.detach().abs().sum()) > 0
