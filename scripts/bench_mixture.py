"""Benchmark the mixture stream: examples/s, tokens/s, restore time and peak memory vs data size.

Writes synthetic tokenized tasks as memory-mapped Arrow files (as the tokenization cache is), then, for
each total size, measures in a fresh process (so peak RSS is per size):

* throughput of ``MixtureStream`` over ``--samples`` items after 1,000 untimed ones (examples/s,
  tokens/s, no tracemalloc);
* peak Python heap (tracemalloc) while building the stream and drawing ``--samples`` items;
* ``ru_maxrss`` of the process, and its resident memory split into anonymous (heap) and file-backed
  (the memory-mapped Arrow pages it touched, which the OS can drop) at the end;
* time to ``load_state_dict`` the state taken after those draws.

The sizes are compared with each other (the rates and the heap must stay flat as the data grows), so
their processes alternate: ``--repeats`` rounds (>= 3) over every size, the order reversed every round
(scripts/bench_baselines.py). Rates, build and restore times are reported as median, min and max over the
rounds; the memory figures as their largest value over the rounds.

Usage::

    python scripts/bench_mixture.py --sizes 100000 1000000 2000000 --samples 200000 [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the alternation discipline

import bench_baselines as bb  # noqa: E402

NUM_TASKS = 8
CHUNK_ROWS = 50_000
WARMUP_DRAWS = 1_000
TIMINGS = ("examples_per_s", "tokens_per_s", "restore_ms", "build_s")  # median [min, max] over the rounds
PEAKS = ("tracemalloc_peak_mib", "max_rss_mib", "rss_anon_mib", "rss_file_mib")  # largest over the rounds


def write_task(path: Path, rows: int, seed: int) -> None:
    """A tokenized task of ``rows`` examples: inputs of 8-64 tokens, targets of 1-16, int32 ids."""
    rng = np.random.default_rng(seed)
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("target_ids", pa.list_(pa.int32()))])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            columns = []
            for low, high in ((8, 65), (1, 17)):
                lengths = rng.integers(low, high, size=n)
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
                values = rng.integers(3, 32_000, size=int(offsets[-1]), dtype=np.int32)
                columns.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)))
            writer.write_batch(pa.record_batch(columns, schema=schema))


def measure(folder: Path, samples: int) -> dict:
    """Run in a fresh process: build the stream over the files in ``folder`` and time it."""
    import datasets

    from train.data import MemberSpec, MixtureSpec, MixtureStream, RateSpec, plan_mixture

    def build():
        dsets = {p.stem: datasets.Dataset.from_file(str(p)) for p in sorted(folder.glob("*.arrow"))}
        spec = MixtureSpec(
            path=folder / "bench.yaml",
            rate=RateSpec(type="examples_proportional", maximum=None),
            members=tuple(MemberSpec(where=f"bench[{i}]", task=t) for i, t in enumerate(dsets)),
        )
        plan = plan_mixture(spec, {t: len(d) for t, d in dsets.items()})
        return dsets, MixtureStream.from_plan(plan, dsets, seed=0)

    start = time.perf_counter()
    dsets, stream = build()
    build_s = time.perf_counter() - start
    for _ in range(WARMUP_DRAWS):
        next(stream)
    tokens = 0
    start = time.perf_counter()
    for _ in range(samples):
        item = next(stream)
        tokens += len(item["input_ids"]) + len(item["target_ids"])
    elapsed = time.perf_counter() - start
    state = stream.state_dict()

    _, fresh = build()
    start = time.perf_counter()
    fresh.load_state_dict(state)
    restore_s = time.perf_counter() - start
    assert next(fresh) == next(stream)  # the restored stream continues exactly
    del dsets, stream, fresh

    tracemalloc.start()
    _, traced = build()
    for _ in range(samples):
        next(traced)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "examples": int(sum(len(s.rows) for s in traced.sources)),
        "samples": samples,
        "build_s": round(build_s, 3),
        "examples_per_s": round(samples / elapsed),
        "tokens_per_s": round(tokens / elapsed),
        "restore_ms": round(restore_s * 1000, 2),
        "state_json_bytes": len(json.dumps(state)),
        "tracemalloc_peak_mib": round(peak / 2**20, 2),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **_rss_split(),
    }


def _rss_split() -> dict:
    """Anonymous (heap) vs file-backed (memory-mapped Arrow pages, reclaimable) resident MiB, Linux only."""
    out = {}
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile"):
                out[f"{key.lower()[:3]}_{key[3:].lower()}_mib"] = round(int(line.split()[1]) / 1024, 1)
    return out


def write_sizes(root: Path, sizes: list[int]) -> dict[int, Path]:
    """One folder of task files per total size; task sizes spread over a factor ~10, like a real mixture."""
    folders = {}
    for size in sizes:
        folder = root / str(size)
        folder.mkdir()
        weights = np.linspace(1.0, 10.0, NUM_TASKS)
        rows = np.maximum(1, (weights / weights.sum() * size).astype(int))
        rows[-1] += size - rows.sum()
        for i, n in enumerate(rows):
            write_task(folder / f"task{i}.arrow", int(n), seed=i)
        folders[size] = folder
    return folders


def summarize(runs: list[dict]) -> dict:
    """One size's rounds: rates as median / min / max, memory as the largest, the rest from the first round."""
    out = dict(runs[0])
    for key in TIMINGS:
        s = bb.spread([r[key] for r in runs])
        out[key], out[f"{key}_min"], out[f"{key}_max"] = s["median"], s["min"], s["max"]
        out[f"{key}_values"] = s["values"]  # per round, so write_benchmarks.py can pool invocations
    for key in PEAKS:
        if key in runs[0]:
            out[key] = max(r[key] for r in runs)
    out["repeats"] = len(runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 2_000_000])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3,
                        help=f"alternating rounds over the sizes (>= {bb.MIN_REPEATS})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.samples)))
        return
    if args.repeats < bb.MIN_REPEATS:
        parser.error(f"--repeats must be at least {bb.MIN_REPEATS}")
    runs: dict[int, list[dict]] = {size: [] for size in args.sizes}
    with tempfile.TemporaryDirectory(prefix="bench_mixture_") as tmp:
        folders = write_sizes(Path(tmp), args.sizes)

        def child(size: int):
            def once() -> float:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(folders[size]), "--samples", str(args.samples)],
                    capture_output=True, text=True, check=True,
                )
                runs[size].append(json.loads(out.stdout.strip().splitlines()[-1]))
                return runs[size][-1]["examples_per_s"]
            return once

        bb.alternate({size: child(size) for size in args.sizes}, args.repeats)
    results = [summarize(runs[size]) for size in args.sizes]
    if args.json:
        print(json.dumps({"benchmark": "mixture_stream", "repeats": args.repeats, "results": results}, indent=2))
        return
    keys = list(results[0])
    print(" | ".join(keys))
    for r in results:
        print(" | ".join(str(r[k]) for k in keys))


if __name__ == "__main__":
    main()
