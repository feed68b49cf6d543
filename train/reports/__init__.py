"""Stage 5, reports: run directories in; a self-contained HTML page and PNG figures out (``mtf report``).

Takes what the loop (:mod:`train.loop`) leaves in a run directory: ``config.yaml``, ``run.json``,
``metrics.jsonl``, ``eval/step-N.json`` and the checkpoints' trainer states, as far as a run got (a
preempted, killed or still-running run included). Gives training, evaluation and mixture figures,
the tables behind them, and an ablation view that overlays several runs on shared axes.

Modules, in data-flow order: rundata (read a run, never raising on damaged files), plots (matplotlib
figures at fixed sizes), page (the HTML page and ``write_report``).
"""

from train import lazy_exports

_EXPORTS = {
    "RunData": "rundata", "read_run": "rundata", "mixture_table": "rundata", "eval_table": "rundata",
    "PIXELS": "plots", "smooth": "plots",
    "SECTIONS": "page", "write_report": "page",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
