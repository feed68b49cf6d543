"""Metrics on generated text for templates without answer choices: SQuAD EM/F1, ROUGE, BLEU.

PromptSource templates name their metrics (``metadata.metrics``); :data:`GENERATION_METRICS` maps those
names to what is computed here. A template with answer choices is scored by rank classification
instead (:mod:`train.evaluation.scoring`), whatever its metrics say.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from train.errors import ConfigError


# PromptSource `metadata.metrics` names -> metrics computed on generated text. "Accuracy" on a template
# with answer choices means rank classification instead.
GENERATION_METRICS = {
    "accuracy": ("exact_match",),
    "exact_match": ("exact_match",),
    "squad": ("exact_match", "f1"),
    "f1": ("f1",),
    "rouge": ("rouge1", "rouge2", "rougeL"),
    "bleu": ("bleu",),
}


def _normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(max(_normalize_answer(prediction) == _normalize_answer(r) for r in references))


def squad_f1(prediction: str, references: Sequence[str]) -> float:
    """Token-overlap F1 of the official SQuAD v1.1 script, maximised over references."""
    best = 0.0
    pred = _normalize_answer(prediction).split()
    for ref in references:
        gold = _normalize_answer(ref).split()
        common = Counter(pred) & Counter(gold)
        same = sum(common.values())
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        if same:
            p, r = same / len(pred), same / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def generation_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], names: Sequence[str]
) -> dict[str, float]:
    """Corpus-level metrics on generated text.

    Args:
        predictions: one string per example.
        references: the example's targets (one or more).
        names: any of exact_match, f1 (SQuAD, in [0, 1]), rouge1/rouge2/rougeL (rouge-score F-measure
            with stemming, best reference, in [0, 1]), bleu (sacrebleu corpus BLEU, in [0, 100]).
    """
    res: dict[str, float] = {}
    n = len(predictions)
    if n == 0:
        return {name: None for name in names}
    rouge_names = [m for m in names if m.startswith("rouge")]
    if rouge_names:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(rouge_names, use_stemmer=True)
        totals = dict.fromkeys(rouge_names, 0.0)
        for pred, refs in zip(predictions, references):
            for m in rouge_names:
                totals[m] += max(scorer.score(r, pred)[m].fmeasure for r in refs)
        res.update({m: totals[m] / n for m in rouge_names})
    for name in names:
        if name == "exact_match":
            res[name] = sum(squad_exact_match(p, r) for p, r in zip(predictions, references)) / n
        elif name == "f1":
            res[name] = sum(squad_f1(p, r) for p, r in zip(predictions, references)) / n
        elif name == "bleu":
            import sacrebleu

            # sacrebleu wants the same number of reference streams for every example: repeat the first.
            width = max(len(r) for r in references)
            streams = [[r[k] if k < len(r) else r[0] for r in references] for k in range(width)]
            res[name] = float(sacrebleu.corpus_bleu(list(predictions), streams).score)
        elif name not in res:
            raise ConfigError(f"evaluation: unknown generation metric {name!r}")
    return res
