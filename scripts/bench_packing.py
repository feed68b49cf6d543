"""Benchmark packing: efficiency vs pad-to-longest, training tokens/s against unpacked and peer trainers.

Data: ``data_mixtures/local_train.yaml``, 10 real tasks from ``../shared/data/tasks``, each rendered
with every one of its PromptSource templates by the project's task machinery (``train.data``: source ->
preprocessors -> sandboxed Jinja), tokenized by ``tokenize_prompted`` with the real T5 tokenizer
(``../shared/data/tokenizers/t5``), and drawn in order from the seeded examples-proportional mixture
stream, as ``mtf train`` draws them (``--rows-per-task`` source rows per task).

What is compared:

* efficiency (real tokens / token slots; deterministic, measured once): ``Packer`` rows at decoder 1024
  and enc-dec 1024 / 256 tokens against the same examples in batches of 32 padded to their longest
  example (t-zero's batches);
* packer: examples/s of ``Packer.next_row`` (decoder, 1024, window 16), median [min-max] of repeats;
* training throughput, real (non-pad) input + target tokens per second, on a tiny model built from
  ``configs/models/llama_tiny.json`` (decoder) and ``configs/models/t5_tiny.json`` (enc-dec), random init,
  fp32, CPU, the same torch threads, AdamW, clipping at 1.0, the same first examples of the same stream:

  - ``mtf_packed``: the real trainer (``train.loop.train``, i.e. ``mtf train``) with ``data.packing=true``,
    ``--rows-per-step`` rows of the row capacity per step (decoder 512 tokens, enc-dec 256 / 64);
  - ``mtf_unpacked``: the real trainer with ``data.packing=false``: one example per row, each micro-batch
    padded to its longest row; as many examples per step as ``mtf_packed`` averages (rows per step x
    examples per packed row, rounded);
  - ``hf_trainer``: ``transformers.Trainer`` + ``DataCollatorForSeq2Seq`` (pad to longest), the same examples
    per step in the same order as ``mtf_unpacked`` (so the same batches; the script checks their tokens);
  - ``trl_sft`` (decoder, when ``trl`` is installed): ``trl.SFTTrainer(packing=True)``, its BFD packing,
    the same rows per step as ``mtf_packed``. See scripts/bench_baselines.py for both baselines.

  Each run trains ``--warmup-steps`` untimed steps, then ``--train-steps`` timed ones (default: 8 for the
  decoder, 32 for the enc-dec model, whose steps are about 10x shorter; see TIMED_STEPS). The arms alternate,
  the order reversed every round, for ``--repeats`` rounds (>= 3); each arm reports the median and the
  min-max of its per-round rates, each ratio the ratio of medians and the min-max of per-round ratios.

Usage::

    python scripts/bench_packing.py [--examples 6000] [--repeats 3] [--train-steps N] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

from bench_env import REPO  # offline Hugging Face, this checkout first on sys.path: before torch / train

import torch  # noqa: E402

import bench_baselines as bb  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import (MixtureStream, Packer, count_examples, load_train_tasks, plan_mixture,  # noqa: E402
                        tokenize_prompted)

SHARED = Path(os.environ.get("MTF_SHARED_DIR", REPO.parent / "shared")) / "data"
MIXTURE = REPO / "data_mixtures" / "local_train.yaml"
MODELS = {"decoder": REPO / "configs/models/llama_tiny.json", "encdec": REPO / "configs/models/t5_tiny.json"}
# Row capacities of the training arms: the trainer's decoder default, and the demo's enc-dec ones.
TRAIN_CAPS = {"decoder": {"max_tokens": 512}, "encdec": {"max_input_tokens": 256, "max_target_tokens": 64}}
# Timed steps per round: a few seconds on one core for either kind. A t5_tiny step takes about a tenth of a
# llama_tiny one, and at 8 steps its sub-second rounds moved a ratio by 20-30% from round to round.
TIMED_STEPS = {"decoder": 8, "encdec": 32}
LR = 1e-3
PAD_BATCH = 32  # examples per pad-to-longest batch in the efficiency baseline
# One data lane: the trainer's rows come from the one seeded stream in order, so the baselines can be given
# the same examples (train/data/lanes.py).
ONE_LANE = ["data.lanes=1"]


# ----------------------------------------------------------------------------------------- data


def bench_config(kind: str, args: argparse.Namespace, *overrides: str):
    """The run config of the benchmark: the mixture, the tiny model, the row capacities, the optimizer."""
    caps = [f"data.{key}={value}" for key, value in TRAIN_CAPS[kind].items()]
    return load_config(None, [
        f"model.config={MODELS[kind]}", f"model.tokenizer={SHARED / 'tokenizers' / 't5'}",
        f"data.train_mixture={MIXTURE}", f"data.max_examples_per_task={args.rows_per_task}", *caps,
        "trainer.precision=fp32", "trainer.cpu=true", f"trainer.seed={args.seed}", "optim.name=adamw",
        f"optim.lr={LR}", "optim.weight_decay=0.0", "optim.clip_grad_norm=1.0", "schedule.name=constant",
        "schedule.warmup_steps=0", "logging.every_steps=1", "logging.progress_bar=false",
        "logging.wandb.mode=disabled", "checkpoint.export_final=false", *ONE_LANE, *overrides])


def example_stream(cfg, tokenizer, kind: str) -> MixtureStream:
    """The seeded mixture stream of the config's tasks: the stages ``mtf train`` runs, in the same order."""
    spec, tasks = load_train_tasks(cfg)
    tokenized = {name: tokenize_prompted(task.prompted(cfg.data.max_examples_per_task, cache_dir=cfg.data.cache_dir),
                                         tokenizer, kind)
                 for name, task in tasks.items()}
    return MixtureStream.from_plan(plan_mixture(spec, count_examples(tokenized)), tokenized, seed=cfg.trainer.seed)


