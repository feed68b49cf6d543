"""Trainer hooks, one concern each: metrics logging, evaluation, checkpointing, preemption.

The loop calls ``hook.on_step_end(ctx)`` once per optimizer step (after the weights changed) and
``hook.on_train_end(ctx)`` once at the end. Hooks read the :class:`TrainContext`; they never change
the data stream or the optimizer.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from train.loop import checkpointing
from train.config import Config
from train.errors import ConfigError
from train.loop.loggers import MetricLoggers, estimate_mfu


@dataclass
class TrainContext:
    """What hooks may read about the run. The trainer updates it before each hook call."""

    cfg: Config
    accelerator: Any
    model: Any
    tokenizer: Any
    kind: str
    step: int = 0
    tokens_seen: int = 0  # real (non-pad) target+input tokens trained on, all ranks
    examples_seen: int = 0
    last_loss: float = float("nan")
    last_grad_norm: Optional[float] = None
    lr: float = 0.0
    step_metrics: dict = field(default_factory=dict)  # packing stats etc. of the last step
    task_counts: Counter = field(default_factory=Counter)  # examples trained on per task, all ranks
    task_tokens: Counter = field(default_factory=Counter)  # real tokens (input + target) trained on per task
    examples_with_choices: int = 0  # examples trained with a usable answer-choice set (T-Few's choice losses)
    packing_stats: dict = field(default_factory=dict)  # the packers' counters so far, all lanes of all ranks
    packing: dict = field(default_factory=dict)  # packing efficiency so far, from packing_stats
    trainer_state: Any = None  # callable returning the resumable state dict (data lanes, counters)
    stop_reason: Optional[str] = None  # "preempted" | "max_time" when the run must stop after this step
    eval_results: Optional[dict] = None
    best_metric_value: Optional[float] = None
    checkpoint_seconds: list = field(default_factory=list)
    flops_per_token: float = 0.0
    export: Any = None  # callable(out_dir): the model in its export format (full HF model, or peft adapter)


class LoggingHook:
    """Every ``logging.every_steps``: loss, lr, grad norm, tokens/s, packing, memory, MFU, task counts."""

    def __init__(self, ctx: TrainContext):
        self.loggers = MetricLoggers(ctx.cfg, ctx.accelerator.is_main_process)
        self.every = ctx.cfg.logging.every_steps
        self.window_start = time.perf_counter()
        self.window_tokens = 0
        self.window_losses: list[float] = []
        self.bar = None
        if ctx.cfg.logging.progress_bar and ctx.accelerator.is_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=ctx.cfg.trainer.max_steps, initial=ctx.step, desc="train", unit="step", dynamic_ncols=True)

    def on_step_end(self, ctx: TrainContext) -> None:
        self.window_tokens += ctx.step_metrics.get("tokens", 0)
        self.window_losses.append(ctx.last_loss)
        if self.bar is not None:
            self.bar.update(1)
        if ctx.step % self.every and ctx.step != ctx.cfg.trainer.max_steps and ctx.stop_reason is None:
            return
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        tokens_per_second = self.window_tokens / elapsed
        metrics = {
            "train/loss": sum(self.window_losses) / len(self.window_losses),
            "train/loss_last": ctx.last_loss,
            "lr": ctx.lr,
            "grad_norm": ctx.last_grad_norm,
            "tokens_per_second": tokens_per_second,
            "tokens_seen": ctx.tokens_seen,
            "examples_seen": ctx.examples_seen,
        }
        metrics.update({k: v for k, v in ctx.step_metrics.items() if k != "tokens"})
        metrics.update({f"tasks/{name}": count for name, count in sorted(ctx.task_counts.items())})
        metrics.update({f"task_tokens/{name}": count for name, count in sorted(ctx.task_tokens.items())})
        mfu = estimate_mfu(ctx.flops_per_token, tokens_per_second, ctx.accelerator.num_processes, ctx.cfg.logging.peak_tflops)
        if mfu is not None:
            metrics["mfu"] = mfu
        metrics.update(_memory_metrics())
        self.loggers.log(metrics, ctx.step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", tok_s=f"{tokens_per_second:,.0f}")
        self.window_start = time.perf_counter()
        self.window_tokens = 0
        self.window_losses = []

    def log(self, metrics: dict, step: int) -> None:
        self.loggers.log(metrics, step)

    def on_train_end(self, ctx: TrainContext) -> None:
        if self.bar is not None:
            self.bar.close()
        self.loggers.close()


def _memory_metrics() -> dict:
    import torch

    out = {}
    if torch.cuda.is_available():
        out["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        out["memory/max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except (ImportError, OSError):
        pass
    return out


class CheckpointHook:
    """Saves every ``checkpoint.every_steps``, at the end, and when the run must stop (preemption, max_time)."""

    def __init__(self, ctx: TrainContext):
        self.every = ctx.cfg.checkpoint.every_steps
        self.last_saved_step: Optional[int] = None

    def save(self, ctx: TrainContext) -> Path:
        state = ctx.trainer_state()
        path, seconds = checkpointing.save_checkpoint(
            ctx.accelerator, ctx.cfg.run.output_dir, ctx.step, state, ctx.cfg.checkpoint.keep_last
        )
        ctx.checkpoint_seconds.append(seconds)
        self.last_saved_step = ctx.step
        return path

    def on_step_end(self, ctx: TrainContext) -> None:
        due = self.every is not None and ctx.step % self.every == 0
        if due or ctx.stop_reason is not None:
            self.save(ctx)

    def on_train_end(self, ctx: TrainContext) -> None:
        if self.last_saved_step != ctx.step:
            self.save(ctx)


class PreemptionHook:
    """Turns SIGTERM / SIGUSR1 (Slurm's warning before a time limit) and ``trainer.max_time`` into a clean stop.

    The signal only sets a flag; the current step finishes, the flag is agreed on by all ranks, then
    the checkpoint hook saves and the trainer exits with ``EXIT_PREEMPTED``.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, ctx: TrainContext):
        self.requested = False
        self.interrupted = False
        self.start = time.monotonic()
        self.max_time = ctx.cfg.trainer.max_time
        self.previous = {}
        for sig, handler in ((signal.SIGTERM, self._handler), (signal.SIGUSR1, self._handler),
                             (signal.SIGINT, self._interrupt)):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def _interrupt(self, signum, frame) -> None:
        """Ctrl-C: finish the step and checkpoint, like a preemption; a second Ctrl-C aborts at once."""
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\n[mtf] Ctrl-C: stopping after this step with a checkpoint (press Ctrl-C again to abort without one)",
              file=sys.stderr, flush=True)

    def check(self, ctx: TrainContext) -> None:
        """Called by the loop before the other hooks; sets ``ctx.stop_reason`` on every rank alike."""
        import torch

        flags = [float(self.requested), float(self.max_time is not None and time.monotonic() - self.start > self.max_time),
                 float(self.interrupted)]
        tensor = torch.tensor(flags, device=ctx.accelerator.device)
        if ctx.accelerator.num_processes > 1:
            tensor = ctx.accelerator.reduce(tensor, reduction="sum")
        if tensor[0] > 0:
            ctx.stop_reason = "preempted"
        elif tensor[2] > 0:
            ctx.stop_reason = "interrupted"
        elif tensor[1] > 0:
            ctx.stop_reason = "max_time"

    def on_step_end(self, ctx: TrainContext) -> None:
        pass

    def on_train_end(self, ctx: TrainContext) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class EvalHook:
    """Zero-shot evaluation on the held-out mixture: every ``eval.every_steps`` (cheap, capped per
    template) and a full one at the end. Results go to ``<output_dir>/eval/step-N.json`` and the loggers
    (``eval/<dataset>/<template>/accuracy``, ``eval/<dataset>/median``). With ``eval.best_metric`` the best
    model so far is exported to ``<output_dir>/best``.
    """

    def __init__(self, ctx: TrainContext, eval_set: Optional[tuple]):
        self.cfg = ctx.cfg.eval
        self.logger: Optional[LoggingHook] = None
        self.evaluators: dict = {}  # per-template cap -> ZeroShotEvaluator (tokenizes once)
        self.eval_set = eval_set
        self.zero_shot: list[str] = []  # the eval mixture's eval.held_out_languages, for the results' grid
        if eval_set and self.cfg.mixture:
            from train.evaluation.runner import zero_shot_languages

            self.zero_shot = zero_shot_languages(self.cfg.mixture)  # read once, not at every evaluation
        if self.cfg.best_metric and eval_set:
            _check_best_metric(self.cfg.best_metric, eval_set)

    def _evaluator(self, ctx: TrainContext, cap: Optional[int]):
        if cap not in self.evaluators:
            from train.evaluation.evaluator import ZeroShotEvaluator
            from train.evaluation.items import resolve_scoring

            examples, clusters, languages = self.eval_set
            scoring = resolve_scoring(self.cfg.scoring, choice_eos=self.cfg.choice_eos,
                                      choice_separator=self.cfg.choice_separator)
            config = getattr(ctx.accelerator.unwrap_model(ctx.model), "config", None)
            self.evaluators[cap] = ZeroShotEvaluator(ctx.tokenizer, examples, kind=ctx.kind, metrics=None, clusters=clusters,
                                                     languages=languages, max_examples_per_template=cap,
                                                     max_input_tokens=scoring.max_prompt_tokens(ctx.kind, config, ctx.tokenizer),
                                                     protocol=self.cfg.protocol,
                                                     protocol_seeds=self.cfg.protocol_seeds,
                                                     length_normalized=self.cfg.length_normalized, scoring=scoring)
        return self.evaluators[cap]

    def run(self, ctx: TrainContext, final: bool) -> Optional[dict]:
        if not self.eval_set:
            return None
        from train.evaluation import results as eval_results

        cap = self.cfg.final_max_examples_per_template if final else self.cfg.max_examples_per_template
        results = self._evaluator(ctx, cap)(ctx.model, accelerator=ctx.accelerator, batch_size=self.cfg.batch_size)
        ctx.model.train()
        results["step"] = ctx.step
        if self.zero_shot:
            results["zero_shot_languages"] = self.zero_shot
        ctx.eval_results = results
        if ctx.accelerator.is_main_process:
            out = Path(ctx.cfg.run.output_dir) / "eval"
            out.mkdir(parents=True, exist_ok=True)
            eval_results.write_results(out / f"step-{ctx.step:08d}.json", results)
            if self.logger is not None:
                self.logger.log(eval_results.flatten_for_logging(results), ctx.step)
        self._track_best(ctx, results)
        return results

    def _track_best(self, ctx: TrainContext, results: dict) -> None:
        if not self.cfg.best_metric:
            return
        from train.evaluation import results as eval_results

        value = eval_results.flatten_for_logging(results).get(self.cfg.best_metric)
        if value is None:
            return
        if ctx.best_metric_value is None or value > ctx.best_metric_value:
            ctx.best_metric_value = value
            best = Path(ctx.cfg.run.output_dir) / "best"
            if ctx.export is not None:
                ctx.export(best)
            else:
                checkpointing.export_model(ctx.accelerator, ctx.model, ctx.tokenizer, best)

    def on_step_end(self, ctx: TrainContext) -> None:
        every = self.cfg.every_steps
        if every and ctx.step % every == 0 and ctx.step != ctx.cfg.trainer.max_steps:
            self.run(ctx, final=False)

    def on_train_end(self, ctx: TrainContext) -> None:
        if self.cfg.at_end and ctx.stop_reason is None:
            self.run(ctx, final=True)


