"""Tasks from YAML: source -> preprocessors -> PromptSource templates -> prompted examples.

A task file (``data_mixtures/*.yaml``) looks like::

    include: [other_tasks.yaml]          # their tasks become visible here (paths relative to this file)
    tasks:
      - name: copa
        source: {type: jsonl, data_files: {validation: demo_data/copa/validation.jsonl}}
        # or: {type: hub, path: super_glue, name: copa}   -> datasets.load_dataset(path, name, split=split)
        # json/jsonl/csv/parquet also take `fields: [a, b]` (records stored as positional lists) and
        # `join: {type: jsonl, data_files: other.jsonl, key: id}` (add the fields of the matching row).
        split: validation
        preprocessors: [{name: rename, args: {mapping: {old: new}}}]   # train.data.preprocessors, in order
        templates: {file: templates/super_glue/copa/templates.yaml, names: null, original_task: true,
                    choices_in_prompt: null, languages: [en]}
        metadata: {dataset: super_glue/copa, cluster: sentence_completion, language: en}
        few_shot: {k: 32, seed: 0}           # optional: k rows drawn with a seed (train.data.few_shot)
    mixture: ...                         # owned by train.data.mixtures: kept untouched in TaskFile.sections
    eval: ...                            # owned by the eval module: kept untouched

Paths. Every relative path in a task file (``data_files``, ``templates.file``, ``include``) resolves
relative to the directory of the YAML file that contains it, so files work from any working directory.

Using local files without editing a task file (two mechanisms, both arguments of :func:`load_task_file`):

* ``data_files={"copa": "/data/copa.jsonl"}`` (or ``{"copa": {"validation": [...]}}``) replaces the
  source of the named task by local files; the type comes from the extension. Relative override paths
  resolve against the current directory (they come from a command line).
* ``data_root="/data"`` (default: the ``MTF_DATA_ROOT`` environment variable) redirects every ``hub``
  source to ``<data_root>/<path>[/<name>]/<split>.{jsonl,json,csv,parquet}``, the layout of
  ``shared/data/tasks`` (e.g. ``super_glue/copa/validation.jsonl``). Local sources are not affected.

Prompted examples follow the contract in COMMON.md: ``{"inputs", "targets", "answer_choices", "task",
"dataset", "template", "example_index"}`` where ``example_index`` is the row index in the preprocessed
split (for a few-shot task too: the drawn row's index in the whole split). Rows whose render is empty or
lacks a field are skipped and counted per (dataset, template) (:class:`RenderReport`). Missing fields and
runtime errors count as *failures*: above ``max_failure_fraction`` of the rows a ``DataError`` names
template, field and a row. Empty renders do not count as failures, because conditional templates produce
them by design (TREC's ``fine_grained_LOC`` renders only LOC questions, ~15% of rows; COPA's "…which may
be caused by" only ``cause`` rows).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import glob
import hashlib
import io
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import datasets
import yaml

from train.errors import ConfigError, DataError, TemplateError
from train.yamlfile import load_yaml
from train.data.few_shot import FewShotDraw, FewShotSpec, draw_rows, parse_few_shot
from train.data.preprocessors import PREPROCESSORS, PreprocessorRegistry
from train.data.templates import (SKIP_EMPTY_INPUT, SKIP_EMPTY_TARGET, SKIP_MISSING_FIELD, SKIP_RENDER_ERROR,
                                  fails_on_data, TEXT_VAR_LENGTH, Template, TemplateMetadata, load_templates)

DATA_ROOT_ENV = "MTF_DATA_ROOT"
LOCAL_TYPES = ("jsonl", "json", "csv", "parquet")
_EXT_TYPES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_READER_VERSION = "2"  # bump when _read_records changes, to invalidate cached Arrow files
_RENDER_VERSION = "1"

FILE_KEYS = ("tasks", "include")  # the top-level keys this module owns; others are passed through
TASK_KEYS = ("name", "source", "split", "preprocessors", "templates", "prompted", "metadata", "few_shot")
SOURCE_KEYS = {"hub": ("type", "path", "name"),
               **{t: ("type", "data_files", "fields", "join") for t in LOCAL_TYPES}}
JOIN_KEYS = ("type", "data_files", "key")  # not "on": YAML 1.1 reads it as True
TEMPLATE_KEYS = ("file", "names", "original_task", "choices_in_prompt", "languages")
PROMPTED_KEYS = ("inputs", "targets", "answer_choices", "template", "language")
LANGUAGE_SEPARATOR = "."  # a prompted-file task with languages from paths or a column: "<task>.<language>"
METADATA_KEYS = ("dataset", "cluster", "language", "prompts")
PREPROCESSOR_KEYS = ("name", "args")

_LIST = getattr(datasets, "List", datasets.Sequence)
PROMPTED_FEATURES = datasets.Features({
    "inputs": datasets.Value("string"),
    "targets": _LIST(datasets.Value("string")),
    "answer_choices": _LIST(datasets.Value("string")),
    "task": datasets.Value("string"),
    "dataset": datasets.Value("string"),
    "template": datasets.Value("string"),
    "example_index": datasets.Value("int64"),
})
_SKIP_COLUMNS = {"_skip_reason": datasets.Value("string"), "_skip_detail": datasets.Value("string")}


# ------------------------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class JoinSpec:
    type: str
    data_files: tuple[str, ...]
    on: str


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where rows come from. ``data_files`` maps split -> absolute paths (local types only)."""

    type: str
    data_files: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    path: Optional[str] = None
    name: Optional[str] = None
    fields: Optional[tuple[str, ...]] = None
    join: Optional[JoinSpec] = None


@dataclasses.dataclass(frozen=True)
class TemplateSelection:
    file: str
    names: Optional[tuple[str, ...]] = None
    original_task: Optional[bool] = None
    choices_in_prompt: Optional[bool] = None
    languages: Optional[tuple[str, ...]] = None


@dataclasses.dataclass(frozen=True)
class PromptedColumns:
    """Where an already-prompted row keeps its parts (a ``prompted:`` task; xP3's jsonl by default).

    ``template``: the prompt's name: ``None`` = the stem of the row's file (xP3 writes one file per dataset
    and prompt), or a literal name; ``template_column``: a column holding it instead. ``language_filter``:
    (column, code) of the rows this task keeps, when languages come from a column.
    """

    inputs: str = "inputs"
    targets: str = "targets"
    answer_choices: Optional[str] = None
    template: Optional[str] = None
    template_column: Optional[str] = None
    language_filter: Optional[tuple[str, str]] = None


