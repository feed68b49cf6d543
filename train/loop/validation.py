"""``mtf validate``: every cheap check of a run, all problems listed at once, no model weights loaded.

Checks, in data-flow order: the config (keys, types, cross-field rules); the training mixture resolves
(task files, includes, nested mixtures, rates); the eval mixture resolves and does not overlap training
(held-out guard); each task's templates render on a few rows; the model config and the tokenizer load,
and they agree (vocab size, model kind); the batch plan and the data lanes fit the rank count (``WORLD_SIZE``,
1 for a plain ``mtf validate``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from train.errors import UserError

PREVIEW_ROWS = 8  # rows per task rendered to check the templates


def validate_run(config_path: str, overrides: list[str]) -> dict[str, Any]:
    """Run every check; return {"config", "checks": [passed], "problems": [messages]}."""
    from train.config import Config, _build, apply_overrides, problems, read_yaml

    checks: list[str] = []
    found: list[str] = []
    try:
        data = apply_overrides(read_yaml(config_path), list(overrides))
        cfg = _build(Config, data, "", str(config_path))
        cfg.source = str(config_path)
    except UserError as err:  # structure is broken: nothing further can be checked
        return {"config": str(config_path), "checks": checks, "problems": [str(err)]}
    cross = problems(cfg)
    found.extend(cross)
    if not cross:
        checks.append("config: keys, types and cross-field rules")

    def attempt(label: str, fn) -> Any:
        try:
            result = fn()
        except UserError as err:
            found.append(f"{label}: {err}")
            return None
        checks.append(label)
        return result

    from train.data import pipeline

    loaded = attempt(f"train mixture {cfg.data.train_mixture} resolves", lambda: pipeline.load_train_tasks(cfg))
    eval_file = None
    if cfg.eval.mixture:
        eval_file = attempt(f"eval mixture {cfg.eval.mixture} resolves", lambda: pipeline.load_eval_file(cfg.eval.mixture, cfg))
    if loaded and eval_file is not None:
        from train.data.tasks import check_held_out

        def guard():
            held, clusters = pipeline.held_out_of(eval_file)
            check_held_out(loaded[1].values(), held, clusters, allow=cfg.eval.allow_held_out_overlap)
            pipeline.check_held_out_languages(loaded[1].values(), eval_file)

        attempt("held-out guard: training does not contain eval datasets", guard)
    tasks = dict(loaded[1]) if loaded else {}
    if eval_file is not None:
        tasks.update({f"eval:{name}": task for name, task in eval_file.tasks.items()})
    for name, task in tasks.items():
        attempt(f"task {name}: templates render on {PREVIEW_ROWS} rows", lambda task=task: _render_check(task))

    from train.modeling.models import check_local_weights, load_model_config, load_tokenizer, model_info

    model_config = attempt("model config loads", lambda: load_model_config(cfg.model))
    tokenizer = attempt("tokenizer loads", lambda: load_tokenizer(cfg.model))
    info = None
    if model_config is not None and tokenizer is not None:
        info = attempt("model and tokenizer agree", lambda: model_info(cfg.model, model_config, tokenizer))
    if info is not None and not cross:  # the plan needs valid numbers
        from train.data.lanes import resolve_lanes
        from train.loop.trainer import plan_batch

        ranks = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate / torchrun; 1 for a plain `mtf validate`
        attempt(f"batch plan and data lanes split over {ranks} rank(s)",
                lambda: resolve_lanes(cfg.data.lanes, plan_batch(cfg, info.kind, ranks).global_rows, ranks))
    if cfg.model.name_or_path and Path(cfg.model.name_or_path).is_dir():
        attempt("model weights are present and whole", lambda: check_local_weights(Path(cfg.model.name_or_path)))
    return {"config": str(config_path), "checks": checks, "problems": found}


def _render_check(task: Any) -> None:
    from train.errors import DataError

    prompted, report = task.prompted_with_report(PREVIEW_ROWS)
    if len(prompted) == 0:
        raise DataError(f"no template of task {task.name} rendered any of the first {PREVIEW_ROWS} rows: {report.to_dict()}")