def _check_best_metric(name: str, eval_set: tuple) -> None:
    """``eval.best_metric`` must name a metric the eval set can produce; a typo would never export a best model.

    Raises:
        ConfigError: with the closest valid names.
    """
    import difflib

    examples, clusters, languages = eval_set
    datasets = sorted({str(ex["dataset"]) for ex in examples})
    groups = {"cluster": set(clusters.values()) | {ex.get("cluster") for ex in examples if ex.get("cluster")},
              "language": set(languages.values()) | {ex.get("language") for ex in examples if ex.get("language")}}
    if any(name.startswith(f"eval/{d}/") for d in datasets):
        return
    if any(name == f"eval/{kind}/{g}/mean" for kind, names in groups.items() for g in names):
        return
    known = [f"eval/{d}/{stat}" for d in datasets for stat in ("median", "mean", "min", "max")]
    known += [f"eval/{kind}/{g}/mean" for kind, names in groups.items() for g in sorted(names)]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    raise ConfigError(f"`eval.best_metric` = {name!r} is not a metric of the eval mixture "
                      f"({len(datasets)} datasets). " + (f"Did you mean {', '.join(close)}? " if close else "")
                      + f"Valid forms: eval/<dataset>/median, eval/<dataset>/<template>/accuracy, eval/cluster/<name>/mean; "
                      f"datasets: {', '.join(datasets)}.")