@dataclasses.dataclass(frozen=True)
class TaskMetadata:
    dataset: str
    cluster: Optional[str] = None
    language: Optional[str] = None  # the data's language (ISO 639 code, as xP3 names its folders)
    prompts: Optional[str] = None  # which prompts render it, e.g. en / mt / ht (BLOOMZ's XCOPA settings)

    @property
    def eval_group(self) -> str:
        """The name evaluation results are grouped (and their median taken) under: the dataset, with the
        prompt setting after an ``@`` when one is set (``xcopa/sw@mt``), so English and translated prompts
        on the same data are separate groups."""
        return self.dataset if self.prompts is None else f"{self.dataset}@{self.prompts}"


@dataclasses.dataclass(frozen=True)
class PreprocessorCall:
    name: str
    args: Mapping[str, Any]


@dataclasses.dataclass
class RenderReport:
    """Per (dataset, template): rows seen, rows rendered, skips by reason and the first skipped row; and,
    for a few-shot task, the rows drawn."""

    entries: dict[tuple[str, str], dict] = dataclasses.field(default_factory=dict)
    few_shot: Optional[FewShotDraw] = None

    def to_dict(self) -> list[dict]:
        return [{"dataset": d, "template": t, **v} for (d, t), v in self.entries.items()]

    def skipped(self) -> int:
        return sum(sum(v["skipped"].values()) for v in self.entries.values())


