"""Metric sinks: jsonl in the run directory (always), wandb (offline by default), tensorboard (optional).

Only the main process writes. Metric keys follow one scheme: ``train/loss``, ``lr``,
``tokens_per_second``, ``packing/efficiency``, ``eval/<dataset>/<template>/accuracy``,
``eval/<dataset>/median``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from train.config import Config, to_dict


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    return value


class JsonlLogger:
    """Appends one JSON object per logged step to ``<output_dir>/metrics.jsonl``."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class WandbLogger:
    """wandb in ``offline`` mode unless the user asks for ``online``: no network call otherwise."""

    def __init__(self, cfg: Config):
        import wandb

        mode = cfg.logging.wandb.mode
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=cfg.logging.wandb.project,
            entity=cfg.logging.wandb.entity,
            name=cfg.run.name or Path(cfg.run.output_dir).name,
            dir=str(Path(cfg.run.output_dir)),
            mode=mode,
            config=to_dict(cfg),
            resume="allow",
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: _jsonable(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorboardLogger:
    def __init__(self, output_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            value = _jsonable(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class MetricLoggers:
    """Fans one metrics dict out to every configured sink (main process only)."""

    def __init__(self, cfg: Config, is_main_process: bool):
        self.sinks: list[Any] = []
        if not is_main_process:
            return
        self.sinks.append(JsonlLogger(cfg.run.output_dir))
        if cfg.logging.wandb.mode != "disabled":
            self.sinks.append(WandbLogger(cfg))
        if cfg.logging.tensorboard:
            self.sinks.append(TensorboardLogger(cfg.run.output_dir))

    def log(self, metrics: dict, step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def estimate_mfu(flops_per_token: float, tokens_per_second: float, num_devices: int, peak_tflops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak (6N FLOPs per token)."""
    if not peak_tflops:
        return None
    return flops_per_token * tokens_per_second / (num_devices * peak_tflops * 1e12)
