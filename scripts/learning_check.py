"""Evidence that the stack learns: train a small T5 from scratch on real prompted classification tasks,
score rank classification on held-back rows of the same tasks, and run an ablation on one token budget.

Data (from ``../shared/data``, a development checkout's shared folder; the script stops with a clear
message without it):

- AG News (4 topics, chance 25%): the 3,000 rows there, shuffled with the seed, 500 held back.
- TREC coarse (6 question types, chance 16.7%): the official train split for training, the official
  500-row test split held back.
- Rotten Tomatoes (sentiment, chance 50%): the 3,000 rows there, shuffled with the seed, 500 held back.

Training rows whose text also occurs among the held-back rows (after lower-casing and collapsing
whitespace) are removed, so no held-back text was ever trained on; the script checks it and records the
counts in its JSON. Every PromptSource template of a task that asks the task's original question
(``original_task: true``; for TREC the five coarse-label ones) is used for training and for scoring. A task's score is
the median over its templates of rank-classification accuracy on the held-back rows, as T0 reports it.

Runs (each a real ``mtf train`` process, same seed; the arms share one token budget, see ``--steps``):

- ``learning``: the learning check itself, packed rows, ``token_mean`` loss (``--learning-steps``);
- ``packed`` (token_mean), ``sequence_mean``, ``target_mean``: packed rows, one loss normalisation each;
- ``unpacked_equal_examples``: one example per row (each micro-batch padded to its longest row, as
  ``data.packing=false`` does), as many examples per step as the packed arm's average, same number of steps;
- ``unpacked_equal_time``: unpacked, the same rows per step as the packed arm, stopped after the packed
  arm's wall-clock (``trainer.max_time``); its last checkpoint is scored with ``mtf eval``.

Usage::

    python scripts/learning_check.py [--out runs/learning_check] [--write-benchmarks BENCHMARKS.md]
    python scripts/learning_check.py --only learning          # just the learning check (~15 min, 2 cores)
    make learning-check                                       # everything, then BENCHMARKS.md and docs/

Prints one JSON object (also written to ``<out>/results.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # benchmarks_md
import benchmarks_md  # noqa: E402
SHARED = REPO.parent / "shared" / "data"
ARMS = ("learning", "packed", "sequence_mean", "target_mean", "unpacked_equal_examples", "unpacked_equal_time")
CHANCE = {"ag_news": 0.25, "trec": 1 / 6, "rotten_tomatoes": 0.5}
BEGIN, END = "<!-- learning_check:begin -->", "<!-- learning_check:end -->"

TREC_COARSE_TEMPLATES = ["what_category_best_describe", "pick_the_best_descriptor", "which_category_best_describes",
                         "trec1", "trec2"]
TREC_FINE = ["ABBR:abb", "ABBR:exp", "ENTY:animal", "ENTY:body", "ENTY:color", "ENTY:cremat", "ENTY:currency",
             "ENTY:dismed", "ENTY:event", "ENTY:food", "ENTY:instru", "ENTY:lang", "ENTY:letter", "ENTY:other",
             "ENTY:plant", "ENTY:product", "ENTY:religion", "ENTY:sport", "ENTY:substance", "ENTY:symbol",
             "ENTY:techmeth", "ENTY:termeq", "ENTY:veh", "ENTY:word", "DESC:def", "DESC:desc", "DESC:manner",
             "DESC:reason", "HUM:gr", "HUM:ind", "HUM:title", "HUM:desc", "LOC:city", "LOC:country", "LOC:mount",
             "LOC:other", "LOC:state", "NUM:code", "NUM:count", "NUM:date", "NUM:dist", "NUM:money", "NUM:ord",
             "NUM:other", "NUM:period", "NUM:perc", "NUM:speed", "NUM:temp", "NUM:volsize", "NUM:weight"]


# ----------------------------------------------------------------------------------------- the data


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _key(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def _ag_text(row: dict) -> str:
    return f"{row['Title']} {row['Description']}"


def split_rows(shared: Path, seed: int, held_back: int) -> dict[str, dict]:
    """Per task: ``train`` and ``eval`` raw rows, disjoint by normalised text, plus the counts removed."""
    rng = random.Random(seed)
    out = {}
    for task, files, text in (("ag_news", ("ag_news/test.jsonl",), _ag_text),
                              ("trec", ("trec/train.jsonl", "trec/test.jsonl"), lambda r: r["text"]),
                              ("rotten_tomatoes", ("rotten_tomatoes/sample.jsonl",), lambda r: r["text"])):
        if len(files) == 2:  # an official split: train / test
            train, held = _read_jsonl(shared / "tasks" / files[0]), _read_jsonl(shared / "tasks" / files[1])
        else:
            rows = _read_jsonl(shared / "tasks" / files[0])
            rng.shuffle(rows)
            held, train = rows[:held_back], rows[held_back:]
        held_keys = {_key(text(r)) for r in held}
        kept = [r for r in train if _key(text(r)) not in held_keys]
        out[task] = {"train": kept, "eval": held, "removed_overlap": len(train) - len(kept)}
        assert not held_keys & {_key(text(r)) for r in kept}
    return out


def _task_yaml(name: str, data_file: Path, split: str) -> str:
    """One task of the learning-check mixtures (the same preprocessing as data_mixtures/local_train.yaml)."""
    templates = SHARED / "promptsource_templates" / name / "templates.yaml"
    pre = ""
    if name == "ag_news":
        pre = """
    preprocessors:
      - {name: join, args: {fields: [Title, Description], into: text, separator: " "}}
      - {name: cast, args: {field: Class Index, to: int}}
      - {name: add, args: {field: Class Index, value: -1}}
      - {name: rename, args: {mapping: {Class Index: label}}}
      - {name: drop, args: {fields: [Title, Description]}}"""
    elif name == "trec":
        pre = f"""
    preprocessors:
      - {{name: class_label, args: {{field: label, into: fine_label, names: {json.dumps(TREC_FINE)}}}}}
      - {{name: regex_replace, args: {{field: label, pattern: ":.*$", into: coarse}}}}
      - {{name: class_label, args: {{field: coarse, into: coarse_label, names: [ABBR, ENTY, DESC, HUM, LOC, NUM]}}}}
      - {{name: drop, args: {{fields: [label, coarse]}}}}"""
    # TREC's two original-task "fine_grained_open" templates ask for the 50 fine labels: not the coarse task.
    selection = f"names: {json.dumps(TREC_COARSE_TEMPLATES)}" if name == "trec" else "original_task: true"
    return f"""
  - name: {name}
    source: {{type: jsonl, data_files: {{{split}: {data_file}}}}}
    split: {split}{pre}
    templates: {{file: {templates}, {selection}}}
    metadata: {{dataset: {name}, language: en}}
