"""The training loop: one function, :func:`train`, readable top to bottom.

Data parallelism is exact by construction, and each rank's data work does not grow with the number of
ranks. A step's global batch is built by ``L`` independent *lanes* (:mod:`train.data.lanes`), each a
mixture lane feeding its own packer; ``L`` (``data.lanes``) depends on the config and the global batch,
never on the number of ranks, and each rank builds only its own lanes, which are exactly its contiguous
slice of the step's global rows. So the examples trained on in a step, and their per-example losses, do
not depend on the number of ranks, while a rank packs ``global rows / ranks`` rows per step (before
lanes, every rank packed the whole global batch and kept its slice: N times the work at N ranks). With
global loss denominators (all-reduced before the backward passes) neither does the gradient; the same
all-reduce carries the step's data counts (tokens, examples per task, packing), so the logs describe the
global batch. Resuming restores every lane's stream and packer ``state_dict`` (a checkpoint gathers all
lanes, so a resume may use another rank count): nothing is replayed or skipped.

The data is off the critical path: a background thread (:mod:`train.data.prefetch`) builds, collates and
counts the next ``data.prefetch_steps`` steps while the model trains, in step order, so the rows do not
depend on the depth; a checkpoint holds the lanes' state after the last step the loop trained, never the
thread's. Each step logs how long it waited for its data (``time/data_wait_s``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from train.config import Config, save_config, to_dict
from train.data import pipeline
from train.data.prefetch import PreparedStep, StepFeed
from train.errors import CheckpointError, ConfigError, TrainingError
from train.loop import checkpointing
from train.loop.rundir import RunLock, RunRecord, check_run_dir
from train.loop.hooks import CheckpointHook, EvalHook, LoggingHook, PreemptionHook, TrainContext
from train.modeling import adapters, losses
from train.modeling.features import check_choice_support, collate, head_inputs, model_forward
from train.modeling.models import ModelInfo, load_model_config, load_tokenizer, model_info

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
    pad_to: str = "capacity"  # data.pad_to resolved: micro-batches padded to "capacity" or to their "longest" row

    def describe(self) -> str:
        slots = f"{self.global_rows * self.row_tokens:,} token slots"
        if self.pad_to == "longest":
            slots = f"at most {slots}, each micro-batch padded to its longest row"
        return (f"global batch {self.global_rows} rows ({slots}) = "
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
    return BatchPlan(global_rows, world_size, rows_per_rank, micro, accum, row_tokens, d.padding())


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
    if cfg.trainer.deepspeed and cfg.optim.name == "adafactor":
        accelerator.print("[mtf] note: under DeepSpeed ZeRO, Adafactor updates flat parameter partitions, not the "
                          "parameter tensors (no factored second moments, update RMS per partition): the run is not "
                          "the same optimizer as without DeepSpeed (as in t-few and t-zero). AdamW has no such difference.")
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
    # ---- model description, tokenizer, batch plan, accelerator, the run directory's lock (cheap; fail
    # before any heavy work). The lock is held until train() returns or raises.
    with setup_run(cfg) as run:
        plan, accelerator, kind = run.plan, run.accelerator, run.info.kind
        check_choice_support(run.info.model_type, choices=cfg.trainer.loss_weights.choice_losses())  # BLOOM: refused
        # ---- data: this rank's lanes (mixture lane -> packer each), whose rows are its slice of the global batch
        data, eval_set = pipeline.build_training_data(cfg, run.tokenizer, kind, accelerator, global_rows=plan.global_rows)
        lanes = f"data lanes {data.mine.start}-{data.mine.stop - 1} of {data.lanes} ({plan.rows_per_rank} rows per step)"
        if plan.world_size > 1:  # one write per rank with its newline, so the lines cannot interleave
            print(f"[mtf] rank {accelerator.process_index}/{plan.world_size} builds {lanes}\n", end="", flush=True)
        else:
            accelerator.print(f"[mtf] builds {lanes}")
        # ---- model and optimizer; the LR is a pure function of the step (see set_lr)
        model, optimizer, (trainable, total) = prepare_model(cfg, run)
        accelerator.print(f"[mtf] {plan.describe()}; model kind {kind}; device {accelerator.device}; "
                          f"parameters: {trainable:,} trainable / {total:,} total ({100.0 * trainable / total:.3g}%)"
                          + (f", {cfg.peft.method} adapter" if cfg.peft.method != "none" else ""))
        lr_at = lr_lambda(cfg)
        ctx = TrainContext(cfg=cfg, accelerator=accelerator, model=model, tokenizer=run.tokenizer, kind=kind)
        ctx.flops_per_token = 6.0 * total  # frozen weights still cost their forward and input-gradient FLOPs
        resume(cfg, ctx, data, run.output_dir)
        tasks = sorted({s.task for s in data.sources})  # the order of the per-task counts every rank sums
        # From here on only the feed touches the lanes: it builds the next data.prefetch_steps steps ahead, and
        # a checkpoint holds the lanes' state after the last step the loop consumed (train/data/prefetch.py).
        feed = StepFeed(lambda n: prepare_step(cfg, run, data, n, tasks, announce=n == ctx.step + 1),
                        initial_state=data.state_dict(), first_step=ctx.step + 1, last_step=cfg.trainer.max_steps,
                        depth=cfg.data.prefetch_steps)
        ctx.trainer_state = lambda: trainer_state(cfg, ctx, feed)
        ctx.export = lambda out: export(cfg, run, model, Path(out))
        run.record = start_record(cfg, run, ctx, data)

        preemption = PreemptionHook(ctx)
        logging_hook, eval_hook = LoggingHook(ctx), EvalHook(ctx, eval_set)
        eval_hook.logger = logging_hook
        checkpoint_hook = CheckpointHook(ctx)
        # Each step: the step's metrics line is written before its checkpoint, so a process killed right after a
        # checkpoint has already logged every step that checkpoint holds (a resume starts at the next one).
        step_hooks = [eval_hook, logging_hook, checkpoint_hook, preemption]
        # At the end: eval before the final checkpoint (best_metric), logging closes last.
        hooks = [eval_hook, checkpoint_hook, preemption, logging_hook]
        mode = cfg.trainer.loss_normalization
        weights = losses.active_weights(cfg.trainer.loss_weights)  # {"lm": 1.0} unless T-Few's losses are on

        # ---- the loop
        start_tokens = ctx.tokens_seen
        loop_start = time.perf_counter()
        model.train()
        try:
            while ctx.step < cfg.trainer.max_steps and ctx.stop_reason is None:
                step_start = time.perf_counter()
                prepared, data_wait = feed.next()  # this rank's rows of the step, collated, and their counts
                micro_batches = prepared.micro_batches
                denominators, counts = global_step_sums(micro_batches, prepared.counts, mode, weights, plan,
                                                        accelerator)
                ctx.lr = set_lr(optimizer, cfg.optim.lr * lr_at(ctx.step))
                components, grad_norm = run_step(cfg, run, model, optimizer, micro_batches, denominators, weights)
                # the weighted total
                ctx.last_loss = sum(weights[k] * v for k, v in components.items() if v is not None)
                if cfg.trainer.nan_guard and not math.isfinite(ctx.last_loss):
                    logging_hook.log({"train/loss_last": ctx.last_loss}, ctx.step + 1)
                    raise TrainingError(
                        f"non-finite loss ({ctx.last_loss}) at step {ctx.step + 1}; stopped without saving this step. "
                        f"The last good checkpoint under {checkpointing.checkpoint_dir(run.output_dir)} is intact. "
                        "Lower `optim.lr`, use `trainer.precision=bf16` or fp32 (not fp16 for T5), or check the data.")
                record_step(cfg, ctx, counts, tasks, grad_norm, time.perf_counter() - step_start, components,
                            data_wait=data_wait)
                preemption.check(ctx)
                for hook in step_hooks:
                    hook.on_step_end(ctx)
        finally:  # a raised step (bad data, a non-finite loss, a signal) stops the thread too
            feed.close()

        loop_seconds = time.perf_counter() - loop_start
        end_start = time.perf_counter()
        for hook in hooks:
            hook.on_train_end(ctx)
        if cfg.checkpoint.export_final and ctx.stop_reason is None:
            export(cfg, run, model, run.output_dir / "final")
        summary = {"steps": ctx.step, "final_loss": ctx.last_loss, "tokens_seen": ctx.tokens_seen,
                   "stop_reason": ctx.stop_reason, "eval": ctx.eval_results,
                   "checkpoint_seconds": ctx.checkpoint_seconds, "output_dir": str(run.output_dir),
                   "train_loop_seconds": loop_seconds, "final_eval_and_save_seconds": time.perf_counter() - end_start,
                   "tokens_per_second": (ctx.tokens_seen - start_tokens) / max(loop_seconds, 1e-9),
                   "packing": ctx.packing, "packing_stats": ctx.packing_stats,
                   "examples_with_choices": ctx.examples_with_choices, "data_wait_seconds": feed.wait_seconds,
                   "prefetch_steps": feed.depth}
        run.record.write(status=ctx.stop_reason or "completed", steps=ctx.step, stop_reason=ctx.stop_reason,
                         final_loss=ctx.last_loss, train_loop_seconds=loop_seconds,
                         data_wait_seconds=feed.wait_seconds, prefetch_steps=feed.depth,
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
    if cfg.peft.method != "none":
        adapters.check_init_from(cfg)  # a wrong adapter directory or base fails before any data or weights
        adapters.peft_config(cfg, model_config)  # a family without default targets fails here too
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
    return RunSetup(model_config, tokenizer, info, plan, accelerator, output_dir, lock)


def _any_rank(accelerator: Any, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum") > 0)


def prepare_model(cfg: Config, run: RunSetup) -> tuple[Any, Any, tuple[int, int]]:
    """(model, optimizer, (trainable, total) parameters), built and wrapped by the accelerator (DDP or DeepSpeed).

    Only trainable parameters reach the optimizer, so an adapter run keeps optimizer state for the
    adapter alone; its checkpoints save only the trainable tensors (see :func:`adapter_checkpoint_hooks`).
    """
    # A random init is built whole on every rank (DeepSpeed partitions it afterwards): under ZeRO-3's
    # zero.Init each rank would draw other random numbers, and the run would not start where 1 process does.
    with without_zero3_init(run.accelerator) if cfg.model.config else nullcontext():
        model = adapters.build_run_model(cfg, run.model_config, run.info.kind)
    counts = adapters.parameter_counts(model)
    optimizer = build_optimizer(cfg, model)
    model, optimizer = run.accelerator.prepare(model, optimizer)
    if cfg.trainer.compile:
        compile_forward(run.accelerator.unwrap_model(model))
    if cfg.peft.method != "none":
        adapter_checkpoint_hooks(run.accelerator, adapters.trainable_names(run.accelerator.unwrap_model(model)))
    return model, optimizer, counts


def compile_forward(model: Any) -> None:
    """``trainer.compile``: replace ``model.forward`` (the module inside any DDP wrapper) by its ``torch.compile``.

    The instance attribute keeps the module itself, so its ``state_dict`` keys, checkpoints and exports are
    unchanged (``torch.compile(model)`` would wrap it and prefix every key with ``_orig_mod.``), and DDP's
    hooks still run around the compiled forward. Shapes are static with ``data.pad_to=capacity``; with
    ``longest`` each new width compiles once more, after which dynamo marks the width dynamic.
    """
    import torch

    model.forward = torch.compile(model.forward)


@contextmanager
def without_zero3_init(accelerator: Any) -> Iterator[None]:
    """A context in which transformers builds models whole, not partitioned by DeepSpeed's ``zero.Init``.

    (accelerate's ``zero3_init_context_manager(enable=False)`` re-registers the same ZeRO-3 config with
    transformers, so models were still partitioned inside it.)
    """
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    registered = getattr(plugin, "dschf", None)
    if registered is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(registered)


def adapter_checkpoint_hooks(accelerator: Any, names: set[str]) -> None:
    """Make ``save_state`` keep only the adapter's tensors of the model, and ``load_state`` load them strictly.

    The frozen base is rebuilt identically on resume (same weights or same seed), so a checkpoint of an
    adapter run is the adapter, its optimizer state, the RNG and the trainer state: a few hundred KB
    instead of the whole model. Under DeepSpeed the engine's own ``exclude_frozen_parameters`` does the
    same (see checkpointing.save_checkpoint).
    """

    def keep_adapter(models: list, weights: list, output_dir: str) -> None:
        for state in weights:  # accelerate writes these dicts after the hook: trim them in place
            for key in [k for k in state if k not in names]:
                del state[key]

    def load_adapter(models: list, input_dir: str) -> None:
        from safetensors.torch import load_file

        for i, model in enumerate(list(models)):
            file = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            if not file.is_file():
                continue  # DeepSpeed engines restore themselves
            state = load_file(str(file))
            missing = sorted(names - set(state))
            if missing or set(state) - names:
                raise CheckpointError(f"{file} does not hold this run's adapter (missing {missing[:3]}, unexpected "
                                      f"{sorted(set(state) - names)[:3]}); was it written with other `peft` settings?")
            accelerator.unwrap_model(model).load_state_dict(state, strict=False)
            models.remove(model)  # loaded here; accelerate would load it strictly and miss the frozen base

    accelerator.register_save_state_pre_hook(keep_adapter)
    accelerator.register_load_state_pre_hook(load_adapter)


def export(cfg: Config, run: RunSetup, model: Any, out: Path) -> None:
    """``out`` (``final/``, ``best/``): the full model in HF format, or for adapter runs the adapter in peft's
    format (plus ``merged/`` with ``peft.export_merged`` and ``base/`` for a random-init base)."""
    if cfg.peft.method == "none":
        checkpointing.export_model(run.accelerator, model, run.tokenizer, out)
        return
    def rebuild() -> Any:  # on the main process only: no ZeRO-3 partitioning (a collective) while building
        with without_zero3_init(run.accelerator):
            return adapters.build_run_model(cfg, run.model_config, run.info.kind)

    adapters.export_adapter(run.accelerator, model, run.tokenizer, out, cfg, merged=cfg.peft.export_merged,
                            rebuild=rebuild)


def resume(cfg: Config, ctx: TrainContext, data: Any, output_dir: Path) -> None:
    """Restore weights, optimizer, RNG, this rank's data lanes' positions and the counters, if a checkpoint is due.

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
        data.load_state_dict(state["data"])
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"checkpoint {resume_from}: the data position in {checkpointing.STATE_FILE} is damaged "
                              f"({type(err).__name__}: {err}). Resume from an earlier checkpoint with "
                              "`trainer.resume=<path>`.") from None
    ctx.step, ctx.tokens_seen, ctx.examples_seen = state["step"], state["tokens_seen"], state["examples_seen"]
    ctx.task_counts = Counter(state.get("task_counts", {}))
    ctx.task_tokens = Counter(state.get("task_tokens", {}))
    ctx.examples_with_choices = int(state.get("examples_with_choices", 0))
    ctx.best_metric_value = state.get("best_metric_value")
    ctx.packing_stats = state.get("packing_stats", {})
    accelerator.print(f"[mtf] resumed from {resume_from} at step {ctx.step}")


