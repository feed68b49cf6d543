"""Zero-shot eval end to end: this stack (``mtf eval``'s path) against lm-evaluation-harness on the same requests.

For every eval set x model, each repeat runs, alternating, A then B:

* A, this stack, the path of ``mtf eval --scoring lm-eval``, phases timed one by one: **render** (the eval
  mixture's PromptSource templates over the first ``--max-examples-per-template`` rows of each task, cold: a
  fresh datasets cache folder every repeat, so the source rows are read and every template rendered again),
  **load** (``load_model_for_eval`` of the saved model), **tokenize** (building the ``ZeroShotEvaluator``: its
  rank items) and **score** (the evaluator's call: every choice scored, accuracies aggregated);
* B, lm-evaluation-harness: ``HFLM`` from the same saved folder with the same ``--batch-size`` (**load**) and
  ``HFLM.loglikelihood`` on one request ``(inputs, " " + choice)`` per answer choice of every example A scored,
  built from A's rendered prompts (**score**), then the argmax of each example for its accuracy.

So the harness gets our rendered prompts and its time excludes rendering; ours includes it. The batch size
counts examples here (each with all its choices: the encoder runs once per example) and requests there.
Both score the same tokens (``resolve_scoring("lm-eval")``); the script reports the largest difference of a
per-choice log-likelihood (expect ~1e-5: fp32 forwards of differently padded batches) and the number of
(dataset, template) pairs whose accuracies agree.

Models: tiny random T5 (``configs/models/t5_tiny.json``, ``configs/tokenizers/t5``) and tiny GPT-2
(``configs/models/gpt2_tiny.json``, ``../shared/data/tokenizers/gpt2``), seeded, saved with ``save_pretrained``
(+ tokenizer) into a temporary folder both stacks load from. Eval sets: ``data_mixtures/demo_eval.yaml`` (COPA,
ships in the repo) and ``data_mixtures/local_eval.yaml`` (five SuperGLUE sets from ``../shared``). Whatever
needs ``../shared`` is skipped, with the reason printed, when it is absent.

Render before/after: the same rows rendered by every template of both eval sets with ``train/data/templates.py``
as committed at ``--baseline-rev`` (loaded as a separate module) and with the working tree's, alternating,
repeated, outputs asserted byte-identical. Once the faster renderer is committed, HEAD's file is the
working tree's: the script says so and skips; pass the commit before the change (the message names it).

Usage::

    python scripts/bench_eval_e2e.py [--max-examples-per-template 60] [--repeats 3] [--batch-size 8] [--json]
    python scripts/bench_eval_e2e.py --write-benchmarks BENCHMARKS.md [--baseline-rev REV]
    python scripts/bench_eval_e2e.py --quick          # smoke: 8 examples per template, 1 repeat (~1 min)

Runtime on 2 busy CPU cores, 1 torch thread: ``--quick`` 1-2 minutes; the defaults (60 rows per task, 3 repeats,
4 eval set x model pairs; local_eval is 3,240 examples, 7,320 requests) about 15 minutes, three quarters of it
GPT-2 on local_eval (its 50k-word output layer dominates both stacks' scoring). ``--models t5_tiny`` about 2.5.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_env import REPO  # offline Hugging Face, this checkout first on sys.path: before torch / train

import torch  # noqa: E402

import benchmarks_md  # noqa: E402

SHARED = Path(os.environ.get("MTF_SHARED_DIR", REPO.parent / "shared")) / "data"
EVAL_SETS = {"demo_eval": REPO / "data_mixtures/demo_eval.yaml", "local_eval": REPO / "data_mixtures/local_eval.yaml"}
# name -> (model config, tokenizer folder, HFLM backend)
MODELS = {"t5_tiny": (REPO / "configs/models/t5_tiny.json", REPO / "configs/tokenizers/t5", "seq2seq"),
          "gpt2_tiny": (REPO / "configs/models/gpt2_tiny.json", SHARED / "tokenizers/gpt2", "causal")}
TEMPLATES_FILE = "train/data/templates.py"
BEGIN, END = "<!-- bench_eval_e2e:begin -->", "<!-- bench_eval_e2e:end -->"
QUICK = {"max_examples_per_template": 8, "repeats": 1}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values)}


# ------------------------------------------------------------------------------------------ models


def save_model(name: str, out: Path, seed: int) -> Path:
    """Build ``name`` from its config with seeded random weights; save it and its tokenizer under ``out/name``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config_file, tokenizer_dir, backend = MODELS[name]
    spec = json.loads(config_file.read_text(encoding="utf-8"))
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    model = (AutoModelForSeq2SeqLM if backend == "seq2seq" else AutoModelForCausalLM).from_config(config)
    folder = out / name
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(folder)
    return folder


