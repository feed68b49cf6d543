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
from typing import Any, Optional

from train.config import Config, save_config, to_dict
from train.data import pipeline
from train.errors import CheckpointError, ConfigError, TrainingError
from train.loop import checkpointing
from train.loop.rundir import RunLock, RunRecord, check_run_dir
from train.loop.hooks import CheckpointHook, EvalHook, LoggingHook, PreemptionHook, TrainContext
from train.modeling import losses
from train.modeling.features import collate, model_forward
from train.modeling.models import ModelInfo, build_model, load_model_config, load_tokenizer, model_info

T5_FAMILY = ("t5", "mt5", "umt5", "longt5", "switch_transformers")  # overflow in fp16


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

    # ---- model description, tokenizer, batch plan, accelerator, the run directory's lock (cheap; fail
    # before any heavy work). The lock is held until train() returns or raises.
    with setup_run(cfg) as run:
        plan, accelerator, kind = run.plan, run.accelerator, run.info.kind
        # ---- data: mixture stream -> packer (global, identical on every rank)
        stream, packer, eval_set = pipeline.build_training_data(cfg, run.tokenizer, kind, accelerator)
        # ---- model and optimizer; the LR is a pure function of the step (see set_lr)
        model, optimizer = prepare_model(cfg, run)
        lr_at = lr_lambda(cfg)
        ctx = TrainContext(cfg=cfg, accelerator=accelerator, model=model, tokenizer=run.tokenizer, kind=kind)
        ctx.flops_per_token = 6.0 * sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
        resume(cfg, ctx, stream, packer, run.output_dir)
        ctx.trainer_state = lambda: trainer_state(cfg, ctx, stream, packer)
        run.record = start_record(cfg, run, ctx, stream)

        preemption = PreemptionHook(ctx)
        logging_hook, eval_hook = LoggingHook(ctx), EvalHook(ctx, eval_set)
        eval_hook.logger = logging_hook
        # Order matters at the end: eval before the final checkpoint (best_metric), logging closes last.
        hooks = [eval_hook, CheckpointHook(ctx), preemption, logging_hook]
        mode = cfg.trainer.loss_normalization

        # ---- the loop
        start_step, start_tokens = ctx.step, ctx.tokens_seen
        loop_start = time.perf_counter()
        model.train()
        while ctx.step < cfg.trainer.max_steps and ctx.stop_reason is None:
            step_start = time.perf_counter()
            rows = [packer.next_row(stream) for _ in range(plan.global_rows)]  # (global_rows,) identical on all ranks
            announce = ctx.step + 1 if ctx.step == start_step else None  # the first step prints each rank's rows
            micro_batches = rank_micro_batches(cfg, run, rows, announce_step=announce)
            denominator = global_denominator(micro_batches, mode, plan, accelerator)
            ctx.lr = set_lr(optimizer, cfg.optim.lr * lr_at(ctx.step))
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
                        logits = model_forward(model, batch, kind)
                    numerator = losses.local_numerator(losses.token_nll(logits, batch["labels"]), batch, mode)
                    # accelerate (and DeepSpeed) divide by grad_accum and DDP averages over ranks: undo both,
                    # so the summed gradient is exactly d(global numerator / global denominator).
                    loss = losses.scaled_loss(numerator, denominator, mode=mode, world_size=plan.world_size)
                    accelerator.backward(loss * plan.grad_accum)
                    numerator_sum += numerator.detach()
                    if accelerator.sync_gradients and cfg.optim.clip_grad_norm and not cfg.trainer.deepspeed:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if cfg.trainer.deepspeed and hasattr(model, "get_global_grad_norm"):
                grad_norm = model.get_global_grad_norm()  # DeepSpeed clips inside its step and keeps the norm
            step_loss = accelerator.reduce(numerator_sum, reduction="sum") if plan.world_size > 1 else numerator_sum
            ctx.last_loss = float(step_loss) / denominator if mode != "sum" and denominator > 0 else float(step_loss)
            if cfg.trainer.nan_guard and not math.isfinite(ctx.last_loss):
                logging_hook.log({"train/loss_last": ctx.last_loss}, ctx.step + 1)
                raise TrainingError(
                    f"non-finite loss ({ctx.last_loss}) at step {ctx.step + 1}; stopped without saving this step. "
                    f"The last good checkpoint under {checkpointing.checkpoint_dir(run.output_dir)} is intact. "
                    "Lower `optim.lr`, use `trainer.precision=bf16` or fp32 (not fp16 for T5), or check the data.")
            record_step(cfg, ctx, rows, packer, grad_norm, time.perf_counter() - step_start)
            preemption.check(ctx)
            for hook in hooks:
                hook.on_step_end(ctx)

        loop_seconds = time.perf_counter() - loop_start
        end_start = time.perf_counter()
        for hook in hooks:
            hook.on_train_end(ctx)
        if cfg.checkpoint.export_final and ctx.stop_reason is None:
            checkpointing.export_model(accelerator, model, run.tokenizer, run.output_dir / "final")
        summary = {"steps": ctx.step, "final_loss": ctx.last_loss, "tokens_seen": ctx.tokens_seen,
                   "stop_reason": ctx.stop_reason, "eval": ctx.eval_results,
                   "checkpoint_seconds": ctx.checkpoint_seconds, "output_dir": str(run.output_dir),
                   "train_loop_seconds": loop_seconds, "final_eval_and_save_seconds": time.perf_counter() - end_start,
                   "tokens_per_second": (ctx.tokens_seen - start_tokens) / max(loop_seconds, 1e-9),
                   "packing": packer.efficiency(), "packing_stats": dict(packer.stats)}
        run.record.write(status=ctx.stop_reason or "completed", steps=ctx.step, stop_reason=ctx.stop_reason,
                         final_loss=ctx.last_loss, train_loop_seconds=loop_seconds,
                         tokens_per_second=summary["tokens_per_second"], checkpoint_seconds=ctx.checkpoint_seconds,
                         exported=cfg.checkpoint.export_final and ctx.stop_reason is None)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary


