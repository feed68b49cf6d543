"""Merging experts against multitask training, on the learning check's tasks (issue "Merging experts", parts 2-3).

Data: the learning check's split (``scripts/learning_check.py``: AG News, TREC coarse, Rotten Tomatoes from
``../shared/data``, 500 held-back rows per task, the same tasks and templates), and on top of it a VALIDATION
split carved out of each task's training rows before any run (``--validation-rows``, 150 by default; training
rows whose text also occurs among them are removed too). The three row sets of every task are disjoint by
normalised text; the script asserts it and records the counts. The validation rows only choose the merge
parameters; the held-back rows only score the final models.

Stages (each step one ``mtf`` command, run in this process unless ``--subprocess``; the learning check's small
T5 and ``configs/merge_check.yaml``):

1. ``base``: a short multitask run from scratch on the three tasks' training rows (``--base-steps``), so the
   experts start from a model that already knows the prompt format;
2. ``experts``: one finetune per task from ``<out>/base/final`` on that task's training rows (``--steps`` each);
   ``multitask``: the same finetune on the mixture of all three for the experts' total steps (3 x ``--steps``);
3. ``grid``: for each method (linear averaging, task arithmetic, TIES, DARE + linear, DARE + TIES), ``mtf merge``
   of the three experts over the base at every point of a small grid of ``lambda`` / ``density`` /
   ``drop_rate`` (``GRID``), each merged model scored by ``mtf eval`` on the validation rows (capped per
   template); the point with the best mean over tasks of the per-task median over templates is chosen (the
   first in grid order on a tie);
4. ``eval``: the merge YAML of each method with its chosen values is written to ``<out>/merges/<method>.yaml``
   and merged into ``<out>/merged_<method>`` (its ``merge_record.json`` records the resolved parameters); the
   base, every expert, the multitask model and every merged model are scored by ``mtf eval`` on every task's
   held-back rows: rank classification, median accuracy over templates, as the learning check does.

Usage::

    python scripts/merge_check.py [--out runs/merge_check] [--write-benchmarks BENCHMARKS.md]
    python scripts/merge_check.py --skip-training          # re-use base/experts/multitask: grid + eval again
    python scripts/merge_check.py --only eval              # re-use the chosen values too: re-merge, re-score
    python scripts/merge_check.py --tables-only --write-benchmarks BENCHMARKS.md   # run nothing
    python scripts/merge_check.py --smoke --out /tmp/mc    # a tiny version of every stage (about a minute)
    make merge-check

The defaults (200 base steps, 150 per expert, 450 multitask, a 23-point grid scored on 50 validation rows per
template, all held-back rows scored) should take about 27 minutes on 2 quiet CPU cores, 40 on busy ones: 1,100
training steps at the learning check's 0.71 s a step (13 min) plus ~2 min of data and model set-up, 23 merges
and validation evals (~9 s each, 3.5 min), 10 held-back evals of 11,000 examples (~47 s each, 8 min). Prints one
JSON object (also written to ``<out>/results.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # benchmarks_md
import benchmarks_md  # noqa: E402
SHARED = REPO.parent / "shared" / "data"
CONFIG = "configs/merge_check.yaml"
BEGIN, END = "<!-- merge_check:begin -->", "<!-- merge_check:end -->"
STAGES = ("base", "experts", "multitask", "grid", "eval")
METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
SPLITS = ("train", "validation", "eval")
SUBPROCESS = False  # --subprocess: every mtf command in a fresh process (see _mtf)
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
       "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}  # what the learning check's runner sets for its processes


def _learning_check():
    """The learning check's module: its split, its task YAML and its ``mtf`` runner are reused as they are."""
    spec = importlib.util.spec_from_file_location("learning_check", REPO / "scripts" / "learning_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lc = _learning_check()
TASKS = tuple(lc.CHANCE)
TEXT = {"ag_news": lc._ag_text, "trec": lambda r: r["text"], "rotten_tomatoes": lambda r: r["text"]}

# The parameter grid of each method (merge_config.USES says which parameters a method reads). Task arithmetic
# and DARE + linear sum the three task vectors (normalize_weights is false), so lambda = 1/3 would be the
# average; TIES and DARE + TIES take a disjoint mean, so lambda = 1 keeps the experts' scale.
GRID: dict[str, list[dict]] = {
    "linear": [{}],
    "task_arithmetic": [{"lambda": lam} for lam in (0.3, 0.5, 0.7, 1.0)],
    "ties": [{"lambda": lam, "density": d} for d in (0.2, 0.5) for lam in (0.7, 1.0, 1.5)],
    "dare_linear": [{"lambda": lam, "drop_rate": p} for p in (0.5, 0.9) for lam in (0.3, 0.5, 1.0)],
    "dare_ties": [{"lambda": lam, "drop_rate": p} for p in (0.5, 0.9) for lam in (0.7, 1.0, 1.5)],
}
SMOKE_GRID: dict[str, list[dict]] = {
    "linear": [{}], "task_arithmetic": [{"lambda": 0.5}], "ties": [{"lambda": 1.0, "density": 0.5}],
    "dare_linear": [{"lambda": 0.5, "drop_rate": 0.5}], "dare_ties": [{"lambda": 1.0, "drop_rate": 0.5}],
}
# Finetuning from the base (experts and multitask alike): a third of the base's learning rate, so the experts
# stay near the base, whose differences from it are what the merge adds.
FINETUNE_LR = 1e-3
# --smoke: every stage, on a few dozen rows per task and a few steps per run.
SMOKE = {"base_steps": 6, "steps": 4, "validation_rows": 16, "max_train_rows": 48, "max_eval_rows": 16,
         "validation_max_examples": 8, "eval_max_examples": 8}
SMOKE_TRAIN = ["trainer.global_batch_size=8"]  # half the rows per step: the smoke run checks the plumbing only


# ----------------------------------------------------------------------------------------- the data


def split_rows(shared: Path, seed: int, held_back: int, validation: int, max_train_rows: int | None = None,
               max_eval_rows: int | None = None) -> dict[str, dict]:
    """Per task: ``train``, ``validation`` and ``eval`` raw rows, disjoint by normalised text.

    ``eval`` is the learning check's held-back split (its first ``max_eval_rows`` rows when given);
    ``validation`` is ``validation`` rows drawn with the seed from the learning check's training rows, and
    ``train`` the rest of them, less any row whose text also occurs in ``validation`` (counted in
    ``removed_validation_overlap``), cut to ``max_train_rows`` when given.
    """
    rows = lc.split_rows(shared, seed, held_back)
    rng = random.Random(seed)
    out = {}
    for task, parts in rows.items():
        text = TEXT[task]
        pool = list(parts["train"])
        rng.shuffle(pool)
        val = pool[:validation]
        val_keys = {lc._key(text(r)) for r in val}
        rest = pool[validation:]
        train = [r for r in rest if lc._key(text(r)) not in val_keys]
        out[task] = {"train": train[:max_train_rows] if max_train_rows else train, "validation": val,
                     "eval": parts["eval"][:max_eval_rows] if max_eval_rows else parts["eval"],
                     "removed_overlap": parts["removed_overlap"], "removed_validation_overlap": len(rest) - len(train)}
    overlaps = row_overlaps(out)
    assert not any(n for pairs in overlaps.values() for n in pairs.values()), overlaps
    return out


def row_overlaps(rows: dict[str, dict]) -> dict[str, dict[str, int]]:
    """Per task, the number of normalised texts shared by each pair of splits (all zero after split_rows)."""
    out = {}
    for task, parts in rows.items():
        keys = {s: {lc._key(TEXT[task](r)) for r in parts[s]} for s in SPLITS}
        out[task] = {f"{a}&{b}": len(keys[a] & keys[b])
                     for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:]}
    return out