def padded_efficiency(examples: list[dict], kind: str, caps: dict, batch: int = PAD_BATCH) -> dict:
    """Pad-to-longest per batch of ``batch`` examples (after the same truncation as the packer)."""
    fitted = list(Packer(kind, pack=False, **caps).rows(iter(examples)))
    real_in = real_tgt = cap_in = cap_tgt = 0
    for i in range(0, len(fitted), batch):
        rows = fitted[i : i + batch]
        real_in += sum(len(r["input_ids"]) for r in rows)
        cap_in += max(len(r["input_ids"]) for r in rows) * len(rows)
        if kind == "encdec":
            real_tgt += sum(len(r["target_ids"]) for r in rows)
            cap_tgt += max(len(r["target_ids"]) for r in rows) * len(rows)
    if kind == "encdec":
        both = (real_in + real_tgt) / (cap_in + cap_tgt)
        return {"input": real_in / cap_in, "target": real_tgt / cap_tgt, "both": both}
    return {"both": real_in / cap_in}


def efficiency(examples: dict[str, list[dict]]) -> tuple[dict, dict]:
    dec_caps = {"max_tokens": 1024}
    packer = Packer("decoder", window=16, **dec_caps)
    list(packer.rows(iter(examples["decoder"])))
    decoder = {
        "packed_efficiency": packer.efficiency()["efficiency"],
        "padded_efficiency": padded_efficiency(examples["decoder"], "decoder", dec_caps)["both"],
        "examples_per_row": packer.efficiency()["examples_per_row"],
        "truncated_inputs": packer.stats["truncated_inputs"],
    }
    ed_caps = {"max_input_tokens": 1024, "max_target_tokens": 256}
    packer = Packer("encdec", window=16, **ed_caps)
    list(packer.rows(iter(examples["encdec"])))
    eff, st = packer.efficiency(), packer.stats
    padded = padded_efficiency(examples["encdec"], "encdec", ed_caps)
    encdec = {
        "packed_efficiency": (st["input_tokens"] + st["target_tokens"]) / (st["rows"] * (1024 + 256)),
        "padded_efficiency": padded["both"],
        "packed_input_efficiency": eff["input_efficiency"],
        "packed_target_efficiency": eff["target_efficiency"],
        "padded_input_efficiency": padded["input"],
        "padded_target_efficiency": padded["target"],
        "examples_per_row": eff["examples_per_row"],
    }
    return decoder, encdec


def packer_speed(examples: list[dict], repeats: int, passes: int = 3) -> dict:
    """Examples/s of the decoder packer over ``passes`` passes of the examples, once per repeat (+1 warm-up)."""
    def once() -> float:
        stream = (ex for _ in range(passes) for ex in examples)
        packer = Packer("decoder", max_tokens=1024, window=16)
        start = time.perf_counter()
        for _ in packer.rows(stream):
            pass
        return packer.stats["examples_seen"] / (time.perf_counter() - start)

    once()  # warm-up
    return bb.spread(bb.alternate({"packer": once}, repeats)["packer"])


# ----------------------------------------------------------------------------------------- training


