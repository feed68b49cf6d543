"""Zero-shot results: aggregation under the T0 or the T-Few protocol, the results JSON and the printed table.

Two protocols (``protocol``), both from the per-(dataset, template) rows that
:mod:`train.evaluation.evaluator` produces:

* ``t0`` (the T0 paper): per (dataset, template) accuracy or metric; per dataset the median (the headline
  number), mean, min and max over templates.
* ``tfew`` (the T-Few paper): per dataset and seed, every example is scored with ONE template drawn at
  random among the rank-classification templates that rendered it, and the accuracy is taken over the
  examples; the headline is the median over ``protocol_seeds`` seeds (mean, min and max over seeds
  too). It needs each example's correctness, which rank-classification rows keep under ``per_example``
  (``{task: {ids, correct, correct_length_normalized}}``; an example is ``(task, example_index)``).
  Seed ``s`` draws ``numpy.random.Generator(PCG64(s)).integers(0, counts)`` over the dataset's examples
  in sorted ``(task, example_index)`` order, ``counts`` being each example's number of templates (sorted
  by name). Datasets with generation templates only have no T-Few score.

With ``length_normalized`` the length-normalised rank-classification accuracy (T-Few's scoring) is every
rank-classification template's score instead of the summed log-probability one (T0's). Per task cluster
and per language: the mean of the dataset headlines. ``mtf eval-merge`` re-runs :func:`aggregate` over the
rows of several shards. The results JSON names the protocol (``protocol``), and so does the table.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from train.errors import ConfigError, DataError

PROTOCOLS = ("t0", "tfew")
DEFAULT_PROTOCOL_SEEDS = 5  # T-Few reports the median over 5 seeds
_DESCRIPTIONS = {
    "t0": "per dataset, the median over templates of each template's {score}",
    "tfew": "per dataset, the median over {seeds} seeds of the {score} when each example is scored with one "
            "template drawn at random",
}


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


def check_protocol(protocol: str, seeds: int) -> None:
    """Raises ConfigError for an unknown protocol or fewer than one seed."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown evaluation protocol {protocol!r}; valid: {', '.join(PROTOCOLS)} "
                          "(t0: median over templates; tfew: median over seeds of one random template per example).")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"the number of protocol seeds must be an int >= 1, got {seeds!r}.")


def describe_protocol(protocol: str, seeds: int, length_normalized: bool) -> dict:
    """The ``protocol`` entry of a results document: name, seeds, scoring and a one-line description."""
    score = "length-normalised accuracy" if length_normalized else "accuracy (or metric)"
    return {"name": protocol, "seeds": seeds if protocol == "tfew" else None, "length_normalized": length_normalized,
            "description": _DESCRIPTIONS[protocol].format(seeds=seeds, score=score)}


def _with_score(row: Mapping, length_normalized: bool) -> dict:
    """A copy of ``row`` whose "score" is its headline under the scoring option (rank rows: which accuracy)."""
    out = dict(row)
    if out.get("metric") == "accuracy" and "accuracy_length_normalized" in out:  # rank classification
        out["score"] = out["accuracy_length_normalized"] if length_normalized else out.get("accuracy")
    return out


def tfew_choices(counts: Sequence[int], seed: int):
    """(n,) template position chosen for each example: ``Generator(PCG64(seed)).integers(0, counts)``."""
    import numpy as np

    return np.random.Generator(np.random.PCG64(seed)).integers(0, np.asarray(counts, dtype=np.int64))