def write_mixtures(work: Path, rows: dict[str, dict]) -> dict[str, Path]:
    """Write the split rows and the mixtures under ``work/data``.

    Returns:
        ``{"train": all three tasks, "train.<task>": one task each, "validation": ..., "eval": ...}`` paths.
    """
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    blocks: dict[str, list[str]] = {s: [] for s in SPLITS}
    paths = {}
    for task, parts in rows.items():
        for split in SPLITS:
            path = data / f"{task}.{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in parts[split]), encoding="utf-8")
            blocks[split].append(lc._task_yaml(task, path, "test" if split == "eval" else split))
        paths[f"train.{task}"] = data / f"train.{task}.yaml"
        paths[f"train.{task}"].write_text(
            "# written by scripts/merge_check.py\ntasks:" + blocks["train"][-1]
            + f"\nmixture:\n  rate: {{type: examples_proportional, maximum: 500000}}\n  members: [{task}]\n",
            encoding="utf-8")
    paths["train"] = data / "train.yaml"
    paths["train"].write_text("# written by scripts/merge_check.py\ntasks:" + "".join(blocks["train"])
                              + "\nmixture:\n  rate: {type: examples_proportional, maximum: 500000}\n"
                              f"  members: [{', '.join(rows)}]\n", encoding="utf-8")
    for split in ("validation", "eval"):
        # Same datasets as training, disjoint rows: an in-distribution check, so no held_out list.
        paths[split] = data / f"{split}.yaml"
        paths[split].write_text("# written by scripts/merge_check.py\ntasks:" + "".join(blocks[split])
                                + "\neval:\n  held_out: []\n", encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------------------- the runs


def _mtf(what: str, args: list[str], log: Path) -> float:
    """``mtf ARGS`` with its output in ``log``; its wall seconds. Stops the script on a non-zero exit.

    By default the command runs in this process (``train.cli.main``, the entry point of ``mtf``, with stdout
    and stderr sent to ``log`` at the file-descriptor level): the imports cost about 8 s a command on 2
    busy cores, and the check runs ~45 commands. ``--subprocess`` (``SUBPROCESS``) runs each one in a fresh
    process instead, as the learning check does; a run's numbers are the same either way (its seeds are
    set by the command itself).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[merge_check] {what}: mtf {' '.join(args)}", file=sys.stderr, flush=True)
    if SUBPROCESS:
        code, seconds = lc.mtf(*args, log=log)
    else:
        from train.cli import main as mtf_main

        start = time.perf_counter()
        with _output_to(log):
            try:
                code = mtf_main(args)
            except SystemExit as stop:  # argparse's own errors
                code = stop.code if isinstance(stop.code, int) else 2
        seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{what}: mtf {args[0]} exited {code}; see {log}")
    return seconds


@contextlib.contextmanager
def _output_to(log: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C-level writes too) to ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log.open("w", encoding="utf-8") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def train_run(name: str, work: Path, mixture: Path, steps: int, overrides: list[str]) -> dict:
    """Train ``work/name`` with ``configs/merge_check.yaml`` for ``steps`` steps; its figures."""
    run_dir = work / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    args = ["train", CONFIG, f"run.output_dir={run_dir}", f"data.train_mixture={mixture}",
            f"trainer.max_steps={steps}", *overrides]
    seconds = _mtf(name, args, work / "logs" / f"{name}.log")
    return train_figures(run_dir, args[2:], seconds)


def train_figures(run_dir: Path, overrides: list[str], wall_seconds: float) -> dict:
    """A training run's figures, read from its run directory."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [m for m in metrics if "train/loss" in m][-1]
    return {"run_dir": _rel(run_dir), "overrides": overrides, "steps": last["step"],
            "examples_seen": last["examples_seen"], "tokens_seen": last["tokens_seen"],
            "final_train_loss": last["train/loss"], "wall_seconds": round(wall_seconds, 1)}


def scores(path: Path) -> dict:
    """An ``mtf eval`` result file -> per-task median over templates, their mean, min-max, templates, rows."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    acc = {t: doc["datasets"][t]["median"] for t in TASKS}
    return {"accuracy": acc, "mean": sum(acc.values()) / len(acc),
            "accuracy_min_max": {t: [doc["datasets"][t]["min"], doc["datasets"][t]["max"]] for t in TASKS},
            "templates": {t: len(doc["templates"][t]) for t in TASKS},
            "rows_per_template": {t: max(r["n"] for r in doc["templates"][t].values()) for t in TASKS}}


def evaluate(name: str, model: Path, mixture: Path, out: Path, max_examples: int | None, log: Path) -> dict:
    """``mtf eval`` of ``model`` on ``mixture`` (rank classification) into ``out``; its scores and wall time."""
    args = ["eval", str(model), "--mixture", str(mixture), "--batch-size", "64", "--output", str(out)]
    if max_examples:
        args += ["--max-examples-per-template", str(max_examples)]
    seconds = _mtf(name, args, log)
    return {**scores(out), "eval_seconds": round(seconds, 1)}


def label(params: dict) -> str:
    """A grid point's name: ``lambda=0.5,density=0.2``; ``defaults`` for none."""
    return ",".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def write_merge_yaml(path: Path, method: str, params: dict, base: Path, experts: list[Path], output_dir: Path,
                     chosen_by: dict | None = None) -> Path:
    """A merge config for ``mtf merge`` (the schema of configs/merges/*.yaml): the experts, weight 1 each;
    ``chosen_by`` (the grid search behind ``params``) is copied into the output's ``merge_record.json``."""
    doc = {"base_model": str(base), "models": [{"model": str(e), "weight": 1.0} for e in experts],
           "method": method, **({"parameters": dict(params)} if params else {}), "dtype": "float32",
           "output_dir": str(output_dir), "overwrite": True, **({"chosen_by": chosen_by} if chosen_by else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by scripts/merge_check.py\n" + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def merge(name: str, config: Path, log: Path) -> tuple[dict, float]:
    """``mtf merge CONFIG``; the resolved parameters its ``merge_record.json`` records, and its wall seconds."""
    seconds = _mtf(name, ["merge", str(config), "--json"], log)
    output_dir = Path(yaml.safe_load(config.read_text(encoding="utf-8"))["output_dir"])
    record = json.loads((output_dir / "merge_record.json").read_text(encoding="utf-8"))
    return record, seconds


def record_parameters(record: dict) -> dict:
    """The method parameters a ``merge_record.json`` holds: the ones the method reads, defaults filled in."""
    return record["parameters"]


def choose(points: list[dict]) -> dict:
    """The grid point with the best validation mean; the first in grid order on a tie."""
    return max(points, key=lambda p: (round(p["score"], 12), -points.index(p)))


def grid_search(method: str, grid: list[dict], work: Path, base: Path, experts: list[Path], validation: Path,
                max_examples: int | None) -> dict:
    """Merge and score on the validation rows every grid point of ``method``; the points and the one chosen.

    The merged models are deleted once scored (the chosen one is merged again by the eval stage).
    """
    folder = work / "grid" / method
    points = []
    for params in grid:
        name = f"{method}[{label(params)}]"
        out_dir = folder / label(params)
        config = write_merge_yaml(folder / f"{label(params)}.yaml", method, params, base, experts, out_dir)
        record, merge_seconds = merge(name, config, work / "logs" / "grid" / f"{method}.{label(params)}.merge.log")
        score = evaluate(name, out_dir, validation, folder / f"{label(params)}.json", max_examples,
                         work / "logs" / "grid" / f"{method}.{label(params)}.eval.log")
        shutil.rmtree(out_dir)
        points.append({"parameters": params, "resolved": record_parameters(record), "validation": score["accuracy"],
                       "score": score["mean"], "merge_seconds": round(merge_seconds, 1),
                       "eval_seconds": score["eval_seconds"]})
    best = choose(points)
    return {"points": points, "chosen": best["parameters"], "chosen_resolved": best["resolved"],
            "validation_score": best["score"]}


def run_all(args: argparse.Namespace) -> dict:
    shared = Path(args.shared)
    if not (shared / "tasks" / "ag_news").is_dir():
        raise SystemExit(f"the merge check reads real task data from {shared} (a development checkout's "
                         "../shared/data); it is not there. Pass --shared PATH.")
    lc.SHARED = shared  # the learning check's task YAML reads its templates from there
    started = time.perf_counter()
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    split = {"seed": args.seed, "held_back": args.held_back, "validation_rows": args.validation_rows,
             "max_train_rows": args.max_train_rows, "max_eval_rows": args.max_eval_rows}
    wanted = set(args.only or STAGES)
    results: dict = {}
    previous = work / "results.json"
    if wanted != set(STAGES) and previous.is_file():  # a partial rerun keeps what it does not redo
        results = json.loads(previous.read_text(encoding="utf-8"))
        if results.get("settings", {}).get("split") != split:
            raise SystemExit(f"{previous} was made from another split ({results.get('settings', {}).get('split')}); "
                             "rerun every stage (no --only / --skip-training) or pass the same row options.")
    rows = split_rows(shared, args.seed, args.held_back, args.validation_rows, args.max_train_rows,
                      args.max_eval_rows)
    mixtures = write_mixtures(work, rows)
    multitask_steps = args.multitask_steps or len(TASKS) * args.steps
    grid = SMOKE_GRID if args.smoke else GRID
    settings = {  # per stage: what it was run with (a partial rerun keeps the other stages' settings)
        "base": {"base_steps": args.base_steps},
        "experts": {"expert_steps": args.steps, "finetune_lr": FINETUNE_LR},
        "multitask": {"multitask_steps": multitask_steps, "finetune_lr": FINETUNE_LR},
        "grid": {"grid": grid, "validation_max_examples_per_template": args.validation_max_examples},
        "eval": {"eval_max_examples_per_template": args.eval_max_examples},
    }
    results.setdefault("settings", {}).update({"split": split, "smoke": args.smoke})
    for name in wanted:
        results["settings"].update(settings[name])
    results.update({
        "data": {t: {"train_rows": len(p["train"]), "validation_rows": len(p["validation"]),
                     "eval_rows": len(p["eval"]), "removed_overlap": p["removed_overlap"],
                     "removed_validation_overlap": p["removed_validation_overlap"]} for t, p in rows.items()},
        "overlaps": row_overlaps(rows), "chance": lc.CHANCE})
    for key in ("runs", "grid", "models", "wall_seconds"):
        results.setdefault(key, {})
    results.setdefault("commands", []).append(args.command)

    def save() -> None:  # after every step: a stopped script keeps what it measured
        previous.write_text(json.dumps(results, indent=2), encoding="utf-8")

    def stage(name: str, fn) -> None:
        if name in wanted:
            start = time.perf_counter()
            fn()
            results["wall_seconds"][name] = round(time.perf_counter() - start, 1)
            save()

    common = [f"trainer.seed={args.seed}", *(SMOKE_TRAIN if args.smoke else [])]
    finetune = [*common, f"optim.lr={FINETUNE_LR}", "model.config=null",
                f"model.name_or_path={work / 'base' / 'final'}"]

    def train_base() -> None:
        results["runs"]["base"] = train_run("base", work, mixtures["train"], args.base_steps,
                                            [*common, f"schedule.warmup_steps={min(50, args.base_steps // 4)}"])

    def train_experts() -> None:
        _need(work / "base" / "final", "base")
        for task in TASKS:
            warmup = f"schedule.warmup_steps={args.steps // 10}"
            results["runs"][f"expert_{task}"] = train_run(f"expert_{task}", work, mixtures[f"train.{task}"],
                                                          args.steps, finetune + [warmup])
            save()

    def train_multitask() -> None:
        _need(work / "base" / "final", "base")
        results["runs"]["multitask"] = train_run("multitask", work, mixtures["train"], multitask_steps,
                                                  finetune + [f"schedule.warmup_steps={multitask_steps // 10}"])

    experts = [work / f"expert_{t}" / "final" for t in TASKS]

    def search() -> None:
        _need(work / "base" / "final", "base")
        for path in experts:
            _need(path, "experts")
        for method in METHODS:
            results["grid"][method] = grid_search(method, grid[method], work, work / "base" / "final", experts,
                                                  mixtures["validation"], args.validation_max_examples)
            save()

    def score_all() -> None:
        models = {"base": work / "base" / "final", **{f"expert_{t}": e for t, e in zip(TASKS, experts)},
                  "multitask": work / "multitask" / "final"}
        for name, path in models.items():
            _need(path, "experts" if name.startswith("expert_") else name)
        for method in METHODS:
            if method not in results["grid"]:
                raise SystemExit(f"no chosen values for {method} in {previous}: run the grid stage first.")
            chosen = results["grid"][method]["chosen"]
            out_dir = work / f"merged_{method}"
            search = results["grid"][method]
            chosen_by = {"search": "grid", "split": "validation", "score": "mean over tasks of the median accuracy "
                         "over templates", "validation_max_examples_per_template": args.validation_max_examples,
                         "points": [{"parameters": p["parameters"], "validation": p["validation"], "score": p["score"]}
                                    for p in search.get("points", [])]}
            config = write_merge_yaml(work / "merges" / f"{method}.yaml", method, chosen, work / "base" / "final",
                                      experts, out_dir, chosen_by)
            record, seconds = merge(f"merged_{method}", config, work / "logs" / f"merged_{method}.merge.log")
            results["grid"][method]["merge_record_parameters"] = record_parameters(record)
            results["grid"][method]["merge_seconds"] = round(seconds, 1)
            models[f"merged_{method}"] = out_dir
        for name, path in models.items():
            results["models"][name] = {
                "path": _rel(path), **evaluate(name, path, mixtures["eval"], work / "eval" / f"{name}.json",
                                               args.eval_max_examples, work / "logs" / f"{name}.eval.log")}
            if name.startswith("merged_"):
                results["models"][name]["parameters"] = results["grid"][name[len("merged_"):]]["chosen"]
            save()
        results["summary"] = summary(results)

    stage("base", train_base)
    stage("experts", train_experts)
    stage("multitask", train_multitask)
    stage("grid", search)
    stage("eval", score_all)
    results["wall_seconds"]["this_call"] = round(time.perf_counter() - started, 1)
    save()
    return results


def _need(path: Path, stage: str) -> None:
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path} is missing: run the `{stage}` stage first (e.g. without --only / --skip-training).")


def recollect(work: Path, results: dict) -> dict:
    """Recompute every score from the eval result files under ``work`` (nothing is run)."""
    for name, model in results.get("models", {}).items():
        path = work / "eval" / f"{name}.json"
        if path.is_file():
            model.update(scores(path))
    for method, found in results.get("grid", {}).items():
        for point in found["points"]:
            path = work / "grid" / method / f"{label(point['parameters'])}.json"
            if path.is_file():
                s = scores(path)
                point["validation"], point["score"] = s["accuracy"], s["mean"]
        best = choose(found["points"])
        found["chosen"], found["validation_score"] = best["parameters"], best["score"]
    if results.get("models"):
        results["summary"] = summary(results)
    return results


# ----------------------------------------------------------------------------------------- the tables


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def _params(params: dict) -> str:
    names = {"lambda": "λ", "density": "density", "drop_rate": "drop"}
    return ", ".join(f"{names.get(k, k)}={v}" for k, v in params.items()) or f"weights 1/{len(TASKS)}"


def summary(results: dict) -> str:
    """Which merge won and by how much against linear averaging, overall and per task (from the numbers)."""
    models = results["models"]
    merged = {m: models[f"merged_{m}"] for m in METHODS if f"merged_{m}" in models}
    if "linear" not in merged:
        return ""
    avg = merged["linear"]
    best = max(merged, key=lambda m: (merged[m]["mean"], m == "linear"))
    chosen = results["grid"][best]["chosen"]
    if best == "linear":
        head = f"No method beat linear averaging on the mean over tasks ({_pct(avg['mean'])}%)" + _runner_up(merged, avg)
    else:
        head = (f"{best} ({_params(chosen)}) won on the mean over tasks: {_pct(merged[best]['mean'])}% against "
                f"{_pct(avg['mean'])}% for linear averaging ({_points(merged[best]['mean'] - avg['mean'])} points).")
    per_task = []
    for t in TASKS:
        top = max(merged, key=lambda m: (merged[m]["accuracy"][t], m == "linear"))
        gap = merged[top]["accuracy"][t] - avg["accuracy"][t]
        per_task.append(f"{t}: none beat averaging ({_pct(avg['accuracy'][t])}%)" if top == "linear" else
                        f"{t}: {top} {_pct(merged[top]['accuracy'][t])}% ({_points(gap)} points)")
    text = head + " Best merge per task, against averaging: " + "; ".join(per_task) + "."
    if "multitask" in models:
        gap = merged[best]["mean"] - models["multitask"]["mean"]
        text += (f" Multitask training on the same steps: {_pct(models['multitask']['mean'])}% mean "
                 f"({_points(-gap)} points against the best merge).")
    own = [models[f"expert_{t}"]["accuracy"][t] for t in TASKS if f"expert_{t}" in models]
    if len(own) == len(TASKS):
        text += (f" Each expert on its own task: {_pct(sum(own) / len(own))}% mean "
                 f"({_points(sum(own) / len(own) - merged[best]['mean'])} points against the best merge).")
    return text


def _runner_up(merged: dict, avg: dict) -> str:
    others = [m for m in merged if m != "linear"]
    if not others:
        return "."
    second = max(others, key=lambda m: merged[m]["mean"])
    return f"; the closest, {second}: {_points(merged[second]['mean'] - avg['mean'])} points."


def markdown(results: dict, machine: str, command: str) -> str:
    s, data, models, runs = results["settings"], results["data"], results["models"], results.get("runs", {})
    steps = {name: runs[name]["steps"] if name in runs else "?" for name in ("base", f"expert_{TASKS[0]}", "multitask")}
    expert = steps[f"expert_{TASKS[0]}"]
    lines = [BEGIN, "## Merging experts against multitask training (`scripts/merge_check.py`)", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {machine}, by `{command}`.",
             "The learning check's T5 (configs/models/t5_learning_check.json), tasks and templates, with",
             f"configs/merge_check.yaml: a base trained from scratch on all three tasks ({steps['base']} steps),",
             f"then from it one expert per task ({expert} steps on that task's rows) and a multitask model",
             f"({steps['multitask']} steps on all three: the experts' total). The experts are merged by `mtf merge`",
             "with each method at the grid point that scored best on validation rows carved out of the training",
             "rows; every model is then scored on the held-back rows (never trained on, never used to choose).",
             "Cells: rank classification, median accuracy over templates (%); *italic*: an expert on its own task.",
             "", "| task | train rows | validation rows | held-back rows | templates | chance |",
             "|---|---|---|---|---|---|"]
    any_model = next(iter(models.values()), {})
    for t in TASKS:
        d = data[t]
        lines.append(f"| {t} | {d['train_rows']:,} | {d['validation_rows']:,} | {d['eval_rows']:,} | "
                     f"{any_model.get('templates', {}).get(t, '?')} | {_pct(results['chance'][t])} |")
    if models:
        rows_scored = ", ".join(f"{t} {n}" for t, n in any_model["rows_per_template"].items())
        lines += ["", f"Held-back rows scored per template: {rows_scored}.", "",
                  "| model | " + " | ".join(TASKS) + " | mean |", "|---" * (len(TASKS) + 2) + "|"]
        for name, m in models.items():
            shown = name + (f" ({_params(m['parameters'])})" if name.startswith("merged_") else "")
            cells = [f"*{_pct(m['accuracy'][t])}*" if name == f"expert_{t}" else _pct(m["accuracy"][t]) for t in TASKS]
            lines.append(f"| {shown} | " + " | ".join(cells) + f" | {_pct(m['mean'])} |")
    if results.get("summary"):
        lines += ["", results["summary"]]
    if results.get("grid"):
        cap = s.get("validation_max_examples_per_template")
        lines += ["", f"**Grid search** on the validation rows ({cap or 'all'} per template at most); score: the mean "
                  "over tasks of the median over templates:", "",
                  "| method | points | chosen | validation score (%) | range over the grid (%) |",
                  "|---|---|---|---|---|"]
        for method, g in results["grid"].items():
            values = [p["score"] for p in g["points"]]
            lines.append(f"| {method} | {len(values)} | {_params(g['chosen'])} | {_pct(g['validation_score'])} | "
                         f"{_pct(min(values))}–{_pct(max(values))} |")
    if runs:
        lines += ["", "| run | steps | examples seen | final train loss | wall-clock (s) |", "|---|---|---|---|---|"]
        for name, r in runs.items():
            lines.append(f"| {name} | {r['steps']} | {r['examples_seen']:,} | {r['final_train_loss']:.4f} | "
                         f"{r['wall_seconds']:.0f} |")
    walls = {k: v for k, v in results["wall_seconds"].items() if k in STAGES}
    lines += ["", "Wall-clock per stage (from the last call that ran it): "
              + ", ".join(f"{k} {v / 60:.1f} min" for k, v in walls.items())
              + f"; {sum(walls.values()) / 60:.1f} min in all.", END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "merge_check"))
    parser.add_argument("--shared", default=str(SHARED))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--held-back", type=int, default=500, help="held-back rows per task without an official "
                        "test split (the learning check's)")
    parser.add_argument("--validation-rows", type=int, default=150, help="rows per task carved out of the training "
                        "rows to choose the merge parameters")
    parser.add_argument("--max-train-rows", type=int, default=None, help="cap the training rows per task")
    parser.add_argument("--max-eval-rows", type=int, default=None, help="cap the held-back rows per task")
    parser.add_argument("--base-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=150, help="steps of each expert (multitask: 3x)")
    parser.add_argument("--multitask-steps", type=int, default=None, help="default: the experts' total steps")
    parser.add_argument("--validation-max-examples", type=int, default=50,
                        help="rows per template scored at each grid point")
    parser.add_argument("--eval-max-examples", type=int, default=None,
                        help="held-back rows per template scored for each model (default: all of them)")
    parser.add_argument("--only", nargs="+", choices=STAGES, default=None,
                        help="run these stages only, re-using the others' models and results from --out")
    parser.add_argument("--skip-training", action="store_true", help="= --only grid eval")
    parser.add_argument("--tables-only", action="store_true", help="run nothing: recompute the scores from the eval "
                        "files under --out and write results.json (and --write-benchmarks)")
    parser.add_argument("--smoke", action="store_true", help="a tiny version of every stage: " + json.dumps(SMOKE)
                        + ", one grid point per method")
    parser.add_argument("--subprocess", action="store_true", help="run every mtf command in a fresh process "
                        "(slower by the imports; the default runs them in this process)")
    parser.add_argument("--write-benchmarks", default=None, help="rewrite the merge-check section of this file")
    args = parser.parse_args(argv)
    args.command = "python scripts/merge_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    global SUBPROCESS
    SUBPROCESS = args.subprocess
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if args.skip_training:
        args.only = sorted(set(args.only or ()) | {"grid", "eval"}, key=STAGES.index)
    work = Path(args.out).resolve()
    if args.tables_only:
        results = recollect(work, json.loads((work / "results.json").read_text(encoding="utf-8")))
        (work / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    else:
        results = run_all(args)
    if args.write_benchmarks:
        import platform

        import torch

        machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
        command = "`, then `".join(results.get("commands") or ["python scripts/merge_check.py"])
        benchmarks_md.write_section(Path(args.write_benchmarks), markdown(results, machine, command), BEGIN, END)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
