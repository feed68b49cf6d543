"""Stage 1, data: mixture files and data files in; a seeded, resumable stream of packed rows out.

Takes a mixture YAML (tasks: a data source, pure preprocessors, PromptSource templates; rates) and a
tokenizer. Gives prompted examples ``{inputs, targets, answer_choices}``, their token ids (cached), an
infinite mixture stream whose position is a small ``state_dict``, and packed rows of segment ids and
positions, plus the eval mixture's prompted examples. Knows nothing of models beyond their kind.

Modules, in data-flow order: templates, preprocessors, few_shot (k rows of a task drawn with a seed),
tasks, tokenization, mixtures, packing, lanes (a rank's share of the global batch: mixture lanes and
their packers), pipeline (wires them for one run), mixture_report (``mtf mixture show``).
"""

from train import lazy_exports

_EXPORTS = {
    "Template": "templates", "load_templates": "templates", "lint_templates": "templates",
    "format_lint_report": "templates",
    "PREPROCESSORS": "preprocessors", "PreprocessorRegistry": "preprocessors",
    "FewShotSpec": "few_shot", "parse_few_shot": "few_shot",
    "Task": "tasks", "TaskFile": "tasks", "TaskRegistry": "tasks", "load_task_file": "tasks",
    "check_held_out": "tasks", "preview": "tasks", "lint_data": "tasks",
    "tokenize_prompted": "tokenization", "tokenizer_fingerprint": "tokenization",
    "MixtureSpec": "mixtures", "MemberSpec": "mixtures", "RateSpec": "mixtures", "MixturePlan": "mixtures",
    "MixtureStream": "mixtures", "load_mixture_spec": "mixtures", "plan_mixture": "mixtures",
    "count_examples": "mixtures",
    "Packer": "packing", "build_row": "packing", "DataLanes": "lanes", "resolve_lanes": "lanes",
    "build_training_data": "pipeline", "load_mixture_tasks": "pipeline", "load_train_tasks": "pipeline",
    "load_eval_examples": "pipeline", "packing_metrics": "pipeline", "step_counts": "pipeline", "few_shot_record": "pipeline",
    "write_few_shot_record": "pipeline",
    "show_mixture": "mixture_report", "format_mixture_report": "mixture_report",
    "plot_mixture_report": "mixture_report",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
