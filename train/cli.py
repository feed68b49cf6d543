"""The ``mtf`` command line.

    mtf train CONFIG [key=value ...]        train (under `accelerate launch` for several processes)
    mtf validate CONFIG [key=value ...]     check a config, its mixtures, templates, model config and tokenizer
    mtf eval MODEL --mixture FILE           zero-shot evaluation of any checkpoint ([--shard I/N] for job arrays)
    mtf eval-merge SHARD.json...            merge `mtf eval --shard` results into one
    mtf templates lint PATH...              load (and with --data, render) PromptSource template files
    mtf tasks preview TASK_OR_MIXTURE       print rendered examples
    mtf mixture show MIXTURE                per-task rates, shares, expected epochs
    mtf report RUN_DIR [RUN_DIR ...]        an HTML page + PNGs of one run, or of several side by side
    mtf merge CONFIG [key=value ...]        merge finetuned experts (full models or adapters) into one model

Exit codes: 0 success, 1 internal error (a bug: traceback printed), 2 user error (config or data: one
paragraph, no traceback unless --debug), 3 preempted (checkpoint written; requeue and resume).
Every command that reports something takes ``--json`` and then prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

from train.errors import EXIT_INTERNAL_ERROR, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR, UserError


def _offline_defaults() -> None:
    # Without these every hub lookup retries for ~46 s before failing (FIELD_NOTES.md). A user with hub
    # access sets HF_HUB_OFFLINE=0 explicitly.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # datasets prints one progress bar per map/filter; the trainer has its own progress and logs.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# ------------------------------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> int:
    from train.config import load_config
    from train.loop.trainer import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        if args.json:
            _print_json(summary)
        else:
            _print_train_summary(summary)
    return EXIT_PREEMPTED if summary.get("stop_reason") else EXIT_OK


def _print_train_summary(summary: dict) -> None:
    print(f"\n[mtf] trained {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
          f"{summary['tokens_seen']:,} tokens; run directory {summary['output_dir']}")
    packing = ", ".join(f"{k} {v:.3f}" for k, v in summary.get("packing", {}).items())
    saves = summary.get("checkpoint_seconds") or []
    print(f"[mtf] training loop {summary['train_loop_seconds']:.1f} s ({summary['tokens_per_second']:,.0f} real tokens/s), "
          f"final eval + checkpoint {summary['final_eval_and_save_seconds']:.1f} s; packing: {packing}"
          + (f"; {len(saves)} checkpoints, {sum(saves) / len(saves):.2f} s each" if saves else ""))
    if summary.get("stop_reason"):
        print(f"[mtf] stopped early ({summary['stop_reason']}); a checkpoint was written. "
              "Run the same command again (trainer.resume=auto) to continue.")
    if summary.get("eval"):
        from train.evaluation.results import format_results_table

        print("\nZero-shot evaluation (held-out tasks):")
        print(format_results_table(summary["eval"]))


def cmd_validate(args: argparse.Namespace) -> int:
    from train.loop.validation import validate_run

    report = validate_run(args.config, args.overrides)
    if args.json:
        _print_json(report)
    else:
        for check in report["checks"]:
            print(f"  ok  {check}")
        for problem in report["problems"]:
            print(f"  ERROR  {problem}")
        print("valid" if not report["problems"] else f"{len(report['problems'])} problem(s) found")
    return EXIT_OK if not report["problems"] else EXIT_USER_ERROR


def cmd_eval(args: argparse.Namespace) -> int:
    from train.evaluation.runner import count_shards, run_eval_command

    if args.count_shards:
        count = count_shards(args.mixture)
        print(json.dumps({"shards": count}) if args.json else count)
        return EXIT_OK
    if not args.model:
        from train.errors import ConfigError

        raise ConfigError("mtf eval needs MODEL (a model directory, run directory or checkpoint), unless --count-shards.")
    results = run_eval_command(model_dir=args.model, mixture=args.mixture, kind=args.kind, tokenizer=args.tokenizer,
                               batch_size=args.batch_size, max_examples_per_template=args.max_examples_per_template,
                               output=args.output, shard=args.shard, base_model=args.base_model,
                               protocol=args.protocol, protocol_seeds=args.protocol_seeds,
                               length_normalized=args.length_normalized, scoring=args.scoring,
                               choice_eos=args.choice_eos, choice_separator=args.choice_separator)
    if results is not None:
        if args.json:
            _print_json(results)
        else:
            from train.evaluation.results import format_results_table

            print(format_results_table(results))
    return EXIT_OK


def cmd_eval_merge(args: argparse.Namespace) -> int:
    from train.evaluation.runner import merge_results
    from train.evaluation.results import format_results_table, write_results

    results = merge_results(args.shards, mixture=args.mixture, protocol=args.protocol,
                            protocol_seeds=args.protocol_seeds, length_normalized=args.length_normalized)
    if args.output:
        write_results(args.output, results)
    if args.json:
        _print_json(results)
    else:
        print(format_results_table(results))
    return EXIT_OK


def cmd_templates_lint(args: argparse.Namespace) -> int:
    from train.data.tasks import lint_data
    from train.data.templates import format_lint_report, lint_templates

    data = lint_data(args.data) if args.data else None
    report = lint_templates([Path(p) for p in args.paths], data=data)
    if args.json:
        _print_json(report)
    else:
        print(format_lint_report(report))
    failed = report["summary"]["load_errors"] or report["summary"]["failing_templates"]
    return EXIT_USER_ERROR if failed else EXIT_OK


def cmd_tasks_preview(args: argparse.Namespace) -> int:
    from train.errors import ConfigError
    from train.data.tasks import load_task_file, preview

    path, _, task_name = args.target.partition(":") if not Path(args.target).exists() else (args.target, "", "")
    task_file = load_task_file(path)
    if task_name:
        if task_name not in task_file.tasks:
            raise ConfigError(f"{path}: no task {task_name!r}; tasks: {', '.join(sorted(task_file.tasks))}.")
        examples = preview(task_file.tasks[task_name], n=args.n)
    else:
        examples = preview(task_file, n=args.n)
    if args.json:
        _print_json(examples)
    else:
        for ex in examples:
            print(f"--- {ex['task']} / {ex['template']} (row {ex['example_index']})")
            if ex["skipped"]:
                print(f"skipped: {ex['skipped']}" + (f": {ex['skip_detail']}" if ex["skip_detail"] else ""))
                continue
            print(f"input:   {ex['inputs']}")
            print(f"target:  {' ||| '.join(ex['targets'])}")
            if ex.get("answer_choices"):
                print(f"choices: {' | '.join(ex['answer_choices'])}")
    failing = _failing_templates(examples)
    if failing:  # what training would refuse: say so here too, instead of showing empty examples
        from train.errors import DataError

        raise DataError("these templates fail on most previewed rows (training would stop on them): "
                        + "; ".join(failing) + ". Add the field with a preprocessor, fix the template, or deselect it.")
    return EXIT_OK


def _failing_templates(examples: list[dict]) -> list[str]:
    from collections import Counter, defaultdict

    from train.data.templates import fails_on_data

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for ex in examples:
        groups[(ex["task"], ex["template"], ex["template_file"])].append(ex)
    out = []
    for (task, template, file), rows in groups.items():
        if fails_on_data(Counter(r["skipped"] for r in rows if r["skipped"]), len(rows)):
            first = next(r for r in rows if r["skipped"])
            out.append(f"task {task}, template {template!r} ({file}): {first['skipped']} {first['skip_detail']!r}")
    return out


def cmd_mixture_show(args: argparse.Namespace) -> int:
    from train.data.mixture_report import format_mixture_report, show_mixture

    report = show_mixture(args.mixture, steps=args.steps, batch_tokens=args.batch_tokens, tokenizer=args.tokenizer,
                          kind=args.kind, samples=args.samples, plot=args.plot, seed=args.seed,
                          max_examples_per_task=args.max_examples_per_task, data_root=args.data_root)
    if args.json:
        _print_json(report)
    else:
        print(format_mixture_report(report))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from train.reports.page import write_report

    missing = [p for p in args.runs if not Path(p).is_dir()]
    if missing:
        from train.errors import ConfigError

        raise ConfigError(f"{', '.join(missing)} is not a directory; pass run directories "
                          "(the `run.output_dir` of a run, e.g. runs/demo).")
    report = write_report(args.runs, args.out)
    if args.json:
        _print_json(report)
    else:
        for name, notes in report["notes"].items():
            for note in notes:
                print(f"[mtf] note ({name}): {note}")
        print(f"[mtf] report: {report['html']}  (figures: {', '.join(Path(p).name for p in report['pngs'])})")
    return EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    from train.experts.merge_config import load_merge_config
    from train.experts.merging import format_summary, merge

    cfg = load_merge_config(args.config, args.overrides)
    summary = merge(cfg, dry_run=args.dry_run)
    if args.json:
        _print_json(summary)
    else:
        print(format_summary(summary))
    return EXIT_OK


# ------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtf", description="Multitask prompted finetuning: mixtures of PromptSource-prompted tasks, exact packing, "
        "Accelerate/DeepSpeed training and zero-shot evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 ok, 1 internal error, 2 config/data error, 3 preempted (checkpoint written).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_text, fn, parent=sub):
        p = parent.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
        p.set_defaults(fn=fn)
        return p

    p = add("train", "Train on a run config (YAML) with optional dotted overrides, e.g. `optim.lr=3e-4 trainer.max_steps=50`. "
            "Writes config.yaml, metrics.jsonl, checkpoints/ and eval/ under run.output_dir.", cmd_train)
    p.add_argument("config", help="run config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (values parsed as YAML)")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")

    p = add("validate", "Check a run config without training: keys and types, cross-field rules, the mixture files "
            "resolve, templates render on a few examples, the model config and tokenizer load (no weights). "
            "Lists every problem and exits 2 if there is any.", cmd_validate)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--json", action="store_true")

    p = add("eval", "Zero-shot evaluation (rank classification / generation) of a Hugging Face model directory, a "
            "run's export or a run checkpoint on an eval mixture; prints per-template accuracy and per-dataset medians. "
            "--shard I/N evaluates one slice of the (dataset, template) pairs (Slurm job arrays, see "
            "scripts/slurm/eval.sbatch); `mtf eval-merge` combines the slices.", cmd_eval)
    p.add_argument("model", nargs="?", help="a Hugging Face model directory (e.g. runs/demo/final), a run directory, "
                   "or a run checkpoint (runs/demo/checkpoints/step-00000040)")
    p.add_argument("--mixture", required=True, help="eval mixture YAML, e.g. data_mixtures/demo_eval.yaml")
    p.add_argument("--kind", default="auto", choices=["auto", "encdec", "decoder", "prefix_lm"])
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--base-model", default=None, help="for a peft adapter directory: its base model (directory or hub "
                   "name); default: the export's base/, else base_model_name_or_path in adapter_config.json")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-examples-per-template", type=positive_int, default=None)
    p.add_argument("--output", default=None, help="write the results JSON here")
    p.add_argument("--shard", default=None, help="INDEX/COUNT: evaluate only the (dataset, template) pairs i (in mixture "
                   "order) with i %% COUNT == INDEX; with COUNT = --count-shards each Slurm array element scores one "
                   "pair (--shard $SLURM_ARRAY_TASK_ID/N). Combine the results with `mtf eval-merge`")
    p.add_argument("--count-shards", action="store_true", help="print the number of (dataset, template) pairs of "
                   "--mixture (the job array size, --array=0-(N-1)) and exit; MODEL is not needed")
    p.add_argument("--protocol", choices=["t0", "tfew"], default="t0", help="per-dataset number: t0 = median over "
                   "templates of per-template accuracy; tfew = median over --protocol-seeds seeds of the accuracy with "
                   "one random template per example (T-Few)")
    p.add_argument("--protocol-seeds", type=positive_int, default=5, help="tfew: seeds 0..N-1 (default 5)")
    p.add_argument("--length-normalized", action="store_true", help="score rank classification by the mean token "
                   "log-probability of each choice (T-Few) instead of the sum (T0)")
    p.add_argument("--scoring", choices=["t0", "lm-eval"], default="t0", help="how prompts and answer choices become "
                   "tokens: t0 (default, as training: every choice ends with eos) or lm-eval (lm-evaluation-harness's "
                   "loglikelihood requests: no eos, ' ' + choice tokenized with the prompt for decoders); recorded in "
                   "the results' `scoring`")
    p.add_argument("--choice-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="override the convention: end every answer choice with eos, or not")
    p.add_argument("--choice-separator", default=None, help="override the convention: text between prompt and "
                   "choice (t0: '' for encoder-decoders, ' ' for decoders; lm-eval: ' ')")
    p.add_argument("--json", action="store_true")

    p = add("eval-merge", "Merge `mtf eval --shard` result files into one results JSON (same format as a single run): "
            "re-aggregates the template rows, fails on a (dataset, template) present twice, and checks that every "
            "pair of --mixture (or every shard index of the array) is there, naming the array indices to rerun.",
            cmd_eval_merge)
    p.add_argument("shards", nargs="+", help="shard result JSON files, e.g. runs/x/eval/shards/shard-*.json")
    p.add_argument("--mixture", default=None, help="the eval mixture the shards came from: check that each of its "
                   "(dataset, template) pairs is present (without it: every shard index 0..COUNT-1)")
    p.add_argument("--output", default=None, help="write the merged results JSON here")
    p.add_argument("--protocol", choices=["t0", "tfew"], default=None, help="aggregate under this protocol "
                   "(default: the one the shards used)")
    p.add_argument("--protocol-seeds", type=positive_int, default=None, help="tfew: seeds 0..N-1 (default: the shards')")
    p.add_argument("--length-normalized", action=argparse.BooleanOptionalAction, default=None,
                   help="length-normalised rank-classification scores (default: what the shards used)")
    p.add_argument("--json", action="store_true")

    templates = sub.add_parser("templates", help="PromptSource template files").add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = add("lint", "Load every templates.yaml under the given paths and report templates and load errors per file; "
            "with --data, render each template on the available rows and report the success rate.", cmd_templates_lint, templates)
    p.add_argument("paths", nargs="+")
    p.add_argument("--data", default=None, help="a mixture YAML (or data root) whose rows to render the templates on")
    p.add_argument("--json", action="store_true")

    tasks = sub.add_parser("tasks", help="prompted tasks").add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = add("preview", "Print rendered examples (input, target, choices) of a task or of every task in a mixture file.",
            cmd_tasks_preview, tasks)
    p.add_argument("target", help="a mixture/task YAML file, or FILE:TASK for one task")
    p.add_argument("--n", type=positive_int, default=3)
    p.add_argument("--json", action="store_true")

    mixture = sub.add_parser("mixture", help="mixtures").add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = add("show", "Per-task examples, rate, share of samples and tokens, expected epochs for --steps and --batch-tokens "
            "(flagging tasks repeated more than 4 times), and realised shares measured from the stream.", cmd_mixture_show, mixture)
    p.add_argument("mixture")
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--batch-tokens", type=positive_int, default=65536)
    p.add_argument("--tokenizer", default="configs/tokenizers/t5",
                   help="tokenizer directory, or byt5 (bytes; needs no files)")
    p.add_argument("--kind", default="encdec", choices=["encdec", "decoder", "prefix_lm"])
    p.add_argument("--samples", type=positive_int, default=20000, help="stream samples drawn to measure realised shares")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--plot", default=None, help="write a bar chart of the composition to this PNG")
    p.add_argument("--max-examples-per-task", type=positive_int, default=None,
                   help="render only the first N rows of each task (a quick look; counts and rates then reflect N)")
    p.add_argument("--data-root", default=None, help="read hub sources from local files under this root (as MTF_DATA_ROOT)")
    p.add_argument("--json", action="store_true")

    p = add("report", "Write one self-contained HTML page (figures embedded; opens from disk) and the same figures as "
            "PNG files from what run directories hold: training curves, zero-shot eval over steps, the mixture planned "
            "vs realised, status, checkpoints and config. Several directories are overlaid on shared axes (an "
            "ablation view). A preempted, killed or running run is reported as far as it got.", cmd_report)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (run.output_dir), e.g. runs/demo")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report for one run, ./mtf-report "
                   "for several)")
    p.add_argument("--json", action="store_true")

    p = add("merge", "Merge experts finetuned from one base (full Hugging Face checkpoints or peft LoRA / (IA)^3 "
            "adapters) into one model: linear averaging, task arithmetic, TIES or DARE, as a merge config says "
            "(configs/merges/*.yaml). Streams tensor by tensor from safetensors; writes a model directory that "
            "from_pretrained and `mtf eval` load, with merge_record.json.", cmd_merge)
    p.add_argument("config", help="merge config, e.g. configs/merges/tfew_tiny_ties.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (values parsed as YAML), e.g. "
                   "parameters.density=0.5 models.1.weight=2")
    p.add_argument("--dry-run", action="store_true", help="check the config and that the models fit together "
                   "(headers only), print the plan, write nothing")
    p.add_argument("--json", action="store_true", help="print the summary (what merge_record.json holds) as JSON")
    return parser


def _option_hint(unknown: list[str]) -> str:
    """``--max-steps 5`` -> a pointer to the dotted override ``trainer.max_steps=5``."""
    import difflib

    from train.config import all_keys

    flag, _, inline = unknown[0].lstrip("-").partition("=")
    value = inline or (unknown[1] if len(unknown) > 1 and not unknown[1].startswith("--") else "<value>")
    name = flag.replace("-", "_")
    keys = all_keys()
    by_leaf = [k for k in keys if k.split(".")[-1] == name]
    close = by_leaf or difflib.get_close_matches(name, keys, n=1, cutoff=0.6) or \
        [k for k in keys if difflib.get_close_matches(name, [k.split(".")[-1]], n=1, cutoff=0.75)][:1]
    hint = f" Did you mean `{close[0]}={value}`?" if close else ""
    return (f"unknown option {unknown[0]}: config values are set as dotted key=value overrides after the config "
            f"file, e.g. `mtf train configs/demo.yaml trainer.max_steps=50`.{hint}")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse then names the flag in its usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def main(argv: Optional[list[str]] = None) -> int:
    _offline_defaults()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if getattr(args, "command", None) in ("train", "validate") and unknown[0].startswith("--"):
            print(f"mtf {args.command}: error: {_option_hint(unknown)}", file=sys.stderr)
            return EXIT_USER_ERROR
        parser.parse_args(argv)  # argparse's own message and exit 2
    try:
        code = args.fn(args)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # torch+gloo sometimes aborts a rank at interpreter exit after a clean run (FIELD_NOTES.md):
            # leave explicitly once everything is flushed.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except UserError as err:
        if args.debug:
            traceback.print_exc()
        print(f"mtf {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("mtf: interrupted", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    except Exception:  # a bug: show everything
        traceback.print_exc()
        print("mtf: internal error (a bug; please report it with the traceback above)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
