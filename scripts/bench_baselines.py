"""Peer baselines for the training benchmark, and the alternating-repeat discipline of every benchmark.

Timing discipline (used by bench_packing.py, bench_eval.py and bench_mixture.py). Other processes share
the machine, and their load comes and goes over seconds to minutes, so a figure from one run of A
followed by one run of B says little. Instead:

* the arms alternate, the order reversed every round so a linear drift in load cancels
  (A B | B A | A B ...), at least 3 rounds;
* warm-up (the first steps or calls) is run and excluded from every timing;
* each arm reports the median and the min-max of its per-repeat rates, and each ratio is the ratio of
  the medians, with the min-max of the per-round ratios (the two arms of one round ran minutes apart at
  most) as its spread.

Baselines a user would pick instead of ``mtf train`` (same model config and random init, same examples
in the same order, same torch threads, AdamW, fp32, gradient clipping at 1.0, CPU):

* ``hf_trainer``: ``transformers.Trainer`` with ``DataCollatorForSeq2Seq(padding="longest")``, the examples
  in stream order (``train_sampling_strategy="sequential"``), the same examples per step as ``mtf``'s
  unpacked run. Decoders get ``input_ids`` = input + target and ``labels`` = -100 over the input
  (the model shifts them); T5 gets ``labels`` = the target.
* ``trl_sft``: ``trl.SFTTrainer(packing=True)`` on the same tokenized examples (prompt tokens labelled
  -100): TRL's default BFD packing into rows of ``max_length``, each batch flattened padding-free into
  one row with position ids restarting per example (transformers turns those into a block-causal mask),
  the same rows per step as ``mtf``'s packed run. Decoders only; skipped, with the reason, when ``trl``
  is not installed (it is not in requirements.lock: ``pip install trl``).

Both time a step from the end of the previous one to its own end (data, forward, backward, clip,
optimizer, callbacks), as ``mtf``'s logged ``tokens_per_second`` does; the rate is real (non-pad) tokens,
inputs and targets, over the timed steps' seconds.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

MIN_REPEATS = 3


# ----------------------------------------------------------------------------------------- alternation


def alternate(arms: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every arm ``repeats`` times, alternating, the order reversed every round; each arm's rates.

    Args:
        arms: name -> a callable that runs the arm once (warm-up excluded inside it) and returns its rate.
        repeats: rounds, at least MIN_REPEATS.

    Returns:
        name -> rates in round order; round ``i`` of two arms ran next to each other.

    Raises:
        ValueError: fewer than MIN_REPEATS repeats.
    """
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats must be at least {MIN_REPEATS}, got {repeats}")
    names = list(arms)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            rates[name].append(float(arms[name]()))
    return rates


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min and max of per-repeat values (and the values, in round order)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def ratio(numerator: list[float], denominator: list[float]) -> dict[str, Any]:
    """Ratio of the medians, and the min-max of the per-round ratios, of two arms' per-repeat rates."""
    per_round = [a / b for a, b in zip(numerator, denominator)]
    return {"ratio": statistics.median(numerator) / statistics.median(denominator), "min": min(per_round),
            "max": max(per_round), "per_round": per_round}


def window_rate(tokens: list[int], step_end_times: list[float], warmup_steps: int) -> dict[str, Any]:
    """Real tokens/s over the steps after ``warmup_steps``.

    Args:
        tokens: real tokens of each step, from step 1.
        step_end_times: ``time.perf_counter()`` at the end of each step, from step 1.
        warmup_steps: steps excluded; the window runs from the end of step ``warmup_steps`` to the last end.
    """
    if warmup_steps < 1 or len(step_end_times) <= warmup_steps:
        raise ValueError(f"need more than {warmup_steps} steps with warm-up >= 1, got {len(step_end_times)}")
    seconds = step_end_times[-1] - step_end_times[warmup_steps - 1]
    timed = tokens[warmup_steps:len(step_end_times)]
    return {"tokens_per_s": sum(timed) / seconds, "seconds": seconds, "timed_step_tokens": timed}


# ----------------------------------------------------------------------------------------- baselines


def trl_version() -> tuple[str | None, str]:
    """(trl's version or None, why it cannot be used): TRL is optional, not in requirements.lock."""
    try:
        import trl
        from trl import SFTConfig, SFTTrainer  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means the arm is skipped, with its reason
        return None, f"trl is not usable here ({type(err).__name__}: {err}); `pip install trl` to add this arm"
    return trl.__version__, ""