def start_record(cfg: Config, run: RunSetup, ctx: TrainContext, data: Any) -> RunRecord:
    """Write ``run.json`` (status running) with the plan and the mixture as planned: what `mtf report` compares to;
    and ``few_shot.json`` (the rows few-shot tasks train on) when the mixture has any."""
    if run.accelerator.is_main_process:
        pipeline.write_few_shot_record(cfg, run.output_dir)
    mixture = [{"name": s.name, "task": s.task, "examples": len(s.rows), "probability": float(s.probability)}
               for s in data.sources]
    return RunRecord(run.output_dir, run.accelerator.is_main_process, max_steps=cfg.trainer.max_steps,
                     start_step=ctx.step, world_size=run.plan.world_size, batch_plan=run.plan.describe(),
                     model_kind=run.info.kind, mixture=mixture)


def trainer_state(cfg: Config, ctx: TrainContext, data: Any) -> dict:
    """The resumable state written next to each checkpoint (``trainer_state.json``); call on every rank.

    Every rank's lanes are gathered (a collective), so the file holds all lanes and a resume may use
    another number of ranks.
    """
    from accelerate.utils import gather_object

    from train.data.lanes import merge_states

    local = data.state_dict()
    states = gather_object([local]) if ctx.accelerator.num_processes > 1 else [local]
    return {"step": ctx.step, "tokens_seen": ctx.tokens_seen, "examples_seen": ctx.examples_seen,
            "data": merge_states(states), "packing_stats": ctx.packing_stats,
            "task_counts": dict(ctx.task_counts), "task_tokens": dict(ctx.task_tokens), "best_metric_value": ctx.best_metric_value,
            "examples_with_choices": ctx.examples_with_choices,
            "config": to_dict(cfg)}


