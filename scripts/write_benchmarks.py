"""Run every benchmark in scripts/ on this machine and rewrite BENCHMARKS.md.

Each figure is a ratio against a baseline measured in the same run (packed vs padded, mtf vs the
Hugging Face Trainer and TRL, encoder-once vs per-choice scoring, data lanes vs one global packer), or
an absolute rate with the machine it was measured on. Timed arms alternate, the order reversed every
round (scripts/bench_baselines.py). A machine's load changes over minutes, so two runs of one benchmark
differ more than the rounds of one run do: every benchmark runs as ``--invocations`` independent
processes (default 2, interleaved with the other benchmarks), each ``--repeats`` rounds (default 3), and
the rounds of all of them are pooled. Rates are the median (min-max) over the pooled rounds; a ratio is
the ratio of the pooled medians, with the min-max of the pooled per-round ratios as its spread. Tests
never assert speed.

The pooled figures are also written as JSON (``--json-out``, default runs/bench/results.json). A second
run with ``--check-against`` that file measures everything again the same way and, instead of replacing
the tables, writes which of its ratios fall inside the first run's spreads (the "Rerun check" section).

``--pool A.json B.json ...`` measures nothing: it pools the rounds of earlier runs' JSON (each already pooled
over its invocations) into one set of figures and writes the tables from them, as if they were one run with
all their processes; their spreads then cover the conditions of every run pooled.

Usage::

    python scripts/write_benchmarks.py [--out BENCHMARKS.md] [--invocations 2] [--repeats 3] [--quick]
    python scripts/write_benchmarks.py --check-against runs/bench/results.json   # make bench-check
    python scripts/write_benchmarks.py --pool runs/bench/results.json runs/bench/results.check.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import bench_env
from bench_env import REPO
import bench_baselines as bb  # noqa: E402
import bench_data_ranks  # noqa: E402
import benchmarks_md  # noqa: E402

RERUN_BEGIN, RERUN_END = benchmarks_md.markers("rerun_check")
# Sections written by their own, longer scripts (make learning-check, make merge-check, bench_eval_e2e.py):
# kept as they are when this script rewrites the file.
KEPT_SECTIONS = [benchmarks_md.markers(name)
                 for name in ("learning_check", "merge_check", "bench_eval_e2e", "bench_loss_memory", "bench_gpu")]
# What each training arm of bench_packing.py is (scripts/bench_packing.py and bench_baselines.py say more).
ARMS = {
    "mtf_packed": "`mtf train`, `data.packing=true` (each micro-batch padded to its longest row, `data.pad_to=auto`)",
    "mtf_unpacked": "`mtf train`, `data.packing=false` (one example per row, micro-batch padded to its longest row)",
    "hf_trainer": "`transformers.Trainer` + `DataCollatorForSeq2Seq` (pad to longest), the same batches as "
                  "mtf_unpacked",
    "trl_sft": "`trl.SFTTrainer(packing=True)` (BFD, padding-free rows), the same rows per step as mtf_packed",
}
UNPACKED_TARGET = 1 / 1.3  # issue 19: mtf's unpacked throughput within 1.3x of the HF Trainer's


def run(script: str, *args: str) -> dict:
    env = {**os.environ, **bench_env.OFFLINE}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args, "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def rate(s: dict, digits: int = 0) -> str:
    """A per-round rate as ``median (min-max)``."""
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}–{s['max']:,.{digits}f})"


def rounds(d: dict) -> str:
    """``N rounds``, and how many processes they were pooled from."""
    n, inv = d["repeats"], d.get("invocations", 1)
    return f"{n} rounds" + (f" ({inv} processes of {n // inv}, pooled)" if inv > 1 else "")


def packing_lines(packing: dict) -> list[str]:
    lines = [
        "## Packing (`scripts/bench_packing.py`)",
        "",
        f"Data: {packing['data']}; the first {packing['examples']:,} examples. Baseline: the same examples in",
        "batches of 32, each padded to its longest example, as t-zero does. Efficiency = real tokens / token slots.",
        "",
        "| layout | packed efficiency | padded efficiency | ratio |",
        "|---|---|---|---|",
    ]
    rows = [("decoder", "packed_efficiency", "padded_efficiency", "decoder, 1024 tokens"),
            ("encdec", "packed_input_efficiency", "padded_input_efficiency", "enc-dec 1024 / 256: encoder side"),
            ("encdec", "packed_target_efficiency", "padded_target_efficiency", "enc-dec 1024 / 256: decoder side"),
            ("encdec", "packed_efficiency", "padded_efficiency", "enc-dec 1024 / 256: both sides")]
    for name, packed_key, padded_key, label in rows:
        p, q = packing[name][packed_key], packing[name][padded_key]
        lines.append(f"| {label} | {p:.3f} | {q:.3f} | {p / q:.2f}x |")
    p = packing["packer"]
    target_fill = packing["encdec"]["packed_target_efficiency"]
    lines += ["", f"Enc-dec rows fill the encoder side; the decoder side is {target_fill:.0%} full because these "
              "tasks' targets are short next to T0's 256-token target capacity (a smaller `data.max_target_tokens` "
              "fills it).", "",
              f"Packer (`Packer.next_row`, decoder, 1024 tokens, window 16): {rate(p)} examples/s over "
              f"{rounds({'repeats': len(p['values']), 'invocations': packing.get('invocations', 1)})}."]
    for kind, t in packing.get("train", {}).items():
        caps = ", ".join(f"`{k}={v}`" for k, v in t["capacity"].items())
        lines += [
            "",
            f"### Training throughput, {'decoder' if kind == 'decoder' else 'enc-dec'} (`{t['model']}`)",
            "",
            f"Real (non-pad) input + target tokens per second of a training step (data, forward, backward, clip, "
            f"AdamW step), fp32, CPU, {packing['threads']} torch thread(s), random init, the same first examples of "
            f"the same seeded stream for every arm; {caps}; {t['rows_per_step']} packed row(s) per step, or "
            f"{t['examples_per_unpacked_step']} examples per unpacked step (= the packed rows' "
            f"{t['examples_per_packed_row']:.1f} examples per row). Each run: {t['warmup_steps']} untimed warm-up "
            f"step(s), then {t['timed_steps']} timed steps; the arms alternate for {rounds(t)}, the order "
            "reversed every round.",
            "",
            "| arm | what runs | real tokens/s, median (min–max) |",
            "|---|---|---|",
        ]
        for name, s in t["tokens_per_s"].items():
            version = f" (trl {t['trl_version']})" if name == "trl_sft" and "trl_version" in t else ""
            lines.append(f"| {name} | {ARMS.get(name, name)}{version} | {rate(s)} |")
        lines += ["", "| comparison | ratio of medians | per-round ratios, min–max |", "|---|---|---|"]
        for name, r in t["ratios"].items():
            lines.append(f"| {name} | **{r['ratio']:.2f}x** | {r['min']:.2f}–{r['max']:.2f} |")
        notes = [f"{name} not run: {why}." for name, why in t["skipped"].items()]
        if "mtf_unpacked/hf_trainer" in t["ratios"]:
            r = t["ratios"]["mtf_unpacked/hf_trainer"]["ratio"]
            verdict = "within" if r >= UNPACKED_TARGET else "NOT within"
            notes.append(f"mtf unpacked vs the HF Trainer: {r:.2f}x, {verdict} the 1.3x target "
                         f"(>= {UNPACKED_TARGET:.2f}x).")
        same = t["same_batches_mtf_unpacked_hf"]
        notes.append("mtf_unpacked and hf_trainer trained the same tokens in every step." if same
                     else "WARNING: mtf_unpacked and hf_trainer did not train the same tokens per step.")
        lines += ["", " ".join(notes)]
    return lines


def mixture_lines(mixture: dict) -> list[str]:
    lines = [
        "## Mixture stream (`scripts/bench_mixture.py`)",
        "",
        "Cached (memory-mapped Arrow) tokenized tasks; the stream's heap must stay flat as the data grows. One",
        f"fresh process per size and round, the sizes alternating for {rounds(mixture)}, the order",
        "reversed every round: rates and restore times as median (min–max) over the rounds, memory as the largest.",
        "",
        "| examples | examples/s | tokens/s | restore (ms) | state (bytes) | Python heap peak (MiB) | max RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in mixture["results"]:
        spreads = {key: {"median": row[key], "min": row[f"{key}_min"], "max": row[f"{key}_max"]}
                   for key in ("examples_per_s", "tokens_per_s", "restore_ms")}
        lines.append(f"| {row['examples']:,} | {rate(spreads['examples_per_s'])} | {rate(spreads['tokens_per_s'])} | "
                     f"{rate(spreads['restore_ms'], 1)} | {row['state_json_bytes']} | "
                     f"{row['tracemalloc_peak_mib']:.2f} | "
                     f"{row['max_rss_mib']:.0f} (anonymous {row['rss_anon_mib']:.0f}) |")
    return lines


def eval_lines(evaluation: dict) -> list[str]:
    tasks = {task: row for task, row in evaluation.items() if isinstance(row, dict) and "ratio" in row}
    first = next(iter(tasks.values())) if tasks else {"repeats": 0}
    lines = [
        "## Rank classification (`scripts/bench_eval.py`)",
        "",
        "Tiny T5 (d256, 4+4 layers), real T5 tokenizer, the first examples of each validation set, batches of",
        f"{evaluation.get('batch_size', 8)} examples, {evaluation.get('threads', 1)} torch thread(s). Compared: "
        "encoder-once scoring (`train.evaluation`) against",
        "the baseline that re-runs the encoder for every answer choice (t-zero). Scores must be identical. One",
        f"warm-up call each, then {rounds(first)} alternating the two, the order reversed every round.",
        "",
        "| task | naive ex/s, median (min–max) | encoder-once ex/s, median (min–max) | ratio of medians | "
        "per-round ratios | max abs score diff |",
        "|---|---|---|---|---|---|",
    ]
    for task, row in tasks.items():
        lines.append(f"| {task} | {rate(row['naive_examples_per_s'], 1)} | "
                     f"{rate(row['encoder_once_examples_per_s'], 1)} | "
                     f"**{row['ratio']:.2f}x** | {row['ratio_min']:.2f}–{row['ratio_max']:.2f} | "
                     f"{row['max_abs_score_diff']:.1e} |")
    return lines


# ----------------------------------------------------------------------------------------- pooling


def _pool_rates(spreads: list[dict]) -> dict:
    """One arm's per-round rates from several invocations, pooled into one spread."""
    return bb.spread([v for s in spreads for v in s["values"]])