"""


def write_mixtures(work: Path, rows: dict[str, dict]) -> tuple[Path, Path]:
    """Write the split rows and the training / eval mixture YAMLs under ``work/data``."""
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    train_tasks, eval_tasks = [], []
    for task, parts in rows.items():
        for part in ("train", "eval"):
            path = data / f"{task}.{part}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in parts[part]), encoding="utf-8")
        train_tasks.append(_task_yaml(task, data / f"{task}.train.jsonl", "train"))
        eval_tasks.append(_task_yaml(task, data / f"{task}.eval.jsonl", "test"))
    names = ", ".join(rows)
    train_yaml, eval_yaml = data / "train.yaml", data / "eval.yaml"
    train_yaml.write_text("# written by scripts/learning_check.py\ntasks:" + "".join(train_tasks)
                          + f"\nmixture:\n  rate: {{type: examples_proportional, maximum: 500000}}\n  members: [{names}]\n",
                          encoding="utf-8")
    # Same datasets, disjoint rows: this is an in-distribution check, not a zero-shot one, so no held_out list.
    eval_yaml.write_text("# written by scripts/learning_check.py\ntasks:" + "".join(eval_tasks)
                         + "\neval:\n  held_out: []\n", encoding="utf-8")
    return train_yaml, eval_yaml


# ----------------------------------------------------------------------------------------- the runs


def mtf(*args: str, log: Path) -> tuple[int, float]:
    """Run the ``mtf`` CLI of this checkout in a fresh process; (exit code, wall seconds)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="offline", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as fh:
        proc = subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=REPO, env=env, stdout=fh,
                              stderr=subprocess.STDOUT, check=False)
    return proc.returncode, time.perf_counter() - start