def prepare_step(cfg: Config, run: RunSetup, data: Any, step: int, tasks: list[str], *, announce: bool) -> PreparedStep:
    """This rank's data of ``step``: its lanes' next rows, collated (and pinned for a GPU), their counts, and the
    lanes' state after them (the feed calls this in step order, ahead of the loop when prefetching)."""
    import torch

    rows = data.next_rows()  # (rows_per_rank,) this rank's slice of the step's global rows
    micro_batches = rank_micro_batches(cfg, run, rows, announce_step=step if announce else None)
    if run.accelerator.device.type == "cuda":  # page-locked host memory: the copy to the GPU runs asynchronously
        micro_batches = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in mb.items()}
                         for mb in micro_batches]
    counts = pipeline.step_counts(rows, data.stats, run.info.kind, cfg, micro_batch_rows=run.plan.micro_batch_size,
                                  tasks=tasks)
    return PreparedStep(step=step, micro_batches=micro_batches, counts=counts, data_state=data.state_dict())


def rank_micro_batches(cfg: Config, run: RunSetup, rows: list[dict], announce_step: Optional[int] = None) -> list[dict]:
    """This rank's rows of the step (its contiguous slice of the global rows), collated into micro-batches.

    With ``announce_step`` and several ranks, each rank prints a digest of its rows for that step.
    """
    plan, rank, info = run.plan, run.accelerator.process_index, run.info
    mine = rows
    if announce_step is not None and plan.world_size > 1:
        # Evidence that the run is really data parallel: each rank trains on different rows.
        digest = hashlib.sha1(json.dumps([r["input_ids"] for r in mine]).encode()).hexdigest()[:12]
        # One write with its newline, so the ranks' lines cannot interleave on a shared stdout.
        print(f"[mtf] rank {rank}/{plan.world_size} step {announce_step} rows digest {digest}\n", end="", flush=True)
    return [collate(mine[i:i + plan.micro_batch_size], kind=info.kind, pad_id=info.pad_token_id,
                    decoder_start_id=info.decoder_start_token_id, max_input_tokens=cfg.data.max_input_tokens,
                    max_target_tokens=cfg.data.max_target_tokens, max_tokens=cfg.data.max_tokens, pad_to=plan.pad_to)
            for i in range(0, len(mine), plan.micro_batch_size)]