@dataclasses.dataclass
class Task:
    """One dataset split rendered with a set of templates."""

    name: str
    source: SourceSpec
    split: str
    preprocessors: tuple[PreprocessorCall, ...]
    templates: Optional[TemplateSelection]  # None for a prompted-file task (``prompted`` set)
    metadata: TaskMetadata
    file: str
    data_root: Optional[str] = None
    few_shot: Optional[FewShotSpec] = None  # k rows drawn with a seed; a mixture member may override it
    prompted_columns: Optional[PromptedColumns] = None  # rows already prompted: no template renders them

    # -- data ---------------------------------------------------------------------------------------
    def load(self, max_examples: Optional[int] = None, *, cache_dir: Optional[str] = None) -> datasets.Dataset:
        """The rows this task uses, after the preprocessors (the HF schema the templates expect).

        Args:
            max_examples: keep only the first N rows of the preprocessed split (of a few-shot task: the
                first N rows of its draw, see :mod:`train.data.few_shot`).
            cache_dir: datasets cache folder (default: the HF datasets cache).

        Raises:
            DataError: missing/undecodable/empty files, unreachable hub dataset, preprocessor failure,
                ``few_shot.k`` larger than the split.
        """
        return self.load_rows(max_examples, cache_dir=cache_dir)[0]

    def load_rows(self, max_examples: Optional[int] = None, *,
                  cache_dir: Optional[str] = None) -> tuple[datasets.Dataset, Optional[FewShotDraw]]:
        """(rows, the few-shot draw or None): :meth:`load` plus which rows of the split a few-shot task kept."""
        ds = self._load_source(cache_dir)
        if self.preprocessors or self.source.join is not None:
            ds = self._preprocess(ds)
        if len(ds) == 0:
            raise DataError(f"task {self.name!r} ({self.file}): split {self.split!r} has no rows after "
                            f"preprocessing. Check the data files and the preprocessors.")
        if self.few_shot is not None:
            draw = draw_rows(ds, self.few_shot, split=self.split, where=self._where(), cap=max_examples)
            return ds.select(draw.indices, new_fingerprint=_hash(["few_shot", ds._fingerprint, draw.indices])), draw
        if max_examples is not None:
            ds = ds.select(range(min(max_examples, len(ds))))
        return ds, None

    def _where(self) -> str:
        return f"task {self.name!r} ({self.file})"

    def _load_source(self, cache_dir: Optional[str]) -> datasets.Dataset:
        src = self.source
        if src.type == "hub":
            root = self.data_root if self.data_root is not None else os.environ.get(DATA_ROOT_ENV)
            if root:
                return self._read_local(_hub_local_files(root, src, self.split, self._where()), None, cache_dir)
            try:
                return datasets.load_dataset(src.path, src.name, split=self.split, cache_dir=cache_dir)
            except Exception as e:  # noqa: BLE001 - network/hub failures have many types
                raise DataError(f"{self._where()}: could not load hub dataset {src.path!r} (name {src.name!r}, "
                                f"split {self.split!r}): {type(e).__name__}: {e}. Offline? Point "
                                f"{DATA_ROOT_ENV} at local files or pass data_files={{{self.name!r}: ...}}.") from e
        if self.split not in src.data_files:
            raise DataError(f"{self._where()}: no data_files for split {self.split!r}; "
                            f"splits with files: {sorted(src.data_files)}")
        return self._read_local((src.type, src.data_files[self.split]), src.fields, cache_dir)

    def _read_local(self, typed_files: tuple[str, Sequence[str]], fields: Optional[Sequence[str]],
                    cache_dir: Optional[str]) -> datasets.Dataset:
        ftype, files = typed_files
        stamp = []
        for f in files:
            if not os.path.isfile(f):
                raise DataError(f"{self._where()}: data file not found: {f}")
            st = os.stat(f)
            stamp.append((f, st.st_mtime_ns, st.st_size))
        fingerprint = _hash(["source", _READER_VERSION, ftype, stamp, fields])
        kwargs = {"ftype": ftype, "files": list(files), "fields": tuple(fields) if fields else None,
                  "task": self.name}
        # Fail here with a precise message (file:line) rather than inside the Arrow writer.
        first = next(_read_records(**kwargs), None)
        if first is None:
            raise DataError(f"{self._where()}: no rows in {', '.join(files)} (empty dataset)")
        try:
            return datasets.Dataset.from_generator(_read_records, gen_kwargs=kwargs, cache_dir=cache_dir,
                                                   fingerprint=fingerprint)
        except datasets.exceptions.DatasetGenerationError as e:
            cause = e.__cause__ or e.__context__
            if isinstance(cause, DataError):
                raise cause from None
            raise DataError(f"{self._where()}: could not read {', '.join(files)}: {cause or e}. Every row "
                            f"must have the same fields with consistent types.") from e

    def _preprocess(self, ds: datasets.Dataset) -> datasets.Dataset:
        join_rows = None
        if self.source.join is not None:
            j = self.source.join
            join_rows = {}
            for row in _read_records(j.type, list(j.data_files), None, self.name):
                if j.on not in row:
                    raise DataError(f"{self._where()}: join file {j.data_files[0]} has a row without {j.on!r}")
                join_rows[row[j.on]] = row
        calls = [(c.name, dict(c.args)) for c in self.preprocessors]
        fingerprint = _hash(["preprocess", ds._fingerprint, calls, self.source.join and
                             dataclasses.asdict(self.source.join), _file_stamp(self.source.join)])
        kwargs = {"calls": calls, "join_rows": join_rows, "join_on": self.source.join.on if self.source.join else None,
                  "where": self._where()}
        out_keys = None
        for index, row in enumerate(ds):  # the output schema: fields of the first row the chain produces
            produced = _apply_chain(row, index, **kwargs)
            if produced:
                out_keys = list(produced[0])
                break
        if out_keys is None:
            raise DataError(f"{self._where()}: the preprocessors produced no rows from {len(ds)} source rows")
        return ds.map(_preprocess_batch, batched=True, with_indices=True, remove_columns=ds.column_names,
                      fn_kwargs={**kwargs, "out_keys": out_keys},
                      new_fingerprint=fingerprint, desc=f"preprocess {self.name}")

    # -- templates ----------------------------------------------------------------------------------
    def select_templates(self) -> list[Template]:
        """The templates this task renders.

        Raises:
            TemplateError: missing templates file, unknown template name, an empty selection, or a
                selected template without ``|||`` (it could never give a target).
        """
        sel = self.templates
        chosen = load_templates(sel.file).select(names=sel.names, original_task=sel.original_task,
                                                 choices_in_prompt=sel.choices_in_prompt,
                                                 languages=sel.languages)
        if not chosen:
            raise TemplateError(f"{self._where()}: no template of {sel.file} matches names={sel.names}, "
                                f"original_task={sel.original_task}, choices_in_prompt={sel.choices_in_prompt},"
                                f" languages={sel.languages}")
        for template in chosen:
            try:
                template.check_has_target()
            except TemplateError as err:
                raise TemplateError(f"{self._where()}: {err} Or deselect it with `templates: {{names: [...]}}`.") from None
        return chosen

    # -- prompted examples ----------------------------------------------------------------------------
    def prompted_with_report(self, max_examples: Optional[int] = None, *,
                             max_field_chars: Optional[int] = TEXT_VAR_LENGTH,
                             max_failure_fraction: float = 0.5,
                             cache_dir: Optional[str] = None) -> tuple[datasets.Dataset, RenderReport]:
        """Render every selected template over the (first ``max_examples``) rows.

        Args:
            max_examples: source rows to use (None: all).
            max_field_chars: truncation of each ``{{ }}`` value (PromptSource: 2048; None: off).
            max_failure_fraction: raise when more than this fraction of rows of one template fail
                (missing field or runtime error). Empty renders are skipped and reported, never raised.
            cache_dir: datasets cache folder.

        Returns:
            (dataset with PROMPTED_FEATURES, report of skips per (dataset, template)).

        Raises:
            DataError / TemplateError: as described above, naming task, template, field and a row.
        """
        if self.prompted_columns is not None:
            return self._prompted_files(max_examples, max_failure_fraction, cache_dir)
        raw, draw = self.load_rows(max_examples, cache_dir=cache_dir)
        # example_index = the row's index in the whole split, also when a few-shot draw picked the rows
        row_ids = list(draw.indices) if draw is not None else None
        report = RenderReport(few_shot=draw)
        parts = []
        for tpl in self.select_templates():
            tpl.compile()  # template bugs (syntax, unknown filter) fail here, before any row is mapped
            spec = tpl.to_dict()
            fingerprint = _hash(["render", _RENDER_VERSION, raw._fingerprint, spec, max_field_chars, self.name,
                                 self.metadata.eval_group, row_ids])
            rendered = raw.map(_render_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
                               fn_kwargs={"template": spec, "task": self.name, "dataset": self.metadata.eval_group,
                                          "max_field_chars": max_field_chars, "row_ids": row_ids},
                               features=datasets.Features({**PROMPTED_FEATURES, **_SKIP_COLUMNS}),
                               new_fingerprint=fingerprint, desc=f"render {self.name}/{tpl.name}")
            counts = _tally_skips(report, self.metadata.eval_group, rendered)
            n = len(rendered)
            if fails_on_data(counts, n, max_failure_fraction):
                failures = counts[SKIP_MISSING_FIELD] + counts[SKIP_RENDER_ERROR]
                reason = SKIP_MISSING_FIELD if counts[SKIP_MISSING_FIELD] else SKIP_RENDER_ERROR
                first = report.entries[(self.metadata.eval_group, tpl.name)]["first_skip"][reason]
                raise DataError(f"{self._where()}: template {tpl.name!r} of {tpl.file} failed on {failures}/{n} "
                                f"rows (> {max_failure_fraction:.0%}); first: {reason} "
                                f"{first['detail']!r} at example_index {first['example_index']}. "
                                f"Add the field with a preprocessor or deselect the template.")
            parts.append(_without_skips(rendered, fingerprint))
        out = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        return out, report

    def _prompted_files(self, max_examples: Optional[int], max_failure_fraction: float,
                        cache_dir: Optional[str]) -> tuple[datasets.Dataset, RenderReport]:
        """Rows that are already prompted (xP3's jsonl): each file read on its own, so its stem can name the
        prompt; the same checks and skip report as rendered templates, no template involved."""
        cols = self.prompted_columns
        report, parts, offset = RenderReport(), [], 0
        for path, ds in self._prompted_sources(cache_dir):
            wanted = [c for c in (cols.inputs, cols.targets, cols.answer_choices, cols.template_column,
                                  cols.language_filter and cols.language_filter[0]) if c]
            missing = [c for c in wanted if c not in ds.column_names]
            if missing:
                key = {cols.inputs: "inputs", cols.targets: "targets", cols.answer_choices: "answer_choices",
                       cols.template_column: "template"}.get(missing[0], "language")
                raise DataError(f"{self._where()}: {path} has no column {missing[0]!r} (prompted.{key}); its columns: "
                                f"{ds.column_names}. Name the column that holds it with `prompted: {{{key}: COLUMN}}`"
                                + (" or add it to the file." if key != "language" else "."))
            if cols.language_filter is not None:
                column, code = cols.language_filter
                ds = ds.filter(lambda v: str(v) == code, input_columns=column,
                               new_fingerprint=_hash(["language", ds._fingerprint, column, code]))
            if max_examples is not None:
                ds = ds.select(range(min(max(max_examples - offset, 0), len(ds))))
            if len(ds) == 0:
                continue
            template = cols.template or (Path(path).stem if path else self.name)
            fingerprint = _hash(["prompted", _RENDER_VERSION, ds._fingerprint, dataclasses.asdict(cols), template,
                                 self.name, self.metadata.eval_group, offset])
            rows = ds.map(_prompted_batch, batched=True, with_indices=True, remove_columns=ds.column_names,
                          fn_kwargs={"columns": cols, "template": template, "task": self.name,
                                     "dataset": self.metadata.eval_group, "offset": offset},
                          features=datasets.Features({**PROMPTED_FEATURES, **_SKIP_COLUMNS}),
                          new_fingerprint=fingerprint, desc=f"prompted {self.name}")
            offset += len(ds)
            counts = _tally_skips(report, self.metadata.eval_group, rows)
            if fails_on_data(counts, len(rows), max_failure_fraction):
                raise DataError(f"{self._where()}: {path}: {sum(counts.values())}/{len(rows)} rows have no "
                                f"{cols.inputs!r} or {cols.targets!r} value ({dict(counts)}); fix the file or "
                                f"point prompted.inputs / prompted.targets at the right columns.")
            parts.append(_without_skips(rows, fingerprint))
        if not parts:
            raise DataError(f"{self._where()}: no prompted rows in split {self.split!r}"
                            + (f" with {cols.language_filter[0]} = {cols.language_filter[1]!r}" if cols.language_filter
                               else "") + ".")
        out = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        return out, report

    def _prompted_sources(self, cache_dir: Optional[str]) -> Iterator[tuple[Optional[str], datasets.Dataset]]:
        """(file, its preprocessed rows) per data file of the split; a hub source is one unnamed part."""
        src = self.source
        if src.type == "hub":
            yield None, self._load_source(cache_dir)
            return
        if self.split not in src.data_files:
            raise DataError(f"{self._where()}: no data_files for split {self.split!r}; "
                            f"splits with files: {sorted(src.data_files)}")
        for path in src.data_files[self.split]:
            ds = self._read_local((src.type, [path]), src.fields, cache_dir)
            yield path, (self._preprocess(ds) if self.preprocessors else ds)

    def template_names(self) -> list[str]:
        """The names of this task's prompts: its selected templates, or a prompted-file task's prompt names
        (file stems, the fixed name, or the values of its template column, read from the data)."""
        cols = self.prompted_columns
        if cols is None:
            return [t.name for t in self.select_templates()]
        if cols.template:
            return [cols.template]
        if cols.template_column is None and self.source.type != "hub":
            return list(dict.fromkeys(Path(f).stem for f in self.source.data_files.get(self.split, ())))
        return list(dict.fromkeys(self.prompted()["template"]))

    def prompt_files(self) -> list[str]:
        """The files the prompts come from: the templates file, or a prompted-file task's data files."""
        if self.prompted_columns is None:
            return [self.templates.file]
        return list(self.source.data_files.get(self.split, ()))

    def prompted(self, max_examples: Optional[int] = None, **kwargs: Any) -> datasets.Dataset:
        """Prompted examples of all selected templates (see :meth:`prompted_with_report`)."""
        return self.prompted_with_report(max_examples, **kwargs)[0]