def warm_up(model_dir: Path, backend: str) -> None:
    """Load the model once through each stack, untimed: the first load in a process pays transformers' lazy
    imports (~2 s), which would otherwise be charged to whichever stack happens to run first."""
    from lm_eval.models.huggingface import HFLM

    from train.evaluation.runner import load_model_for_eval

    load_model_for_eval(str(model_dir))
    HFLM(pretrained=str(model_dir), backend=backend, device="cpu", batch_size=1)


# ------------------------------------------------------------------------------------------ A: this stack


def run_mtf(model_dir: Path, mixture: Path, cap: int, batch_size: int, cache_root: Path) -> dict:
    """One end-to-end eval the way ``mtf eval --scoring lm-eval`` runs it; every phase timed.

    Returns:
        ``{"seconds": {render, load, tokenize, score, e2e}, "examples", "evaluator", "model", "results"}``.
    """
    from train.data import load_eval_examples
    from train.evaluation.evaluator import ZeroShotEvaluator
    from train.evaluation.items import resolve_scoring
    from train.evaluation.runner import load_model_for_eval

    cache = Path(tempfile.mkdtemp(prefix="datasets-", dir=cache_root))  # cold: nothing rendered or read yet
    seconds = {}
    start = time.perf_counter()
    examples, clusters, languages = load_eval_examples(str(mixture), cache_dir=str(cache), max_examples=cap)
    seconds["render"] = time.perf_counter() - start
    t = time.perf_counter()
    model, tokenizer, kind = load_model_for_eval(str(model_dir))
    seconds["load"] = time.perf_counter() - t
    t = time.perf_counter()
    scoring = resolve_scoring("lm-eval")  # as `mtf eval --scoring lm-eval`, over-long encoder inputs cut alike
    evaluator = ZeroShotEvaluator(tokenizer, examples, kind=kind, clusters=clusters, languages=languages,
                                  max_examples_per_template=cap, scoring=scoring,
                                  max_input_tokens=scoring.max_prompt_tokens(kind, model.config, tokenizer))
    seconds["tokenize"] = time.perf_counter() - t
    t = time.perf_counter()
    results = evaluator(model, batch_size=batch_size)
    seconds["score"] = time.perf_counter() - t
    seconds["e2e"] = time.perf_counter() - start
    shutil.rmtree(cache, ignore_errors=True)
    return {"seconds": seconds, "examples": examples, "evaluator": evaluator, "model": model, "results": results}


def scored_examples(evaluator, examples: list[dict]) -> list[tuple]:
    """(rank item, its rendered example) for every example A scored, in item order."""
    by_key = {(ex["task"], ex["dataset"], ex["template"], int(ex["example_index"])): ex for ex in examples}
    out = []
    for item in evaluator.rank_items:
        task, example_index = evaluator.example_of[item.index]
        dataset, template = evaluator.group_of[item.index]
        out.append((item, by_key[(task, dataset, template, example_index)]))
    return out


# ------------------------------------------------------------------------------------------ B: the harness


