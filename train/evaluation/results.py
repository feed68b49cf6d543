"""Zero-shot results: T0-style aggregation, the results JSON and the printed table.

Aggregation follows the T0 paper: per (dataset, template) accuracy or metric; per dataset the median
(the headline number), mean, min and max over templates; per task cluster and per language the mean of
the dataset medians. :mod:`train.evaluation.evaluator` produces the per-template rows; ``mtf eval-merge``
re-runs :func:`aggregate` over the rows of several shards.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path


def mean_or_none(values: Sequence) -> float | None:
    return sum(float(v) for v in values) / len(values) if values else None


def _summary(values: Sequence[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "mean": None, "min": None, "max": None, "num_templates": 0}
    return {
        "median": float(statistics.median(vals)),
        "mean": float(statistics.fmean(vals)),
        "min": float(min(vals)),
        "max": float(max(vals)),
        "num_templates": len(vals),
    }


def aggregate(
    per_template: Mapping[str, Mapping[str, Mapping]],
    cluster_of: Mapping[str, str] | None = None,
    language_of: Mapping[str, str] | None = None,
) -> dict:
    """T0-style aggregation of per-template rows.

    Args:
        per_template: {dataset: {template: row}}; a row has "score" (its primary metric, None when
            nothing was scored) and optionally "accuracy_length_normalized".
        cluster_of / language_of: dataset -> cluster / language.

    Returns:
        {"templates": per_template, "datasets": {dataset: {median, mean, min, max, num_templates,
        length_normalized: {...}, cluster, language}}, "clusters": {c: {mean, median, datasets}},
        "languages": {l: {...}}}; cluster and language values average the dataset medians.
    """
    cluster_of, language_of = dict(cluster_of or {}), dict(language_of or {})
    datasets: dict[str, dict] = {}
    for dataset, rows in per_template.items():
        summary = _summary([r.get("score") for r in rows.values()])
        ln = [r.get("accuracy_length_normalized") for r in rows.values()]
        if any(v is not None for v in ln):
            summary["length_normalized"] = _summary(ln)
        summary["cluster"] = cluster_of.get(dataset, "other")
        summary["language"] = language_of.get(dataset, "en")
        datasets[dataset] = summary

    def by(key: str) -> dict[str, dict]:
        groups: dict[str, list[str]] = defaultdict(list)
        for d, s in datasets.items():
            if s["median"] is not None:
                groups[s[key]].append(d)
        return {
            g: {
                "mean": statistics.fmean(datasets[d]["median"] for d in ds),
                "median": float(statistics.median(datasets[d]["median"] for d in ds)),
                "datasets": sorted(ds),
            }
            for g, ds in sorted(groups.items())
        }

    return {
        "templates": {d: dict(rows) for d, rows in per_template.items()},
        "datasets": datasets,
        "clusters": by("cluster"),
        "languages": by("language"),
    }


def flatten_for_logging(results: Mapping) -> dict[str, float]:
    """Flat metric dict for loggers: ``eval/<dataset>/<template>/<metric>``, ``eval/<dataset>/median``, ..."""
    flat: dict[str, float] = {}
    for dataset, rows in results["templates"].items():
        for template, row in rows.items():
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("score",):
                    flat[f"eval/{dataset}/{template}/{key}"] = float(value)
    for dataset, s in results["datasets"].items():
        for key in ("median", "mean", "min", "max"):
            if s[key] is not None:
                flat[f"eval/{dataset}/{key}"] = float(s[key])
        if "length_normalized" in s and s["length_normalized"]["median"] is not None:
            flat[f"eval/{dataset}/length_normalized_median"] = float(s["length_normalized"]["median"])
    for section, prefix in (("clusters", "cluster"), ("languages", "language")):
        for name, s in results.get(section, {}).items():
            flat[f"eval/{prefix}/{name}/mean"] = float(s["mean"])
    return flat


def write_results(path: str | os.PathLike, results: Mapping) -> Path:
    """Write one evaluation's results as JSON (atomically: temp file then rename). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def _fmt(value, pct: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:6.2f}" if pct else f"{value:6.2f}"


def format_results_table(results: Mapping) -> str:
    """A fixed-width table: one line per template, then one summary line per dataset.

    Accuracy-like values are shown in percent; "chance" is 100 / num_choices averaged over the
    template's examples, so a random model's numbers can be judged at a glance.
    """
    head = (
        f"{'dataset':<28} {'template':<36} {'n':>5} {'skip':>5} {'metric':<12} "
        f"{'score':>7} {'len-norm':>8} {'chance':>7}"
    )
    lines = [head, "-" * len(head)]
    for dataset in sorted(results["templates"]):
        for template in sorted(results["templates"][dataset]):
            r = results["templates"][dataset][template]
            pct = r["metric"] != "bleu"
            lines.append(
                f"{dataset[:28]:<28} {template[:36]:<36} {r['n']:>5} {r['num_skipped']:>5} {r['metric'][:12]:<12} "
                f"{_fmt(r.get('score'), pct):>7} {_fmt(r.get('accuracy_length_normalized')):>8} "
                f"{_fmt(r.get('chance')):>7}"
            )
    lines.append("-" * len(head))
    for dataset in sorted(results["datasets"]):
        s = results["datasets"][dataset]
        ln = s.get("length_normalized", {}).get("median")
        lines.append(
            f"{dataset[:28]:<28} {'median over ' + str(s['num_templates']) + ' templates':<36} "
            f"min {_fmt(s['min'])} mean {_fmt(s['mean'])} max {_fmt(s['max'])}  median {_fmt(s['median'])}"
            f"  len-norm median {_fmt(ln)}  [{s['cluster']}, {s['language']}]"
        )
    for section in ("clusters", "languages"):
        for name, s in results.get(section, {}).items():
            lines.append(
                f"{section[:-1]} {name}: mean of dataset medians {_fmt(s['mean'])} ({len(s['datasets'])} datasets)"
            )
    return "\n".join(lines)