def mtf_run(cfg_overrides: list[str], kind: str, args: argparse.Namespace, work: Path, timed: int) -> dict:
    """One real ``mtf train`` run (``train.loop.train``, in this process), timed from its metrics.jsonl.

    With ``logging.every_steps=1`` each step logs ``tokens_per_second`` over the window since the
    previous step's log (data, packing, forward, backward, optimizer, hooks) and the cumulative
    ``tokens_seen``; their quotient is the step's seconds.
    """
    from train.loop import read_metrics, train

    out = Path(tempfile.mkdtemp(prefix="mtf_", dir=work))
    cfg = bench_config(kind, args, f"run.output_dir={out}",
                       f"trainer.max_steps={args.warmup_steps + timed}", *cfg_overrides)
    train(cfg)
    logged = [m for m in read_metrics(out) if "tokens_per_second" in m]
    seen = [0] + [m["tokens_seen"] for m in logged]
    tokens = [b - a for a, b in zip(seen, seen[1:])]
    ends, clock = [], 0.0
    for n, m in zip(tokens, logged):
        clock += n / m["tokens_per_second"]
        ends.append(clock)
    return {**bb.window_rate(tokens, ends, args.warmup_steps), "step_tokens": tokens}


def train_throughput(kind: str, args: argparse.Namespace, tokenizer, work: Path) -> dict:
    """Alternate the training arms of one model kind (see the module docstring); rates, ratios and settings."""
    from train.modeling import build_run_model, load_model_config

    timed = args.train_steps or TIMED_STEPS[kind]
    steps = args.warmup_steps + timed
    cfg = bench_config(kind, args)
    stream = example_stream(cfg, tokenizer, kind)
    caps = TRAIN_CAPS[kind]
    # Examples per packed row at the training capacity (the trainer's window), on the examples the runs see.
    probe = Packer(kind, window=cfg.data.pack_window, **caps)
    probe_rows = list(islice(probe.rows(stream), args.rows_per_step * steps * 2))
    per_row = probe.stats["examples_packed"] / len(probe_rows)
    batch = max(1, round(args.rows_per_step * per_row))  # examples per unpacked step
    stream = example_stream(cfg, tokenizer, kind)  # from the start again
    singles = list(islice(Packer(kind, pack=False, **caps).rows(stream), 2 * batch * steps))

    arms: dict = {}  # name -> one timed run, returning its rate
    last: dict[str, dict] = {}  # name -> the figures of its latest run

    def model():
        return build_run_model(cfg, load_model_config(cfg.model), kind)

    def arm(name: str, run) -> None:
        def once() -> float:
            with contextlib.redirect_stdout(sys.stderr):  # the trainers print; stdout is kept for the JSON
                last[name] = run()
            print(f"[bench_packing] {kind} {name}: {last[name]['tokens_per_s']:,.0f} real tokens/s",
                  file=sys.stderr, flush=True)
            return last[name]["tokens_per_s"]
        arms[name] = once

    rows = args.rows_per_step
    arm("mtf_packed", lambda: mtf_run(["data.packing=true", f"trainer.global_batch_size={rows}",
                                       f"trainer.micro_batch_size={rows}"], kind, args, work, timed))
    arm("mtf_unpacked", lambda: mtf_run(["data.packing=false", f"trainer.global_batch_size={batch}",
                                         f"trainer.micro_batch_size={batch}"], kind, args, work, timed))
    arm("hf_trainer", lambda: bb.hf_trainer_run(
        model(), tokenizer, singles, kind, batch_size=batch, warmup_steps=args.warmup_steps, steps=timed,
        lr=LR, seed=args.seed, out_dir=tempfile.mkdtemp(prefix="hf_", dir=work)))
    trl, why = bb.trl_version()
    skipped = {}
    if kind != "decoder":
        skipped["trl_sft"] = "TRL's SFTTrainer trains decoder-only models"
    elif trl is None or args.no_trl:
        skipped["trl_sft"] = "--no-trl" if args.no_trl else why
    else:
        arm("trl_sft", lambda: bb.trl_sft_run(
            model(), tokenizer, singles, rows_per_step=rows, max_length=caps["max_tokens"],
            warmup_steps=args.warmup_steps, steps=timed, lr=LR, seed=args.seed,
            out_dir=tempfile.mkdtemp(prefix="trl_", dir=work)))
    rates = bb.alternate(arms, args.repeats)
    result = {
        "model": str(MODELS[kind].relative_to(REPO)), "capacity": caps, "rows_per_step": rows,
        "examples_per_packed_row": per_row, "examples_per_unpacked_step": batch,
        "warmup_steps": args.warmup_steps, "timed_steps": timed, "repeats": args.repeats,
        "tokens_per_s": {name: bb.spread(values) for name, values in rates.items()},
        # Same batches: mtf's unpacked run and the HF Trainer saw the same real tokens in every step.
        "same_batches_mtf_unpacked_hf": last["mtf_unpacked"]["step_tokens"] == last["hf_trainer"]["step_tokens"],
        "skipped": skipped,
    }
    pairs = [("mtf_packed", "mtf_unpacked"), ("mtf_unpacked", "hf_trainer"), ("mtf_packed", "hf_trainer"),
             ("mtf_packed", "trl_sft")]
    result["ratios"] = {f"{a}/{b}": bb.ratio(rates[a], rates[b]) for a, b in pairs if a in rates and b in rates}
    if trl is not None and "trl_sft" in rates:
        result["trl_version"] = trl
        result["trl_packed_rows"] = last["trl_sft"]["packed_rows"]
    return result