def run_harness(model_dir: Path, backend: str, requests: list[tuple[str, str]], batch_size: int) -> dict:
    """HFLM from ``model_dir`` and ``loglikelihood`` on ``requests``; load and scoring timed."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    lm = HFLM(pretrained=str(model_dir), backend=backend, device="cpu", batch_size=batch_size)
    loaded = time.perf_counter()
    out = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                            for i, r in enumerate(requests)], disable_tqdm=True)
    end = time.perf_counter()
    return {"seconds": {"load": loaded - start, "score": end - loaded, "e2e": end - start},
            "logprobs": [logprob for logprob, _ in out], "max_length": lm.max_length}


def compare(pairs: list[tuple], ours: dict, theirs: list[float], results: dict, max_length: int, kind: str) -> dict:
    """Per-choice |A - B| and per-(dataset, template) accuracy agreement.

    The harness cuts what does not fit its ``max_length`` (T5: the tokenizer's ``model_max_length``, 512) from
    the left: an enc-dec keeps the last ``max_length`` prompt tokens, a decoder the last ``max_length + 1``
    tokens of prompt + choice. This stack cuts an enc-dec prompt the same way (``mtf eval --scoring lm-eval``) but
    keeps whole decoder prompts, so over-long decoder requests are scored on different tokens: they are counted
    and their differences reported apart.

    Args:
        pairs: (rank item, example) in request order; ours: item index -> ChoiceScores (A, scored again
            untimed); theirs: the harness's log-likelihoods, one per request; results: A's results;
            max_length: the harness's; kind: A's model kind.
    """
    diff = {"fit": 0.0, "cut": 0.0}
    cut = pos = argmax_agree = 0
    correct: dict[tuple[str, str], list[int]] = {}
    for item, ex in pairs:
        scores = theirs[pos:pos + len(item.choice_ids)]
        pos += len(item.choice_ids)
        for a, b, choice in zip(ours[item.index].sum_logprob, scores, item.choice_ids):
            cropped = len(item.prompt_ids) > max_length if kind == "encdec" else \
                len(item.prompt_ids) + len(choice) > max_length + 1
            cut += cropped
            diff["cut" if cropped else "fit"] = max(diff["cut" if cropped else "fit"], abs(a - b))
        best = max(range(len(scores)), key=lambda k: (scores[k], -k))  # ties -> first choice, as ours
        argmax_agree += best == ours[item.index].argmax()
        correct.setdefault((ex["dataset"], ex["template"]), []).append(int(best in item.gold))
    agree = sum(abs(results["templates"][d][t]["accuracy"] - sum(c) / len(c)) < 1e-12
                for (d, t), c in correct.items())
    return {"max_abs_logprob_diff": diff["fit"], "harness_max_length": max_length,
            "requests_cut_by_harness": cut, "max_abs_logprob_diff_cut": diff["cut"] if cut else None,
            "templates_agreeing": agree, "templates": len(correct),
            "examples_argmax_agreeing": argmax_agree, "examples": len(pairs)}


def bench_pair(eval_set: str, model_name: str, model_dir: Path, args: argparse.Namespace, cache_root: Path) -> dict:
    """A, B, A, B, ... ``args.repeats`` times on one eval set x model."""
    from train.evaluation.scoring import score_rank_items

    backend = MODELS[model_name][2]
    a_times: list[dict] = []
    b_times: list[dict] = []
    check = None
    for repeat in range(args.repeats):
        a = run_mtf(model_dir, EVAL_SETS[eval_set], args.max_examples_per_template, args.batch_size, cache_root)
        a_times.append(a["seconds"])
        if repeat == 0:
            examples, pairs = a["examples"], scored_examples(a["evaluator"], a["examples"])
            requests = [(ex["inputs"], " " + choice) for _, ex in pairs for choice in ex["answer_choices"]]
            with torch.no_grad():  # per-choice scores for the comparison, outside the timed phases
                ours = score_rank_items(a["model"].eval(), a["evaluator"].rank_items, a["evaluator"].kind,
                                        batch_size=args.batch_size, pad_id=a["evaluator"].pad)
            results, kind = a["results"], a["evaluator"].kind
        else:
            assert a["examples"] == examples, "a cold render differs from the first one"
        del a
        b = run_harness(model_dir, backend, requests, args.batch_size)
        b_times.append(b["seconds"])
        if repeat == 0:
            check = compare(pairs, ours, b["logprobs"], results, b["max_length"], kind)
        log(f"  {eval_set} x {model_name} repeat {repeat + 1}/{args.repeats}: mtf {a_times[-1]['e2e']:.2f}s "
            f"(render {a_times[-1]['render']:.2f}, tokenize {a_times[-1]['tokenize']:.2f}, score "
            f"{a_times[-1]['score']:.2f}), harness {b_times[-1]['e2e']:.2f}s")
    mtf = {phase: stats([t[phase] for t in a_times]) for phase in a_times[0]}
    harness = {phase: stats([t[phase] for t in b_times]) for phase in b_times[0]}
    prepare = [t["render"] + t["tokenize"] for t in a_times]
    return {
        "eval_set": eval_set, "model": model_name, "backend": backend,
        "examples": len(pairs), "requests": len(requests), "rendered_examples": len(examples),
        "mtf_seconds": mtf, "harness_seconds": harness,
        "ratio": {"min": harness["e2e"]["min"] / mtf["e2e"]["min"],
                  "median": harness["e2e"]["median"] / mtf["e2e"]["median"]},
        "mtf_render_tokenize_seconds": stats(prepare),
        "mtf_render_tokenize_over_score": statistics.median(p / t["score"] for p, t in zip(prepare, a_times)),
        **check,
    }


# ------------------------------------------------------------------------------------------ render before/after


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def baseline_templates(rev: str, out: Path):
    """``train/data/templates.py`` at ``rev`` as its own module, or None when it equals the working tree's."""
    source = git("show", f"{rev}:{TEMPLATES_FILE}")
    if source == (REPO / TEMPLATES_FILE).read_text(encoding="utf-8"):
        return None
    path = out / "baseline_templates.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("baseline_templates", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def render_all(make, templates: list, rows: list[list[dict]]) -> tuple[float, float, list]:
    """Render every row of each template's task with fresh ``make(template)`` copies.

    Returns:
        (seconds compiling, seconds rendering, outputs). Task rendering compiles each template once per batch
        of 1,000 rows (``datasets.map``), so with a few dozen rows per task compiling weighs as much as rendering.
    """
    compiling = rendering = 0.0
    out = []
    for template, task_rows in zip(templates, rows):
        start = time.perf_counter()
        copy = make(template)
        copy.compile()
        compiled = time.perf_counter()
        for i, row in enumerate(task_rows):
            rendered, reason, detail = copy.render_or_skip(row, seed_key=i)
            out.append((None if rendered is None else (rendered.inputs, rendered.targets, rendered.answer_choices),
                        reason, detail))
        compiling += compiled - start
        rendering += time.perf_counter() - compiled
    return compiling, rendering, out


def render_before_after(eval_sets: list[str], cap: int, repeats: int, rev: str, work: Path) -> dict:
    """Old (``rev``) vs current templates on the eval sets' rows; outputs asserted identical."""
    from train.data import load_task_file
    from train.data.templates import Template

    sha = git("rev-parse", "--short", rev).strip()
    old = baseline_templates(rev, work)
    if old is None:
        last = git("log", "-n1", "--format=%h", "--", TEMPLATES_FILE).strip()
        return {"baseline_rev": rev, "baseline_sha": sha, "skipped": (
            f"{TEMPLATES_FILE} at {rev} ({sha}) is identical to the working tree's: nothing to compare. Pass "
            f"--baseline-rev with the commit before the renderer change (the last commit changing it is {last}: "
            f"--baseline-rev {last}^)")}
    fields = [f.name for f in dataclasses.fields(old.Template)]

    def make_old(t):
        meta = old.TemplateMetadata(**dataclasses.asdict(t.metadata))
        return old.Template(**{k: getattr(t, k) for k in fields if k != "metadata"}, metadata=meta)

    def make_new(t):
        return Template(**{f.name: getattr(t, f.name) for f in dataclasses.fields(Template)})

    templates, rows = [], []
    cache = tempfile.mkdtemp(prefix="datasets-", dir=work)
    for name in eval_sets:
        for task in load_task_file(str(EVAL_SETS[name])).tasks.values():
            raw, _ = task.load_rows(cap, cache_dir=cache)
            task_rows = raw.to_list()
            for template in task.select_templates():
                templates.append(template)
                rows.append(task_rows)
    seconds: dict[str, list[float]] = {"compile_before": [], "render_before": [], "compile_after": [],
                                       "render_after": []}
    for _ in range(repeats):  # alternating, old first
        compile_old, render_old, out_old = render_all(make_old, templates, rows)
        compile_new, render_new, out_new = render_all(make_new, templates, rows)
        assert out_old == out_new, "the current templates render differently from the baseline's"
        for key, value in zip(seconds, (compile_old, render_old, compile_new, render_new)):
            seconds[key].append(value)
    before = [c + r for c, r in zip(seconds["compile_before"], seconds["render_before"])]
    after = [c + r for c, r in zip(seconds["compile_after"], seconds["render_after"])]
    return {"baseline_rev": rev, "baseline_sha": sha, "subject": git("log", "-n1", "--format=%s", rev).strip(),
            "eval_sets": eval_sets, "templates": len(templates), "renders": sum(len(r) for r in rows),
            "identical": True, "before_seconds": stats(before), "after_seconds": stats(after),
            "speedup": {"min": min(before) / min(after),
                        "median": statistics.median(before) / statistics.median(after)},
            "render_only_speedup": statistics.median(seconds["render_before"]) / statistics.median(seconds["render_after"]),
            **{f"{key}_seconds": stats(values) for key, values in seconds.items()}}


# ------------------------------------------------------------------------------------------ report


def table(results: dict) -> str:
    head = ("| eval set | model | examples | choice requests | mtf render | mtf tokenize | mtf score | mtf e2e | "
            "harness e2e | ratio min / median | max abs Δ logprob | templates agreeing |")
    lines = [head, "|---" * (head.count(" | ") + 1) + "|"]
    for r in results["rows"]:
        m, h = r["mtf_seconds"], r["harness_seconds"]
        lines.append(f"| {r['eval_set']} | {r['model']} | {r['examples']:,} | {r['requests']:,} | "
                     f"{m['render']['median']:.2f} | {m['tokenize']['median']:.2f} | {m['score']['median']:.2f} | "
                     f"{m['e2e']['median']:.2f} | {h['e2e']['median']:.2f} | **{r['ratio']['min']:.2f}x** / "
                     f"**{r['ratio']['median']:.2f}x** | {r['max_abs_logprob_diff']:.1e} | "
                     f"{r['templates_agreeing']}/{r['templates']} |")
    return "\n".join(lines)


def render_line(r: dict) -> str:
    if "skipped" in r:
        return f"Render before/after: skipped; {r['skipped']}."
    b, a = r["before_seconds"], r["after_seconds"]
    subject = r["subject"] if len(r["subject"]) <= 60 else r["subject"][:57] + "..."
    return (f"Render before/after ({', '.join(r['eval_sets'])}: the same rows, templates compiled then rendered, "
            f"alternating): {r['templates']} templates, {r['renders']:,} renders, byte-identical. Baseline: "
            f"`{TEMPLATES_FILE}` as committed at `{r['baseline_rev']}` ({r['baseline_sha']}, \"{subject}\"), the "
            f"renderer before this change: {b['min']:.2f} s min / {b['median']:.2f} s median; now {a['min']:.2f} / "
            f"{a['median']:.2f} s: **{r['speedup']['median']:.1f}x** faster (median; {r['speedup']['min']:.1f}x "
            f"min); rendering alone, compiling left out, {r['render_only_speedup']:.1f}x.")


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [BEGIN, "## Zero-shot eval end to end (`scripts/bench_eval_e2e.py`)", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {results['machine']}, by `{results['command']}`.",
             f"Each eval set x model: {s['repeats']} repeat{'s' if s['repeats'] > 1 else ''} of this stack then lm-evaluation-harness "
             f"{results['lm_eval_version']}, alternating; seconds are medians, ratio = harness e2e / mtf e2e "
             "(min over min, median over median; > 1: we are faster).",
             "This stack runs `mtf eval --scoring lm-eval`'s path end to end: render the eval mixture's templates "
             f"cold (fresh datasets cache; first {s['max_examples_per_template']} rows per task), load the model, "
             f"tokenize, score and aggregate (batches of {s['batch_size']} examples, all their choices). The "
             f"harness gets our rendered prompts, one `loglikelihood` request `(inputs, \" \" + choice)` per "
             f"choice (batches of {s['batch_size']} requests), so its time excludes rendering; ours includes it. "
             "Both load the same saved tiny random model (T5: configs/models/t5_tiny.json; GPT-2: "
             "configs/models/gpt2_tiny.json) and score the same tokens.", "", table(results), ""]
    for r in results["rows"]:
        m = r["mtf_seconds"]
        e2e = m["e2e"]["median"]
        lines.append(f"- {r['eval_set']} x {r['model']}: our time, median share: render {m['render']['median'] / e2e:.0%}, "
                     f"model load {m['load']['median'] / e2e:.0%}, tokenize {m['tokenize']['median'] / e2e:.0%}, "
                     f"score {m['score']['median'] / e2e:.0%} (render + tokenize = "
                     f"{r['mtf_render_tokenize_over_score']:.2f}x score); harness: load "
                     f"{r['harness_seconds']['load']['median']:.2f} s, loglikelihood "
                     f"{r['harness_seconds']['score']['median']:.2f} s.")
        if r["requests_cut_by_harness"]:
            lines.append(f"  {r['requests_cut_by_harness']:,} requests are longer than the harness's max_length "
                         f"({r['harness_max_length']}), which keeps their last tokens where this stack keeps the "
                         f"whole prompt: not in the Δ column; on them max |Δ| = {r['max_abs_logprob_diff_cut']:.1e}.")
    for reason in results["skipped"]:
        lines.append(f"- skipped: {reason}")
    lines += ["", render_line(results["render_before_after"]), END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples-per-template", type=int, default=60, help="rows rendered per task")
    parser.add_argument("--repeats", type=int, default=3, help="A,B pairs per eval set x model (min and median)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples (ours) / requests (harness) per forward")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 (default) keeps timings stable on a shared machine")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model weights")
    parser.add_argument("--eval-sets", nargs="+", choices=sorted(EVAL_SETS), default=list(EVAL_SETS))
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--baseline-rev", default="HEAD", help="git revision whose train/data/templates.py is the "
                        "render baseline")
    parser.add_argument("--quick", action="store_true", help="smoke: " + json.dumps(QUICK))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--write-benchmarks", default=None, help="rewrite this benchmark's section of this file")
    parser.add_argument("--work-dir", default=None, help="folder for the saved models and caches (default: a "
                        "temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    command = "python scripts/bench_eval_e2e.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    torch.set_num_threads(args.threads)
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401 - imported here so that no timed phase pays for it
    except ImportError:
        print("bench_eval_e2e: needs lm-evaluation-harness (pip install lm_eval; `make install` pins it)",
              file=sys.stderr)
        return 2
    import datasets
    import train.data.tasks  # noqa: F401 - imports outside the timed phases, for both stacks alike
    import train.evaluation.evaluator  # noqa: F401

    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    skipped = []
    eval_sets = []
    for name in args.eval_sets:
        if name == "local_eval" and not (SHARED / "tasks/super_glue").is_dir():
            skipped.append(f"local_eval: its data is under {SHARED}/tasks/super_glue, which is absent")
        else:
            eval_sets.append(name)
    models = []
    for name in args.models:
        if not MODELS[name][1].is_dir():
            skipped.append(f"{name}: its tokenizer {MODELS[name][1]} is absent")
        else:
            models.append(name)
    for reason in skipped:
        log(f"skipped: {reason}")

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_eval_e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    # Some libraries log to stdout (DeepSpeed's accelerator probe, imported lazily): keep --json's stdout clean.
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model_dirs = {name: save_model(name, work / "models", args.seed) for name in models}
            for name in models:
                warm_up(model_dirs[name], MODELS[name][2])
            rows = []
            for eval_set in eval_sets:
                for name in models:
                    log(f"{eval_set} x {name}")
                    rows.append(bench_pair(eval_set, name, model_dirs[name], args, work))
            log("render before/after")
            render = render_before_after(eval_sets, args.max_examples_per_template, args.repeats,
                                         args.baseline_rev, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    results = {
        "settings": {k: getattr(args, k) for k in ("max_examples_per_template", "repeats", "batch_size", "threads",
                                                   "seed", "baseline_rev")},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
                   f"({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})",
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "?",
        "command": command, "rows": rows, "render_before_after": render, "skipped": skipped,
    }
    if args.write_benchmarks:
        benchmarks_md.write_section(Path(args.write_benchmarks), markdown(results), BEGIN, END)
        log(f"wrote {args.write_benchmarks}")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(markdown(results).replace(BEGIN + "\n", "").replace(END + "\n", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