def tfew_scores(rows: Mapping[str, Mapping], seeds: int, length_normalized: bool = False) -> dict | None:
    """T-Few's score of one dataset from its template rows (see the module docstring).

    Args:
        rows: {template: row}; rows with ``per_example`` take part (rank classification).
        seeds: seeds 0..seeds-1.
        length_normalized: use ``correct_length_normalized``.

    Returns:
        {"seed_scores": [per seed], "num_examples", "num_templates"}, or None when no row has per_example.

    Raises:
        DataError: a row's per_example lists differ in length.
    """
    key = "correct_length_normalized" if length_normalized else "correct"
    table: dict[tuple[str, int], dict[str, int]] = defaultdict(dict)  # (task, example_index) -> template -> 0|1
    templates = set()
    for template, row in rows.items():
        for task, entry in (row.get("per_example") or {}).items():
            if len(entry["ids"]) != len(entry[key]):
                raise DataError(f"template {template!r}, task {task!r}: per_example ids and {key} differ in length; "
                                "the results file is damaged (re-evaluate that template).")
            templates.add(template)
            for example, correct in zip(entry["ids"], entry[key]):
                table[(str(task), int(example))][template] = int(correct)
    if not table:
        return None
    examples = sorted(table)
    options = [[table[e][t] for t in sorted(table[e])] for e in examples]  # correctness per template, by name
    counts = [len(o) for o in options]
    seed_scores = []
    for seed in range(seeds):
        picks = tfew_choices(counts, seed)
        seed_scores.append(sum(o[int(p)] for o, p in zip(options, picks)) / len(options))
    return {"seed_scores": seed_scores, "num_examples": len(examples), "num_templates": len(templates)}


def aggregate(
    per_template: Mapping[str, Mapping[str, Mapping]],
    cluster_of: Mapping[str, str] | None = None,
    language_of: Mapping[str, str] | None = None,
    *,
    protocol: str = "t0",
    protocol_seeds: int = DEFAULT_PROTOCOL_SEEDS,
    length_normalized: bool = False,
) -> dict:
    """Aggregate per-template rows under the T0 or T-Few protocol (see the module docstring).

    Args:
        per_template: {dataset: {template: row}}; a row has "metric", "score" (its primary metric, None when
            nothing was scored), optionally "accuracy", "accuracy_length_normalized" and "per_example".
        cluster_of / language_of: dataset -> cluster / language.
        protocol: "t0" or "tfew"; protocol_seeds: T-Few's seeds 0..N-1.
        length_normalized: rank-classification rows score with their length-normalised accuracy.

    Returns:
        {"protocol": {name, seeds, length_normalized, description}, "templates": per_template (each row's
        "score" set by ``length_normalized``), "datasets": {dataset: {median, mean, min, max, num_templates,
        protocol, length_normalized: {...}, cluster, language; tfew adds num_seeds, seed_scores,
        num_examples and t0_median}}, "clusters": {c: {mean, median, datasets}}, "languages": {l: {...}}};
        cluster and language values average the dataset medians.

    Raises:
        ConfigError: an unknown protocol or seeds < 1.
    """
    check_protocol(protocol, protocol_seeds)
    cluster_of, language_of = dict(cluster_of or {}), dict(language_of or {})
    per_template = {d: {t: _with_score(r, length_normalized) for t, r in rows.items()}
                    for d, rows in per_template.items()}
    datasets: dict[str, dict] = {}
    for dataset, rows in per_template.items():
        summary = _summary([r.get("score") for r in rows.values()])
        if protocol == "tfew":
            tfew = tfew_scores(rows, protocol_seeds, length_normalized)
            t0_median, num_templates = summary["median"], summary["num_templates"]
            summary = _summary(tfew["seed_scores"] if tfew else [])
            summary.update(num_templates=tfew["num_templates"] if tfew else 0, num_seeds=protocol_seeds,
                           seed_scores=tfew["seed_scores"] if tfew else [],
                           num_examples=tfew["num_examples"] if tfew else 0, t0_median=t0_median)
            if tfew is None and num_templates:
                summary["note"] = "no T-Few score: no rank-classification template (tfew needs per-example accuracy)"
        summary["protocol"] = protocol
        ln = [r.get("accuracy_length_normalized") for r in rows.values()]
        if any(v is not None for v in ln):
            summary["length_normalized"] = _summary(ln)
        summary["cluster"] = cluster_of.get(dataset, "other")
        summary["language"] = language_of.get(dataset, "en")
        summary["prompts"] = prompts_of(dataset)
        datasets[dataset] = summary

    def by(key: str) -> dict[str, dict]:
        groups: dict[str, list[str]] = defaultdict(list)
        for d, s in datasets.items():
            if s["median"] is None or s[key] is None:
                continue
            # a language under a prompt setting is its own group (sw@mt, sw@en), as BLOOMZ reports them
            groups[s[key] if key == "prompts" or s["prompts"] is None else f"{s[key]}@{s['prompts']}"].append(d)
        return {
            g: {
                "mean": statistics.fmean(datasets[d]["median"] for d in ds),
                "median": float(statistics.median(datasets[d]["median"] for d in ds)),
                "datasets": sorted(ds),
            }
            for g, ds in sorted(groups.items())
        }

    return {
        "protocol": describe_protocol(protocol, protocol_seeds, length_normalized),
        "templates": per_template,
        "datasets": datasets,
        "clusters": by("cluster"),
        "languages": by("language"),
        **({"prompt_settings": by("prompts")} if any(s["prompts"] for s in datasets.values()) else {}),
    }


