"""The training loop: one function, :func:`train`, readable top to bottom.

Data parallelism is exact by construction: every rank draws the same *global* mixture stream and packs
the same global rows (packing is cheap next to a forward pass), then takes its own contiguous slice of
the step's rows. So the examples trained on in a step, and their per-example losses, do not depend on
the number of ranks; with global loss denominators (all-reduced before the backward passes) neither
does the gradient. Resuming restores the stream's and the packer's ``state_dict``: nothing is
replayed or skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train import checkpointing
from train.config import Config, save_config, to_dict
from train.errors import ConfigError, TrainingError
from train.hooks import CheckpointHook, EvalHook, LoggingHook, PreemptionHook, TrainContext


@dataclass
class BatchPlan:
    """How a step's global batch is split; printed at start so nobody has to guess."""

    global_rows: int  # packed rows per optimizer step, all ranks together
    world_size: int
    rows_per_rank: int
    micro_batch_size: int  # rows per forward pass
    grad_accum: int  # forward passes per rank per step
    row_tokens: int  # capacity of one row (enc-dec: encoder side)

    def describe(self) -> str:
        return (f"global batch {self.global_rows} rows ({self.global_rows * self.row_tokens:,} token slots) = "
                f"{self.world_size} ranks x {self.grad_accum} accumulation x {self.micro_batch_size} rows")


def plan_batch(cfg: Config, kind: str, world_size: int) -> BatchPlan:
    """Resolve rows per step, per rank and per micro-batch from the config and the rank count.

    Raises:
        ConfigError: the numbers do not divide evenly.
    """
    t, d = cfg.trainer, cfg.data
    row_tokens = d.max_input_tokens if kind == "encdec" else d.max_tokens
    if t.global_batch_tokens is not None:
        global_rows = max(1, t.global_batch_tokens // row_tokens)
    else:
        global_rows = t.global_batch_size
    if global_rows % world_size:
        raise ConfigError(f"the global batch of {global_rows} rows does not split over {world_size} ranks; "
                          f"make `trainer.global_batch_size` a multiple of {world_size}.")
    rows_per_rank = global_rows // world_size
    if t.grad_accum is not None:
        if rows_per_rank % t.grad_accum:
            raise ConfigError(f"{rows_per_rank} rows per rank do not split into `trainer.grad_accum`={t.grad_accum} micro-batches.")
        micro, accum = rows_per_rank // t.grad_accum, t.grad_accum
    else:
        micro = min(t.micro_batch_size, rows_per_rank)
        if rows_per_rank % micro:
            raise ConfigError(f"{rows_per_rank} rows per rank are not a multiple of `trainer.micro_batch_size`={micro}; "
                              "change one of them or set `trainer.grad_accum`.")
        accum = rows_per_rank // micro
    return BatchPlan(global_rows, world_size, rows_per_rank, micro, accum, row_tokens)


def make_accelerator(cfg: Config, plan: BatchPlan) -> Any:
    """An Accelerator that really is distributed on CPU (gloo) and really uses DeepSpeed when asked.

    FIELD_NOTES: on CPU, ``cpu=True`` plus ``--multi_gpu`` gives gloo DDP, but ``cpu=True`` with DeepSpeed
    silently drops DeepSpeed; DeepSpeed on CPU needs ``InitProcessGroupKwargs(backend="gloo")`` instead.
    """
    import torch
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    on_cpu = cfg.trainer.cpu or not torch.cuda.is_available()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not cfg.trainer.deepspeed:
        raise ConfigError("launched with DeepSpeed (accelerate --use_deepspeed or a DeepSpeed accelerate config) but "
                          "`trainer.deepspeed` is not set: name the same JSON, e.g. "
                          "`trainer.deepspeed=configs/deepspeed/zero2.json`, so its \"auto\" values come from the run config.")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.trainer.precision]
    kwargs: dict = {"gradient_accumulation_steps": plan.grad_accum, "mixed_precision": mixed}
    handlers = []
    if cfg.trainer.deepspeed:
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=str(cfg.trainer.deepspeed),
                                                     gradient_accumulation_steps=plan.grad_accum,
                                                     gradient_clipping=cfg.optim.clip_grad_norm or 0.0)
        if on_cpu:
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    elif on_cpu:
        kwargs["cpu"] = True
    if handlers:
        kwargs["kwargs_handlers"] = handlers
    accelerator = Accelerator(**kwargs)
    if cfg.trainer.deepspeed:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
        ds["train_batch_size"] = plan.global_rows
    return accelerator