def _pool_ratio(numerators: list[dict], denominators: list[dict], per_round: list[list[float]]) -> dict:
    """Ratio of the pooled medians, spread over the pooled per-round ratios (each from one round of one process)."""
    rounds = [r for rs in per_round for r in rs]
    num = statistics.median(v for s in numerators for v in s["values"])
    den = statistics.median(v for s in denominators for v in s["values"])
    return {"ratio": num / den, "min": min(rounds), "max": max(rounds), "per_round": rounds}


def _same(values: list, what: str):
    """A figure that does not depend on timing (packing efficiency, rows built): equal in every invocation."""
    if any(v != values[0] for v in values[1:]):
        raise SystemExit(f"{what} differs between invocations of one benchmark ({values}): it should not depend on "
                         "timing; a benchmark's data or configuration changed between them")
    return values[0]


def pool_packing(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for kind in ("decoder", "encdec"):
        for key, value in runs[0][kind].items():
            if isinstance(value, (int, float)):
                _same([r[kind][key] for r in runs], f"packing {kind} {key}")
    out["packer"] = _pool_rates([r["packer"] for r in runs])
    out["invocations"] = len(runs)
    out["train"] = {}
    for kind, first in runs[0].get("train", {}).items():
        ts = [r["train"][kind] for r in runs]
        pooled = dict(first)
        pooled["repeats"], pooled["invocations"] = sum(t["repeats"] for t in ts), len(ts)
        pooled["tokens_per_s"] = {arm: _pool_rates([t["tokens_per_s"][arm] for t in ts]) for arm in first["tokens_per_s"]}
        pooled["ratios"] = {}
        for name in first["ratios"]:
            a, b = name.split("/")
            pooled["ratios"][name] = _pool_ratio([t["tokens_per_s"][a] for t in ts], [t["tokens_per_s"][b] for t in ts],
                                                 [t["ratios"][name]["per_round"] for t in ts])
        pooled["same_batches_mtf_unpacked_hf"] = all(t["same_batches_mtf_unpacked_hf"] for t in ts)
        out["train"][kind] = pooled
    return out


def pool_mixture(runs: list[dict]) -> dict:
    rows = []
    for i, first in enumerate(runs[0]["results"]):
        rs = [r["results"][i] for r in runs]
        row = dict(first)
        for key in [k[:-len("_values")] for k in first if k.endswith("_values")]:
            s = bb.spread([v for r in rs for v in r[f"{key}_values"]])
            row[key], row[f"{key}_min"], row[f"{key}_max"], row[f"{key}_values"] = (s["median"], s["min"], s["max"],
                                                                                     s["values"])
        for key in ("tracemalloc_peak_mib", "max_rss_mib", "rss_anon_mib", "rss_file_mib"):
            if key in first:
                row[key] = max(r[key] for r in rs)
        row["repeats"] = sum(r["repeats"] for r in rs)
        rows.append(row)
    return {**runs[0], "repeats": sum(r["repeats"] for r in runs), "invocations": len(runs), "results": rows}


def pool_eval(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for task, first in runs[0].items():
        if not (isinstance(first, dict) and "ratio" in first):
            continue
        rs = [r[task] for r in runs]
        naive = [r["naive_examples_per_s"] for r in rs]
        fast = [r["encoder_once_examples_per_s"] for r in rs]
        ratio = _pool_ratio(fast, naive, [r["ratio_per_round"] for r in rs])
        out[task] = {**first, "repeats": sum(r["repeats"] for r in rs), "invocations": len(rs), "naive_examples_per_s": _pool_rates(naive),
                     "encoder_once_examples_per_s": _pool_rates(fast), "ratio": ratio["ratio"],
                     "ratio_min": ratio["min"], "ratio_max": ratio["max"], "ratio_per_round": ratio["per_round"],
                     "max_abs_score_diff": max(r["max_abs_score_diff"] for r in rs)}
    return out


def pool_data_ranks(runs: list[dict]) -> dict:
    raw = {key: [v for r in runs for v in r["raw_seconds_per_step"][key]] for key in runs[0]["raw_seconds_per_step"]}
    for key in runs[0]["meta"]:
        _same([r["meta"][key]["rows_built_per_step"] for r in runs], f"bench_data_ranks {key} rows built")
    return {**runs[0], "repeats": sum(r["repeats"] for r in runs), "invocations": len(runs), "raw_seconds_per_step": raw,
            "table": bench_data_ranks.tabulate(raw, runs[0]["ranks"], runs[0]["meta"])}


def ratio_spreads(results: dict) -> dict[str, dict]:
    """Every timed ratio of a (pooled) run: name -> ratio, min, max."""
    out = {}
    for kind, t in results["packing"].get("train", {}).items():
        for name, r in t["ratios"].items():
            out[f"training {kind} {name}"] = {"ratio": r["ratio"], "min": r["min"], "max": r["max"]}
    for task, row in results["eval"].items():
        if isinstance(row, dict) and "ratio" in row:
            out[f"rank classification {task} encoder-once/naive"] = {"ratio": row["ratio"], "min": row["ratio_min"],
                                                                    "max": row["ratio_max"]}
    for row in results["data_ranks"]["table"][1:]:
        for arm in ("lanes", "global"):
            a = row[arm]
            out[f"data {arm} at {row['ranks']} ranks vs 1"] = {"ratio": a["vs_1_rank"], "min": a["vs_1_rank_spread"][0],
                                                              "max": a["vs_1_rank_spread"][1]}
    return out


def rerun_check(previous: dict, current: dict) -> tuple[str, int, int]:
    """The Rerun check section: which of ``current``'s ratios fall inside ``previous``'s spreads."""
    before, now = ratio_spreads(previous), ratio_spreads(current)
    names = [n for n in before if n in now]
    inside = [n for n in names if before[n]["min"] <= now[n]["ratio"] <= before[n]["max"]]
    lines = [RERUN_BEGIN, "## Rerun check", "",
             f"A second, independent `make bench` ({current['command']}, {current['date']}, commit "
             f"{current['commit']}) against the figures below (commit {previous['commit']}): "
             f"**{len(inside)} of {len(names)} ratios fell inside the spreads below.**", "",
             "| ratio | here: ratio (spread) | second run | inside |", "|---|---|---|---|"]
    for n in names:
        b, c = before[n], now[n]
        lines.append(f"| {n} | {b['ratio']:.2f}x ({b['min']:.2f}–{b['max']:.2f}) | {c['ratio']:.2f}x | "
                     f"{'yes' if n in inside else '**no**'} |")
    return "\n".join(lines + [RERUN_END]) + "\n", len(inside), len(names)


def _set_invocations(tree: Any, total: int) -> None:
    """Every ``invocations`` count in a pooled result (per benchmark, per training kind, per eval task)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "invocations":
                tree[key] = total
            else:
                _set_invocations(value, total)


def pool_results(docs: list[dict]) -> dict:
    """Earlier runs' results JSONs pooled into one, as if they were one run with all their processes.

    Raises:
        SystemExit: the runs used different repeats per process, or a figure that does not depend on timing
            (packing efficiency, rows built) differs between them.
    """
    repeats = {d["repeats_per_invocation"] for d in docs}
    if len(repeats) != 1:
        raise SystemExit(f"--pool: the runs have different --repeats ({sorted(repeats)}); pool runs made alike")
    out = {"packing": pool_packing([d["packing"] for d in docs]), "mixture": pool_mixture([d["mixture"] for d in docs]),
           "eval": pool_eval([d["eval"] for d in docs]), "data_ranks": pool_data_ranks([d["data_ranks"] for d in docs])}
    total = sum(d["invocations"] for d in docs)
    _set_invocations(out, total)
    commits = sorted({d["commit"] for d in docs})
    return {**out, "invocations": total, "repeats_per_invocation": repeats.pop(), "machine": docs[0]["machine"],
            "date": max(d["date"] for d in docs), "commit": ", ".join(commits),
            "command": " + ".join(f"`{d['command']}`" for d in docs)}


def git_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md"],
                           cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()  # code changes only
    return (proc.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def measure(args: argparse.Namespace) -> dict:
    """Every benchmark ``args.invocations`` times, interleaved (all of them once, then again), pooled."""
    quick = args.quick
    plans = {
        "packing": ("bench_packing.py", [*(["--examples", "1500", "--warmup-steps", "1", "--train-steps", "2",
                                            "--rows-per-step", "1"] if quick else [])]),
        "mixture": ("bench_mixture.py", ["--sizes", "100000", "1000000", "--samples", "50000"] if quick
                    else ["--sizes", "100000", "1000000", "2000000", "--samples", "200000"]),
        "eval": ("bench_eval.py", ["--num-examples", "16"] if quick else ["--num-examples", "192"]),
        "data_ranks": ("bench_data_ranks.py", ["--steps", "3", "--min-seconds", "0.2"] if quick else []),
    }
    runs: dict[str, list[dict]] = {name: [] for name in plans}
    for i in range(args.invocations):
        for name, (script, extra) in plans.items():
            print(f"[write_benchmarks] {name}: invocation {i + 1} of {args.invocations}", file=sys.stderr, flush=True)
            runs[name].append(run(script, *extra, "--repeats", str(args.repeats)))
    return {"packing": pool_packing(runs["packing"]), "mixture": pool_mixture(runs["mixture"]),
            "eval": pool_eval(runs["eval"]), "data_ranks": pool_data_ranks(runs["data_ranks"]),
            "invocations": args.invocations, "repeats_per_invocation": args.repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--invocations", type=int, default=2, help="independent processes per benchmark, pooled")
    parser.add_argument("--repeats", type=int, default=bb.MIN_REPEATS,
                        help=f"alternating rounds per invocation (>= {bb.MIN_REPEATS})")
    parser.add_argument("--json-out", default=str(REPO / "runs" / "bench" / "results.json"),
                        help="where the pooled figures go as JSON (what --check-against reads)")
    parser.add_argument("--check-against", default=None, metavar="RESULTS_JSON",
                        help="measure again and write only the Rerun check section: which ratios fall inside the "
                             "spreads of that earlier run (its --json-out)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not for publishing)")
    parser.add_argument("--pool", nargs="+", default=None, metavar="RESULTS_JSON",
                        help="measure nothing: pool these earlier runs' --json-out files and write the tables")
    parser.add_argument("--pin-cpu", type=int, default=None, metavar="CPU",
                        help="run every benchmark process on this one CPU core (Linux), so other work on the machine "
                             "can be kept on the other cores; every arm is single-threaded, data prefetch included")
    args = parser.parse_args()
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})  # inherited by every benchmark process started below
    if args.invocations < 1 or args.repeats < bb.MIN_REPEATS:
        parser.error(f"--invocations must be >= 1 and --repeats >= {bb.MIN_REPEATS}")
    previous = None
    if args.check_against:
        path = Path(args.check_against)
        if not path.is_file():
            parser.error(f"--check-against {path}: no such file; it is the --json-out of an earlier "
                         "`python scripts/write_benchmarks.py` (make bench writes runs/bench/results.json)")
        previous = json.loads(path.read_text(encoding="utf-8"))
    if args.pool:
        missing = [p for p in args.pool if not Path(p).is_file()]
        if missing:
            parser.error(f"--pool: no such file: {', '.join(missing)}")
        results = pool_results([json.loads(Path(p).read_text(encoding="utf-8")) for p in args.pool])
    else:
        import torch

        machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " + (
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
        command = "python scripts/write_benchmarks.py " + " ".join(sys.argv[1:])
        results = {**measure(args), "machine": machine, "date": datetime.date.today().isoformat(),
                   "commit": git_commit(), "command": command.strip()}
    json_out = Path(args.json_out)
    if previous is not None and json_out.resolve() == Path(args.check_against).resolve():
        json_out = json_out.with_name(json_out.stem + ".check.json")
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    out = Path(args.out)
    if previous is not None:
        section, inside, total = rerun_check(previous, results)
        benchmarks_md.write_section(out, section, RERUN_BEGIN, RERUN_END)
        print(section)
        print(f"{inside} of {total} ratios inside the earlier run's spreads; wrote {out} and {json_out}")
        return

    packing, mixture, evaluation = results["packing"], results["mixture"], results["eval"]
    invocations, repeats = results["invocations"], results["repeats_per_invocation"]
    pooled = (f"{invocations} independent processes per benchmark, {repeats} rounds each, pooled"
              if invocations > 1 else f"{repeats} rounds")
    by = (f"the runs {results['command']} pooled by `python scripts/write_benchmarks.py --pool ...`" if args.pool
          else f"`{results['command']}` (`make bench`)")
    lines = [
        "# Benchmarks",
        "",
        f"Measured {results['date']} on {results['machine']}, commit {results['commit']}, by {by}.",
        "Ratios compare against a baseline measured in the same run, the arms alternating (order reversed every round),",
        f"warm-up excluded: {pooled}. Rates are median (min–max) over the rounds; a ratio is the ratio of the",
        "medians with the min–max of the per-round ratios as its spread. Absolute rates depend on the machine and its",
        "load. Tests never assert speed.",
        "",
        RERUN_BEGIN,
        "## Rerun check",
        "",
        "Not yet checked against a second run: `make bench-check` measures everything again and writes here which",
        "ratios fall inside these spreads.",
        RERUN_END,
        "",
        *packing_lines(packing),
        "",
        *mixture_lines(mixture),
        "",
        *eval_lines(evaluation),
    ]
    # Sections written by other scripts (learning_check.py, merge_check.py, bench_eval_e2e.py,
    # bench_loss_memory.py, bench_gpu.py) are kept as they are: they come from long runs that `make bench`
    # does not repeat.
    kept = ""
    for begin, end in KEPT_SECTIONS:
        section = benchmarks_md.read_section(out, begin, end)
        if section is not None:
            kept += "\n" + section + "\n"
    out.write_text("\n".join(lines) + "\n" + kept, encoding="utf-8")
    benchmarks_md.write_section(out, bench_data_ranks.render(results["data_ranks"]), bench_data_ranks.BEGIN,
                                bench_data_ranks.END)
    print(f"wrote {args.out} and {json_out}")


if __name__ == "__main__":
    main()
