"""``mtf eval``: zero-shot evaluation of any checkpoint, standalone, under ``accelerate launch``, or as a
Slurm job array.

What it evaluates (``MODEL``):

* a Hugging Face model directory (``config.json`` + weights), e.g. ``runs/demo/final`` or a hub name;
* a peft adapter directory (``adapter_config.json``, e.g. an adapter run's ``final/``): its base model
  (``--base-model``, else the export's ``base/``, else the name in ``adapter_config.json``) is loaded and
  the adapter merged into it;
* a run directory: its ``final/`` export;
* a run's checkpoint (``runs/demo/checkpoints/step-00000040``): the model is rebuilt from the run's
  ``config.yaml`` and loaded from the checkpoint's weights (DDP/single-process checkpoints; for a
  DeepSpeed checkpoint use the run's ``final/`` export).

Sharding (BLOOMZ evaluated one (dataset, template) per job, many short jobs that fill gaps in the queue):
the (dataset, template) pairs of an eval mixture are listed in mixture order (tasks in file order, each
task's selected templates in templates-file order, a pair shared by two tasks once). ``--shard I/N`` keeps
pair ``i`` when ``i % N == I``, so with ``N = mtf eval --count-shards`` each array element scores exactly
one pair::

    pairs  p0 p1 p2 p3 p4 p5 p6      --shard 1/3 -> p1 p4      --shard 4/7 -> p4

A shard renders only the tasks that hold its pairs and keeps their rows in the whole run's order, so
``max_examples_per_template`` picks the same examples as an unsharded run. The result records
``meta.shard = {"index", "count", "pairs"}``; :func:`merge_results` (``mtf eval-merge``) re-aggregates the
shards' template rows into the document one unsharded run writes, and checks that every pair is there.

Protocol (``--protocol t0|tfew``, ``--protocol-seeds N``, ``--length-normalized``): how per-template rows
become per-dataset numbers, see :mod:`train.evaluation.results`. Rank-classification rows keep each
example's correctness, so the protocol of a merge is free: by default the shards' own, else the flags'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from train.errors import ConfigError, DataError
from train.evaluation.results import DEFAULT_PROTOCOL_SEEDS
from train.modeling.models import check_eos, check_local_weights, check_vocab

Pair = tuple[str, str]  # (dataset, template)


# ------------------------------------------------------------------------------------------ sharding


def mixture_pairs(mixture: str) -> list[Pair]:
    """The (dataset, template) pairs of an eval mixture in mixture order (no data is read or rendered).

    Raises:
        ConfigError / TemplateError: the mixture or one of its template files does not load.
    """
    from train.data.tasks import load_task_file

    pairs: dict[Pair, None] = {}  # an ordered set: ANLI's three rounds share ("anli", template) pairs
    for task in load_task_file(mixture).tasks.values():
        for name in task.template_names():
            pairs.setdefault((task.metadata.eval_group, name), None)
    if not pairs:
        raise ConfigError(f"{mixture}: the eval mixture defines no tasks; add a `tasks:` list.")
    return list(pairs)


def count_shards(mixture: str) -> int:
    """Number of (dataset, template) pairs of an eval mixture: the size of the one-pair-per-job array."""
    return len(mixture_pairs(mixture))


def parse_shard(shard: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``.

    Raises:
        ConfigError: not two integers with 0 <= I < N (the message gives the matching ``--array``).
    """
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {shard!r}: write it as INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 3/12 "
                          "(under Slurm: --shard $SLURM_ARRAY_TASK_ID/N).") from None
    if count < 1:
        raise ConfigError(f"--shard {shard!r}: COUNT must be at least 1.")
    if not 0 <= index < count:
        raise ConfigError(f"--shard {shard!r}: INDEX must be in 0..{count - 1}; a job array of {count} shards "
                          f"is submitted as sbatch --array=0-{count - 1}.")
    return index, count