def _tally_skips(report: RenderReport, dataset: str, rows: datasets.Dataset) -> Counter:
    """Add ``rows``' rendered and skipped counts, and each reason's first skipped row, to ``report`` per template
    (parts of one template add up); return the skip reasons' counts of ``rows``."""
    names, reasons = rows["template"], rows["_skip_reason"]
    for (name, reason), n in Counter(zip(names, reasons)).items():
        entry = report.entries.setdefault((dataset, name), {"rows": 0, "rendered": 0, "skipped": {}, "first_skip": {}})
        entry["rows"] += n
        if reason:
            entry["skipped"][reason] = entry["skipped"].get(reason, 0) + n
        else:
            entry["rendered"] += n
    for i, (name, reason) in enumerate(zip(names, reasons)):
        first = report.entries[(dataset, name)]["first_skip"]
        if reason and reason not in first:
            first[reason] = {"example_index": rows[i]["example_index"], "detail": rows[i]["_skip_detail"]}
    return Counter(r for r in reasons if r)


def _without_skips(rows: datasets.Dataset, fingerprint: str) -> datasets.Dataset:
    """The rendered rows, without the skipped ones and the skip columns (cached under ``fingerprint``)."""
    kept = rows.filter(lambda r: r == "", input_columns="_skip_reason", new_fingerprint=_hash(["filter", fingerprint]))
    return kept.remove_columns(list(_SKIP_COLUMNS))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:32]


def _file_stamp(join: Optional[JoinSpec]) -> list:
    if join is None:
        return []
    return [(f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in join.data_files if os.path.isfile(f)]


def _hub_local_files(root: str, src: SourceSpec, split: str, where: str) -> tuple[str, list[str]]:
    base = Path(root) / str(src.path)
    if src.name:
        base = base / src.name
    for ext, ftype in _EXT_TYPES.items():
        candidate = base / f"{split}{ext}"
        if candidate.is_file():
            return ftype, [str(candidate)]
    raise DataError(f"{where}: {DATA_ROOT_ENV}/data_root={root} is set but none of "
                    f"{base}/{split}.{{jsonl,json,csv,parquet}} exists")


# ------------------------------------------------------------------------------------ row functions


def _read_records(ftype: str, files: Sequence[str], fields: Optional[Sequence[str]], task: str) -> Iterator[dict]:
    """Yield rows as dicts; every decoding problem is a DataError naming file and line.

    All rows must have the same fields (an Arrow table has one schema): a row that lacks or adds a field
    is reported with its line instead of failing later inside the Arrow writer.
    """
    keys: Optional[set] = None
    for path, lineno, row in _read_records_unchecked(ftype, files, fields, task):
        if keys is None:
            keys = set(row)
        elif set(row) != keys:
            missing, extra = sorted(keys - set(row)), sorted(set(row) - keys)
            raise DataError(f"task {task!r}: {path}:{lineno}: fields differ from the first row "
                            f"(missing {missing}, extra {extra}); every row needs the same fields")
        yield row


def _read_records_unchecked(ftype: str, files: Sequence[str], fields: Optional[Sequence[str]],
                            task: str) -> Iterator[tuple[str, int, dict]]:
    for path in files:
        if ftype == "parquet":
            import pyarrow.parquet as pq  # pyarrow is a datasets dependency

            try:
                table = pq.read_table(path)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several error types for a bad file
                raise DataError(f"task {task!r}: {path}: not a readable Parquet file ({e}).") from None
            for i, row in enumerate(table.to_pylist()):
                yield path, i + 1, row
            continue
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Excel, Notepad) is not part of the data
            raw = raw[3:]
        if ftype == "jsonl":
            for lineno, line in enumerate(raw.split(b"\n"), start=1):
                text = _decode(line, path, lineno, task).strip()
                if not text:
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"task {task!r}: {path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from e
                yield path, lineno, _as_record(obj, fields, path, lineno, task)
        elif ftype == "json":
            text = _decode(raw, path, None, task)
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"task {task!r}: {path}:{e.lineno}: invalid JSON ({e.msg})") from e
            if isinstance(doc, dict) and isinstance(doc.get("data"), list):
                doc = doc["data"]
            if not isinstance(doc, list):
                raise DataError(f"task {task!r}: {path}: expected a JSON list of records (or {{'data': [...]}})")
            for i, obj in enumerate(doc):
                yield path, i + 1, _as_record(obj, fields, path, i + 1, task)
        elif ftype == "csv":
            text = _decode(raw, path, None, task)
            for i, row in enumerate(csv.DictReader(io.StringIO(text, newline=""))):
                yield path, i + 2, dict(row)  # line 1 is the header
        else:  # internal invariant: the task file parser validated the type
            raise AssertionError(ftype)


