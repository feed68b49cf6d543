"""Benchmark the mixture stream: examples/s, tokens/s, restore time and peak memory vs data size.

Writes synthetic tokenized tasks as memory-mapped Arrow files (as the tokenization cache is), then, for
each total size, measures in a fresh process (so peak RSS is per size):

* throughput of ``MixtureStream`` over ``--samples`` items (examples/s, tokens/s, no tracemalloc);
* peak Python heap (tracemalloc) while building the stream and drawing ``--samples`` items;
* ``ru_maxrss`` of the process, and its resident memory split into anonymous (heap) and file-backed
  (the memory-mapped Arrow pages it touched, which the OS can drop) at the end;
* time to ``load_state_dict`` a state taken after ``--samples`` items.

Usage::

    python scripts/bench_mixture.py --sizes 100000 1000000 2000000 --samples 200000 [--json]
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

NUM_TASKS = 8
CHUNK_ROWS = 50_000


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 2_000_000])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.samples)))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_mixture_") as tmp:
        for size in args.sizes:
            folder = Path(tmp) / str(size)
            folder.mkdir()
            # task sizes spread over a factor ~10, like a real mixture
            weights = np.linspace(1.0, 10.0, NUM_TASKS)
            rows = np.maximum(1, (weights / weights.sum() * size).astype(int))
            rows[-1] += size - rows.sum()
            for i, n in enumerate(rows):
                write_task(folder / f"task{i}.arrow", int(n), seed=i)
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(folder), "--samples", str(args.samples)],
                capture_output=True, text=True, check=True,
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            for f in folder.glob("*.arrow"):
                f.unlink()
    if args.json:
        print(json.dumps({"benchmark": "mixture_stream", "results": results}, indent=2))
        return
    keys = list(results[0])
    print(" | ".join(keys))
    for r in results:
        print(" | ".join(str(r[k]) for k in keys))


if __name__ == "__main__":
    main()