def select_pairs(pairs: list[Pair], index: int, count: int, mixture: str = "the eval mixture") -> list[Pair]:
    """The pairs of shard ``index`` of ``count``: pair ``i`` when ``i % count == index``.

    Raises:
        ConfigError: ``count`` exceeds the number of pairs. Such an array would have elements with
            nothing to evaluate, and a merge could not tell an empty shard from a lost one, so every
            element fails at once with the array to submit instead.
    """
    if count > len(pairs):
        raise ConfigError(
            f"--shard {index}/{count}: {mixture} has only {len(pairs)} (dataset, template) pairs, so COUNT must be "
            f"at most {len(pairs)}. For one pair per job use --shard $SLURM_ARRAY_TASK_ID/{len(pairs)} with "
            f"sbatch --array=0-{len(pairs) - 1} (mtf eval --count-shards --mixture {mixture} prints {len(pairs)}).")
    return [pair for i, pair in enumerate(pairs) if i % count == index]


def load_examples(mixture: str, pairs: Optional[list[Pair]] = None,
                  max_examples_per_template: Optional[int] = None) -> tuple[list[dict], dict, dict]:
    """(prompted examples, dataset -> cluster, dataset -> language) of an eval mixture or of some of its pairs.

    With ``pairs``, only the tasks holding one of them are rendered and only those pairs' rows are kept,
    in the order the whole mixture yields them (so a per-template cap keeps the same rows). With
    ``max_examples_per_template``, only the first that many rows of each task are rendered: rendering
    time follows the cap, not the dataset size, and every template of a task sees the same rows.

    Raises:
        ConfigError / DataError: the mixture does not load or yields no example.
    """
    from train.data import load_eval_examples
    from train.data.tasks import load_task_file

    if pairs is None:
        return load_eval_examples(mixture, max_examples=max_examples_per_template)
    wanted = set(pairs)
    examples: list[dict] = []
    clusters: dict[str, str] = {}
    languages: dict[str, str] = {}
    for task in load_task_file(mixture).tasks.values():
        dataset = task.metadata.eval_group
        if not any((dataset, name) in wanted for name in task.template_names()):
            continue
        if task.metadata.cluster:
            clusters[dataset] = task.metadata.cluster
        if task.metadata.language:
            languages[dataset] = task.metadata.language
        examples.extend(row for row in task.prompted(max_examples_per_template).to_list()
                        if (row["dataset"], row["template"]) in wanted)
    if not examples:
        shown = ", ".join(f"{d}/{t}" for d, t in pairs)
        raise DataError(f"{mixture}: the shard's pairs ({shown}) produced no examples; check those tasks' data "
                        "files and templates (mtf tasks preview).")
    return examples, clusters, languages


def prompt_files(mixture: str, pairs: Optional[list[Pair]] = None) -> dict[str, dict]:
    """The prompt set of an eval mixture: ``{dataset: {"file", "sha256", "templates": [sorted names]}}``.

    ``sha256`` is the first 16 hex digits of the templates file's bytes: two results with the same hash were
    scored on the same prompt text.
    """
    import hashlib

    from train.data.tasks import load_task_file

    wanted = set(pairs) if pairs is not None else None
    out: dict[str, dict] = {}
    for task in load_task_file(mixture).tasks.values():
        group = task.metadata.eval_group
        names = [name for name in task.template_names() if wanted is None or (group, name) in wanted]
        if not names:
            continue
        path = Path(task.prompt_files()[0])
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
        entry = out.setdefault(group, {"file": str(path), "sha256": digest, "templates": []})
        entry["templates"] = sorted(set(entry["templates"]) | set(names))
    return out


# ------------------------------------------------------------------------------------------ models


_LOOKED_FOR = ("config.json (a Hugging Face model directory), adapter_config.json (a peft adapter), "
               "final/config.json or final/adapter_config.json (a run directory's export), "
               "or trainer_state.json + accelerate/model*.safetensors (a run checkpoint)")


def resolve_model_path(model: str) -> Path:
    """Where the model of ``model`` is: the directory itself, a run directory's ``final/``, or a checkpoint.

    A path that does not exist is returned unchanged (it may be a hub model id).

    Raises:
        ConfigError: an existing path that holds no model (the message lists what it looked for).
    """
    path = Path(model)
    markers = ("config.json", "adapter_config.json", "trainer_state.json")
    if path.is_dir() and not any((path / m).exists() for m in markers) \
            and any((path / "final" / m).exists() for m in markers[:2]):
        return path / "final"  # a run directory: its export
    if path.exists() and not (path.is_dir() and any((path / m).exists() for m in markers)):
        raise ConfigError(f"{model}: no model found; looked for {_LOOKED_FOR}. Pass e.g. runs/demo/final or "
                          "runs/demo/checkpoints/step-00000040.")
    return path


