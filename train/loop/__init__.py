"""Stage 4, loop: a run config in; a trained model, checkpoints, metrics and eval results out.

Takes everything before it: the data stream and packer (:mod:`train.data`), the model, tensors and
losses (:mod:`train.modeling`) and the zero-shot evaluator (:mod:`train.evaluation`). Gives one readable
Accelerate/DeepSpeed loop, hooks with one concern each (metrics logging, periodic eval, checkpoints,
preemption), atomic checkpoints with exact resume, the Hugging Face export, and ``mtf validate``.

Modules, in data-flow order: loggers, checkpointing, rundir (checks and the one-run lock), hooks, trainer,
validation.
"""

from train import lazy_exports

_EXPORTS = {
    "read_metrics": "loggers", "estimate_mfu": "loggers",
    "find_resume_checkpoint": "checkpointing", "list_complete": "checkpointing", "export_model": "checkpointing",
    "TrainContext": "hooks",
    "BatchPlan": "trainer", "plan_batch": "trainer", "train": "trainer",
    "validate_run": "validation",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
