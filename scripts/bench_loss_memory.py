"""Peak memory of one training step at a 250k vocabulary: full logits against ``trainer.loss_chunk_tokens``.

One step = the forward pass, the loss and its backward pass (no optimizer), exactly as ``mtf train`` runs
them (:func:`train.modeling.features.model_forward` or :func:`~train.modeling.features.head_inputs`, then
:func:`train.modeling.losses.local_numerators` and :func:`~train.modeling.losses.weighted_loss`, token_mean),
on CPU in fp32, for a Llama-style decoder with a tiny body (hidden 256, 2 layers, untied output layer) and
a BLOOM/mT5-size vocabulary of 250,000, on 2 packed rows of 2048 tokens (random examples: input and target
32-512 tokens each, so about half the positions carry a label). Arms:

* **full**: today's path, ``(tokens, vocab)`` fp32 logits for every position (the default, None);
* **chunk N**: the output layer and the NLL over N label positions at a time, recomputed in the backward.

How memory is measured (CPU torch has no ``torch.cuda.max_memory_allocated``): the step runs inside
``torch.profiler.profile(activities=[CPU], profile_memory=True)``, which records every allocation and free
of tensor storage made through c10's CPU allocator (``[memory]`` events, bytes +/-, with a timestamp);
sorted by time and summed, they give the bytes held by tensors at every moment of the step, and the
**tensor peak** is the maximum of that running sum (it starts at 0: weights and inputs that exist before
the step are not counted; the weights' gradients, created in the backward, are). As a cross-check from
outside torch, the process's peak resident memory is reset before the step (``/proc/self/clear_refs`` = 5,
Linux) and the **RSS peak growth** is ``VmHWM`` after the step minus ``VmRSS`` before it. The large
logits buffers (mmapped by glibc, returned on free) are counted by both, so the two agree within a few
percent at this vocabulary; RSS can run below the tensor peak (glibc keeps freed blocks under its mmap
threshold, up to 32 MiB, resident, so earlier steps' memory is already in ``VmRSS`` and is reused) or a
little above it (allocator overhead, non-tensor memory). Step time is the wall time of the profiled step
(the profiler adds a few ms to a step of tens of seconds).

Each repeat runs every arm once, the arms alternating with the order reversed every other repeat; the
figures are min and median over repeats. The arms' losses are checked equal (within 1e-5 relative).

Usage::

    python scripts/bench_loss_memory.py [--vocab 250000] [--rows 2] [--tokens 2048] [--chunks 4096 1024]
                                        [--repeats 3] [--threads 2] [--json] [--write-benchmarks BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))  # benchmarks_md
import benchmarks_md  # noqa: E402

BEGIN, END = "<!-- bench_loss_memory:begin -->", "<!-- bench_loss_memory:end -->"
MIB = 2 ** 20


def build(args):
    """(model, batch): the tiny-body decoder and one micro-batch of packed rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.data.packing import Packer
    from train.modeling.features import collate

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=args.vocab,
                         max_position_embeddings=args.tokens, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).train()
    rng = random.Random(0)
    examples = ({"input_ids": [rng.randrange(2, args.vocab) for _ in range(rng.randint(32, 512))],
                 "target_ids": [rng.randrange(2, args.vocab) for _ in range(rng.randint(32, 512))],
                 "task": "t", "index": i} for i in range(10 ** 6))
    rows = Packer("decoder", max_tokens=args.tokens, window=8).rows(examples)
    batch = collate([next(rows) for _ in range(args.rows)], "decoder", pad_id=0, max_tokens=args.tokens)
    return model, batch


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def tensor_peak_bytes(prof) -> int:
    """Largest running sum of the profiler's allocation (+) and free (-) events, in time order."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def step(model, batch, chunk: int | None) -> dict:
    """One profiled forward + loss + backward; its tensor peak, RSS peak growth, seconds and loss."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from train.modeling import losses
    from train.modeling.features import head_inputs, model_forward

    weights = {"lm": 1.0}
    denominators = losses.local_denominators(batch, "token_mean", weights)
    model.zero_grad(set_to_none=True)
    gc.collect()
    rss_before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        logits = (model_forward(model, batch, "decoder") if chunk is None
                  else head_inputs(model, batch, "decoder", chunk_tokens=chunk))
        numerators = losses.local_numerators(logits, batch, "token_mean", weights)
        loss = losses.weighted_loss(numerators, denominators, weights, mode="token_mean")
        loss.backward()
        seconds = time.perf_counter() - start
        del logits, numerators
    rss_growth = (_rss_kib("VmHWM") - rss_before) * 1024
    return {"tensor_peak_bytes": tensor_peak_bytes(prof), "rss_peak_growth_bytes": rss_growth, "seconds": seconds,
            "loss": loss.item()}