def train_arm(name: str, work: Path, train_yaml: Path, eval_yaml: Path, overrides: list[str],
              allow_stop: bool = False) -> dict:
    run_dir = work / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    args = ["train", "configs/learning_check.yaml", f"run.output_dir={run_dir}", f"data.train_mixture={train_yaml}",
            f"eval.mixture={eval_yaml}", *overrides]
    print(f"[learning_check] {name}: mtf {' '.join(args)}", file=sys.stderr, flush=True)
    code, seconds = mtf(*args, log=work / f"{name}.log")
    if code not in ((0, 3) if allow_stop else (0,)):
        raise SystemExit(f"{name}: mtf train exited {code}; see {work / f'{name}.log'}")
    if code == 3:  # stopped by max_time: score its last checkpoint with `mtf eval`
        ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
        out = run_dir / "eval" / f"{ckpts[-1].name}.json"
        out.parent.mkdir(exist_ok=True)
        ecode, _ = mtf("eval", str(ckpts[-1]), "--mixture", str(eval_yaml), "--batch-size", "64",
                       "--output", str(out), log=work / f"{name}.eval.log")
        if ecode != 0:
            raise SystemExit(f"{name}: mtf eval exited {ecode}; see {work / f'{name}.eval.log'}")
    return collect(run_dir, overrides, seconds)


def collect(run_dir: Path, overrides: list[str], wall_seconds: float) -> dict:
    """An arm's figures, read from its run directory (so they can be recomputed without retraining).

    ``train_seconds`` is the time of the training steps alone (no evals, no checkpoints): the mean of the
    step times logged every ``logging.every_steps`` steps, times the number of steps. ``loop_seconds`` is
    the loop's wall-clock from run.json, periodic evals included.
    """
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [m for m in metrics if "train/loss" in m]
    last = train_rows[-1]
    step_times = [m["step_seconds"] for m in train_rows if "step_seconds" in m]
    record = json.loads((run_dir / "run.json").read_text())
    final = json.loads(sorted((run_dir / "eval").glob("step-*.json"))[-1].read_text())
    return {
        "run_dir": str(run_dir.relative_to(REPO) if run_dir.is_relative_to(REPO) else run_dir),
        "overrides": overrides, "steps": last["step"], "wall_seconds": round(wall_seconds, 1),
        "train_seconds": round(sum(step_times) / len(step_times) * last["step"], 1),
        "loop_seconds": round(record.get("train_loop_seconds") or 0.0, 1), "status": record.get("status"),
        "examples_seen": last["examples_seen"], "tokens_seen": last["tokens_seen"],
        "final_train_loss": last["train/loss"], "packing_efficiency": last.get("packing/efficiency"),
        "accuracy": {d: v["median"] for d, v in final["datasets"].items()},
        "accuracy_min_max": {d: [v["min"], v["max"]] for d, v in final["datasets"].items()},
        "templates": {d: len(t) for d, t in final["templates"].items()},
        "eval_rows": {d: max(r["n"] for r in t.values()) for d, t in final["templates"].items()},
        "eval_step": final.get("step"),
    }


def recollect(work: Path, results: dict) -> dict:
    """Recompute every arm's figures from its run directory (keeping its overrides and wall-clock)."""
    for name, arm in results["arms"].items():
        if (work / name / "run.json").is_file():
            results["arms"][name] = collect(work / name, arm["overrides"], arm["wall_seconds"])
    return results


