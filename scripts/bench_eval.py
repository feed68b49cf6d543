#!/usr/bin/env python
"""Benchmark: encoder-once rank classification vs naive per-choice scoring (what t-zero does).

The naive scorer repeats every prompt once per answer choice and runs the whole encoder-decoder on each
copy, so the encoder runs ``num_choices`` times per example. ``train.evaluation`` runs it once and repeats
the encoder states. Both score the same tokens; the script checks the scores agree.

Usage:
    python scripts/bench_eval.py [--num-examples 64] [--batch-size 8] [--repeats 5] [--threads 1] [--json]

Timing: one warm-up call of each scorer, then ``--repeats`` rounds alternating the two, the order
reversed every round (scripts/bench_baselines.py), with ``--threads`` torch threads. Each scorer's
examples/s is reported as median, min and max over the rounds; the ratio is encoder-once over naive,
the ratio of the medians, with the min and max of the per-round ratios.

Needs ../shared/data (COPA and Cosmos QA validation sets, the T5 tokenizer). Prints, per task,
naive_examples_per_s, encoder_once_examples_per_s, ratio (ratio_min, ratio_max) and max_abs_score_diff.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_env import REPO  # offline Hugging Face, this checkout first on sys.path: before torch / train

import torch  # noqa: E402

import bench_baselines as bb  # noqa: E402
from train import evaluation as ev  # noqa: E402

SHARED_DATA = Path(os.environ.get("MTF_SHARED_DIR", REPO.parent / "shared")) / "data"


def copa_examples(n: int) -> list[dict]:
    """COPA validation with a simple prompt: premise + 'What was the cause/effect?'; 2 choices."""
    rows = [json.loads(l) for l in open(SHARED_DATA / "tasks/super_glue/copa/validation.jsonl")][:n]
    out = []
    for r in rows:
        choices = [r["choice1"], r["choice2"]]
        out.append({"inputs": f"{r['premise']} What was the {r['question']}?", "targets": [choices[r["label"]]],
                    "answer_choices": choices, "task": "copa_simple", "dataset": "super_glue/copa",
                    "template": "simple", "example_index": r["idx"]})
    return out


def cosmos_examples(n: int) -> list[dict]:
    """Cosmos QA validation: context + question; 4 choices."""
    rows = [json.loads(l) for l in open(SHARED_DATA / "tasks/cosmos_qa/validation.jsonl")][:n]
    out = []
    for i, r in enumerate(rows):
        choices = [r[f"answer{k}"] for k in range(4)]
        out.append({"inputs": f"{r['context']}\nQuestion: {r['question']}", "targets": [choices[int(r["label"])]],
                    "answer_choices": choices, "task": "cosmos_simple", "dataset": "cosmos_qa",
                    "template": "simple", "example_index": i})
    return out


def naive_scores(model, items: list[ev.RankItem], batch_size: int, pad_id: int) -> dict[int, list[float]]:
    """t-zero style: each (example, choice) pair is a full forward; the encoder re-runs for every choice."""
    out: dict[int, list[float]] = {}
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        prompts = [it.prompt_ids for it in batch for _ in it.choice_ids]  # input repeated per choice
        choices = [c for it in batch for c in it.choice_ids]
        ids, mask = ev.pad_sequences(prompts, pad_id)
        labels, lab_mask = ev.pad_sequences(choices, pad_id)
        logits = model(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(lab_mask == 0, -100),
                       use_cache=False).logits
        flat = ev.token_logprobs(logits, labels, lab_mask).tolist()
        for it, scores in zip(batch, ev.split_by_item(flat, batch)):
            out[it.index] = scores
    return out


def bench_task(model, tokenizer, examples: list[dict], batch_size: int, repeats: int) -> dict:
    """Alternate the two scorers (order reversed every round), one warm-up call each, ``repeats`` rounds."""
    evaluator = ev.ZeroShotEvaluator(tokenizer, examples, kind="encdec")
    items = evaluator.rank_items
    # Same example order for both (the encoder-once path sorts by length itself; naive gets it pre-sorted
    # too so padding waste is comparable).
    items_sorted = sorted(items, key=lambda it: -len(it.prompt_ids))
    pad = evaluator.pad
    n = len(items)
    scores = {}

    def timed(name: str, fn):
        def once() -> float:
            start = time.perf_counter()
            scores[name] = fn()
            return n / (time.perf_counter() - start)  # examples/s
        return once

    arms = {"encoder_once": timed("encoder_once", lambda: ev.score_rank_items(model, items, "encdec",
                                                                              batch_size=batch_size, pad_id=pad)),
            "naive": timed("naive", lambda: naive_scores(model, items_sorted, batch_size, pad))}
    with torch.no_grad():
        for once in arms.values():  # warm-up, not timed
            once()
        rates = bb.alternate(arms, repeats)
    fast, naive = scores["encoder_once"], scores["naive"]
    diff = max(abs(a - b) for i in naive for a, b in zip(naive[i], fast[i].sum_logprob))
    ratio = bb.ratio(rates["encoder_once"], rates["naive"])
    return {
        "num_examples": n,
        "num_choices": sorted({len(it.choice_ids) for it in items}),
        "repeats": repeats,
        "naive_examples_per_s": bb.spread(rates["naive"]),
        "encoder_once_examples_per_s": bb.spread(rates["encoder_once"]),
        "ratio": ratio["ratio"],  # encoder-once over naive: the ratio of the median rates
        "ratio_min": ratio["min"],  # min and max of the per-round ratios
        "ratio_max": ratio["max"],
        "ratio_per_round": ratio["per_round"],
        "max_abs_score_diff": diff,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=64, help="examples per task")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward")
    parser.add_argument("--repeats", type=int, default=5,
                        help=f"alternating timed rounds per method (>= {bb.MIN_REPEATS}): median, min and max reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 (default) keeps timings stable on a shared machine")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.repeats < bb.MIN_REPEATS:
        parser.error(f"--repeats must be at least {bb.MIN_REPEATS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not SHARED_DATA.is_dir():
        print(f"bench_eval: needs the shared data folder {SHARED_DATA}", file=sys.stderr)
        return 2

    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(str(SHARED_DATA / "tokenizers/t5"))
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=4,
                   num_decoder_layers=4, decoder_start_token_id=tokenizer.pad_token_id,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = T5ForConditionalGeneration(cfg).eval()
    results = {
        "super_glue/copa (2 choices)": bench_task(model, tokenizer, copa_examples(args.num_examples),
                                                 args.batch_size, args.repeats),
        "cosmos_qa (4 choices)": bench_task(model, tokenizer, cosmos_examples(args.num_examples),
                                            args.batch_size, args.repeats),
    }
    results["threads"] = torch.get_num_threads()
    results["batch_size"] = args.batch_size
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"T5 d256 4+4 layers, vocab {len(tokenizer)}, batch {args.batch_size} examples, "
              f"{torch.get_num_threads()} threads, {args.repeats} alternating rounds (median, min-max)")
        for task, r in results.items():
            if not isinstance(r, dict):
                continue
            naive, fast = r["naive_examples_per_s"], r["encoder_once_examples_per_s"]
            print(f"{task:<28} naive {naive['median']:7.1f} ex/s ({naive['min']:.1f}-{naive['max']:.1f})   "
                  f"encoder-once {fast['median']:7.1f} ex/s ({fast['min']:.1f}-{fast['max']:.1f})   "
                  f"ratio {r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})   "
                  f"max |score diff| {r['max_abs_score_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
