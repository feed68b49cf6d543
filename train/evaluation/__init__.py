"""Stage 3, evaluation: a model and prompted eval examples in; zero-shot scores and T0-style aggregates out.

Takes a model of any kind (enc-dec, decoder, prefix-LM; plain, DDP or DeepSpeed), its tokenizer and
prompted examples from :mod:`train.data`. Gives per-(dataset, template) accuracy by rank classification
(or generation metrics), per-dataset median/mean/min/max, per-cluster and per-language means, a results
JSON and a table. Runs inside training (the loop's eval hook) or standalone (``mtf eval``).

Modules, in data-flow order: metrics, items (examples -> tokenized items), distributed (sharding and
gathering), batching, scoring (rank classification per architecture), generation, results
(aggregation), evaluator (ties them together), runner (``mtf eval`` / ``eval-merge``).
"""

from train import lazy_exports

_EXPORTS = {
    "GENERATION_METRICS": "metrics", "generation_metrics": "metrics",
    "RankItem": "items", "GenItem": "items", "EvalItems": "items", "build_eval_items": "items",
    "SKIP_NO_CHOICES": "items", "SKIP_GOLD_NOT_IN_CHOICES": "items", "SKIP_NO_TARGETS": "items",
    "SKIP_UNSUPPORTED_METRIC": "items",
    "DistContext": "distributed",
    "make_batches": "batching", "pad_sequences": "batching",
    "ChoiceScores": "scoring", "score_rank_items": "scoring", "token_logprobs": "scoring",
    "split_by_item": "scoring",
    "generate_predictions": "generation",
    "aggregate": "results", "flatten_for_logging": "results", "write_results": "results",
    "format_results_table": "results",
    "ZeroShotEvaluator": "evaluator", "evaluate": "evaluator",
    "run_eval_command": "runner", "merge_results": "runner", "load_model_for_eval": "runner",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
