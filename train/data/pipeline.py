"""The training data pipeline, assembled: mixture file -> tasks -> prompted -> tokenized -> stream -> packer.

Each stage lives in its own module (:mod:`train.data.tasks`, :mod:`train.data.tokenization`, :mod:`train.data.mixtures`,
:mod:`train.data.packing`); this module only wires them in order from a run config, and loads the eval
mixture's prompted examples for the eval hook. The held-out guard runs here, before any tokenization, and
applies to few-shot tasks like any other. Mixture members' ``few_shot`` settings override their tasks' here.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

from train.config import Config
from train.errors import ConfigError, DataError


def _mixture_files(spec: Any) -> list[Path]:
    """The file of a mixture spec and of every nested mixture, in visiting order."""
    files = [Path(spec.path)]
    for member in spec.members:
        if member.mixture is not None:
            files.extend(f for f in _mixture_files(member.mixture) if f not in files)
    return files


def load_mixture_tasks(path: str | Path, *, data_root: Optional[str] = None) -> tuple[Any, dict]:
    """(mixture spec, every task defined by the mixture file and its nested mixtures' files).

    A member's ``few_shot`` (even ``null``) replaces its task's own setting.

    Raises:
        ConfigError: as the mixture and task file loaders; two members give one task different few-shot settings.
    """
    from train.data.mixtures import load_mixture_spec
    from train.data.tasks import load_task_file

    spec = load_mixture_spec(path)
    tasks: dict = {}
    groups: dict = {}
    for file in _mixture_files(spec):
        task_file = load_task_file(file, data_root=data_root)
        for name, task in task_file.tasks.items():
            tasks.setdefault(name, task)
        for name, members in task_file.groups.items():
            groups.setdefault(name, members)
    spec = _expand_groups(spec, groups)
    for name, (few_shot, _) in spec.few_shot_overrides().items():
        if name in tasks:  # an unknown name is reported with the known ones by load_train_tasks / plan_mixture
            tasks[name] = dataclasses.replace(tasks[name], few_shot=few_shot)
    return spec, tasks


def _expand_groups(spec: Any, groups: dict) -> Any:
    """A member naming a prompted-file task split by language (``xp3``) becomes one member per language task
    (``xp3.en``, ``xp3.zh``, ...), each with the member's settings, in every nested mixture too."""
    members = []
    for member in spec.members:
        if member.mixture is not None:
            members.append(dataclasses.replace(member, mixture=_expand_groups(member.mixture, groups)))
        elif member.task in groups:
            members.extend(dataclasses.replace(member, task=name) for name in groups[member.task])
        else:
            members.append(member)
    return dataclasses.replace(spec, members=tuple(members))


def load_train_tasks(cfg: Config) -> tuple[Any, dict]:
    """(mixture spec, task name -> Task) of the tasks the training mixture samples, nested files included."""
    spec, tasks = load_mixture_tasks(cfg.data.train_mixture, data_root=cfg.data.data_root)
    missing = [name for name in spec.task_names() if name not in tasks]
    if missing:
        raise ConfigError(f"{cfg.data.train_mixture}: the mixture samples tasks that no file defines: {', '.join(missing)}. "
                          f"Defined: {', '.join(sorted(tasks))}.")
    return spec, {name: tasks[name] for name in spec.task_names()}


def few_shot_record(cfg: Config) -> Optional[dict]:
    """The ``few_shot.json`` document of a run's training tasks, or None when no task is few-shot.

    It goes through the same :meth:`~train.data.tasks.Task.load_rows` as the rendering in
    :func:`build_training_data` (cached, deterministic), so it names exactly the rows the run trains on.
    """
    from train.data.few_shot import record

    _, tasks = load_train_tasks(cfg)
    draws = {}
    for name, task in tasks.items():
        if task.few_shot is not None:
            _, draw = task.load_rows(cfg.data.max_examples_per_task, cache_dir=cfg.data.cache_dir)
            draws[name] = (draw, {"dataset": task.metadata.dataset, "task_file": task.file})
    return record(draws) if draws else None


def write_few_shot_record(cfg: Config, output_dir: str | Path) -> Optional[Path]:
    """Write ``<output_dir>/few_shot.json`` (atomically) when the run has few-shot tasks; call on the main process."""
    from train.data.few_shot import write_record

    document = few_shot_record(cfg)
    return write_record(output_dir, document) if document is not None else None


def load_eval_file(path: str, cfg: Optional[Config] = None) -> Any:
    from train.data.tasks import load_task_file

    return load_task_file(path, data_root=cfg.data.data_root if cfg else None)


EVAL_SECTION_KEYS = ("held_out", "clusters", "held_out_languages")


def held_out_of(eval_file: Any) -> tuple[list[str], list[str]]:
    """(held-out datasets, held-out clusters) an eval mixture declares in its ``eval:`` section."""
    section = _eval_section(eval_file)
    held, clusters = (_names(section.get(key), f"{eval_file.path}: eval.{key}") for key in ("held_out", "clusters"))
    if not held:  # an eval mixture holds out at least its own datasets
        held = sorted({t.metadata.dataset for t in eval_file.tasks.values()})
    return held, clusters


def held_out_languages_of(eval_file: Any) -> list[str]:
    """The languages an eval mixture scores zero-shot (``eval.held_out_languages``): no training task may be in
    one of them, whatever ``eval.allow_held_out_overlap`` says.

    Raises:
        ConfigError: a listed language that none of the eval mixture's tasks has (a typo would guard nothing).
    """
    where = f"{eval_file.path}: eval.held_out_languages"
    languages = _names(_eval_section(eval_file).get("held_out_languages"), where)
    known = sorted({t.metadata.language for t in eval_file.tasks.values() if t.metadata.language})
    for code in languages:
        if code not in known:
            close = difflib.get_close_matches(code, known, n=1)
            raise ConfigError(f"{where}: no task of this eval mixture is in language {code!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; its tasks' languages (metadata.language): {', '.join(known) or 'none'}.")
    return languages


def _eval_section(eval_file: Any) -> dict:
    section = eval_file.sections.get("eval") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{eval_file.path}: `eval` must be a mapping with `held_out` and optional `clusters`.")
    unknown = set(section) - set(EVAL_SECTION_KEYS)
    if unknown:
        raise ConfigError(f"{eval_file.path}: unknown key(s) in `eval`: {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(EVAL_SECTION_KEYS)}.")
    return section


def check_held_out_languages(tasks: Any, eval_file: Any) -> None:
    """Refuse training tasks in a language the eval mixture scores zero-shot (``eval.held_out_languages``).

    Raises:
        ConfigError: naming each such task, its file and language, and the eval file's key.
    """
    held = set(held_out_languages_of(eval_file))
    offenders = [f"{t.name} ({t.file}, metadata.language {t.metadata.language})" for t in tasks
                 if t.metadata.language in held]
    if offenders:
        raise ConfigError(f"training tasks are in languages that {eval_file.path} scores zero-shot "
                          f"(eval.held_out_languages: {', '.join(sorted(held))}): {'; '.join(offenders)}. Remove "
                          "them from the training mixture, or drop the language from eval.held_out_languages (its "
                          "results would no longer be zero-shot).")


def _names(value: Any, where: str) -> list[str]:
    """A list of names; one name alone is accepted (``list("super_glue/copa")`` would give its letters)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of names, e.g. [super_glue/copa], not {value!r}.")
    return list(value)


def load_eval_examples(mixture: str, *, data_root: Optional[str] = None, cache_dir: Optional[str] = None,
                       max_examples: Optional[int] = None) -> tuple[list[dict], dict, dict]:
    """(prompted examples, dataset -> cluster, dataset -> language) of every task of an eval mixture.

    ``max_examples``: render only the first that many rows of each task (a per-template cap applied before
    rendering, so its cost follows the cap).
    """
    from train.data.tasks import load_task_file

    task_file = load_task_file(mixture, data_root=data_root)
    examples: list[dict] = []
    clusters: dict[str, str] = {}
    languages: dict[str, str] = {}
    for task in task_file.tasks.values():
        dataset = task.metadata.eval_group  # the dataset, or dataset@prompts (a prompt setting is its own group)
        if task.metadata.cluster:
            clusters[dataset] = task.metadata.cluster
        if task.metadata.language:
            languages[dataset] = task.metadata.language
        examples.extend(task.prompted(max_examples, cache_dir=cache_dir).to_list())
    if not examples:
        raise DataError(f"{mixture}: the eval mixture produced no examples; check its tasks' data files and templates.")
    return examples, clusters, languages


def build_training_data(cfg: Config, tokenizer: Any, kind: str, accelerator: Any = None, *,
                        global_rows: int = 1) -> tuple[Any, Optional[list]]:
    """This rank's data lanes (:class:`~train.data.lanes.DataLanes`) and the eval set (None without ``eval.mixture``).

    The eval set is (prompted examples, dataset -> cluster, dataset -> language), see
    :func:`load_eval_examples`. ``global_rows``: packed rows per step, all ranks together; the lanes
    (``data.lanes``) split it, and this rank builds only its own lanes' rows.

    Every rank tokenizes the same tasks; the main process renders and tokenizes first so the others read
    its ``datasets`` cache instead of racing to write it.

    Raises:
        ConfigError: unknown tasks, held-out overlap, bad rates, lanes that do not fit the batch and ranks.
        DataError: unreadable data, templates that fail on most rows, tasks with no examples.
    """
    from train.data.lanes import DataLanes, resolve_lanes
    from train.data.mixtures import MixtureStream, count_examples, plan_mixture
    from train.data.packing import Packer
    from train.data.tasks import check_held_out
    from train.data.tokenization import tokenize_prompted

    rank, world_size = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    lanes = resolve_lanes(cfg.data.lanes, global_rows, world_size)  # before any heavy work
    spec, tasks = load_train_tasks(cfg)
    eval_file = load_eval_file(cfg.eval.mixture, cfg) if cfg.eval.mixture else None
    if eval_file is not None:
        held, clusters = held_out_of(eval_file)
        overlap = check_held_out(tasks.values(), held, clusters, allow=cfg.eval.allow_held_out_overlap)
        check_held_out_languages(tasks.values(), eval_file)
        if overlap and accelerator is not None:
            accelerator.print(f"[mtf] WARNING: training on held-out data (eval.allow_held_out_overlap=true): {'; '.join(overlap)}")

    first = accelerator.main_process_first() if accelerator is not None else nullcontext()
    with first:
        tokenized = {}
        for name, task in tasks.items():
            prompted = task.prompted(cfg.data.max_examples_per_task, cache_dir=cfg.data.cache_dir)
            tokenized[name] = tokenize_prompted(prompted, tokenizer, kind, num_proc=cfg.data.num_proc)
        evaluation = (load_eval_examples(cfg.eval.mixture, data_root=cfg.data.data_root, cache_dir=cfg.data.cache_dir)
                      if eval_file is not None else None)
    plan = plan_mixture(spec, count_examples(tokenized),
                        languages={name: task.metadata.language for name, task in tasks.items()})
    stream = MixtureStream.from_plan(plan, tokenized, seed=cfg.trainer.seed)

    def make_packer() -> Packer:
        return Packer(kind, max_input_tokens=cfg.data.max_input_tokens, max_target_tokens=cfg.data.max_target_tokens,
                      max_tokens=cfg.data.max_tokens, pack=cfg.data.packing, window=cfg.data.pack_window,
                      overlong_policy=cfg.data.overlong, choices=cfg.trainer.loss_weights.choice_losses())

    data = DataLanes(stream, make_packer, lanes=lanes, global_rows=global_rows, rank=rank, world_size=world_size)
    return data, evaluation


def step_counts(rows: list[dict], packer_stats: dict, kind: str, cfg: Config, *, micro_batch_rows: int,
                tasks: list[str]) -> dict[str, float]:
    """Additive counts of one rank's rows of a step, in a key order every rank shares (``tasks`` fixed).

    Summed over ranks they give the step's global figures (:func:`packing_metrics`, the trainer's task
    counts): ``tokens``, ``examples``, ``rows``, ``choice_sets``; per side, real tokens and the token slots
    of the collated tensors (each micro-batch of ``micro_batch_rows`` consecutive rows padded as
    ``data.pad_to`` says); examples and real tokens per task (segment ``s`` of a row belongs to
    ``tasks[s - 1]``); and the packers' cumulative counters (``packer/<name>``).
    """
    from train.data.packing import count_choice_sets

    out: dict[str, float] = {"tokens": sum(len(r.get("input_ids", [])) + len(r.get("target_ids", [])) for r in rows),
                             "examples": sum(len(r["tasks"]) for r in rows), "rows": len(rows),
                             "choice_sets": count_choice_sets(rows) if cfg.trainer.loss_weights.choice_losses() else 0}
    longest = cfg.data.padding() == "longest"
    for side, key in (("input", "input_ids"), ("target", "target_ids")) if kind == "encdec" else (("", "input_ids"),):
        out[f"real_{side}"] = sum(len(r[key]) for r in rows)
        slots = 0
        for i in range(0, len(rows), micro_batch_rows):
            chunk = rows[i:i + micro_batch_rows]
            slots += len(chunk) * (max(len(r[key]) for r in chunk) if longest else _capacity(cfg, kind, side))
        out[f"slots_{side}"] = slots
    examples = Counter(t for r in rows for t in r["tasks"])
    tokens = task_tokens(rows)
    out.update({f"examples/{t}": examples.get(t, 0) for t in tasks})
    out.update({f"tokens/{t}": tokens.get(t, 0) for t in tasks})
    out.update({f"packer/{name}": value for name, value in sorted(packer_stats.items())})
    return out


def _capacity(cfg: Config, kind: str, side: str) -> int:
    if kind != "encdec":
        return cfg.data.max_tokens
    return cfg.data.max_input_tokens if side == "input" else cfg.data.max_target_tokens


def task_tokens(rows: list[dict]) -> Counter:
    """Real tokens (input + target) per task in packed rows: segment ``s`` of a row belongs to ``tasks[s - 1]``."""
    out: Counter = Counter()
    for row in rows:
        tasks = row["tasks"]
        for key in ("input_segment_ids", "target_segment_ids", "segment_ids"):
            for segment, n in Counter(row.get(key, ())).items():
                if segment > 0:
                    out[tasks[segment - 1]] += n
    return out


def packing_metrics(counts: dict[str, float], kind: str, cfg: Config) -> dict:
    """Per-step packing figures for the logs from a step's :func:`step_counts` (summed over ranks).

    Two efficiencies, both real tokens over slots: ``packing/efficiency`` over the row capacity (what the
    packer achieved; unchanged by ``data.pad_to``), and ``packing/tensor_efficiency`` over the slots of the
    collated tensors the model computed. enc-dec: both are the encoder side's; ``*_input_*`` /
    ``*_target_*`` give each side. Also the packers' truncations and drops so far.
    """
    n = max(counts["rows"], 1)
    out = {"packing/examples_per_row": counts["examples"] / n}
    for side in ("input", "target") if kind == "encdec" else ("",):
        name = f"{side}_" if side else ""
        out[f"packing/{name}efficiency"] = counts[f"real_{side}"] / (n * _capacity(cfg, kind, side))
        out[f"packing/tensor_{name}efficiency"] = counts[f"real_{side}"] / max(counts[f"slots_{side}"], 1)
    if kind == "encdec":
        out["packing/efficiency"] = out["packing/input_efficiency"]
        out["packing/tensor_efficiency"] = out["packing/tensor_input_efficiency"]
    for key, value in counts.items():
        if key.startswith(("packer/truncated", "packer/dropped")):
            out[f"packing/{key[len('packer/'):]}"] = int(value)
    return out
