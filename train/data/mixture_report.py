"""``mtf mixture show``: what a mixture will feed the model, planned and measured.

Per task: examples (after prompting and tokenizing), ``k`` and seed of few-shot tasks, planned rate, share of samples realised by the real
:class:`~train.data.mixtures.MixtureStream`, mean tokens per example, share of tokens, and the expected number
of epochs for a given training length, flagging tasks repeated more than ``REPEAT_WARNING_EPOCHS`` times
(data-constrained scaling laws). When the mixture has ``languages:`` or its tasks more than one language,
also planned and realised shares per language and per (task, language). Optionally a bar chart.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from train.errors import ConfigError
from train.data.mixtures import REPEAT_WARNING_EPOCHS, MixturePlan, MixtureStream, count_examples, plan_mixture


# --------------------------------------------------------------------------------------------------
# Report for `mtf mixture show`
# --------------------------------------------------------------------------------------------------


def mixture_report(
    plan: MixturePlan,
    datasets: Mapping[str, Any],
    *,
    steps: int | None = None,
    batch_tokens: int | None = None,
    realised_samples: int = 10_000,
    seed: int = 0,
    few_shot: Mapping[str, Any] | None = None,
) -> dict:
    """Per-task planned and realised shares, token shares and expected epochs (JSON-able).

    Args:
        plan: from :func:`plan_mixture`.
        datasets: task -> tokenized dataset (the same the plan was made from).
        steps, batch_tokens: training length; when both are given, expected epochs per task =
            ``steps * batch_tokens * token_share / (mean_tokens * examples)``, an upper bound since
            packing padding is ignored. Tasks above ``REPEAT_WARNING_EPOCHS`` are flagged.
        realised_samples: items drawn from the real :class:`MixtureStream` to measure realised shares.
        seed: the stream seed.
        few_shot: task -> its :class:`~train.data.few_shot.FewShotSpec` (few-shot tasks only).

    Returns:
        {"mixture", "rate", "seed", "steps", "batch_tokens", "realised_samples", "tasks": [per task:
        task, templates, few_shot ({k, seed} or None), examples, rate, mean_tokens, token_share,
        expected_epochs, repeats, realised_share], "warnings": [str]}; when the mixture has ``languages:``
        or the plan's tasks more than one language, also "languages" (the ``languages:`` rate, or None),
        "per_language": [language, tasks, examples, rate, realised_share] and "per_task_language": [task,
        language, rate, realised_share] (language None: a task without one).
    """
    stream = MixtureStream.from_plan(plan, datasets, seed)
    # mean tokens per example of each source, from the Arrow offsets (no row decoding)
    lengths_cache: dict[str, np.ndarray] = {}
    per_task: dict[str, dict] = {}
    for planned, source in zip(plan.sources, stream.sources):
        if planned.task not in lengths_cache:
            lengths_cache[planned.task] = source.columns.lengths()
        lengths = lengths_cache[planned.task]
        rows = source.rows
        mean = float(lengths[rows.start : rows.stop].mean() if isinstance(rows, range) else lengths[rows].mean())
        entry = per_task.setdefault(
            planned.task, {"task": planned.task, "templates": 0, "examples": 0, "rate": 0.0, "_tokens": 0.0}
        )
        entry["templates"] += planned.template is not None
        entry["examples"] += planned.examples
        entry["rate"] += planned.probability
        entry["_tokens"] += planned.probability * mean  # expected tokens per sample from this source
    tokens_per_sample = sum(e["_tokens"] for e in per_task.values())
    realised: dict[str, int] = dict.fromkeys(per_task, 0)
    for _ in range(realised_samples):
        realised[next(stream)["task"]] += 1
    total_tokens = steps * batch_tokens if steps is not None and batch_tokens is not None else None
    warnings = []
    rows_out = []
    few_shot = dict(few_shot or {})
    for task in sorted(per_task):
        e = per_task[task]
        mean_tokens = e["_tokens"] / e["rate"]
        epochs = None
        if total_tokens is not None:
            samples = total_tokens / tokens_per_sample * e["rate"]
            epochs = samples / e["examples"]
        repeats = epochs is not None and epochs > REPEAT_WARNING_EPOCHS
        if repeats and few_shot.get(task) is not None:
            warnings.append(
                f"few-shot task '{task}' (k={few_shot[task].k}) would be seen {epochs:.1f} times: expected when "
                "finetuning on a few examples (T-Few), but watch the eval for overfitting."
            )
        elif repeats:
            warnings.append(
                f"task '{task}' would be seen {epochs:.1f} times (> {REPEAT_WARNING_EPOCHS:g} epochs): "
                "repeated data helps little beyond ~4 epochs (data-constrained scaling laws); cap it lower."
            )
        rows_out.append(
            {
                "task": task,
                "templates": e["templates"] or None,
                "few_shot": few_shot[task].to_dict() if few_shot.get(task) is not None else None,
                "examples": e["examples"],
                "rate": e["rate"],
                "mean_tokens": mean_tokens,
                "token_share": e["_tokens"] / tokens_per_sample,
                "expected_epochs": epochs,
                "repeats": repeats,
                "realised_share": realised[task] / realised_samples if realised_samples else None,
            }
        )
    rate = plan.spec.rate
    report = {
        "mixture": str(plan.spec.path),
        "rate": {k: v for k, v in vars(rate).items() if v is not None},
        "seed": seed,
        "steps": steps,
        "batch_tokens": batch_tokens,
        "realised_samples": realised_samples,
        "tasks": rows_out,
        "warnings": warnings,
    }
    if plan.spec.languages is not None or len(plan.language_shares()) > 1:  # one language: nothing to add
        report.update(_language_rows(plan, rows_out, realised, realised_samples))
    return report


def _language_rows(plan: MixturePlan, tasks: list[dict], realised: Mapping[str, int], samples: int) -> dict:
    """Planned and realised shares per language and per (task, language), from the per-task figures."""
    language_of = {task: code for task, code in plan.task_language_shares()}  # a task has one language
    per_task_language = [
        {"task": t["task"], "language": language_of[t["task"]], "rate": t["rate"],
         "realised_share": t["realised_share"]}
        for t in sorted(tasks, key=lambda t: (str(language_of[t["task"]]), t["task"]))
    ]
    per_language: dict[str | None, dict] = {}
    for t in tasks:
        code = language_of[t["task"]]
        entry = per_language.setdefault(code, {"language": code, "tasks": 0, "examples": 0, "rate": 0.0,
                                               "_realised": 0})
        entry["tasks"] += 1
        entry["examples"] += t["examples"]
        entry["rate"] += t["rate"]
        entry["_realised"] += realised[t["task"]]
    for entry in per_language.values():
        entry["realised_share"] = entry.pop("_realised") / samples if samples else None
    spec = plan.spec.languages
    rates = None if spec is None else {k: v for k, v in vars(spec.rate).items() if v is not None}
    if spec is not None and spec.weights is not None:
        rates["weights"] = dict(spec.weights)
    return {
        "languages": rates,
        "per_language": sorted(per_language.values(), key=lambda e: str(e["language"])),
        "per_task_language": per_task_language,
    }


def format_mixture_report(report: Mapping) -> str:
    """The report as a fixed-width table followed by its warnings."""
    header = ["task", "tmpl", "k", "examples", "rate", "realised", "tok/ex", "tok share", "epochs", ""]
    lines = []
    for t in report["tasks"]:
        few = t.get("few_shot")
        lines.append(
            [
                t["task"],
                str(t["templates"] or "-"),
                "-" if not few else f"{few['k']} (seed {few['seed']})",  # k rows of a few-shot task
                f"{t['examples']:,}",
                f"{t['rate']:.4f}",
                "-" if t["realised_share"] is None else f"{t['realised_share']:.4f}",
                f"{t['mean_tokens']:.1f}",
                f"{t['token_share']:.4f}",
                "-" if t["expected_epochs"] is None else f"{t['expected_epochs']:.2f}",
                "REPEATS" if t["repeats"] else "",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rate = ", ".join(f"{k}={v}" for k, v in report["rate"].items())
    out = [f"mixture {report['mixture']} ({rate}; realised over {report['realised_samples']:,} samples, "
           f"seed {report['seed']})", fmt(header).rstrip(), *(fmt(r).rstrip() for r in lines)]
    if "per_language" in report:
        out += ["", *_format_languages(report)]
    out += [f"WARNING: {w}" for w in report["warnings"]]
    return "\n".join(out)


def _format_languages(report: Mapping) -> list[str]:
    """Per language, then its tasks indented below it: planned and realised shares."""
    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    examples = {t["task"]: t["examples"] for t in report["tasks"]}
    header = ["language", "tasks", "examples", "rate", "realised"]
    lines = []
    for lang in report["per_language"]:
        lines.append([lang["language"] or "(none)", str(lang["tasks"]), f"{lang['examples']:,}",
                      share(lang["rate"]), share(lang["realised_share"])])
        lines += [[f"  {t['task']}", "", f"{examples[t['task']]:,}", share(t["rate"]), share(t["realised_share"])]
                  for t in report["per_task_language"] if t["language"] == lang["language"]]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rates = report["languages"]
    title = "languages" + ("" if rates is None else " (" + ", ".join(f"{k}={v}" for k, v in rates.items()) + ")")
    return [title, fmt(header), *(fmt(r) for r in lines)]


def plot_mixture_report(report: Mapping, path: str | Path) -> None:
    """Bar chart of planned vs realised sample shares and token shares per task (PNG, Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = [t["task"] for t in report["tasks"]]
    x = np.arange(len(tasks))
    fig = Figure(figsize=(max(6.0, 0.6 * len(tasks) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.27
    ax.bar(x - width, [t["rate"] for t in report["tasks"]], width, label="planned share")
    ax.bar(x, [t["realised_share"] or 0.0 for t in report["tasks"]], width, label="realised share")
    ax.bar(x + width, [t["token_share"] for t in report["tasks"]], width, label="token share")
    ax.set_xticks(x, tasks, rotation=45, ha="right")
    ax.set_ylabel("share")
    ax.set_title(Path(report["mixture"]).name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))


def show_mixture(
    path: str | Path,
    *,
    steps: int | None = None,
    batch_tokens: int | None = None,
    tokenizer: Any = None,
    kind: str = "encdec",
    samples: int = 10_000,
    plot: str | Path | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    data_root: str | None = None,
    max_examples_per_task: int | None = None,
) -> dict:
    """``mtf mixture show``: load a mixture file's tasks, prompt and tokenize them, and report.

    Args:
        path: the mixture YAML (its ``tasks``/``include`` and nested mixtures define the tasks).
        steps, batch_tokens, samples, seed: see :func:`mixture_report`.
        tokenizer: a tokenizer, a folder for ``AutoTokenizer.from_pretrained``, or ``"byt5"`` (bytes, no files).
        kind: model kind (decides eos / leading-space handling, hence token counts).
        plot: write :func:`plot_mixture_report`'s PNG here.
        cache_dir, data_root, max_examples_per_task: passed to train.data.tasks.

    Returns:
        The :func:`mixture_report` dict.

    Raises:
        ConfigError / DataError: as :func:`load_mixture_spec`, :func:`plan_mixture` and train.data.tasks.
    """
    from train.data.pipeline import load_mixture_tasks
    from train.data.tokenization import tokenize_prompted

    if tokenizer == "byt5":  # the byte tokenizer needs no files
        from transformers import ByT5Tokenizer

        tokenizer = ByT5Tokenizer()
    elif tokenizer is None or isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        if tokenizer is None or not Path(tokenizer).is_dir():
            raise ConfigError(f"--tokenizer must be a folder with tokenizer files or `byt5`, got {tokenizer!r}.")
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    spec, tasks = load_mixture_tasks(path, data_root=data_root)
    tokenized = {}
    for name in spec.task_names():
        if name not in tasks:
            continue  # plan_mixture names the unknown task, its file and the known ones
        prompted = tasks[name].prompted(max_examples_per_task, cache_dir=cache_dir)
        tokenized[name] = tokenize_prompted(prompted, tokenizer, kind)
    counts = {**dict.fromkeys(tasks, 0), **count_examples(tokenized)}
    plan = plan_mixture(spec, counts, languages={name: task.metadata.language for name, task in tasks.items()})
    few_shot = {name: task.few_shot for name, task in tasks.items() if task.few_shot is not None}
    report = mixture_report(
        plan, tokenized, steps=steps, batch_tokens=batch_tokens, realised_samples=samples, seed=seed, few_shot=few_shot
    )
    if plot is not None:
        plot_mixture_report(report, plot)
    return report