def measure(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, batch = build(args)
    labels = int((batch["labels"] != -100).sum())
    arms = [None, *args.chunks]
    raw: dict[str, list[dict]] = {_name(a): [] for a in arms}
    for repeat in range(args.repeats):
        for arm in (arms if repeat % 2 == 0 else arms[::-1]):
            raw[_name(arm)].append(step(model, batch, arm))
    reference = raw["full"][0]["loss"]
    for name, runs in raw.items():
        for run in runs:
            assert abs(run["loss"] - reference) <= 1e-5 * abs(reference), (name, run["loss"], reference)
    full_peak = statistics.median(r["tensor_peak_bytes"] for r in raw["full"])
    table = []
    for arm in arms:
        runs = raw[_name(arm)]
        row = {"arm": _name(arm), "chunk_tokens": arm}
        for key in ("tensor_peak_bytes", "rss_peak_growth_bytes", "seconds"):
            values = [r[key] for r in runs]
            row[key] = {"min": min(values), "median": statistics.median(values)}
        row["peak_vs_full"] = row["tensor_peak_bytes"]["median"] / full_peak
        table.append(row)
    params = sum(p.numel() for p in model.parameters())
    return {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "rows": args.rows, "tokens": args.tokens,
            "positions": batch["labels"].numel(), "label_positions": labels, "parameters": params,
            "parameter_bytes": 4 * params, "full_logits_bytes": 4 * batch["labels"].numel() * args.vocab,
            "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__, "loss": reference,
            "table": table, "raw": raw}


def _name(chunk: int | None) -> str:
    return "full" if chunk is None else f"chunk {chunk}"


def render(results: dict) -> str:
    r = results
    lines = [BEGIN, "## Peak memory of a training step at vocab 250k (`scripts/bench_loss_memory.py`)", "",
             f"One forward + loss + backward (token_mean, fp32, CPU, torch {r['torch']}, {r['threads']} threads) of a Llama-style "
             f"decoder with a tiny body (hidden {r['hidden']}, {r['layers']} layers, {r['parameters'] / 1e6:.0f}M parameters, "
             f"almost all in the untied embedding and output layer) and vocab {r['vocab']:,}, on {r['rows']} packed rows of "
             f"{r['tokens']} tokens ({r['label_positions']:,} of {r['positions']:,} positions carry a label). **full**: today's "
             f"path, fp32 logits for every position ({r['full_logits_bytes'] / MIB:,.0f} MiB per copy); **chunk N**: "
             "`trainer.loss_chunk_tokens=N`, the output layer and NLL over N label positions at a time, recomputed in the "
             "backward. Tensor peak: the largest sum of live tensor bytes during the step, from `torch.profiler`'s allocation "
             "events (`profile_memory=True`; the weights' gradients, created in the backward, "
             f"{r['parameter_bytes'] / MIB:,.0f} MiB, are included). RSS peak growth: `VmHWM` after the step minus `VmRSS` "
             f"before it (`/proc/self/clear_refs`). {r['repeats']} repeats, arms alternating; min / median. The arms' losses "
             "agree within 1e-5.", "",
             "| arm | tensor peak (MiB) | vs full | RSS peak growth (MiB) | step (s) |", "|---|---|---|---|---|"]
    for row in r["table"]:
        peak, rss, sec = row["tensor_peak_bytes"], row["rss_peak_growth_bytes"], row["seconds"]
        lines.append(f"| {row['arm']} | {peak['min'] / MIB:,.0f} / {peak['median'] / MIB:,.0f} | **{row['peak_vs_full']:.2f}x** | "
                     f"{rss['min'] / MIB:,.0f} / {rss['median'] / MIB:,.0f} | {sec['min']:.1f} / {sec['median']:.1f} |")
    lines += ["", "The chunked arms never hold more than one chunk's logits (and their gradient) at a time, and positions "
              "without a label never reach the output layer; the price is one more output-layer matmul per chunk in the "
              "backward.", END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=250_000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=2, help="packed rows in the micro-batch")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per row")
    parser.add_argument("--chunks", type=int, nargs="+", default=[4096, 1024], help="trainer.loss_chunk_tokens arms")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--write-benchmarks", default=None, help="rewrite this benchmark's section of this file")
    args = parser.parse_args(argv)
    results = measure(args)
    print(json.dumps(results, indent=1) if args.json else render(results))
    if args.write_benchmarks:
        benchmarks_md.write_section(Path(args.write_benchmarks), render(results), BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