def build_optimizer(cfg: Config, model: Any) -> Any:
    import torch

    o = cfg.optim
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "adafactor":
        from transformers.optimization import Adafactor

        # T0's settings: a fixed learning rate, no relative step or parameter scaling.
        return Adafactor(groups, lr=o.lr, relative_step=False, scale_parameter=False, warmup_init=False)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def lr_lambda(cfg: Config):
    """Multiplier of ``optim.lr`` at a given optimizer step: warmup, then constant / linear / cosine."""
    warmup, total, name = cfg.schedule.warmup_steps, cfg.trainer.max_steps, cfg.schedule.name

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def train(cfg: Config) -> dict:
    """Train according to ``cfg``; return a summary (steps, final loss, eval results, timings).

    Raises:
        ConfigError / DataError: bad config or data, found before any training step.
        TrainingError: a non-finite loss; the last good checkpoint is kept.
        Preempted: a stop requested by a signal or ``trainer.max_time``, after a checkpoint.
    """
    import torch
    from accelerate.utils import set_seed

    from train import data as data_mod
    from train.features import collate, model_forward
    from train.losses import local_denominator, local_numerator, scaled_loss, token_nll
    from train.models import build_model, load_model_config, load_tokenizer, model_info

    # ---- model description, tokenizer and batch plan (cheap; fail before any heavy work)
    model_config = load_model_config(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    info = model_info(cfg.model, model_config, tokenizer)
    if cfg.trainer.precision == "fp16" and info.model_type in ("t5", "mt5", "umt5", "longt5", "switch_transformers"):
        # The name-based check in config.validate misses renamed checkpoints; the model type does not.
        raise ConfigError(f"`trainer.precision=fp16` with a {info.model_type} model: T5 overflows in fp16 and produces NaN "
                          "losses (t5#539, transformers#9295). Use `trainer.precision=bf16` (or fp32).")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    plan = plan_batch(cfg, info.kind, world_size)
    accelerator = make_accelerator(cfg, plan)
    if accelerator.num_processes != world_size:
        raise TrainingError(f"WORLD_SIZE says {world_size} ranks but accelerate started {accelerator.num_processes}; "
                            "on CPU launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`.")
    rank = accelerator.process_index
    output_dir = Path(cfg.run.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        accelerator.print(f"[mtf] {plan.describe()}; model kind {info.kind}; device {accelerator.device}")

    # ---- data: mixture stream -> packer (global, identical on every rank)
    stream, packer, eval_set = data_mod.build_training_data(cfg, tokenizer, info, accelerator)

    # ---- model and optimizer
    set_seed(cfg.trainer.seed)
    model = build_model(cfg.model, model_config, info.kind)
    optimizer = build_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The learning rate is a pure function of the step, set on the (possibly DeepSpeed-wrapped)
    # optimizer's param groups before each step: nothing to checkpoint, nothing to drift on resume,
    # and no scheduler object for DeepSpeed's ZeRO-3 wrapper to break.
    lr_at = lr_lambda(cfg)

    ctx = TrainContext(cfg=cfg, accelerator=accelerator, model=model, tokenizer=tokenizer, kind=info.kind)
    n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    ctx.flops_per_token = 6.0 * n_params

    # ---- resume
    resume_from = checkpointing.find_resume_checkpoint(cfg.trainer.resume, output_dir)
    if resume_from is not None:
        state = checkpointing.load_checkpoint(accelerator, resume_from)
        stream.load_state_dict(state["stream"])
        packer.load_state_dict(state["packer"])
        ctx.step, ctx.tokens_seen, ctx.examples_seen = state["step"], state["tokens_seen"], state["examples_seen"]
        ctx.task_counts = Counter(state.get("task_counts", {}))
        ctx.best_metric_value = state.get("best_metric_value")
        accelerator.print(f"[mtf] resumed from {resume_from} at step {ctx.step}")

    def trainer_state() -> dict:
        return {"step": ctx.step, "tokens_seen": ctx.tokens_seen, "examples_seen": ctx.examples_seen,
                "stream": stream.state_dict(), "packer": packer.state_dict(),
                "task_counts": dict(ctx.task_counts), "best_metric_value": ctx.best_metric_value,
                "config": to_dict(cfg)}

    ctx.trainer_state = trainer_state
    preemption = PreemptionHook(ctx)
    logging_hook, eval_hook = LoggingHook(ctx), EvalHook(ctx, eval_set)
    eval_hook.logger = logging_hook
    # Order matters at the end: eval before the final checkpoint (best_metric), logging closes last.
    hooks = [eval_hook, CheckpointHook(ctx), preemption, logging_hook]
    collate_kwargs = dict(kind=info.kind, pad_id=info.pad_token_id, decoder_start_id=info.decoder_start_token_id,
                          max_input_tokens=cfg.data.max_input_tokens, max_target_tokens=cfg.data.max_target_tokens,
                          max_tokens=cfg.data.max_tokens)
    mode = cfg.trainer.loss_normalization

    # ---- the loop
    start_step, start_tokens = ctx.step, ctx.tokens_seen
    loop_start = time.perf_counter()
    model.train()
    while ctx.step < cfg.trainer.max_steps and ctx.stop_reason is None:
        step_start = time.perf_counter()
        rows = [packer.next_row(stream) for _ in range(plan.global_rows)]  # (global_rows,) identical on all ranks
        mine = rows[rank * plan.rows_per_rank:(rank + 1) * plan.rows_per_rank]
        if ctx.step == start_step and plan.world_size > 1:
            # Evidence that the run is really data parallel: each rank trains on different rows.
            digest = hashlib.sha1(json.dumps([r["input_ids"] for r in mine]).encode()).hexdigest()[:12]
            print(f"[mtf] rank {rank}/{plan.world_size} step {ctx.step + 1} rows digest {digest}", flush=True)
        micro_batches = [collate(mine[i:i + plan.micro_batch_size], **collate_kwargs)
                         for i in range(0, len(mine), plan.micro_batch_size)]
        # The loss denominator of the whole step over all ranks, known before any backward pass, so
        # the gradient is independent of micro-batching, accumulation and rank count. It is a count
        # (tokens, sequences or targets), so the all-reduced float64 sum is exact in any order.
        denominator = float(sum(float(local_denominator(b, mode)) for b in micro_batches))
        if plan.world_size > 1:
            denominator = float(accelerator.reduce(torch.tensor(denominator, dtype=torch.float64,
                                                                device=accelerator.device), reduction="sum"))
        ctx.lr = cfg.optim.lr * lr_at(ctx.step)
        for group in optimizer.param_groups:
            group["lr"] = ctx.lr
        numerator_sum = torch.zeros((), device=accelerator.device)
        # accelerate syncs and steps when its micro-batch counter hits a multiple of grad_accum. A step
        # always runs exactly grad_accum micro-batches, so start each one at 0: a counter restored from a
        # checkpoint written with another accumulation (another rank count) would otherwise step mid-batch.
        accelerator.step = 0
        grad_norm = None
        for batch in micro_batches:
            batch = {k: v.to(accelerator.device) if hasattr(v, "to") else v for k, v in batch.items()}
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model_forward(model, batch, info.kind)
                nll = token_nll(logits, batch["labels"])
                numerator = local_numerator(nll, batch, mode)
                # accelerate (and DeepSpeed) divide by grad_accum and DDP averages over ranks: undo both,
                # so the summed gradient is exactly d(global numerator / global denominator).
                accelerator.backward(scaled_loss(numerator, denominator, mode=mode, world_size=plan.world_size) * plan.grad_accum)
                numerator_sum += numerator.detach()
                if accelerator.sync_gradients and cfg.optim.clip_grad_norm and not cfg.trainer.deepspeed:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if cfg.trainer.deepspeed and hasattr(model, "get_global_grad_norm"):
            grad_norm = model.get_global_grad_norm()  # DeepSpeed clips inside its step and keeps the norm
        loss = accelerator.reduce(numerator_sum, reduction="sum") if plan.world_size > 1 else numerator_sum
        ctx.last_loss = float(loss) / denominator if mode != "sum" and denominator > 0 else float(loss)
        if cfg.trainer.nan_guard and not math.isfinite(ctx.last_loss):
            logging_hook.log({"train/loss_last": ctx.last_loss}, ctx.step + 1)
            raise TrainingError(
                f"non-finite loss ({ctx.last_loss}) at step {ctx.step + 1}; stopped without saving this step. "
                f"The last good checkpoint under {checkpointing.checkpoint_dir(output_dir)} is intact. "
                "Lower `optim.lr`, use `trainer.precision=bf16` or fp32 (not fp16 for T5), or check the data.")
        ctx.step += 1
        ctx.last_grad_norm = float(grad_norm) if grad_norm is not None else None
        step_tokens = sum(len(r.get("input_ids", [])) + len(r.get("target_ids", [])) for r in rows)
        ctx.tokens_seen += step_tokens
        ctx.examples_seen += sum(len(r["tasks"]) for r in rows)
        ctx.task_counts.update(t for r in rows for t in r["tasks"])
        ctx.step_metrics = {"tokens": step_tokens, "step_seconds": time.perf_counter() - step_start,
                            **data_mod.packing_metrics(rows, packer, info.kind, cfg)}
        preemption.check(ctx)
        for hook in hooks:
            hook.on_step_end(ctx)

    loop_seconds = time.perf_counter() - loop_start
    end_start = time.perf_counter()
    for hook in hooks:
        hook.on_train_end(ctx)
    if cfg.checkpoint.export_final and ctx.stop_reason is None:
        checkpointing.export_model(accelerator, model, tokenizer, output_dir / "final")
    summary = {"steps": ctx.step, "final_loss": ctx.last_loss, "tokens_seen": ctx.tokens_seen,
               "stop_reason": ctx.stop_reason, "eval": ctx.eval_results,
               "checkpoint_seconds": ctx.checkpoint_seconds, "output_dir": str(output_dir),
               "train_loop_seconds": loop_seconds, "final_eval_and_save_seconds": time.perf_counter() - end_start,
               "tokens_per_second": (ctx.tokens_seen - start_tokens) / max(loop_seconds, 1e-9),
               "packing": packer.efficiency(), "packing_stats": dict(packer.stats)}
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