def _decode(data: bytes, path: str, lineno: Optional[int], task: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if lineno is None:  # find the line for the message
            lineno = data[: e.start].count(b"\n") + 1
        raise DataError(f"task {task!r}: {path}:{lineno}: not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                        f"re-encode the file as UTF-8") from e


def _as_record(obj: Any, fields: Optional[Sequence[str]], path: str, lineno: int, task: str) -> dict:
    if fields is not None:
        if not isinstance(obj, list) or len(obj) != len(fields):
            raise DataError(f"task {task!r}: {path}: record {lineno} is not a list of {len(fields)} values "
                            f"({list(fields)})")
        return dict(zip(fields, obj))
    if not isinstance(obj, dict):
        raise DataError(f"task {task!r}: {path}: record {lineno} is a {type(obj).__name__}, not an object; "
                        f"set source.fields to name positional values")
    return obj


def _apply_chain(row: dict, index: int, calls: list, join_rows: Optional[dict], join_on: Optional[str],
                 where: str) -> list[dict]:
    """Join (optional) and run the preprocessor chain on one source row; may return 0..n rows."""
    if join_rows is not None:
        if row.get(join_on) not in join_rows:
            raise DataError(f"{where}: row {index}: no row with {join_on}={row.get(join_on)!r} in the join file")
        row = {**join_rows[row[join_on]], **row}
    current = [row]
    for name, args in calls:
        p = PREPROCESSORS.get(name)
        produced: list[dict] = []
        for r in current:
            try:
                out = p.fn(r, **args)
            except KeyError as e:  # the fields listed are the ones this preprocessor received
                raise DataError(f"{where}: preprocessor {name!r} at source row {index}: field {e.args[0]!r} is "
                                f"missing (fields: {sorted(map(str, r))})") from e
            except (ValueError, TypeError, AttributeError, IndexError, re.error) as e:
                raise DataError(f"{where}: preprocessor {name!r} at source row {index}: {e}") from e
            if p.kind == "example":
                produced.append(out)
            else:
                produced.extend(out)
        current = produced
    return current


def _preprocess_batch(batch: dict[str, list], indices: list[int], calls: list, join_rows: Optional[dict],
                      join_on: Optional[str], where: str, out_keys: list[str]) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in out_keys}  # a batch may produce no rows: keep the schema
    for index, values in zip(indices, zip(*batch.values())):
        for r in _apply_chain(dict(zip(batch, values)), index, calls, join_rows, join_on, where):
            if set(r) != set(out_keys):
                raise DataError(f"{where}: preprocessors produced rows with different fields at source row "
                                f"{index}: {sorted(out_keys)} vs {sorted(r)}")
            for k in out_keys:
                out[k].append(r[k])
    return out


def _prompted_batch(batch: dict[str, list], indices: list[int], columns: PromptedColumns, template: str, task: str,
                    dataset: str, offset: int) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in list(PROMPTED_FEATURES) + list(_SKIP_COLUMNS)}
    choices = batch[columns.answer_choices] if columns.answer_choices else [None] * len(indices)
    names = batch[columns.template_column] if columns.template_column else [template] * len(indices)
    for index, inputs, targets, options, name in zip(indices, batch[columns.inputs], batch[columns.targets],
                                                      choices, names):
        targets = [targets] if isinstance(targets, str) else list(targets or [])
        reason, detail = "", ""
        if inputs is None or targets is None:
            reason, detail = SKIP_MISSING_FIELD, columns.inputs if inputs is None else columns.targets
        elif not inputs:
            reason = SKIP_EMPTY_INPUT
        elif not targets or not all(targets):
            reason = SKIP_EMPTY_TARGET
        keep = not reason
        out["inputs"].append(inputs if keep else "")
        out["targets"].append(targets if keep else [])
        out["answer_choices"].append(list(options or []) if keep else [])
        out["task"].append(task)
        out["dataset"].append(dataset)
        out["template"].append(str(name))
        out["example_index"].append(offset + index)
        out["_skip_reason"].append(reason)
        out["_skip_detail"].append(detail)
    return out


def _render_batch(batch: dict[str, list], indices: list[int], template: dict, task: str, dataset: str,
                  max_field_chars: Optional[int], row_ids: Optional[list[int]] = None) -> dict[str, list]:
    spec = dict(template)
    meta = spec.pop("metadata")
    tpl = Template(**spec, metadata=TemplateMetadata(**{k: tuple(v) if isinstance(v, list) else v
                                                        for k, v in meta.items()}))
    out: dict[str, list] = {k: [] for k in list(PROMPTED_FEATURES) + list(_SKIP_COLUMNS)}
    for index, values in zip(indices, zip(*batch.values())):
        index = row_ids[index] if row_ids is not None else index  # the row's index in the whole split
        example = dict(zip(batch, values))
        rendered, reason, detail = tpl.render_or_skip(example, seed_key=index, max_field_chars=max_field_chars)
        out["inputs"].append(rendered.inputs if rendered else "")
        out["targets"].append(rendered.targets if rendered else [])
        out["answer_choices"].append(rendered.answer_choices if rendered else [])
        out["task"].append(task)
        out["dataset"].append(dataset)
        out["template"].append(tpl.name)
        out["example_index"].append(index)
        out["_skip_reason"].append(reason)
        out["_skip_detail"].append(detail)
    return out


# ------------------------------------------------------------------------------------ task files


@dataclasses.dataclass
class TaskFile:
    """A parsed task/mixture YAML.

    Attributes:
        path: absolute path of the file.
        tasks: name -> Task, including tasks of included files (in include order, then this file's).
        own_tasks: names defined in this file itself.
        sections: every other top-level section (``mixture``, ``eval``, ...), untouched.
    """

    path: str
    tasks: dict[str, Task]
    own_tasks: list[str]
    sections: dict[str, Any]
    groups: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # prompted task -> its language tasks


def _check_keys(mapping: Any, allowed: Sequence[str], where: str) -> dict:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}.{hint} Allowed: {list(allowed)}")
    return mapping


def _resolve(base: Path, p: str) -> str:
    return str((base / os.path.expanduser(p)).resolve())


_DATA_ROOT_VARS = ("${" + DATA_ROOT_ENV + "}", "$" + DATA_ROOT_ENV)