def load_model_for_eval(model: str, kind: str = "auto", tokenizer: Optional[str] = None,
                        base_model: Optional[str] = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, kind) from an HF directory / hub name, a peft adapter directory, a run directory,
    or a run checkpoint. ``base_model`` names an adapter's base when its export does not.

    Raises:
        ConfigError: the path holds no model (the message lists what it looked for); the tokenizer has no
            eos token or more tokens than the model has embedding rows.
    """
    path = resolve_model_path(model)
    if (path / "trainer_state.json").exists():
        return _load_from_checkpoint(path, kind, tokenizer)
    if (path / "adapter_config.json").exists():
        return _load_adapter(path, kind, tokenizer, base_model)
    return _load_model_dir(model, path, kind, tokenizer)


def _check_vocab(model_config: Any, tok: Any, model: Any, tokenizer: Optional[str]) -> None:
    """check_vocab, naming the evaluated model and ``--tokenizer`` when it was given."""
    check_vocab(model_config, tok, f"{model}" + (f" with --tokenizer {tokenizer}" if tokenizer else ""))


def _load_model_dir(model: str, path: Path, kind: str, tokenizer: Optional[str]) -> tuple[Any, Any, str]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        where = "" if path.exists() else " (no such directory; as a hub model id it did not load either)"
        raise ConfigError(f"{model}: cannot load a model config{where}: {str(err).splitlines()[0]} "
                          f"Looked for {_LOOKED_FOR}.") from None
    is_encdec = bool(getattr(config, "is_encoder_decoder", False))
    resolved = ("encdec" if is_encdec else "decoder") if kind == "auto" else kind
    auto = AutoModelForSeq2SeqLM if is_encdec else AutoModelForCausalLM
    if path.is_dir():
        check_local_weights(path)
    tok = _eval_tokenizer(tokenizer or str(path), model)
    _check_vocab(config, tok, model, tokenizer)  # before the weights load: a wrong --tokenizer fails in seconds
    try:
        loaded = auto.from_pretrained(str(path))
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{model}: the model weights cannot be loaded ({str(err).splitlines()[0]}). "
                          "Re-export the model, or evaluate another checkpoint.") from None
    return loaded, tok, resolved


def _eval_tokenizer(source: str, who: Any) -> Any:
    """The tokenizer at ``source``, with a pad token (decoders often lack one; padding is masked anyway)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{who}: no tokenizer could be loaded from {source} ({str(err).splitlines()[0]}). "
                          "Pass one with --tokenizer.") from None
    check_eos(tok, f"{who}: the tokenizer at {source}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_adapter(path: Path, kind: str, tokenizer: Optional[str], base_model: Optional[str]) -> tuple[Any, Any, str]:
    from train.modeling.adapters import load_adapter_for_eval

    model, base = load_adapter_for_eval(path, base_model, kind)
    is_encdec = bool(getattr(model.config, "is_encoder_decoder", False))
    resolved = ("encdec" if is_encdec else "decoder") if kind == "auto" else kind
    source = tokenizer or (str(path) if (path / "tokenizer_config.json").exists() else base)
    tok = _eval_tokenizer(source, path)
    _check_vocab(model.config, tok, path, tokenizer)
    return model, tok, resolved


def _load_from_checkpoint(path: Path, kind: str, tokenizer: Optional[str]) -> tuple[Any, Any, str]:
    from train.config import Config, _build, read_yaml
    from train.modeling.models import align_special_tokens, build_model, infer_kind, load_model_config, load_tokenizer

    run_config = path.parent.parent / "config.yaml"
    if not run_config.exists():
        raise ConfigError(f"{path}: a checkpoint needs its run's config.yaml at {run_config} to rebuild the model.")
    # Only the model section matters here; the run's data paths may no longer exist.
    cfg = _build(Config, read_yaml(run_config), "", str(run_config))
    weights = sorted((path / "accelerate").glob("model*.safetensors"))
    if not weights:
        raise ConfigError(f"{path}: no model weights under accelerate/ (a DeepSpeed checkpoint?). "
                          f"Evaluate the run's final/ export instead.")
    model_config = load_model_config(cfg.model)
    resolved = infer_kind(cfg.model, model_config) if kind == "auto" else kind
    cfg.model.gradient_checkpointing = False
    cfg.model.tokenizer = tokenizer or cfg.model.tokenizer
    tok = load_tokenizer(cfg.model)
    _check_vocab(model_config, tok, path, tokenizer)  # before any weights are read
    align_special_tokens(cfg.model, model_config, tok)  # the config as the run built it
    if cfg.peft.method != "none":  # an adapter checkpoint holds the adapter only: rebuild the base, then load it
        return _load_adapter_checkpoint(cfg, model_config, resolved, weights, tok)
    model = build_model(cfg.model, model_config, resolved)
    state = _read_checkpoint_weights(weights)
    _restore_tied(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
        raise ConfigError(f"{path}: the checkpoint does not match the run's model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); was it written by another run's config.yaml?")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model, tok, resolved


def _load_adapter_checkpoint(cfg: Any, model_config: Any, kind: str, weights: list[Path],
                             tok: Any) -> tuple[Any, Any, str]:
    from train.modeling.adapters import build_run_model

    model = build_run_model(cfg, model_config, kind)
    state = _read_checkpoint_weights(weights)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != trainable:
        raise ConfigError(f"{weights[0].parent}: the checkpoint does not hold this run's adapter "
                          f"(missing {sorted(trainable - set(state))[:3]}, unexpected {sorted(set(state) - trainable)[:3]}).")
    model.load_state_dict(state, strict=False)
    return model.merge_and_unload(), tok, kind


def _read_checkpoint_weights(weights: list[Path]) -> dict:
    """Every tensor of a checkpoint's ``accelerate/model*.safetensors`` files; a damaged file is a ConfigError."""
    from safetensors.torch import load_file

    state = {}
    for file in weights:
        try:
            state.update(load_file(str(file)))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ConfigError(f"{file} is damaged ({err}); evaluate an earlier checkpoint or the run's final/ export.") from None
    return state


def _restore_tied(model: Any, state: dict) -> None:
    """Give every alias of a tied tensor its saved value, whichever alias the checkpoint kept.

    safetensors cannot store aliased tensors, so a checkpoint keeps one name per tied group (accelerate
    keeps the first, ``shared.weight`` for T5; ``safetensors.torch.save_model`` may keep another). The
    groups come from the freshly built model's own storage sharing.
    """
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict().items():
        groups.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
    for names in groups.values():
        kept = [n for n in names if n in state]
        if len(names) > 1 and kept:
            for name in names:
                state.setdefault(name, state[kept[0]])


# ------------------------------------------------------------------------------------------ running


def run_eval_command(*, model_dir: str, mixture: str, kind: str = "auto", tokenizer: Optional[str] = None,
                     batch_size: int = 16, max_examples_per_template: Optional[int] = None,
                     output: Optional[str] = None, shard: Optional[str] = None,
                     base_model: Optional[str] = None, protocol: str = "t0",
                     protocol_seeds: int = DEFAULT_PROTOCOL_SEEDS, length_normalized: bool = False,
                     scoring: str = "t0", choice_eos: Optional[bool] = None,
                     choice_separator: Optional[str] = None) -> Optional[dict]:
    """Evaluate ``model_dir`` on ``mixture`` (or on shard ``"I/N"`` of its pairs).

    ``protocol``, ``protocol_seeds``, ``length_normalized``: see :func:`train.evaluation.results.aggregate`;
    ``scoring``, ``choice_eos``, ``choice_separator``: see :func:`train.evaluation.items.resolve_scoring`.

    Returns:
        The results (see :func:`train.evaluation.results.aggregate`) with ``meta.model``, ``meta.mixture`` and
        ``meta.shard`` (``{"index", "count", "pairs": [[dataset, template], ...]}``, None unsharded) on the
        main process; None on the others. Written to ``output`` when given.

    Raises:
        ConfigError: a bad ``--shard``, a path without a model, a mixture that does not load, an unknown
            protocol.
        DataError: the mixture (or the shard) yields no example.
    """
    import torch
    from accelerate import Accelerator

    from train.evaluation.items import resolve_scoring
    from train.evaluation.results import check_protocol, write_results
    from train.evaluation import evaluate

    # Check the protocol, shard and model path before rendering anything: a wrong array fails in seconds.
    check_protocol(protocol, protocol_seeds)
    convention = resolve_scoring(scoring, choice_eos=choice_eos, choice_separator=choice_separator)
    shard_meta = None
    pairs = None
    if shard:
        index, count = parse_shard(shard)
        pairs = select_pairs(mixture_pairs(mixture), index, count, mixture)
        shard_meta = {"index": index, "count": count, "pairs": [list(p) for p in pairs]}
    resolve_model_path(model_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    with accelerator.main_process_first():
        examples, clusters, languages = load_examples(mixture, pairs, max_examples_per_template)
    model, tok, resolved = load_model_for_eval(model_dir, kind, tokenizer, base_model)
    model.to(accelerator.device)
    results = evaluate(model, tok, examples, kind=resolved, batch_size=batch_size, accelerator=accelerator,
                       max_input_tokens=convention.max_prompt_tokens(resolved, model.config, tok),
                       max_examples_per_template=max_examples_per_template, clusters=clusters, languages=languages,
                       protocol=protocol, protocol_seeds=protocol_seeds, length_normalized=length_normalized,
                       scoring=convention, prompts=prompt_files(mixture, pairs))
    results.setdefault("meta", {}).update({"model": str(model_dir), "mixture": str(mixture), "shard": shard_meta})
    zero_shot = zero_shot_languages(mixture)
    if zero_shot:
        results["zero_shot_languages"] = zero_shot
    if not accelerator.is_main_process:
        return None
    if output:
        write_results(output, results)
    return results


# ------------------------------------------------------------------------------------------ merging


def _read_result(path: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"shard result {path} does not exist; did every `mtf eval --shard` job finish?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"shard result {path} is not valid JSON ({err}); rerun that shard.") from None
    templates = doc.get("templates") if isinstance(doc, dict) else None
    if not isinstance(templates, dict) or not all(
            isinstance(rows, dict) and all(isinstance(r, dict) for r in rows.values()) for rows in templates.values()):
        raise DataError(f"{path} is not an `mtf eval` result (it needs a `templates` mapping "
                        "{dataset: {template: row}}); pass the files written by `mtf eval --output`.")
    shard = (doc.get("meta") or {}).get("shard")
    if shard is not None and not (isinstance(shard, dict) and isinstance(shard.get("index"), int)
                                  and isinstance(shard.get("count"), int) and isinstance(shard.get("pairs"), list)):
        raise DataError(f"{path}: meta.shard must be {{index, count, pairs}} as `mtf eval --shard` writes it; "
                        f"got {shard!r}.")
    return doc


def _merged_meta(paths: list[str], docs: list[dict]) -> dict:
    """Meta values all shards agree on, summed example counts, and where the merge came from."""
    metas = [doc.get("meta") or {} for doc in docs]
    meta = {k: v for k, v in metas[0].items()
            if k not in ("shard", "num_examples") and all(k in m and m[k] == v for m in metas)}
    if all(isinstance(m.get("num_examples"), int) for m in metas):
        meta["num_examples"] = sum(m["num_examples"] for m in metas)
    meta["shard"] = None  # the merged document stands for the whole mixture
    meta["merged_from"] = list(paths)
    return meta


def _check_complete(owner: dict[Pair, str], shard_file: dict[int, str], count: Optional[int],
                    mixture: Optional[str]) -> Optional[list[Pair]]:
    """Raise unless the merged files cover ``mixture`` (or every shard index); return the mixture's pairs.

    Args:
        owner: pair -> the file that holds it; shard_file: shard index -> file; count: the array size.

    Raises:
        DataError: a missing pair (named, with the array indices to rerun) or a pair not in ``mixture``.
    """
    if mixture is None:
        absent = sorted(set(range(count)) - set(shard_file)) if count is not None else []
        if absent:
            listed = ",".join(map(str, absent))
            raise DataError(f"missing {len(absent)} of {count} shards: indices {listed} have no result file. Rerun "
                            f"them (sbatch --array={listed} scripts/slurm/eval.sbatch ...), then merge again; pass "
                            "--mixture to also name their (dataset, template) pairs.")
        return None
    expected = mixture_pairs(mixture)
    known = set(expected)
    extra = [p for p in owner if p not in known]
    if extra:
        d, t = extra[0]
        raise DataError(f"{owner[extra[0]]}: {d}/{t} is not a (dataset, template) pair of {mixture} "
                        f"({len(extra)} such pair(s)); was it evaluated on another mixture?")
    missing = [(i, p) for i, p in enumerate(expected) if p not in owner]
    if missing:
        names = ", ".join(f"{d}/{t}" for _, (d, t) in missing)
        if count is not None:  # pair i is in shard i % count
            rerun = ",".join(map(str, sorted({i % count for i, _ in missing})))
            how = (f"Rerun array indices {rerun} (sbatch --array={rerun} scripts/slurm/eval.sbatch ..., i.e. "
                   f"mtf eval --shard I/{count}), then merge again.")
        else:
            how = "Evaluate them (mtf eval --mixture ...), then merge again."
        raise DataError(f"missing {len(missing)} of {len(expected)} (dataset, template) pairs of {mixture}: "
                        f"{names}. {how}")
    return expected


def _merge_protocol(paths: list[str], docs: list[dict], protocol: Optional[str], protocol_seeds: Optional[int],
                    length_normalized: Optional[bool]) -> tuple[str, int, bool]:
    """The merge's protocol: each setting given (not None) wins, else the one all shards agree on, else T0's default.

    Raises:
        DataError: a setting is not given and the shards disagree on it (each file's value is named).
    """
    given = {"name": protocol, "seeds": protocol_seeds, "length_normalized": length_normalized}
    defaults = {"name": "t0", "seeds": DEFAULT_PROTOCOL_SEEDS, "length_normalized": False}
    flags = {"name": "--protocol", "seeds": "--protocol-seeds", "length_normalized": "--length-normalized"}
    out = {}
    for key, value in given.items():
        if value is None:
            seen = {path: (doc.get("protocol") or {}).get(key) for path, doc in zip(paths, docs)}
            values = {v for v in seen.values() if v is not None}
            if len(values) > 1:
                listed = ", ".join(f"{p}: {v}" for p, v in seen.items())
                raise DataError(f"the shard results were aggregated with different protocol settings ({key}: {listed}); "
                                f"pass {flags[key]} to choose one for the merge.")
            value = values.pop() if values else defaults[key]
        out[key] = value
    return out["name"], out["seeds"] or DEFAULT_PROTOCOL_SEEDS, bool(out["length_normalized"])


def merge_results(paths: list[str], mixture: Optional[str] = None, *, protocol: Optional[str] = None,
                  protocol_seeds: Optional[int] = None, length_normalized: Optional[bool] = None) -> dict:
    """Combine shard result files (``mtf eval --shard``) into the document one unsharded ``mtf eval`` writes.

    Template rows are re-aggregated with :func:`train.evaluation.results.aggregate` (per-dataset medians, cluster
    and language means), keeping each dataset's cluster and language.

    Args:
        paths: result JSON files, in any order.
        mixture: the eval mixture; when given, every (dataset, template) pair of it must be present and no
            other. Without it, completeness is checked from the shards' ``meta.shard`` (every index
            ``0..count-1`` present).
        protocol, protocol_seeds, length_normalized: how to aggregate; None = what the shards used.

    Returns:
        ``{"templates", "datasets", "clusters", "languages", "meta"}``; ``meta.merged_from`` lists ``paths``.

    Raises:
        ConfigError: a file does not exist, or no file is given.
        DataError: a file is not a result; a pair or a shard index appears twice; shards of arrays of
            different sizes; a pair (or shard) is missing (the message names the pairs and the array
            indices to rerun) or does not belong to ``mixture``; shards aggregated with different protocol
            settings and no setting given.
    """
    from train.evaluation.results import aggregate

    if not paths:
        raise ConfigError("eval-merge: no shard result files given; pass OUT/shards/shard-*.json.")
    paths = [str(p) for p in paths]
    docs = [_read_result(p) for p in paths]
    count_file: dict[int, str] = {}  # array size -> first file of that size
    for path, doc in zip(paths, docs):
        shard = (doc.get("meta") or {}).get("shard")
        if shard is not None:
            count_file.setdefault(shard["count"], path)
    if len(count_file) > 1:  # checked first: shard indices of arrays of different sizes mean different pairs
        sizes = ", ".join(f"{c} ({f})" for c, f in sorted(count_file.items()))
        raise DataError(f"the shard results come from job arrays of different sizes: {sizes}; merge the results of "
                        "one array (rerun stale shards with the same N).")
    count = next(iter(count_file), None)
    per_template: dict[str, dict[str, dict]] = {}
    owner: dict[Pair, str] = {}  # pair -> the file that has it
    shard_file: dict[int, str] = {}  # shard index -> file
    cluster_of: dict[str, str] = {}
    language_of: dict[str, str] = {}
    for path, doc in zip(paths, docs):
        shard = (doc.get("meta") or {}).get("shard")
        if shard is not None:
            if shard["index"] in shard_file:
                raise DataError(f"{path} and {shard_file[shard['index']]} are both shard "
                                f"{shard['index']}/{shard['count']}; merge each shard once (delete the stale file).")
            shard_file[shard["index"]] = path
        rows_pairs = [(d, t) for d, rows in doc["templates"].items() for t in rows]
        # A pair the shard was given but that produced no row (a template that rendered nothing) is still covered.
        meta_pairs = [p for p in map(tuple, (shard or {}).get("pairs", [])) if p not in rows_pairs]
        for pair in rows_pairs + meta_pairs:
            if pair in owner:
                raise DataError(f"{pair[0]}/{pair[1]} appears in two shard results, {owner[pair]} and {path}; "
                                "merge each shard once (delete the stale file).")
            owner[pair] = path
        for dataset, rows in doc["templates"].items():
            per_template.setdefault(dataset, {}).update(rows)
        for dataset, summary in (doc.get("datasets") or {}).items():
            if isinstance(summary, dict) and summary.get("cluster"):
                cluster_of[dataset] = summary["cluster"]
            if isinstance(summary, dict) and summary.get("language"):
                language_of[dataset] = summary["language"]

    expected = _check_complete(owner, shard_file, count, mixture)
    if expected is not None:  # mixture order: a stable document whatever order the shards finished in
        ordered: dict[str, dict[str, dict]] = {}
        for d, t in expected:
            if t in per_template.get(d, {}):
                ordered.setdefault(d, {})[t] = per_template[d][t]
        per_template = ordered
    name, seeds, ln = _merge_protocol(paths, docs, protocol, protocol_seeds, length_normalized)
    merged = aggregate(per_template, cluster_of, language_of, protocol=name, protocol_seeds=seeds, length_normalized=ln)
    scoring = _merged_scoring(paths, docs)
    if scoring is not None:
        merged["scoring"] = {**scoring, "score": "mean token log-probability (length-normalised)" if ln
                             else "summed token log-probability"}
    merged["meta"] = _merged_meta(paths, docs)
    zero_shot = sorted({code for doc in docs for code in doc.get("zero_shot_languages") or ()})
    if zero_shot:
        merged["zero_shot_languages"] = zero_shot
    return merged


def zero_shot_languages(mixture: str) -> list[str]:
    """The languages an eval mixture scores zero-shot (its ``eval.held_out_languages``), for the language table."""
    from train.data.pipeline import held_out_languages_of
    from train.data.tasks import load_task_file

    return held_out_languages_of(load_task_file(mixture))


def _merged_scoring(paths: list[str], docs: list[dict]) -> Optional[dict]:
    """The shards' common scoring convention, with their prompt sets joined.

    Raises:
        DataError: shards tokenized under different conventions (scores that cannot be pooled).
    """
    seen = {path: {k: v for k, v in (doc.get("scoring") or {}).items() if k not in ("prompts", "score")}
            for path, doc in zip(paths, docs)}
    distinct = {json.dumps(v, sort_keys=True) for v in seen.values()}
    if len(distinct) > 1:
        listed = "; ".join(f"{p}: {v.get('name', 'not recorded')} {v}" for p, v in seen.items())
        raise DataError(f"the shard results were scored under different conventions ({listed}); rerun the stale "
                        "shards with the same --scoring / --choice-eos / --choice-separator.")
    first = next((doc.get("scoring") for doc in docs if doc.get("scoring")), None)
    if first is None:
        return None
    prompts: dict = {}
    for doc in docs:
        for dataset, entry in ((doc.get("scoring") or {}).get("prompts") or {}).items():
            into = prompts.setdefault(dataset, {**entry, "templates": []})
            into["templates"] = sorted(set(into["templates"]) | set(entry.get("templates", [])))
    return {**first, "prompts": prompts or None}
