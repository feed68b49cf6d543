"""Split an eval mixture into one shard per (task, template) and merge the shards' results.

Used by ``scripts/slurm/eval.sbatch`` (one Slurm array element per shard, BLOOMZ style) and
``scripts/slurm/merge_eval.sh``::

    python scripts/eval_shards.py count data_mixtures/demo_eval.yaml            # -> 12
    python scripts/eval_shards.py list data_mixtures/demo_eval.yaml             # index, task, dataset, template
    python scripts/eval_shards.py write data_mixtures/demo_eval.yaml 3 shard.yaml
    python scripts/eval_shards.py merge data_mixtures/demo_eval.yaml out/results.json out/shards/*.json

A shard file is a task file with the shard's task only, restricted to one template (``templates.names``),
every path made absolute and the mixture's ``eval:`` section copied, so ``mtf eval --mixture shard.yaml``
scores exactly that (dataset, template). Merging re-runs the T0 aggregation (per-dataset medians, cluster
and language means) over all shards' template rows, so the merged JSON has the layout of one ``mtf eval
--json`` over the whole mixture.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from train.errors import EXIT_USER_ERROR, ConfigError, UserError  # noqa: E402


def shards(mixture: str) -> list[dict]:
    """The (task, template) shards of an eval mixture, in a stable order (file order, template file order).

    Returns:
        [{"index", "task", "dataset", "template"}, ...].

    Raises:
        ConfigError / TemplateError: the mixture or a template file does not load.
    """
    from train.tasks import load_task_file

    task_file = load_task_file(mixture)
    out = []
    for task in task_file.tasks.values():
        for template in task.select_templates():
            out.append({"index": len(out), "task": task.name, "dataset": task.metadata.dataset,
                        "template": template.name})
    return out


def _task_dict(task: Any, template: str) -> dict:
    """A task of train.tasks as the YAML that defines it, with absolute paths and one template."""
    src = task.source
    source: dict[str, Any] = {"type": src.type}
    if src.type == "hub":
        source.update(path=src.path, name=src.name)
    else:
        source["data_files"] = {split: list(files) for split, files in src.data_files.items()}
        if src.fields:
            source["fields"] = list(src.fields)
        if src.join is not None:
            source["join"] = {"type": src.join.type, "data_files": list(src.join.data_files), "key": src.join.on}
    sel = task.templates
    templates = {"file": sel.file, "names": [template], "original_task": sel.original_task,
                 "choices_in_prompt": sel.choices_in_prompt,
                 "languages": list(sel.languages) if sel.languages is not None else None}
    meta = task.metadata
    return {"name": task.name, "source": source, "split": task.split,
            "preprocessors": [{"name": p.name, "args": dict(p.args)} for p in task.preprocessors],
            "templates": templates,
            "metadata": {"dataset": meta.dataset, "cluster": meta.cluster, "language": meta.language}}


def write_shard(mixture: str, index: int, out: str | Path) -> dict:
    """Write shard ``index`` of ``mixture`` as a task file at ``out``. Returns the shard's description.

    Raises:
        ConfigError: ``index`` is not a shard of the mixture (the message gives the valid range).
    """
    from train.tasks import load_task_file

    all_shards = shards(mixture)
    if not 0 <= index < len(all_shards):
        raise ConfigError(f"{mixture} has {len(all_shards)} (task, template) shards; index {index} is out of range "
                          f"(submit the array as --array=0-{len(all_shards) - 1})")
    shard = all_shards[index]
    task_file = load_task_file(mixture)
    doc: dict[str, Any] = {"tasks": [_task_dict(task_file.tasks[shard["task"]], shard["template"])]}
    if "eval" in task_file.sections:
        doc["eval"] = task_file.sections["eval"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Shard {index} of {len(all_shards)} of {Path(mixture).resolve()}: task {shard['task']}, "
              f"template {shard['template']!r} (written by scripts/eval_shards.py)\n")
    out.write_text(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return shard


def merge(mixture: Optional[str], shard_results: list[dict]) -> dict:
    """Merge the results of ``mtf eval`` on each shard into the results of the whole mixture.

    Args:
        mixture: the eval mixture; when given, every one of its shards must be present exactly once.
        shard_results: the JSON documents written by ``mtf eval --output`` for the shards.

    Returns:
        The aggregated results (``templates``, ``datasets``, ``clusters``, ``languages``, ``meta``).

    Raises:
        ConfigError: a shard is missing or present twice.
    """
    from train.evaluation import aggregate

    per_template: dict[str, dict[str, dict]] = {}
    cluster_of: dict[str, str] = {}
    language_of: dict[str, str] = {}
    for result in shard_results:
        for dataset, rows in result["templates"].items():
            for template, row in rows.items():
                if template in per_template.get(dataset, {}):
                    raise ConfigError(f"shard results contain ({dataset}, {template}) twice; merge each shard once")
                per_template.setdefault(dataset, {})[template] = row
        for dataset, summary in result.get("datasets", {}).items():
            cluster_of[dataset] = summary.get("cluster", "other")
            language_of[dataset] = summary.get("language", "en")
    if mixture is not None:
        expected = {(s["dataset"], s["template"]) for s in shards(mixture)}
        got = {(d, t) for d, rows in per_template.items() for t in rows}
        if got != expected:
            missing = sorted(expected - got)
            extra = sorted(got - expected)
            raise ConfigError(f"shard results do not cover {mixture}: missing {missing or 'none'}, "
                              f"not in the mixture {extra or 'none'}; rerun the failed array elements")
    # sort for a stable file whatever order the shards finished in
    per_template = {d: dict(sorted(rows.items())) for d, rows in sorted(per_template.items())}
    merged = aggregate(per_template, cluster_of, language_of)
    metas = [r["meta"] for r in shard_results if isinstance(r.get("meta"), dict)]
    meta: dict[str, Any] = {"shards": len(shard_results)}
    if metas:
        meta.update({k: v for k, v in metas[0].items() if all(m.get(k) == v for m in metas)})
        if all(isinstance(m.get("num_examples"), int) for m in metas):
            meta["num_examples"] = sum(m["num_examples"] for m in metas)
    merged["meta"] = meta
    return merged


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("count", help="number of (task, template) shards")
    p.add_argument("mixture")
    p = sub.add_parser("list", help="the shards, one per line: index, task, dataset, template (tab-separated)")
    p.add_argument("mixture")
    p = sub.add_parser("write", help="write one shard's task file")
    p.add_argument("mixture")
    p.add_argument("index", type=int)
    p.add_argument("out")
    p = sub.add_parser("merge", help="merge shard result JSONs into one results JSON")
    p.add_argument("mixture", help="the eval mixture (checks that every shard is present)")
    p.add_argument("out")
    p.add_argument("shards", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "count":
            print(len(shards(args.mixture)))
        elif args.command == "list":
            for s in shards(args.mixture):
                print(f"{s['index']}\t{s['task']}\t{s['dataset']}\t{s['template']}")
        elif args.command == "write":
            s = write_shard(args.mixture, args.index, args.out)
            print(f"shard {s['index']}: {s['dataset']} / {s['template']} -> {args.out}")
        else:
            from train.evaluation import format_results_table, write_results

            results = merge(args.mixture, [json.loads(Path(f).read_text()) for f in args.shards])
            write_results(args.out, results)
            print(format_results_table(results))
            print(f"\nmerged {len(args.shards)} shards -> {args.out}")
    except UserError as err:
        print(f"eval_shards.py {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