# ----------------------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=6000, help="examples of the stream in the efficiency tables")
    parser.add_argument("--rows-per-task", type=int, default=300,
                        help="source rows per task (data.max_examples_per_task)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds of every timed arm (>= 3)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed training steps at the start of every run")
    parser.add_argument("--train-steps", type=int, default=None,
                        help=f"timed training steps of every run (default per kind: {TIMED_STEPS})")
    parser.add_argument("--rows-per-step", type=int, default=2, help="packed rows per training step")
    parser.add_argument("--kinds", nargs="+", choices=sorted(MODELS), default=["decoder", "encdec"],
                        help="model kinds of the training benchmark")
    parser.add_argument("--no-train", action="store_true", help="efficiency and packer speed only")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL arm even when trl is installed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not (SHARED / "tasks").is_dir():
        sys.exit(f"bench_packing: needs the shared data folder {SHARED} (set MTF_SHARED_DIR)")
    if args.repeats < bb.MIN_REPEATS:
        parser.error(f"--repeats must be at least {bb.MIN_REPEATS}")
    if args.warmup_steps < 1 or (args.train_steps is not None and args.train_steps < 1):
        parser.error("--warmup-steps and --train-steps must be at least 1 (the first step is never timed)")
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    print(f"[bench_packing] torch threads: {torch.get_num_threads()}", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "t5"))
    examples = {kind: list(islice(example_stream(bench_config(kind, args), tokenizer, kind), args.examples))
                for kind in ("decoder", "encdec")}
    decoder, encdec = efficiency(examples)
    result = {
        "data": f"{MIXTURE.relative_to(REPO)}: every PromptSource template of its tasks, {args.rows_per_task} "
                "source rows per task, real T5 tokenizer, the seeded mixture stream",
        "examples": args.examples,
        "threads": torch.get_num_threads(),
        "decoder": decoder,
        "encdec": encdec,
        "packer": packer_speed(examples["decoder"], args.repeats),
        "train": {},
    }
    if not args.no_train:
        with tempfile.TemporaryDirectory(prefix="bench_packing_") as work:
            for kind in args.kinds:
                result["train"][kind] = train_throughput(kind, args, tokenizer, Path(work))
    if args.json:
        print(json.dumps(result))
        return
    print(f"data: {result['data']}; {args.examples} examples; torch threads {result['threads']}")
    for name in ("decoder", "encdec"):
        print(name, {k: round(v, 3) for k, v in result[name].items()})
    p = result["packer"]
    print(f"packer: {p['median']:,.0f} examples/s (min {p['min']:,.0f}, max {p['max']:,.0f})")
    for kind, t in result["train"].items():
        print(f"\ntraining, {kind} ({t['model']}, {t['capacity']}): {t['rows_per_step']} packed rows or "
              f"{t['examples_per_unpacked_step']} examples per step; {t['warmup_steps']} warm-up + "
              f"{t['timed_steps']} timed steps; {t['repeats']} alternating rounds")
        for name, s in t["tokens_per_s"].items():
            print(f"  {name:<13} {s['median']:9,.0f} real tokens/s   (min {s['min']:,.0f}, max {s['max']:,.0f})")
        for name, r in t["ratios"].items():
            print(f"  {name:<26} {r['ratio']:.2f}x   (per round {r['min']:.2f}-{r['max']:.2f})")
        for name, why in t["skipped"].items():
            print(f"  {name}: skipped ({why})")
        if not t["same_batches_mtf_unpacked_hf"]:
            print("  WARNING: mtf_unpacked and hf_trainer did not see the same tokens per step")


if __name__ == "__main__":
    main()