def _as_files(value: Any, base: Path, where: str, data_root: Optional[str] = None) -> tuple[str, ...]:
    """Absolute data files: relative to ``base``, globs expanded, ``${MTF_DATA_ROOT}`` replaced by ``data_root``."""
    files = [value] if isinstance(value, str) else value
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise ConfigError(f"{where}: data_files must be a path or a list of paths")
    out: list[str] = []
    for f in files:
        if any(v in f for v in _DATA_ROOT_VARS):  # large corpora (xP3) live outside the project
            if not data_root:
                raise ConfigError(f"{where}: {f!r} starts from ${DATA_ROOT_ENV}, which is not set. Point it at the "
                                  f"folder that holds the data (export {DATA_ROOT_ENV}=/data, or data.data_root in "
                                  "the run config); the README's 'Crosslingual training' section gives the layout.")
            f = f.replace(_DATA_ROOT_VARS[0], data_root).replace(_DATA_ROOT_VARS[1], data_root)
        resolved = _resolve(base, f)
        if glob.has_magic(resolved):  # shards like train-*.jsonl, as datasets accepts them
            matches = sorted(glob.glob(resolved))
            if not matches:
                raise ConfigError(f"{where}: data_files pattern {f!r} matches no file (looked for {resolved})")
            out.extend(matches)
        else:
            out.append(resolved)
    return tuple(out)


def _type_from_files(files: Sequence[str], where: str) -> str:
    types = {_EXT_TYPES.get(Path(f).suffix.lower()) for f in files}
    if len(types) != 1 or None in types:
        raise ConfigError(f"{where}: cannot infer the file type of {list(files)}; use .jsonl/.json/.csv/.parquet")
    return types.pop()  # type: ignore[return-value]


def _parse_task(raw: Any, base: Path, path: str, registry: PreprocessorRegistry,
                data_root: Optional[str] = None) -> list[Task]:
    """The task a ``tasks:`` entry defines; a prompted-file task whose language comes from paths or a column
    becomes one task per language (:func:`_split_by_language`)."""
    where = f"{path}: tasks[{raw.get('name', '?') if isinstance(raw, dict) else '?'}]"
    _check_keys(raw, TASK_KEYS, where)
    for key in ("name", "source", "split", "metadata"):
        if key not in raw:
            raise ConfigError(f"{where}: missing required key {key!r}")
    name = str(raw["name"])
    where = f"{path}: task {name!r}"
    if ("templates" in raw) == ("prompted" in raw):
        raise ConfigError(f"{where}: give exactly one of `templates` (PromptSource templates render the rows) or "
                          "`prompted` (the rows are already prompted, e.g. xP3's jsonl: "
                          "`prompted: {inputs: inputs, targets: targets}`)")

    src = _check_keys(raw["source"], sorted({k for ks in SOURCE_KEYS.values() for k in ks}), f"{where}.source")
    stype = src.get("type")
    if stype not in SOURCE_KEYS:
        close = difflib.get_close_matches(str(stype), list(SOURCE_KEYS), n=1)
        raise ConfigError(f"{where}.source.type: {stype!r} is not one of {list(SOURCE_KEYS)}"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    _check_keys(src, SOURCE_KEYS[stype], f"{where}.source")
    if stype == "hub":
        if not src.get("path"):
            raise ConfigError(f"{where}.source: a hub source needs 'path' (e.g. super_glue)")
        source = SourceSpec(type="hub", path=str(src["path"]),
                            name=None if src.get("name") is None else str(src["name"]))  # YAML reads 2016 as int
    else:
        df = src.get("data_files")
        if isinstance(df, (str, list)):
            df = {str(raw["split"]): df}
        if not isinstance(df, dict) or not df:
            raise ConfigError(f"{where}.source.data_files: give a mapping split -> path(s)")
        join = None
        if src.get("join") is not None:
            j = _check_keys(src["join"], JOIN_KEYS, f"{where}.source.join")
            if j.get("type") not in LOCAL_TYPES or not j.get("key") or not j.get("data_files"):
                raise ConfigError(f"{where}.source.join: needs type (one of {LOCAL_TYPES}), data_files and key")
            join = JoinSpec(type=j["type"], data_files=_as_files(j["data_files"], base, f"{where}.source.join"),
                            on=str(j["key"]))
        source = SourceSpec(type=stype, data_files={str(s): _as_files(f, base, f"{where}.source.data_files", data_root)
                                                    for s, f in df.items()},
                            fields=tuple(src["fields"]) if src.get("fields") else None, join=join)

    calls = []
    entries = raw.get("preprocessors") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{where}.preprocessors: must be a list of {{name, args}} entries, not a "
                          f"{type(entries).__name__}; write "
                          "`preprocessors: [{name: rename, args: {mapping: {a: b}}}]`.")
    for i, p in enumerate(entries):
        at = f"{where}.preprocessors[{i}]"
        _check_keys(p, PREPROCESSOR_KEYS, at)
        if not p.get("name"):
            raise ConfigError(f"{at}: missing 'name', the preprocessor to apply (one of {registry.names()}); "
                              "write `{name: rename, args: {mapping: {a: b}}}`.")
        args = {} if p.get("args") is None else p["args"]
        registry.check_args(str(p["name"]), args, at)
        calls.append(PreprocessorCall(name=str(p["name"]), args=args))

    templates, prompted, language_from = None, None, None
    if "templates" in raw:
        t = _check_keys(raw["templates"], TEMPLATE_KEYS, f"{where}.templates")
        if not t.get("file"):
            raise ConfigError(f"{where}.templates: 'file' (a PromptSource templates.yaml) is required")
        tuple_or_none = lambda v: None if v is None else tuple(v if isinstance(v, list) else [v])  # noqa: E731
        templates = TemplateSelection(file=_resolve(base, t["file"]), names=tuple_or_none(t.get("names")),
                                      original_task=t.get("original_task"), choices_in_prompt=t.get("choices_in_prompt"),
                                      languages=tuple_or_none(t.get("languages")))
    else:
        prompted, language_from = _parse_prompted(raw["prompted"], source, f"{where}.prompted")
        if "few_shot" in raw:
            raise ConfigError(f"{where}.few_shot: a prompted-file task has no few-shot draw; export the drawn rows "
                              "instead, or render the source rows with `templates:`.")
    m = _check_keys(raw["metadata"], METADATA_KEYS, f"{where}.metadata")
    if not m.get("dataset"):
        raise ConfigError(f"{where}.metadata: 'dataset' (e.g. super_glue/rte) is required")
    str_or_none = lambda v: None if v is None else str(v)  # noqa: E731
    metadata = TaskMetadata(dataset=str(m["dataset"]), cluster=m.get("cluster"), language=str_or_none(m.get("language")),
                            prompts=str_or_none(m.get("prompts")))
    if language_from is not None and metadata.language is not None:
        raise ConfigError(f"{where}: the language comes from `prompted.language` ({language_from}) and from "
                          f"`metadata.language` ({metadata.language}); keep one.")
    task = Task(name=name, source=source, split=str(raw["split"]), preprocessors=tuple(calls),
                templates=templates, metadata=metadata, file=path, few_shot=parse_few_shot(raw.get("few_shot"), where),
                prompted_columns=prompted)
    return [task] if language_from is None else _split_by_language(task, language_from, where)