def run_all(args: argparse.Namespace) -> dict:
    shared = Path(args.shared)
    if not (shared / "tasks" / "ag_news").is_dir():
        raise SystemExit(f"the learning check reads real task data from {shared} (a development checkout's "
                         "../shared/data); it is not there. Pass --shared PATH.")
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = split_rows(shared, args.seed, args.held_back)
    train_yaml, eval_yaml = write_mixtures(work, rows)
    seed = [f"trainer.seed={args.seed}"]
    results: dict = {"data": {t: {"train_rows": len(p["train"]), "eval_rows": len(p["eval"]),
                                  "removed_overlap": p["removed_overlap"]} for t, p in rows.items()},
                     "chance": CHANCE, "arms": {}}
    previous = work / "results.json"
    results["commands"] = []
    if args.only and previous.is_file():  # a partial rerun keeps the other arms' results
        old = recollect(work, json.loads(previous.read_text()))
        results["arms"], results["commands"] = old["arms"], old.get("commands", [])
    results["commands"].append("python scripts/learning_check.py " + " ".join(sys.argv[1:]))
    wanted = args.only or list(ARMS)

    def save(name: str, arm: dict) -> None:  # after every arm: a stopped script keeps what it measured
        results["arms"][name] = arm
        (work / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    if "learning" in wanted:
        save("learning", train_arm("learning", work, train_yaml, eval_yaml,
                                   seed + [f"trainer.max_steps={args.learning_steps}"]))
    budget = seed + [f"trainer.max_steps={args.steps}", f"eval.every_steps={max(1, args.steps // 4)}",
                     f"checkpoint.every_steps={args.steps}"]
    for arm, mode in (("packed", "token_mean"), ("sequence_mean", "sequence_mean"), ("target_mean", "target_mean")):
        if arm in wanted:
            save(arm, train_arm(arm, work, train_yaml, eval_yaml, budget + [f"trainer.loss_normalization={mode}"]))
    packed = results["arms"].get("packed")
    if not packed and {"unpacked_equal_examples", "unpacked_equal_time"} & set(wanted):
        raise SystemExit("the unpacked arms are sized from the `packed` arm: run it first (or in the same call).")
    if packed and "unpacked_equal_examples" in wanted:
        per_step = packed["examples_seen"] / packed["steps"]
        rows_per_step = max(8, int(round(per_step / 8)) * 8)  # a multiple of the micro-batch
        save("unpacked_equal_examples", train_arm(
            "unpacked_equal_examples", work, train_yaml, eval_yaml,
            budget + ["data.packing=false", f"trainer.global_batch_size={rows_per_step}"]))
    if packed and "unpacked_equal_time" in wanted:
        save("unpacked_equal_time", train_arm(
            "unpacked_equal_time", work, train_yaml, eval_yaml,
            seed + ["data.packing=false", f"trainer.max_steps={args.steps * 50}", "eval.every_steps=null",
                    f"trainer.max_time={packed['train_seconds']}", "checkpoint.every_steps=null"],
            allow_stop=True))
    (work / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


# ----------------------------------------------------------------------------------------- the tables


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(results: dict, machine: str, command: str) -> str:
    tasks = list(results["chance"])
    lines = [BEGIN, "## Learning check and ablation (`scripts/learning_check.py`)", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {machine}, all runs in one sitting, by `{command}`.",
             "A T5 (configs/models/t5_learning_check.json, random init) trained from scratch on three real prompted",
             "classification tasks (every original-task PromptSource template), scored by rank classification on",
             "held-back rows of the same tasks that were never trained on. Cells: median accuracy over templates (%).", "",
             "| task | train rows | held-back rows | templates | chance |", "|---|---|---|---|---|"]
    arm0 = next(iter(results["arms"].values()))
    for t in tasks:
        d = results["data"][t]
        lines.append(f"| {t} | {d['train_rows']:,} | {d['eval_rows']:,} | {arm0['templates'].get(t, '?')} | "
                     f"{_pct(results['chance'][t])} |")
    if "learning" in results["arms"]:
        a = results["arms"]["learning"]
        lines += ["", f"**Learning check** ({a['steps']} steps, {a['examples_seen']:,} examples, "
                  f"{a['wall_seconds'] / 60:.1f} min wall-clock including the evals):", "",
                  "| task | accuracy (median over templates) | min–max over templates | chance |", "|---|---|---|---|"]
        for t in tasks:
            lo, hi = a["accuracy_min_max"][t]
            lines.append(f"| {t} | **{_pct(a['accuracy'][t])}** | {_pct(lo)}–{_pct(hi)} | {_pct(results['chance'][t])} |")
    if "learning" in results["arms"] and "packed" in results["arms"]:
        lines += ["", "Below the aims (AG News 70%, sentiment 65%). The 300-step `packed` arm reaches the same accuracies as",
                  "the 1,100-step run, so more steps at this learning rate buy nothing: the limits are the 2,500 rows of",
                  "AG News / Rotten Tomatoes and a from-scratch 32k-token embedding; sentiment is not learned."]
    ablation = [n for n in ARMS[1:] if n in results["arms"]]
    if ablation:
        base = results["arms"].get("packed")
        lines += ["", "**Ablation** (same seed, same steps except `unpacked_equal_time`; ratios against `packed`):", "",
                  "| arm | " + " | ".join(tasks) + " | final train loss | examples seen | steps | training steps (s) | vs packed |",
                  "|---" * (len(tasks) + 6) + "|"]
        for n in ablation:
            a = results["arms"][n]
            ratio = f"{a['train_seconds'] / base['train_seconds']:.2f}x time" if base else ""
            lines.append(f"| {n} | " + " | ".join(_pct(a["accuracy"][t]) for t in tasks)
                         + f" | {a['final_train_loss']:.4f} | {a['examples_seen']:,} | {a['steps']} | "
                         f"{a['train_seconds']:.0f} | {ratio} |")
        lines += ["", "- `packed`, `sequence_mean`, `target_mean`: packed rows, the loss normalised per token, per example,",
                  "  and per target token weighted 1/len(target) (BLOOMZ); with global denominators the last two are the",
                  "  same number (train/modeling/losses.py): their step-10 losses agree to 7 digits, then float",
                  "  rounding compounds over the steps, so the gap between those two rows is this comparison's noise.",
                  "- `unpacked_equal_examples`: `data.packing=false` (each micro-batch padded to its longest row), as many",
                  "  examples per step as `packed` saw on average, same steps: the time packing saves.",
                  "- `unpacked_equal_time`: unpacked, the same rows per step as `packed`, stopped after `packed`'s",
                  "  training-step time: what the same compute buys without packing.",
                  "- Training steps (s): the time of the training steps alone, without evals and checkpoints (the mean",
                  "  of the step times logged every 10 steps, times the steps); the ratio column divides it by `packed`'s.",
                  "- The train loss is each arm's own normalisation: comparable between `packed` and the unpacked arms,",
                  "  not with `sequence_mean` / `target_mean`.",
                  "", "Curves of every arm (`mtf report` over the run directories; the full page is",
                  "`runs/learning_check/report/index.html`):", "",
                  "![training curves of the arms](docs/learning_check_training.png)",
                  "![accuracy over steps, median over templates with the min-max band](docs/learning_check_eval.png)"]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "learning_check"))
    parser.add_argument("--shared", default=str(SHARED))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--held-back", type=int, default=500, help="rows held back per task without an official test split")
    parser.add_argument("--learning-steps", type=int, default=1100)
    parser.add_argument("--steps", type=int, default=300, help="steps of each ablation arm (one token budget)")
    parser.add_argument("--tables-only", action="store_true", help="run nothing: write the tables and figures from "
                        "<out>/results.json")
    parser.add_argument("--only", nargs="+", choices=ARMS, default=None)
    parser.add_argument("--write-benchmarks", default=None, help="rewrite the learning-check section of this file")
    parser.add_argument("--plot", default=None, help="folder for the overlay figures of all arms (from `mtf report`): "
                        "learning_check_training.png and learning_check_eval.png")
    args = parser.parse_args()
    if args.tables_only:
        results = recollect(Path(args.out).resolve(), json.loads((Path(args.out) / "results.json").read_text()))
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    else:
        results = run_all(args)
    if args.plot:
        import shutil

        from train.reports.page import write_report

        work = Path(args.out).resolve()
        arms = [work / name for name in ARMS if name in results["arms"]]
        report = write_report(arms, work / "report")
        results["report"] = report["html"]
        Path(args.plot).mkdir(parents=True, exist_ok=True)
        for figure in ("training", "eval"):
            shutil.copy(work / "report" / f"{figure}.png", Path(args.plot) / f"learning_check_{figure}.png")
    if args.write_benchmarks:
        import platform

        import torch

        machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
        command = "`, then `".join(results.get("commands") or ["python scripts/learning_check.py"])
        benchmarks_md.write_section(Path(args.write_benchmarks), markdown(results, machine, command), BEGIN, END)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
