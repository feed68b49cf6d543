"""Stage 6, experts: finetuned models in; one merged model out (``mtf merge``).

Takes a merge config (``configs/merges/*.yaml``: a base model, experts that are full Hugging Face
checkpoints or peft LoRA / (IA)^3 adapters of it, a method and its parameters). Gives a merged model
directory that ``from_pretrained`` and ``mtf eval`` load, written tensor by tensor from the safetensors
inputs, with ``merge_record.json`` (the resolved config, the parameters, a SHA-256 per input file, peak
memory). Methods: linear averaging, task arithmetic, TIES, DARE (linear and TIES).

Modules, in data-flow order: merge_config, checkpoints, methods, merging.
"""

from train import lazy_exports

_EXPORTS = {
    "MergeConfig": "merge_config", "load_merge_config": "merge_config", "merge_problems": "merge_config",
    "METHODS": "merge_config",
    "Checkpoint": "checkpoints", "Adapter": "checkpoints", "open_expert": "checkpoints",
    "linear": "methods", "task_arithmetic": "methods", "trim": "methods", "elect_sign": "methods",
    "disjoint_mean": "methods", "ties": "methods", "dare": "methods", "keep_mask": "methods",
    "tensor_seed": "methods", "merge_tensor": "methods",
    "MergePlan": "merging", "plan_merge": "merging", "merge": "merging", "format_summary": "merging",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