def _parse_prompted(raw: Any, source: SourceSpec, where: str) -> tuple[PromptedColumns, Any]:
    """(the columns of a ``prompted:`` section, where its language comes from: None, "path" or ("column", c))."""
    p = _check_keys({} if raw is None else raw, PROMPTED_KEYS, where)
    for key in ("inputs", "targets", "answer_choices"):
        if p.get(key) is not None and not isinstance(p[key], str):
            raise ConfigError(f"{where}.{key}: the name of a column, got {p[key]!r}")
    template, template_column = p.get("template"), None
    if isinstance(template, dict):
        template_column = str(_check_keys(template, ("column",), f"{where}.template")["column"])
        template = None
    elif template is not None:
        template = str(template)
    language = p.get("language")
    if language == "path":
        if source.type == "hub":
            raise ConfigError(f"{where}.language: `path` takes each file's folder as its language; a hub source has "
                              "no files. Use `{column: NAME}` or metadata.language.")
        language = "path"
    elif isinstance(language, dict) and set(language) == {"column"}:
        if source.type == "hub":
            raise ConfigError(f"{where}.language: the languages of a column are read from the task's files when the "
                              "task file loads; a hub source has none. Use local files, or one task per language "
                              "with metadata.language.")
        language = ("column", str(language["column"]))
    elif language is not None:
        raise ConfigError(f"{where}.language: `path` (each file's folder names its language, xP3's layout "
                          f"<lang>/<file>.jsonl) or `{{column: NAME}}`, got {language!r}. Without it the task's "
                          "language is metadata.language.")
    columns = PromptedColumns(inputs=p.get("inputs") or "inputs", targets=p.get("targets") or "targets",
                              answer_choices=p.get("answer_choices"), template=template, template_column=template_column)
    return columns, language


def _split_by_language(task: Task, language_from: Any, where: str) -> list[Task]:
    """One task per language, ``<name>.<language>``: by each file's folder, or by a column's values."""
    out = []
    if language_from == "path":
        codes: dict[str, dict[str, list[str]]] = {}
        for split, files in task.source.data_files.items():
            for f in files:
                codes.setdefault(Path(f).parent.name, {}).setdefault(split, []).append(f)
        for code, by_split in sorted(codes.items()):
            out.append(dataclasses.replace(
                task, name=f"{task.name}{LANGUAGE_SEPARATOR}{code}",
                source=dataclasses.replace(task.source, data_files={s: tuple(fs) for s, fs in by_split.items()}),
                metadata=dataclasses.replace(task.metadata, language=code)))
        return out
    column = language_from[1]
    files = task.source.data_files.get(task.split, ())
    seen: dict[str, None] = {}
    for file, lineno, row in _read_records_unchecked(task.source.type, files, task.source.fields, task.name):
        if column not in row:
            raise ConfigError(f"{where}.language: {file}:{lineno} has no column {column!r}; its columns: {sorted(row)}")
        seen.setdefault(str(row[column]), None)
    for code in sorted(seen):
        columns = dataclasses.replace(task.prompted_columns, language_filter=(column, code))
        out.append(dataclasses.replace(task, name=f"{task.name}{LANGUAGE_SEPARATOR}{code}", prompted_columns=columns,
                                       metadata=dataclasses.replace(task.metadata, language=code)))
    if not out:
        raise ConfigError(f"{where}.language: no rows in {list(files)} to read languages from")
    return out


def load_task_file(path: str | Path, *, data_files: Optional[Mapping[str, Any]] = None,
                   data_root: Optional[str] = None,
                   registry: PreprocessorRegistry = PREPROCESSORS,
                   _seen: Optional[tuple[str, ...]] = None) -> TaskFile:
    """Parse a task/mixture YAML (the ``tasks`` and ``include`` sections; others are passed through).

    Args:
        path: the YAML file.
        data_files: override sources with local files: task name -> path | [paths] | {split: paths}.
        data_root: redirect hub sources to local files (default: ``$MTF_DATA_ROOT``); see module doc.
        registry: preprocessor registry used to validate preprocessor names and arguments.

    Returns:
        TaskFile.

    Raises:
        ConfigError: unreadable/invalid YAML, unknown keys (with did-you-mean), duplicate task names,
            include cycles, an override for an unknown task.
    """
    p = Path(path).resolve()
    seen = _seen or ()
    if str(p) in seen:
        raise ConfigError(f"include cycle: {' -> '.join(seen + (str(p),))}")
    try:
        doc = load_yaml(p.read_text(encoding="utf-8"), str(p))
    except FileNotFoundError as e:
        raise ConfigError(f"task file not found: {p}") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from e
    doc = doc or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level (with a 'tasks' list)")
    tasks: dict[str, Task] = {}
    groups: dict[str, list[str]] = {}
    root = data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV)
    for inc in doc.get("include") or []:
        sub = load_task_file(_resolve(p.parent, str(inc)), data_root=root, registry=registry, _seen=seen + (str(p),))
        for name, task in sub.tasks.items():
            if name in tasks:
                raise ConfigError(f"{p}: task {name!r} is defined twice ({tasks[name].file} and {task.file})")
            tasks[name] = task
        groups.update(sub.groups)
    raw_tasks = doc.get("tasks") or []
    if not isinstance(raw_tasks, list):
        raise ConfigError(f"{p}: 'tasks' must be a list of task definitions")
    own = []
    for raw in raw_tasks:
        parsed = _parse_task(raw, p.parent, str(p), registry, root)
        if parsed[0].name != str(raw["name"]):  # split by language: the task's name stands for all of them
            groups[str(raw["name"])] = [task.name for task in parsed]
        for task in parsed:
            if task.name in tasks:
                raise ConfigError(f"{p}: task {task.name!r} is defined twice ({tasks[task.name].file} and {p})")
            task.data_root = root
            tasks[task.name] = task
            own.append(task.name)
    for name, files in (data_files or {}).items():
        if name not in tasks:
            close = difflib.get_close_matches(name, list(tasks), n=1)
            raise ConfigError(f"data_files override for unknown task {name!r}"
                              + (f"; did you mean {close[0]!r}?" if close else "") + f". Tasks: {sorted(tasks)}")
        t = tasks[name]
        by_split = files if isinstance(files, dict) else {t.split: files}
        resolved = {s: _as_files(f, Path.cwd(), f"data_files[{name}]") for s, f in by_split.items()}
        ftype = _type_from_files([f for fs in resolved.values() for f in fs], f"data_files[{name}]")
        tasks[name] = dataclasses.replace(t, source=SourceSpec(type=ftype, data_files=resolved))
    sections = {k: v for k, v in doc.items() if k not in FILE_KEYS}
    return TaskFile(path=str(p), tasks=tasks, own_tasks=own, sections=sections, groups=groups)


# --------------------------------------------------------------------------------------- registry