def _counting_trainer(base: type, kind: str) -> type:
    """``base`` (a Trainer class) that records each step's real tokens, and the end time of each step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - the callback signature
            self.ends.append(time.perf_counter())

    class Counting(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.step_tokens: list[int] = []
            self.clock = StepClock()
            super().__init__(*args, callbacks=[self.clock], **kwargs)

        def training_step(self, model, inputs, *args, **kwargs):  # noqa: ANN001 - the Trainer signature
            if "attention_mask" in inputs:  # padded batches: the mask marks the real input tokens
                real = int(inputs["attention_mask"].sum())
            else:  # TRL's padding-free row: every token is real
                real = int(inputs["input_ids"].numel())
            if kind == "encdec":
                real += int((inputs["labels"] != -100).sum())
            self.step_tokens.append(real)
            return super().training_step(model, inputs, *args, **kwargs)

    return Counting


def _common_args(out_dir: str, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """TrainingArguments shared by both baselines: what ``mtf``'s benchmark config sets, nothing else on."""
    return {"output_dir": out_dir, "max_steps": steps, "per_device_train_batch_size": batch_size,
            "gradient_accumulation_steps": 1, "learning_rate": lr, "lr_scheduler_type": "constant",
            "optim": "adamw_torch", "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
            "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "use_cpu": True, "bf16": False, "fp16": False,
            "report_to": [], "save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True,
            "dataloader_num_workers": 0, "seed": seed, "train_sampling_strategy": "sequential",
            "remove_unused_columns": False}


def hf_trainer_run(model: Any, tokenizer: Any, rows: list[dict], kind: str, *, batch_size: int, warmup_steps: int,
                   steps: int, lr: float, seed: int, out_dir: str) -> dict:
    """Train ``model`` with ``transformers.Trainer`` on unpacked rows (stream order), pad-to-longest batches.

    Args:
        rows: ``Packer(pack=False)`` rows (one example each, already fitted to the capacity), in stream order.
        kind: "decoder" or "encdec".
        batch_size: examples per step.
        warmup_steps, steps: steps excluded from the timing, then timed steps.

    Returns:
        :func:`window_rate` of the timed steps, plus ``step_tokens`` (every step's real tokens).
    """
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    features = []
    for row in rows[:batch_size * (warmup_steps + steps)]:
        if kind == "encdec":
            features.append({"input_ids": row["input_ids"], "attention_mask": [1] * len(row["input_ids"]),
                             "labels": row["target_ids"]})
        else:
            ids = row["input_ids"]
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                             "labels": [t if m else -100 for t, m in zip(ids, row["loss_mask"])]})
    collator = DataCollatorForSeq2Seq(tokenizer, model=model if kind == "encdec" else None, padding="longest",
                                      label_pad_token_id=-100)
    args = TrainingArguments(**_common_args(out_dir, warmup_steps + steps, batch_size, lr, seed))
    trainer = _counting_trainer(Trainer, kind)(model=model, args=args, train_dataset=features, data_collator=collator)
    trainer.train()
    return {**window_rate(trainer.step_tokens, trainer.clock.ends, warmup_steps), "step_tokens": trainer.step_tokens}


def trl_sft_run(model: Any, tokenizer: Any, rows: list[dict], *, rows_per_step: int, max_length: int,
                warmup_steps: int, steps: int, lr: float, seed: int, out_dir: str) -> dict:
    """Train a decoder with ``trl.SFTTrainer(packing=True)`` (BFD, padding-free) on the same examples.

    Args:
        rows: decoder ``Packer(pack=False)`` rows in stream order; TRL packs them itself.
        rows_per_step: TRL's packed rows (of ``max_length``) per step.

    Returns:
        :func:`window_rate` of the timed steps, plus ``step_tokens`` and ``packed_rows`` (TRL's row count).
    """
    import datasets
    from trl import SFTConfig, SFTTrainer

    data = datasets.Dataset.from_list([
        {"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["loss_mask"])]}
        for r in rows])
    args = SFTConfig(**_common_args(out_dir, warmup_steps + steps, rows_per_step, lr, seed), max_length=max_length,
                     packing=True, dataset_num_proc=None)
    trainer = _counting_trainer(SFTTrainer, "decoder")(model=model, args=args, train_dataset=data,
                                                       processing_class=tokenizer)
    if len(trainer.train_dataset) < rows_per_step * (warmup_steps + steps):
        raise ValueError(f"TRL packed {len(trainer.train_dataset)} rows, fewer than the "
                         f"{rows_per_step * (warmup_steps + steps)} the steps need; draw more examples")
    trainer.train()
    return {**window_rate(trainer.step_tokens, trainer.clock.ends, warmup_steps), "step_tokens": trainer.step_tokens,
            "packed_rows": len(trainer.train_dataset)}
