"""Zero-shot evaluation of a model on a prompted eval set: :class:`ZeroShotEvaluator` and :func:`evaluate`.

The evaluator tokenizes the eval set once (:mod:`train.evaluation.items`); each call shards the items
over ranks (:mod:`train.evaluation.distributed`), scores answer choices (:mod:`train.evaluation.scoring`)
or generates (:mod:`train.evaluation.generation`), gathers every example exactly once and aggregates
under the T0 or the T-Few protocol (:mod:`train.evaluation.results`). Rank-classification rows keep each
example's correctness (``per_example``) so that ``mtf eval-merge`` can re-aggregate shards either way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from train.evaluation.distributed import DistContext, is_zero3
from train.evaluation.generation import generate_predictions
from train.evaluation.items import SCORINGS, Scoring, build_eval_items
from train.evaluation.metrics import generation_metrics
from train.evaluation.results import DEFAULT_PROTOCOL_SEEDS, aggregate, check_protocol, mean_or_none
from train.evaluation.scoring import ChoiceScores, score_rank_items


class ZeroShotEvaluator:
    """Tokenizes an evaluation set once; call it with a model to evaluate (cheap to re-run in training).

    Args:
        tokenizer: a Hugging Face tokenizer with an eos token.
        examples_by_task: prompted examples (see COMMON contract), flat or grouped by task name.
        kind: "encdec", "decoder" or "prefix_lm".
        metrics: optional mapping "dataset/template" or "dataset" -> PromptSource metric names, used for
            templates without answer choices (generation). An example's own "metrics" key wins.
        clusters: optional mapping dataset -> task cluster (nli, coreference, ...). An example's own
            "cluster" key is used when the mapping lacks the dataset.
        languages: optional mapping dataset -> language; else the example's "language" key, else "en".
        max_examples_per_template: keep only the examples of the first N source rows (``example_index`` < N;
            without it, the first N examples) of each (dataset, template).
        max_input_tokens: truncate long prompts (encdec keeps the first tokens + eos, or the last tokens under the
            lm-eval convention, as the harness does; decoder kinds keep
            the last ones, next to the answer). None = no truncation.
        protocol: "t0" (median over templates) or "tfew" (median over ``protocol_seeds`` seeds of one random
            template per example); see :func:`train.evaluation.results.aggregate`.
        length_normalized: the length-normalised rank-classification accuracy is the headline score.
        scoring: how prompts and answer choices are tokenized (:class:`train.evaluation.items.Scoring`:
            T0's convention, lm-evaluation-harness's, or a variant); recorded as the results' ``scoring``.
        prompts: optional description of the prompt set (template files and their hashes), recorded under
            ``scoring.prompts``.

    Raises:
        ConfigError: unknown kind, tokenizer without eos, unknown protocol or seeds < 1.
        DataError: an example lacks a required key, or no example at all can be evaluated.
    """

    def __init__(
        self,
        tokenizer,
        examples_by_task: Mapping[str, Sequence[dict]] | Sequence[dict],
        *,
        kind: str,
        metrics: Mapping[str, Sequence[str]] | None = None,
        clusters: Mapping[str, str] | None = None,
        languages: Mapping[str, str] | None = None,
        max_examples_per_template: int | None = None,
        max_input_tokens: int | None = None,
        protocol: str = "t0",
        protocol_seeds: int = DEFAULT_PROTOCOL_SEEDS,
        length_normalized: bool = False,
        scoring: Scoring = SCORINGS["t0"],
        prompts: Mapping[str, Any] | None = None,
    ):
        check_protocol(protocol, protocol_seeds)
        self.protocol, self.protocol_seeds, self.length_normalized = protocol, protocol_seeds, length_normalized
        self.scoring = dict(scoring.describe(kind, length_normalized), prompts=dict(prompts) if prompts else None)
        items = build_eval_items(tokenizer, examples_by_task, kind=kind, metrics=metrics, clusters=clusters,
                                 languages=languages, max_examples_per_template=max_examples_per_template,
                                 max_input_tokens=max_input_tokens, scoring=scoring)
        self.tokenizer = tokenizer
        self.kind = kind
        self.eos = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad = int(pad) if pad is not None else self.eos
        self.rank_items, self.gen_items = items.rank_items, items.gen_items
        self.groups, self.group_of, self.example_of = items.groups, items.group_of, items.example_of
        self.cluster_of, self.language_of = items.cluster_of, items.language_of

    def __call__(
        self,
        model,
        *,
        accelerator=None,
        batch_size: int = 8,
        max_tokens_per_batch: int | None = None,
        max_new_tokens: int = 64,
        num_beams: int = 1,
    ) -> dict:
        """Evaluate ``model``; returns the results dict (see :func:`aggregate`).

        Args:
            model: a Hugging Face model of this evaluator's kind (possibly wrapped by DeepSpeed).
            accelerator: an ``accelerate.Accelerator`` to shard examples over its processes; None uses
                ``torch.distributed`` when it is initialised, else one process.
            batch_size: at most this many examples per forward.
            max_tokens_per_batch: optional padded-token budget per forward (prompts + all choices).
            max_new_tokens, num_beams: generation settings for templates without answer choices.
        """
        dist = DistContext.from_accelerator(accelerator)
        # Call the bare module: a DDP wrapper's forward would sync buffers (a collective) on every call,
        # which hangs when ranks run different numbers of batches. ZeRO-3 hooks live on the module itself.
        model = getattr(model, "module", model)
        if hasattr(model, "get_base_model"):  # a peft model: its base carries the injected adapter layers
            model = model.get_base_model()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                local_rank = [it for it in self.rank_items if it.index % dist.world_size == dist.rank]
                local_gen = [it for it in self.gen_items if it.index % dist.world_size == dist.rank]
                sync = dist.world_size > 1 and is_zero3(model)
                scores = score_rank_items(
                    model, local_rank, self.kind, batch_size=batch_size,
                    max_tokens_per_batch=max_tokens_per_batch, dist=dist if sync else None, pad_id=self.pad,
                )
                preds = generate_predictions(
                    model, self.tokenizer, local_gen, self.kind, batch_size=batch_size,
                    max_new_tokens=max_new_tokens, num_beams=num_beams, dist=dist if sync else None,
                    pad_id=self.pad, eos_id=self.eos,
                )
        finally:
            model.train(was_training)
        gathered = dist.gather(
            [(i, s, None) for i, s in scores.items()] + [(i, None, p) for i, p in preds.items()]
        )
        seen = [i for i, _, _ in gathered]
        assert len(seen) == len(set(seen)), "an example was scored by two ranks"
        all_scores = {i: s for i, s, _ in gathered if s is not None}
        all_preds = {i: p for i, _, p in gathered if p is not None}
        results = self._results(all_scores, all_preds)
        results["scoring"] = self.scoring
        results["meta"] = {
            "kind": self.kind,
            "num_processes": dist.world_size,
            "num_examples": len(self.group_of),
            "num_beams": num_beams,
            "max_new_tokens": max_new_tokens,
        }
        return results

    def _results(self, scores: dict[int, ChoiceScores], preds: dict[int, str]) -> dict:
        refs = {it.index: it.references for it in self.gen_items}
        golds = {it.index: it.gold for it in self.rank_items}
        per_template: dict[str, dict[str, dict]] = defaultdict(dict)
        for (dataset, template), g in self.groups.items():
            row: dict[str, Any] = {
                "task": g.task,
                "n": len(g.indices),
                "skipped": dict(sorted(g.skipped.items())),
                "num_skipped": sum(g.skipped.values()),
            }
            if g.mode == "rank":
                correct = [int(scores[i].argmax() in golds[i]) for i in g.indices]
                correct_ln = [int(scores[i].argmax(length_normalized=True) in golds[i]) for i in g.indices]
                row.update(
                    metric="accuracy",
                    accuracy=mean_or_none(correct),
                    accuracy_length_normalized=mean_or_none(correct_ln),
                    chance=mean_or_none([1.0 / k for k in g.num_choices]),
                    per_example=self._per_example(g.indices, correct, correct_ln),
                )
            else:
                values = generation_metrics([preds[i] for i in g.indices], [refs[i] for i in g.indices], g.metrics)
                row.update(values, metric=g.metrics[0], chance=None)
            row["score"] = row.get(row["metric"])
            per_template[dataset][template] = row
        return aggregate(per_template, self.cluster_of, self.language_of, protocol=self.protocol,
                         protocol_seeds=self.protocol_seeds, length_normalized=self.length_normalized)

    def _per_example(self, indices: list[int], correct: list[int], correct_ln: list[int]) -> dict:
        """``{task: {"ids": [example_index], "correct": [0|1], "correct_length_normalized": [0|1]}}``."""
        out: dict[str, dict[str, list[int]]] = {}
        for i, c, c_ln in zip(indices, correct, correct_ln):
            task, example = self.example_of[i]
            entry = out.setdefault(task, {"ids": [], "correct": [], "correct_length_normalized": []})
            entry["ids"].append(example)
            entry["correct"].append(c)
            entry["correct_length_normalized"].append(c_ln)
        return out


def evaluate(
    model,
    tokenizer,
    examples_by_task: Mapping[str, Sequence[dict]] | Sequence[dict],
    *,
    kind: str,
    batch_size: int = 8,
    max_tokens_per_batch: int | None = None,
    max_examples_per_template: int | None = None,
    accelerator=None,
    clusters: Mapping[str, str] | None = None,
    languages: Mapping[str, str] | None = None,
    metrics: Mapping[str, Sequence[str]] | None = None,
    max_input_tokens: int | None = None,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    protocol: str = "t0",
    protocol_seeds: int = DEFAULT_PROTOCOL_SEEDS,
    length_normalized: bool = False,
    scoring: Scoring = SCORINGS["t0"],
    prompts: Mapping[str, Any] | None = None,
) -> dict:
    """One-shot zero-shot evaluation (tokenize + score + aggregate). See :class:`ZeroShotEvaluator`.

    Returns:
        ``{"protocol": {...}, "scoring": {...}, "templates": {dataset: {template: row}}, "datasets": {...}, "clusters": {...},
        "languages": {...}, "meta": {...}}``; each template row has n, skipped, accuracy and
        accuracy_length_normalized (or generation metrics), chance, score and, for rank classification,
        per_example.
    """
    evaluator = ZeroShotEvaluator(
        tokenizer, examples_by_task, kind=kind, metrics=metrics, clusters=clusters, languages=languages,
        max_examples_per_template=max_examples_per_template, max_input_tokens=max_input_tokens,
        protocol=protocol, protocol_seeds=protocol_seeds, length_normalized=length_normalized,
        scoring=scoring, prompts=prompts,
    )
    return evaluator(
        model, accelerator=accelerator, batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch,
        max_new_tokens=max_new_tokens, num_beams=num_beams,
    )