def prompts_of(group: str) -> str | None:
    """The prompt setting of an eval group ``dataset@prompts`` (:attr:`TaskMetadata.eval_group`), or None."""
    return group.partition("@")[2] or None


def flatten_for_logging(results: Mapping) -> dict[str, float]:
    """Flat metric dict for loggers: ``eval/<dataset>/<template>/<metric>``, ``eval/<dataset>/median``, ..."""
    flat: dict[str, float] = {}
    for dataset, rows in results["templates"].items():
        for template, row in rows.items():
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("score",):
                    flat[f"eval/{dataset}/{template}/{key}"] = float(value)
    for dataset, s in results["datasets"].items():
        for key in ("median", "mean", "min", "max", "t0_median"):
            if s.get(key) is not None:
                flat[f"eval/{dataset}/{key}"] = float(s[key])
        if "length_normalized" in s and s["length_normalized"]["median"] is not None:
            flat[f"eval/{dataset}/length_normalized_median"] = float(s["length_normalized"]["median"])
    for section, prefix in (("clusters", "cluster"), ("languages", "language"), ("prompt_settings", "prompts")):
        for name, s in results.get(section, {}).items():
            flat[f"eval/{prefix}/{name}/mean"] = float(s["mean"])
    return flat


# A JSON array of scalars as json.dumps(indent=2) lays it out: one element per line. JSON strings cannot hold
# a raw newline, so "[" + newline and newline + "]" only occur as structure.
_SCALAR_ARRAY = re.compile(r"\[\n\s+([^\[\]{}\n]*(?:,\n\s+[^\[\]{}\n]*)*)\n\s*\]")


def dumps_results(results: Mapping) -> str:
    """Indented JSON with arrays of scalars on one line (``per_example`` lists stay one line each)."""
    text = json.dumps(results, indent=2, sort_keys=True)
    return _SCALAR_ARRAY.sub(lambda m: "[" + re.sub(r",\n\s+", ", ", m.group(1)) + "]", text)


