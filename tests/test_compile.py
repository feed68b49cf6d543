"""``trainer.compile``: the model's forward through ``torch.compile`` trains the same losses as eager (fp32, 1e-5)."""

from __future__ import annotations

import json

import pytest

from conftest import FAST, fresh_accelerate
from test_trainer import _losses
from train.config import load_config
from train.errors import ConfigError

STEPS = 3


def _train(run, *extra: str) -> dict:
    from train.loop.trainer import train

    cfg = load_config("configs/demo.yaml", [*FAST, f"trainer.max_steps={STEPS}", f"run.output_dir={run}",
                                            "logging.wandb.mode=disabled", "data.pad_to=capacity",
                                            "checkpoint.every_steps=3", *extra])
    with fresh_accelerate():
        return train(cfg)


def test_compiled_forward_trains_the_same_losses_as_eager_and_keeps_checkpoint_keys(tmp_path):
    pytest.importorskip("torch._inductor")
    _train(tmp_path / "eager")
    _train(tmp_path / "compiled", "trainer.compile=true")
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert sorted(compiled) == list(range(1, STEPS + 1))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], abs=1e-5, rel=1e-5), step
    # the module is not wrapped: the checkpoint's weights have the eager run's names (no `_orig_mod.` prefix)
    from safetensors import safe_open

    def keys(run):
        with safe_open(str(run / "checkpoints" / "step-00000003" / "accelerate" / "model.safetensors"), "pt") as f:
            return sorted(f.keys())

    assert keys(tmp_path / "compiled") == keys(tmp_path / "eager")


def test_compile_with_deepspeed_is_refused_at_load():
    with pytest.raises(ConfigError, match="trainer.compile"):
        load_config("configs/demo.yaml", ["trainer.compile=true", "trainer.deepspeed=configs/deepspeed/zero2.json"])
