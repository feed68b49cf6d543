"""Per-rank data time per step at simulated 1, 8 and 64 ranks: data lanes against every rank packing the whole batch.

The data path of ``mtf train`` alone (no model), driven as rank 0 of ``W`` ranks would drive it, with
the per-rank batch fixed (``--rows-per-rank`` packed rows per rank per step, so the global batch grows
with ``W``, as it does when a run adds GPUs):

* **lanes** (this stack): :func:`train.data.pipeline.build_training_data` for rank 0 of ``W``
  (``data.lanes=auto``): rank 0 builds only its own lanes, i.e. its ``rows_per_rank`` rows;
* **global** (the design before lanes, and what every rank of t-zero / Megatron-style loaders does when
  each rank reads the whole stream): one mixture stream and one packer build all ``rows_per_rank x W``
  global rows on every rank, which keeps its slice.

Timed per step, both arms alike: building the rank's rows (mixture draws, token lookups, best-fit
packing), the step's data counts (:func:`train.data.pipeline.step_counts` over the rows the rank built)
and collating the rank's rows into its micro-batch tensors. Not timed: tokenizing the tasks (cached,
once per run) and the warm-up steps that fill the packers' windows (``2 x data.pack_window / rows per
lane`` steps per arm, so both are measured in steady state). Each arm runs at least ``--steps`` steps and
``--min-seconds`` seconds. Each repeat runs every ``W`` with the two arms alternating (lanes, global);
the figures are the min and median over repeats of the mean seconds per step, and the ratios divide the medians by the same arm's median at 1 rank.

Data: the shipped demo mixture (``configs/demo.yaml``: three tasks through their PromptSource templates,
the real T5 tokenizer, enc-dec rows of 256 / 64 tokens, window 64).

Usage::

    python scripts/bench_data_ranks.py [--ranks 1 8 64] [--rows-per-rank 8] [--steps 20] [--min-seconds 2] [--repeats 5] [--json]
    python scripts/bench_data_ranks.py --write-benchmarks BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from bench_env import REPO  # offline Hugging Face, this checkout first on sys.path: before torch / train
import benchmarks_md  # noqa: E402

BEGIN, END = "<!-- bench_data_ranks:begin -->", "<!-- bench_data_ranks:end -->"


class SimulatedRank:
    """The part of an ``accelerate.Accelerator`` the data pipeline reads: which rank of how many."""

    def __init__(self, rank: int, world_size: int):
        self.process_index, self.num_processes = rank, world_size

    def print(self, *args, **kwargs) -> None:
        pass

    def main_process_first(self):
        return nullcontext()


def build(cfg, tokenizer, kind: str, world_size: int, rows_per_rank: int, arm: str):
    """(data lanes of rank 0, rows the arm builds per step, rows rank 0 trains on per step)."""
    from dataclasses import replace

    from train.data import pipeline

    global_rows = rows_per_rank * world_size
    if arm == "lanes":
        data, _ = pipeline.build_training_data(cfg, tokenizer, kind, SimulatedRank(0, world_size), global_rows=global_rows)
        return data, rows_per_rank
    one = replace(cfg, data=replace(cfg.data, lanes=1))  # one stream, one packer, all the global rows
    data, _ = pipeline.build_training_data(one, tokenizer, kind, SimulatedRank(0, 1), global_rows=global_rows)
    return data, global_rows


def time_arm(cfg, tokenizer, info, world_size: int, rows_per_rank: int, steps: int, arm: str,
             min_seconds: float) -> dict:
    from train.data import pipeline
    from train.modeling.features import collate

    data, built = build(cfg, tokenizer, info.kind, world_size, rows_per_rank, arm)
    tasks = sorted({s.task for s in data.sources})
    warmup = math.ceil(2 * cfg.data.pack_window / data.rows_per_lane)

    def step() -> None:
        rows = data.next_rows()
        pipeline.step_counts(rows, data.stats, info.kind, cfg, micro_batch_rows=rows_per_rank, tasks=tasks)
        collate(rows[:rows_per_rank], kind=info.kind, pad_id=info.pad_token_id, decoder_start_id=info.decoder_start_token_id,
                max_input_tokens=cfg.data.max_input_tokens, max_target_tokens=cfg.data.max_target_tokens,
                max_tokens=cfg.data.max_tokens, pad_to=cfg.data.padding())

    for _ in range(warmup):
        step()
    start, done = time.perf_counter(), 0
    while done < steps or time.perf_counter() - start < min_seconds:  # a step of 3 ms is noise alone
        step()
        done += 1
    seconds = (time.perf_counter() - start) / done
    return {"seconds_per_step": seconds, "rows_built_per_step": built, "lanes_of_rank": len(data.mine),
            "lanes": data.lanes, "warmup_steps": warmup, "timed_steps": done}


def measure(args) -> dict:
    import torch

    from train.config import load_config
    from train.modeling.models import load_model_config, load_tokenizer, model_info

    torch.set_num_threads(args.threads)
    cache = tempfile.mkdtemp(prefix="bench_data_ranks_")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.cache_dir={cache}", "eval.mixture=null"])
    tokenizer = load_tokenizer(cfg.model)
    info = model_info(cfg.model, load_model_config(cfg.model), tokenizer)
    results: dict = {f"{arm}@{w}": [] for w in args.ranks for arm in ("lanes", "global")}
    meta: dict = {}
    for _ in range(args.repeats):
        for w in args.ranks:
            for arm in ("lanes", "global"):  # alternating, every repeat
                r = time_arm(cfg, tokenizer, info, w, args.rows_per_rank, args.steps, arm, args.min_seconds)
                results[f"{arm}@{w}"].append(r["seconds_per_step"])
                meta[f"{arm}@{w}"] = {k: v for k, v in r.items() if k != "seconds_per_step"}
    return {"ranks": args.ranks, "rows_per_rank": args.rows_per_rank, "steps": args.steps,
            "min_seconds": args.min_seconds, "repeats": args.repeats,
            "threads": args.threads, "pack_window": cfg.data.pack_window, "table": tabulate(results, args.ranks, meta),
            "raw_seconds_per_step": results, "meta": meta}


def tabulate(raw: dict[str, list[float]], ranks: list[int], meta: dict) -> list[dict]:
    """One row per rank count: ms per step (min, median) and the median against the same arm at ``ranks[0]``.

    Args:
        raw: ``"{arm}@{ranks}"`` -> seconds per step, one per repeat (repeat ``i`` of every key ran in one round).
        meta: ``"{arm}@{ranks}"`` -> what the arm built (lanes, rows), from :func:`time_arm`.
    """
    table = []
    for w in ranks:
        row = {"ranks": w}
        for arm in ("lanes", "global"):
            times, base_times = raw[f"{arm}@{w}"], raw[f"{arm}@{ranks[0]}"]
            per_repeat = [t / b for t, b in zip(times, base_times)]
            row[arm] = {"min_ms": 1e3 * min(times), "median_ms": 1e3 * statistics.median(times),
                        "vs_1_rank": statistics.median(times) / statistics.median(base_times),
                        "vs_1_rank_spread": [min(per_repeat), max(per_repeat)], **meta[f"{arm}@{w}"]}
        table.append(row)
    return table


def render(results: dict) -> str:
    pooled = (f" ({results['invocations']} processes of {results['repeats'] // results['invocations']} pooled)"
              if results.get("invocations", 1) > 1 else "")
    lines = [BEGIN, "## Per-rank data time at simulated rank counts (`scripts/bench_data_ranks.py`)", "",
             f"The data path of `mtf train` alone, as rank 0 of W ranks runs it, {results['rows_per_rank']} packed rows per "
             f"rank per step (the global batch grows with W), demo mixture (3 tasks, PromptSource templates, T5 tokenizer, "
             f"enc-dec 256/64, window {results['pack_window']}). Timed per step: building the rank's rows, the step's data "
             f"counts, collating the rank's micro-batch; steady state (warm-up steps fill the windows first). "
             f"**lanes**: `data.lanes=auto`, rank 0 builds only its lanes. **global**: one stream and one packer build the "
             f"whole global batch on every rank (the design before lanes). {results['repeats']} repeats{pooled}, arms alternating, "
             f"at least {results['steps']} steps and {results['min_seconds']:g} s each, {results['threads']} torch thread(s); ms per step as min / median; "
             "\"vs 1 rank\" = median / the same arm's median at 1 rank, with the range of per-repeat ratios.", "",
             "| ranks | lanes (of rank 0 / all) | lanes ms/step | lanes vs 1 rank | global rows built | global ms/step | global vs 1 rank |",
             "|---|---|---|---|---|---|---|"]
    for row in results["table"]:
        a, b = row["lanes"], row["global"]
        lines.append(f"| {row['ranks']} | {a['lanes_of_rank']} / {a['lanes']} | {a['min_ms']:.2f} / {a['median_ms']:.2f} | "
                     f"**{a['vs_1_rank']:.2f}x** ({a['vs_1_rank_spread'][0]:.2f}-{a['vs_1_rank_spread'][1]:.2f}) | "
                     f"{b['rows_built_per_step']} | {b['min_ms']:.2f} / {b['median_ms']:.2f} | "
                     f"{b['vs_1_rank']:.2f}x ({b['vs_1_rank_spread'][0]:.2f}-{b['vs_1_rank_spread'][1]:.2f}) |")
    lines += ["", "With lanes the global rows do not depend on W, so a rank trains on what it would in a run with another rank "
              "count (tests: 1 vs 2 processes equal, resume across rank counts exact); the per-rank data time stays flat "
              "while the global design's grows with the global batch.", END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64], help="simulated rank counts; the first is the base")
    parser.add_argument("--rows-per-rank", type=int, default=8, help="packed rows per rank per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm and repeat, at least")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="timed seconds per arm and repeat, at least")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (collate)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--write-benchmarks", default=None, help="rewrite this benchmark's section of this file")
    args = parser.parse_args(argv)
    results = measure(args)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(render(results))
    if args.write_benchmarks:
        benchmarks_md.write_section(Path(args.write_benchmarks), render(results), BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