def global_step_sums(micro_batches: list[dict], counts: dict[str, float], mode: str, weights: dict[str, float],
                     plan: BatchPlan, accelerator: Any) -> tuple[dict[str, float], dict[str, float]]:
    """(each active loss's denominator, the step's data counts), both summed over all ranks before any backward pass.

    The denominators make the gradient independent of micro-batching, accumulation and rank count. Every
    value is a count (tokens, sequences, targets, wrong-choice tokens, examples with choices; the
    :func:`~train.data.pipeline.step_counts` of this rank's rows), so the all-reduced float64 sum is exact
    in any order; one all-reduce carries all of them.
    """
    import torch

    totals = [0.0] * len(weights)
    for batch in micro_batches:
        for i, value in enumerate(losses.local_denominators(batch, mode, weights).values()):
            totals[i] += float(value)
    values = totals + [float(v) for v in counts.values()]
    if plan.world_size > 1:
        values = accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=accelerator.device),
                                    reduction="sum").tolist()
    denominators = dict(zip(weights, (float(v) for v in values[:len(weights)])))
    return denominators, dict(zip(counts, values[len(weights):]))


def set_lr(optimizer: Any, lr: float) -> float:
    """Set the step's learning rate on every param group of the (possibly DeepSpeed-wrapped) optimizer.

    The LR is a pure function of the step: nothing to checkpoint, nothing to drift on resume, and no
    scheduler object for DeepSpeed's ZeRO-3 wrapper to break.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def run_step(cfg: Config, run: RunSetup, model: Any, optimizer: Any, micro_batches: list[dict],
             denominators: dict[str, float], weights: dict[str, float]) -> tuple[dict, Any]:
    """Forward, backward and one optimizer step over this rank's micro-batches of a step.

    Returns:
        (each loss of the step, ``{name: global numerator / global denominator or None}``; the gradient norm
        before clipping, or None when nothing clips).
    """
    import torch

    accelerator, plan, kind, mode = run.accelerator, run.plan, run.info.kind, cfg.trainer.loss_normalization
    numerator_sums = torch.zeros(len(weights), device=accelerator.device)  # (losses,) in weights' order
    # accelerate syncs and steps when its micro-batch counter hits a multiple of grad_accum. A step
    # always runs exactly grad_accum micro-batches, so start each one at 0: a counter restored from a
    # checkpoint written with another accumulation (another rank count) would otherwise step mid-batch.
    accelerator.step = 0
    grad_norm = None
    for batch in micro_batches:
        batch = {k: v.to(accelerator.device, non_blocking=True) if hasattr(v, "to") else v
                 for k, v in batch.items()}  # pinned by the feed when the device is a GPU
        with accelerator.accumulate(model):
            with accelerator.autocast():  # trainer.loss_chunk_tokens: the loss applies the output layer
                logits = (model_forward(model, batch, kind) if cfg.trainer.loss_chunk_tokens is None
                          else head_inputs(model, batch, kind, chunk_tokens=cfg.trainer.loss_chunk_tokens))
            numerators = losses.local_numerators(logits, batch, mode, weights)
            # accelerate (and DeepSpeed) divide by grad_accum and DDP averages over ranks: undo both,
            # so the summed gradient is exactly
            # d(sum_k weight_k * global numerator_k / global denominator_k).
            loss = losses.weighted_loss(numerators, denominators, weights, mode=mode,
                                        world_size=plan.world_size)
            accelerator.backward(loss * plan.grad_accum)
            numerator_sums += torch.stack([n.detach() for n in numerators.values()])
            if accelerator.sync_gradients and cfg.optim.clip_grad_norm and not cfg.trainer.deepspeed:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if cfg.trainer.deepspeed and hasattr(model, "get_global_grad_norm"):
        grad_norm = model.get_global_grad_norm()  # DeepSpeed clips inside its step and keeps the norm
    step_sums = (accelerator.reduce(numerator_sums, reduction="sum") if plan.world_size > 1
                 else numerator_sums)
    return losses.step_losses(dict(zip(weights, step_sums.tolist())), denominators, mode), grad_norm


def record_step(cfg: Config, ctx: TrainContext, counts: dict[str, float], tasks: list[str], grad_norm: Any,
                seconds: float, components: Optional[dict] = None, data_wait: float = 0.0) -> None:
    """Advance the step and the counters the hooks read (tokens, examples, task counts, packing figures),
    from the step's data ``counts`` summed over ranks (:func:`global_step_sums`).

    With T-Few's choice losses on, also each loss of the step (``train/loss_<name>``; absent for a loss
    whose denominator was 0 this step) and the examples trained with a usable choice set (cumulative).
    """
    from train.data.packing import efficiency_of

    ctx.step += 1
    ctx.last_grad_norm = float(grad_norm) if grad_norm is not None else None
    step_tokens = int(counts["tokens"])
    ctx.tokens_seen += step_tokens
    ctx.examples_seen += int(counts["examples"])
    ctx.task_counts.update({t: int(counts[f"examples/{t}"]) for t in tasks if counts[f"examples/{t}"]})
    ctx.task_tokens.update({t: int(counts[f"tokens/{t}"]) for t in tasks if counts[f"tokens/{t}"]})
    ctx.packing_stats = {k[len("packer/"):]: int(v) for k, v in counts.items() if k.startswith("packer/")}
    ctx.packing = efficiency_of(ctx.packing_stats, ctx.kind, max_input_tokens=cfg.data.max_input_tokens,
                                max_target_tokens=cfg.data.max_target_tokens, max_tokens=cfg.data.max_tokens)
    ctx.step_metrics = {"tokens": step_tokens, "step_seconds": seconds, "time/step_s": seconds,
                        "time/data_wait_s": data_wait, **pipeline.packing_metrics(counts, ctx.kind, cfg)}
    if cfg.trainer.loss_weights.choice_losses():
        ctx.examples_with_choices += int(counts["choice_sets"])
        ctx.step_metrics["examples_with_choices"] = ctx.examples_with_choices
        ctx.step_metrics.update({f"train/loss_{name}": value for name, value in (components or {}).items()
                                 if value is not None})