# --------------------------------------------------------------------------------------------------
# Set-up and per-step bookkeeping, in the order train() calls them
# --------------------------------------------------------------------------------------------------


@dataclass
class RunSetup:
    """What a run knows before it reads any data or builds any weights."""

    model_config: Any  # the transformers config
    tokenizer: Any
    info: ModelInfo
    plan: BatchPlan
    accelerator: Any
    output_dir: Path
    lock: RunLock  # held by the main process until train() returns or raises
    record: Optional[RunRecord] = None  # run.json, once the data is known

    def __enter__(self) -> "RunSetup":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.record is not None:
            self.record.__exit__(*exc)  # an error on the way out: status "failed" with the message
        self.lock.release()


def setup_run(cfg: Config) -> RunSetup:
    """Model description, tokenizer, batch plan and accelerator; saves the resolved config, prints the plan.

    Raises:
        ConfigError: fp16 with a T5-family model, a batch that does not split, DeepSpeed without its JSON.
        TrainingError: the launcher started a different number of processes than ``WORLD_SIZE`` says.
    """
    model_config = load_model_config(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    info = model_info(cfg.model, model_config, tokenizer)
    if cfg.trainer.precision == "fp16" and info.model_type in T5_FAMILY:
        # The name-based check in config.validate misses renamed checkpoints; the model type does not.
        raise ConfigError(f"`trainer.precision=fp16` with a {info.model_type} model: T5 overflows in fp16 and produces NaN "
                          "losses (t5#539, transformers#9295). Use `trainer.precision=bf16` (or fp32).")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    plan = plan_batch(cfg, info.kind, world_size)
    accelerator = make_accelerator(cfg, plan)
    if accelerator.num_processes != world_size:
        raise TrainingError(f"WORLD_SIZE says {world_size} ranks but accelerate started {accelerator.num_processes}; "
                            "on CPU launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`.")
    output_dir, lock = Path(cfg.run.output_dir), RunLock(Path(cfg.run.output_dir))
    refusal = None
    if accelerator.is_main_process:
        try:
            check_run_dir(output_dir)
            lock.acquire()  # before config.yaml: a second run must not overwrite the first one's files
        except ConfigError as err:
            refusal = err
    if _any_rank(accelerator, refusal is not None):  # every rank stops, not only the main one
        raise refusal or ConfigError(f"the main process refused the run directory {output_dir} (see its message).")
    if accelerator.is_main_process:
        save_config(cfg, output_dir / "config.yaml")
        accelerator.print(f"[mtf] {plan.describe()}; model kind {info.kind}; device {accelerator.device}")
    return RunSetup(model_config, tokenizer, info, plan, accelerator, output_dir, lock)


def _any_rank(accelerator: Any, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum") > 0)


def prepare_model(cfg: Config, run: RunSetup) -> tuple[Any, Any]:
    """(model, optimizer), seeded, built and wrapped by the accelerator (DDP or DeepSpeed)."""
    from accelerate.utils import set_seed

    set_seed(cfg.trainer.seed)
    model = build_model(cfg.model, run.model_config, run.info.kind)
    optimizer = build_optimizer(cfg, model)
    return run.accelerator.prepare(model, optimizer)


def resume(cfg: Config, ctx: TrainContext, stream: Any, packer: Any, output_dir: Path) -> None:
    """Restore weights, optimizer, RNG, the stream's and packer's positions and the counters, if a checkpoint is due.

    Every file is verified first (no unpickling of code, nothing truncated), and the checkpoint's config
    must match this run's except for keys that cannot change the training (see ``RESUME_MAY_CHANGE``).

    Raises:
        CheckpointError: a damaged or untrusted checkpoint, or a config that changed; nothing was loaded.
    """
    t, accelerator = cfg.trainer, ctx.accelerator
    resume_from, skipped = checkpointing.find_resume_checkpoint(t.resume, output_dir, fallback=t.resume_fallback,
                                                                trust=t.trust_checkpoint)
    accelerator.wait_for_everyone()  # every rank has chosen before the bad ones are moved aside
    if accelerator.is_main_process:
        for bad, why in skipped:
            accelerator.print(f"[mtf] WARNING: skipped {bad} (moved to {checkpointing.reject(bad)}): {why}")
    accelerator.wait_for_everyone()
    if resume_from is None:
        return
    state = json.loads((resume_from / checkpointing.STATE_FILE).read_text(encoding="utf-8"))
    changes = checkpointing.config_changes(state.get("config") or {}, to_dict(cfg), t.resume_allow_changes)
    if changes:
        raise CheckpointError(
            f"the config changed since checkpoint {resume_from}: {'; '.join(changes)}. Resuming would silently train "
            "something else. Restore those values, accept them with `trainer.resume_allow_changes=[key, ...]` "
            "(or `[\"*\"]`), or start a new run (`trainer.resume=none` or another `run.output_dir`).")
    checkpointing.load_checkpoint(accelerator, resume_from, trust=t.trust_checkpoint)
    try:
        stream.load_state_dict(state["stream"])
        packer.load_state_dict(state["packer"])
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"checkpoint {resume_from}: the data position in {checkpointing.STATE_FILE} is damaged "
                              f"({type(err).__name__}: {err}). Resume from an earlier checkpoint with "
                              "`trainer.resume=<path>`.") from None
    ctx.step, ctx.tokens_seen, ctx.examples_seen = state["step"], state["tokens_seen"], state["examples_seen"]
    ctx.task_counts = Counter(state.get("task_counts", {}))
    ctx.task_tokens = Counter(state.get("task_tokens", {}))
    ctx.best_metric_value = state.get("best_metric_value")
    accelerator.print(f"[mtf] resumed from {resume_from} at step {ctx.step}")


def start_record(cfg: Config, run: RunSetup, ctx: TrainContext, stream: Any) -> RunRecord:
    """Write ``run.json`` (status running) with the plan and the mixture as planned: what `mtf report` compares to."""
    mixture = [{"name": s.name, "task": s.task, "examples": len(s.rows), "probability": float(s.probability)}
               for s in stream.sources]
    return RunRecord(run.output_dir, run.accelerator.is_main_process, max_steps=cfg.trainer.max_steps,
                     start_step=ctx.step, world_size=run.plan.world_size, batch_plan=run.plan.describe(),
                     model_kind=run.info.kind, mixture=mixture)


def trainer_state(cfg: Config, ctx: TrainContext, stream: Any, packer: Any) -> dict:
    """The resumable state written next to each checkpoint (``trainer_state.json``)."""
    return {"step": ctx.step, "tokens_seen": ctx.tokens_seen, "examples_seen": ctx.examples_seen,
            "stream": stream.state_dict(), "packer": packer.state_dict(),
            "task_counts": dict(ctx.task_counts), "task_tokens": dict(ctx.task_tokens), "best_metric_value": ctx.best_metric_value,
            "config": to_dict(cfg)}


def rank_micro_batches(cfg: Config, run: RunSetup, rows: list[dict], announce_step: Optional[int] = None) -> list[dict]:
    """This rank's contiguous slice of the step's global rows, collated into micro-batches.

    With ``announce_step`` and several ranks, each rank prints a digest of its rows for that step.
    """
    plan, rank, info = run.plan, run.accelerator.process_index, run.info
    mine = rows[rank * plan.rows_per_rank:(rank + 1) * plan.rows_per_rank]
    if announce_step is not None and plan.world_size > 1:
        # Evidence that the run is really data parallel: each rank trains on different rows.
        digest = hashlib.sha1(json.dumps([r["input_ids"] for r in mine]).encode()).hexdigest()[:12]
        # One write with its newline, so the ranks' lines cannot interleave on a shared stdout.
        print(f"[mtf] rank {rank}/{plan.world_size} step {announce_step} rows digest {digest}\n", end="", flush=True)
    return [collate(mine[i:i + plan.micro_batch_size], kind=info.kind, pad_id=info.pad_token_id,
                    decoder_start_id=info.decoder_start_token_id, max_input_tokens=cfg.data.max_input_tokens,
                    max_target_tokens=cfg.data.max_target_tokens, max_tokens=cfg.data.max_tokens)
            for i in range(0, len(mine), plan.micro_batch_size)]


def global_denominator(micro_batches: list[dict], mode: str, plan: BatchPlan, accelerator: Any) -> float:
    """The loss denominator of the whole step over all ranks, known before any backward pass.

    So the gradient is independent of micro-batching, accumulation and rank count. It is a count
    (tokens, sequences or targets), so the all-reduced float64 sum is exact in any order.
    """
    import torch

    denominator = float(sum(float(losses.local_denominator(b, mode)) for b in micro_batches))
    if plan.world_size > 1:
        denominator = float(accelerator.reduce(torch.tensor(denominator, dtype=torch.float64,
                                                            device=accelerator.device), reduction="sum"))
    return denominator


def set_lr(optimizer: Any, lr: float) -> float:
    """Set the step's learning rate on every param group of the (possibly DeepSpeed-wrapped) optimizer.

    The LR is a pure function of the step: nothing to checkpoint, nothing to drift on resume, and no
    scheduler object for DeepSpeed's ZeRO-3 wrapper to break.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def record_step(cfg: Config, ctx: TrainContext, rows: list[dict], packer: Any, grad_norm: Any, seconds: float) -> None:
    """Advance the step and the counters the hooks read (tokens, examples, task counts, packing figures)."""
    ctx.step += 1
    ctx.last_grad_norm = float(grad_norm) if grad_norm is not None else None
    step_tokens = sum(len(r.get("input_ids", [])) + len(r.get("target_ids", [])) for r in rows)
    ctx.tokens_seen += step_tokens
    ctx.examples_seen += sum(len(r["tasks"]) for r in rows)
    ctx.task_counts.update(t for r in rows for t in r["tasks"])
    ctx.task_tokens.update(pipeline.task_tokens(rows))
    ctx.step_metrics = {"tokens": step_tokens, "step_seconds": seconds,
                        **pipeline.packing_metrics(rows, packer, ctx.kind, cfg)}
