"""Recipe presets resolve to the published settings (T0, BLOOMZ, mT0) and the CPU demo."""

from pathlib import Path

import pytest

from train.config import load_config
from train.loop.trainer import plan_batch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_t0_3b_matches_t_zero():
    cfg = load_config("configs/runs/t0_3b.yaml")
    assert cfg.model.kind == "encdec" and "t5" in cfg.model.name_or_path and "lm-adapt" in cfg.model.name_or_path
    assert (cfg.data.max_input_tokens, cfg.data.max_target_tokens, cfg.data.packing) == (1024, 256, True)
    assert (cfg.optim.name, cfg.optim.lr, cfg.schedule.name, cfg.schedule.warmup_steps) == ("adafactor", 1e-3, "constant", 0)
    assert cfg.trainer.global_batch_tokens == 2**20
    assert plan_batch(cfg, "encdec", world_size=8).global_rows == 1024  # ~1M tokens = 1024 rows of 1024
    assert cfg.trainer.max_steps == 12200
    assert cfg.trainer.precision == "bf16"
    assert cfg.data.train_mixture.endswith("t0_train.yaml") and cfg.eval.mixture.endswith("t0_eval.yaml")


def test_bloomz_560m_matches_tr13_mtf():
    cfg = load_config("configs/runs/bloomz_560m.yaml")
    assert cfg.model.kind == "decoder" and cfg.model.name_or_path == "bigscience/bloom-560m"
    assert (cfg.data.max_tokens, cfg.data.packing) == (2048, True)
    assert cfg.trainer.loss_normalization == "target_mean"
    o = cfg.optim
    assert (o.name, o.lr, o.betas, o.eps, o.weight_decay, o.clip_grad_norm) == ("adamw", 2e-5, [0.9, 0.95], 1e-8, 1e-4, 1.0)
    assert (cfg.schedule.name, cfg.schedule.warmup_steps) == ("constant", 0)
    assert cfg.trainer.precision == "bf16"
    assert cfg.trainer.global_batch_size * cfg.trainer.max_steps == pytest.approx(6_348_800, rel=0.001)


def test_mt0_base_matches_xmtf():
    cfg = load_config("configs/runs/mt0_base.yaml")
    assert cfg.model.name_or_path == "google/mt5-base" and cfg.model.kind == "encdec"
    assert (cfg.data.max_input_tokens, cfg.data.max_target_tokens, cfg.data.packing) == (1024, 1024, False)
    assert cfg.trainer.loss_normalization == "sequence_mean"
    assert cfg.trainer.global_batch_size == 512
    assert (cfg.optim.name, cfg.optim.lr, cfg.schedule.name) == ("adafactor", 1e-3, "constant")


def test_demo_is_a_small_cpu_run():
    cfg = load_config("configs/runs/demo.yaml")
    assert cfg.model.config == "configs/models/t5_tiny.json" and cfg.model.tokenizer == "configs/tokenizers/t5"
    assert cfg.trainer.precision == "fp32" and cfg.trainer.deepspeed is None
    assert cfg.eval.mixture == "data_mixtures/demo_eval.yaml"
    assert cfg.trainer.max_steps <= 300


def test_tfew_3b_matches_the_t_few_paper():
    """t-few configs/t03b.json + ia3.json + rte.json and src/utils/Config.py defaults."""
    cfg = load_config("configs/runs/tfew_3b.yaml")
    assert cfg.model.name_or_path == "bigscience/T0_3B" and cfg.model.kind == "encdec"
    assert (cfg.peft.method, cfg.peft.target_modules, cfg.peft.feedforward_modules) == ("ia3", ["k", "v", "wi_1"], [])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.clip_grad_norm) == ("adafactor", 3e-3, 1.0)
    assert (cfg.schedule.name, cfg.schedule.warmup_steps, cfg.trainer.max_steps) == ("linear", 60, 1000)  # 6% warmup
    assert (cfg.trainer.global_batch_size, cfg.data.packing) == (8, False)  # 8 examples per step
    assert cfg.data.max_input_tokens == 256 and cfg.trainer.precision == "bf16"
    w = cfg.trainer.loss_weights
    assert (w.lm, w.unlikelihood, w.rank_classification) == (1.0, 1.0, 1.0)
    assert (cfg.eval.length_normalized, cfg.eval.protocol, cfg.eval.protocol_seeds) == (True, "tfew", 5)
    from train.data.mixtures import load_mixture_spec
    from train.data.tasks import load_task_file

    tasks = load_task_file(cfg.data.train_mixture).tasks
    (task,) = tasks.values()
    assert task.split == "train" and task.few_shot is not None and task.few_shot.k == 32  # t-few num_shot
    assert load_mixture_spec(cfg.data.train_mixture).task_names() == [task.name]


def test_tfew_ia3_pretrain_uses_the_last_file_of_t_fews_config_stack():
    cfg = load_config("configs/runs/tfew_ia3_pretrain.yaml")
    assert cfg.model.name_or_path == "bigscience/T0_3B" and cfg.peft.method == "ia3"
    assert cfg.peft.target_modules == ["k", "v", "wi_1"]
    assert cfg.optim.lr == 3e-4  # pretrain.json (3e-4) is applied after ia3.json (3e-3)
    assert (cfg.trainer.max_steps, cfg.trainer.global_batch_size) == (100_000, 16)
    assert cfg.data.train_mixture.endswith("t0_train.yaml")
    w = cfg.trainer.loss_weights
    assert (w.lm, w.unlikelihood, w.rank_classification) == (1.0, 0.0, 0.0)


def test_tfew_tiny_is_the_recipe_at_cpu_scale():
    cfg = load_config("configs/runs/tfew_tiny.yaml")
    big = load_config("configs/runs/tfew_3b.yaml")
    assert cfg.model.config == "configs/models/t5_tiny.json" and cfg.trainer.precision == "fp32"
    assert (cfg.peft.method, cfg.peft.target_modules) == (big.peft.method, big.peft.target_modules)
    assert cfg.trainer.loss_weights == big.trainer.loss_weights
    assert (cfg.eval.protocol, cfg.eval.length_normalized) == ("tfew", True)
    assert cfg.trainer.max_steps <= 100 and cfg.optim.name == "adafactor" and cfg.schedule.name == "linear"