def write_results(path: str | os.PathLike, results: Mapping) -> Path:
    """Write one evaluation's results as JSON (atomically: temp file then rename). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps_results(results) + "\n")
    os.replace(tmp, path)
    return path


def _fmt(value, pct: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:6.2f}" if pct else f"{value:6.2f}"


def scoring_line(scoring: Mapping | None) -> str:
    """One line naming the scoring convention: choice eos, separator, tokenization and the prompt set."""
    if not scoring:  # results written before the convention was recorded: they used T0's
        return "scoring t0 (not recorded in this file; files of that age all used it)"
    tokenization = ("prompt and choice tokenized together, then split" if scoring.get("joint_tokenization")
                    else "prompt and choice tokenized apart")
    specials = "tokenizer's special tokens" if scoring.get("tokenizer_special_tokens") else "this stack's eos layout"
    prompts = scoring.get("prompts") or {}
    files = f"; prompts: {len(prompts)} template files ({', '.join(sorted(prompts)[:3])}{', ...' if len(prompts) > 3 else ''})" \
        if prompts else ""
    return (f"scoring {scoring['name']}: choices {'end with eos' if scoring.get('choice_eos') else 'without eos'}, "
            f"separator {scoring.get('choice_separator')!r}, {tokenization}, {specials}{files}")


def language_grid(results: Mapping, zero_shot: Sequence[str] = ()) -> list[str]:
    """Per language (rows) and prompt setting (columns): the mean of the dataset medians, BLOOMZ's XCOPA table.

    Empty when no eval group has a prompt setting. ``zero_shot``: languages marked as never trained on.
    """
    settings = list(results.get("prompt_settings") or {})
    if not settings:
        return []
    cells: dict[str, dict[str, float]] = defaultdict(dict)
    for name, s in results["languages"].items():
        language, _, setting = name.partition("@")
        if setting:  # groups without a prompt setting keep their own line above
            cells[language][setting] = s["mean"]
    zero_shot = set(zero_shot or results.get("zero_shot_languages") or ())
    head = f"{'language':<10}" + "".join(f"{setting + ' prompts':>14}" for setting in settings) + \
        ("  zero-shot" if zero_shot else "")
    lines = ["", "per language, mean of dataset medians (each dataset: median over its templates)", head,
             "-" * len(head)]
    for language in sorted(cells):
        row = "".join(f"{_fmt(cells[language].get(setting)):>14}" for setting in settings)
        lines.append(f"{language:<10}{row}" + (("  yes" if language in zero_shot else "  no") if zero_shot else ""))
    medians = "".join(f"{_fmt(results['prompt_settings'][setting]['median']):>14}" for setting in settings)
    lines += ["-" * len(head), f"{'median':<10}{medians}"]
    return lines


def format_results_table(results: Mapping) -> str:
    """A fixed-width table: one line per template, then one summary line per dataset.

    Accuracy-like values are shown in percent; "chance" is 100 / num_choices averaged over the
    template's examples, so a random model's numbers can be judged at a glance.
    """
    head = (
        f"{'dataset':<28} {'template':<36} {'n':>5} {'skip':>5} {'metric':<12} "
        f"{'score':>7} {'len-norm':>8} {'chance':>7}"
    )
    lines = [scoring_line(results.get("scoring")), head, "-" * len(head)]
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
        if s.get("protocol") == "tfew":
            over = f"tfew: median over {s['num_seeds']} seeds"
            extra = f"  t0 median {_fmt(s.get('t0_median'))}  ({s['num_templates']} templates, {s['num_examples']} ex)"
        else:
            over, extra = f"median over {s['num_templates']} templates", f"  len-norm median {_fmt(ln)}"
        lines.append(
            f"{dataset[:28]:<28} {over:<36} "
            f"min {_fmt(s['min'])} mean {_fmt(s['mean'])} max {_fmt(s['max'])}  median {_fmt(s['median'])}"
            f"{extra}  [{s['cluster']}, {s['language']}" + (f", {s['prompts']} prompts" if s.get("prompts") else "")
            + "]" + (f"  ({s['note']})" if s.get("note") else "")
        )
    grid = language_grid(results)
    for section in ("clusters", "languages", "prompt_settings"):
        for name, s in results.get(section, {}).items():
            if grid and section == "languages" and "@" in name:
                continue  # the grid below shows them
            lines.append(
                f"{section[:-1].replace('_', ' ')} {name}: mean of dataset medians {_fmt(s['mean'])} "
                f"({len(s['datasets'])} datasets)"
            )
    lines.extend(grid)
    protocol = results.get("protocol") or describe_protocol("t0", DEFAULT_PROTOCOL_SEEDS, False)  # older files
    scoring = "mean token log-probability (length-normalised)" if protocol.get("length_normalized") else \
        "summed log-probability"
    lines.append(f"protocol {protocol['name']}: {protocol['description']}; score = rank classification by {scoring}")
    return "\n".join(lines)