class TaskRegistry:
    """Task name -> Task. Adding a duplicate raises; a missing name lists the known ones."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def add(self, task: Task) -> None:
        if task.name in self._tasks:
            raise ConfigError(f"task {task.name!r} is already registered (from {self._tasks[task.name].file}); "
                              f"rename one of them")
        self._tasks[task.name] = task

    def add_file(self, task_file: TaskFile) -> None:
        for task in task_file.tasks.values():
            self.add(task)

    def get(self, name: str) -> Task:
        if name not in self._tasks:
            close = difflib.get_close_matches(name, list(self._tasks), n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ConfigError(f"unknown task {name!r}.{hint} Known tasks: {sorted(self._tasks)}")
        return self._tasks[name]

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def reset(self) -> None:
        self._tasks.clear()


TASKS = TaskRegistry()


# ------------------------------------------------------------------------------------ held-out guard

# Different names of the same data. RTE is both glue/rte and super_glue/rte; WSC "fixed" only corrects
# some span annotations; the MNLI validation configs are splits of glue/mnli.
DATASET_ALIASES = {
    "glue/rte": "super_glue/rte",
    "rte": "super_glue/rte",
    "super_glue/wsc.fixed": "super_glue/wsc",
    "wsc": "super_glue/wsc",
    "glue/mnli_matched": "glue/mnli",
    "glue/mnli_mismatched": "glue/mnli",
    "multi_nli": "glue/mnli",
    "tau/commonsense_qa": "commonsense_qa",
    "winogrande/winogrande_debiased": "winogrande/winogrande_xl",
}
_DROPPED_CONFIGS = ("none", "default", "plain_text")


def normalize_dataset_name(name: str) -> str:
    """Canonical dataset name: ``"Super_GLUE rte"``, ``"super_glue/rte"``, ``"glue/rte"`` -> ``"super_glue/rte"``.

    Lower-cases, turns spaces/colons/backslashes into ``/``, drops empty configs (``/none``, ``/plain_text``)
    and applies :data:`DATASET_ALIASES` (only names that really are the same data).
    """
    n = name.strip().lower()
    for sep in (" ", ":", "\\", "\t"):
        n = n.replace(sep, "/")
    parts = [x for x in n.split("/") if x]
    while len(parts) > 1 and parts[-1] in _DROPPED_CONFIGS:
        parts.pop()
    n = "/".join(parts)
    return DATASET_ALIASES.get(n, n)


def _same_or_parent(train: str, held: str) -> bool:
    return train == held or train.startswith(held + "/")


def check_held_out(train_tasks: Iterable[Task], held_out: Sequence[str], clusters: Sequence[str] = (),
                   allow: bool = False) -> list[str]:
    """Refuse training tasks whose dataset or cluster is held out for evaluation.

    A held-out name also covers its configs (``anli`` covers ``anli/r1``); names are compared after
    :func:`normalize_dataset_name`, so ``glue/rte`` in training collides with held-out ``super_glue/rte``.

    Args:
        train_tasks: the training tasks.
        held_out: held-out dataset names.
        clusters: held-out task clusters (``metadata.cluster``), e.g. ``["nli", "coreference"]``.
        allow: return the offenders instead of raising (an explicit, logged opt-out).

    Returns:
        Descriptions of the offending tasks (empty when clean).

    Raises:
        ConfigError: there are offenders and ``allow`` is False.
    """
    held = [normalize_dataset_name(h) for h in held_out]
    held_clusters = {c.strip().lower() for c in clusters}
    offenders = []
    for t in train_tasks:
        ds = normalize_dataset_name(t.metadata.dataset)
        hit = next((h for h in held if _same_or_parent(ds, h)), None)
        if hit is not None:
            offenders.append(f"{t.name} (dataset {t.metadata.dataset} = held-out {hit})")
        elif t.metadata.cluster and t.metadata.cluster.strip().lower() in held_clusters:
            offenders.append(f"{t.name} (cluster {t.metadata.cluster} is held out)")
    if offenders and not allow:
        raise ConfigError("training tasks overlap the held-out evaluation set: " + "; ".join(offenders)
                          + ". Remove them from the mixture, or, to train and score on disjoint rows of the same "
                          "datasets on purpose (not a zero-shot eval), set `eval.allow_held_out_overlap=true`.")
    return offenders


# ------------------------------------------------------------------------------------------ preview


def preview(task_or_file: Union[Task, TaskFile, str, Path], n: int = 3, *,
            max_field_chars: Optional[int] = TEXT_VAR_LENGTH, **load_kwargs: Any) -> list[dict]:
    """Prompted examples of the first ``n`` source rows with every selected template (for ``mtf tasks preview``).

    Args:
        task_or_file: a Task, a TaskFile or the path of a task file (all its tasks).
        n: source rows per task.
        load_kwargs: passed to :func:`load_task_file` when a path is given (data_files, data_root).

    Returns:
        Prompted-example dicts (COMMON.md contract) plus ``"skipped"`` (the skip reason or "") and
        ``"skip_detail"`` (the missing field or the error).
    """
    if isinstance(task_or_file, (str, Path)):
        task_or_file = load_task_file(task_or_file, **load_kwargs)
    tasks = list(task_or_file.tasks.values()) if isinstance(task_or_file, TaskFile) else [task_or_file]
    out = []
    for task in tasks:
        if task.prompted_columns is not None:  # already prompted: the first rows as they are
            out.extend({**row, "template_file": task.prompt_files()[0] if task.prompt_files() else "", "skipped": "",
                        "skip_detail": ""} for row in task.prompted(n).to_list())
            continue
        rows, draw = task.load_rows(n)
        for tpl in task.select_templates():
            for i, row in enumerate(rows):
                i = draw.indices[i] if draw is not None else i  # the row's index in the whole split
                r, reason, detail = tpl.render_or_skip(row, seed_key=i, max_field_chars=max_field_chars)
                out.append({"inputs": r.inputs if r else "", "targets": r.targets if r else [],
                            "answer_choices": r.answer_choices if r else [], "task": task.name,
                            "dataset": task.metadata.dataset, "template": tpl.name, "template_file": tpl.file,
                            "example_index": i, "skipped": reason, "skip_detail": detail})
    return out


def lint_data(task_file: Union[TaskFile, str, Path], max_examples: Optional[int] = 200,
              **load_kwargs: Any) -> dict[str, list[dict]]:
    """Preprocessed rows of every loadable task, keyed by resolved templates-file path, for
    :func:`train.data.templates.lint_templates` (``mtf templates lint PATH --data TASK_FILE``).

    Tasks whose data cannot be loaded here (e.g. hub sources offline) are left out.
    """
    tf = task_file if isinstance(task_file, TaskFile) else load_task_file(task_file, **load_kwargs)
    data: dict[str, list[dict]] = {}
    for task in tf.tasks.values():
        if task.prompted_columns is not None:  # no template to lint
            continue
        try:
            rows = task.load(max_examples)
        except DataError:
            continue
        data.setdefault(task.templates.file, []).extend(rows.to_list())
    return data
