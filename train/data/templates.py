"""PromptSource-compatible prompt templates: safe loading, sandboxed seeded rendering, linting.

A PromptSource ``templates.yaml`` looks like::

    dataset: super_glue
    subset: rte
    templates:
      2b52a83c-...: !Template
        answer_choices: Yes ||| No
        id: 2b52a83c-...
        jinja: '{{premise}} ... Yes or no? ||| {{ answer_choices[label] }}'
        metadata: !TemplateMetadata {original_task: true, choices_in_prompt: true, metrics: [Accuracy], languages: [en]}
        name: MNLI crowdsource
        reference: ...

What this module does differently from ``promptsource/templates.py`` (and why):

* YAML is read with a subclass of ``yaml.SafeLoader`` (the C one when available) whose ``!Template`` and
  ``!TemplateMetadata`` constructors build plain mappings; PromptSource used ``FullLoader`` plus Python tags.
* Jinja runs in ``jinja2.sandbox.SandboxedEnvironment`` with ``StrictUndefined``: ``{{ ''.__class__ }}`` is
  refused and a missing field is an error that names the field. We do NOT use the *Immutable* sandbox:
  194 of the 2085 upstream templates call ``.append``/``.update``/``.pop`` on lists they build (e.g.
  ``{% set seq = [] %}{% for x in ... %}{{ seq.append(x) or '' }}``), which the immutable sandbox refuses.
  Instead a template that could mutate a value (its Jinja AST names a mutating method such as ``append``,
  ``update`` or ``pop``, as an attribute or a string) renders a deep copy of the example, so no template can
  mutate the caller's data (the property the immutable sandbox is meant to give us) and security is
  unchanged; the others (nine in ten) read the row as it is, without the copy.
* The ``choice`` filter (PromptSource: unseeded ``random.choice``) and Jinja's builtin ``random`` filter
  draw from a ``random.Random`` seeded by ``sha256(dataset, template id, seed_key)``, so a render is
  identical across runs, processes and ranks. The generator is only built when a filter draws from it.
* Custom names the real templates use are provided: filters ``choice``, ``most_frequent``, ``random``
  (seeded) and the global ``zip`` (found by walking the Jinja AST of all 2085 upstream templates).

Rendering contract (as PromptSource ``Template.apply``): ``|||`` inside field values is replaced by a
sentinel before rendering and restored after splitting; the ``answer_choices`` expression is rendered with
the example, split on ``|||``, stripped and exposed to the template as ``answer_choices``; every ``{{ }}``
value is truncated with Jinja's ``truncate`` filter to ``max_field_chars`` (PromptSource's
``TEXT_VAR_LENGTH=2048``; ``None`` disables it); output is split on ``|||`` and each part stripped (T0's
targets had a leading space that it stripped afterwards).

Speed (eval sets are rendered on every fresh ``mtf eval``): an ``answer_choices`` without Jinja syntax
(``Yes ||| No``, most classification templates) is rendered once per template, not once per row; the render
context is built from one flat dict (``shared=True``) instead of Jinja's per-render merge of its globals.
Together with the copy and the lazy generator above this renders about 2x faster than before, byte for byte
the same text (tests/test_templates.py).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import jinja2
import jinja2.filters
import jinja2.nodes
import yaml
from jinja2.sandbox import SandboxedEnvironment

from train.errors import TemplateError
from train.yamlfile import StrictLoader, load_yaml

TEXT_VAR_LENGTH = 2048  # PromptSource's per-{{ }} truncation, in characters
ANSWER_SEPARATOR = "|||"
# Same sentinel PromptSource uses, so renders of values containing "|||" match byte for byte.
PIPE_PROTECTOR = "3ed2dface8203c4c9dfb1a5dc58e41e0"

# Method names that mutate a list, dict or set in place: a template naming one gets a deep copy of its row.
_MUTATORS = frozenset({"append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "update",
                       "setdefault", "popitem", "add", "discard", "difference_update", "intersection_update",
                       "symmetric_difference_update"})

_RNG_VAR = "_mtf_rng"  # context variable carrying the per-render RNG (a name no template uses)
_TRUNC_VAR = "_mtf_max_field_chars"

# Skip reasons counted (not raised) when rendering a dataset: they depend on the data row, not the template.
SKIP_MISSING_FIELD = "missing_field"
SKIP_EMPTY_INPUT = "empty_input"
SKIP_EMPTY_TARGET = "empty_target"
SKIP_RENDER_ERROR = "render_error"


# ----------------------------------------------------------------------------------------------- loading


class PromptSourceLoader(StrictLoader):
    """The strict safe YAML loader (duplicate keys refused), reading ``!Template`` / ``!TemplateMetadata`` nodes as plain mappings."""


def _construct_plain_mapping(loader: yaml.Loader, node: yaml.Node) -> dict:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(None, None, f"expected a mapping after {node.tag}", node.start_mark)
    return loader.construct_mapping(node, deep=True)


PromptSourceLoader.add_constructor("!Template", _construct_plain_mapping)
PromptSourceLoader.add_constructor("!TemplateMetadata", _construct_plain_mapping)


@dataclasses.dataclass(frozen=True)
class TemplateMetadata:
    original_task: Optional[bool] = None
    choices_in_prompt: Optional[bool] = None
    metrics: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Rendered:
    """One rendered example. ``targets`` may be empty strings; dataset rendering counts and skips those."""

    inputs: str
    targets: list[str]
    answer_choices: list[str]


class MissingFieldError(TemplateError):
    """A template referenced a field the example does not have (StrictUndefined)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class RenderFailure(TemplateError):
    """A data-dependent runtime error inside a template (e.g. ``list.index`` of a missing value)."""


@dataclasses.dataclass
class Template:
    """One PromptSource template.

    Attributes:
        id: the template uuid.
        name: human name, unique within a file.
        jinja: ``input ||| target [||| target...]`` Jinja source.
        answer_choices: Jinja expression rendering ``a ||| b ||| c``, or None.
        metadata: original_task, choices_in_prompt, metrics, languages.
        reference: free text.
        dataset: ``"<dataset>/<subset>"`` or ``"<dataset>"`` (e.g. ``"super_glue/rte"``).
        file: the templates.yaml it came from (for error messages).
    """

    id: str
    name: str
    jinja: str
    answer_choices: Optional[str] = None
    metadata: TemplateMetadata = dataclasses.field(default_factory=TemplateMetadata)
    reference: str = ""
    dataset: str = ""
    file: str = "<string>"

    def __post_init__(self) -> None:
        self._compiled: Optional[tuple[jinja2.Template, Optional[jinja2.Template]]] = None
        self._mutating = True  # set by compile(): whether a render needs its own deep copy of the row
        self._static_choices: Optional[list[str]] = None  # set by compile(): answer choices without Jinja syntax

    # -- helpers ----------------------------------------------------------------------------------
    def _where(self) -> str:
        return f"template {self.name!r} (id {self.id}) in {self.file}"

    def compile(self) -> None:
        """Parse and compile the Jinja sources, once per distinct source text in this process.

        Raises:
            TemplateError: a syntax error or an unknown filter/test (naming file and template).
        """
        if self._compiled is not None:
            return
        key = (self.jinja, self.answer_choices)
        cached = _COMPILED.get(key)
        if cached is None:
            asts = self._parse()  # one parse per source: checked, scanned for mutators, then compiled
            mutating = any(_names_mutator(ast) for ast in asts.values())
            compiled = {which: _ENV.from_string(ast) for which, ast in asts.items()}
            main, choices = compiled["jinja"], compiled.get("answer_choices")
            static = None
            if choices is not None and not _has_jinja_syntax(self.answer_choices):
                text = self._run(choices, {_RNG_VAR: None, _TRUNC_VAR: None}, "answer_choices")
                static = [_unescape_pipe(c.strip()) for c in text.split(ANSWER_SEPARATOR)]
            cached = _COMPILED[key] = (main, choices, mutating, static)
        main, choices, self._mutating, self._static_choices = cached
        self._compiled = (main, choices)

    def check(self) -> None:
        """Static check without code generation (about 5x cheaper than :meth:`compile`; used by lint).

        Raises:
            TemplateError: a syntax error, or a filter/test name the environment does not define.
        """
        self._parse()

    def _parse(self) -> dict[str, jinja2.nodes.Template]:
        """The checked ASTs of ``jinja`` and ``answer_choices`` (when set).

        Raises:
            TemplateError: a syntax error, or a filter/test name the environment does not define (Jinja only
                finds those inside untaken branches at runtime).
        """
        asts = {}
        for which, source in (("jinja", self.jinja), ("answer_choices", self.answer_choices)):
            if source is None:
                continue
            try:
                ast = _ENV.parse(source)
            except jinja2.TemplateSyntaxError as e:
                raise TemplateError(f"{self._where()}: Jinja error in `{which}` at line {e.lineno}: "
                                    f"{e.message}. Fix the template text.") from e
            for node in ast.find_all((jinja2.nodes.Filter, jinja2.nodes.Test)):
                known = _ENV.filters if isinstance(node, jinja2.nodes.Filter) else _ENV.tests
                if node.name not in known:
                    kind = "filter" if isinstance(node, jinja2.nodes.Filter) else "test"
                    close = difflib.get_close_matches(node.name, list(known), n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise TemplateError(f"{self._where()}: unknown {kind} {node.name!r} in `{which}` "
                                        f"(line {node.lineno}).{hint}")
            asts[which] = ast
        return asts

    def check_has_target(self) -> None:
        """Raises: TemplateError: the jinja has no ``|||``, so no row can render a target (lint and tasks call this)."""
        if ANSWER_SEPARATOR not in self.jinja:
            raise TemplateError(f"{self._where()}: the template has no `{ANSWER_SEPARATOR}` in its jinja, so it renders an "
                                f"input and no target (every row would be skipped). Write `input {ANSWER_SEPARATOR} target`.")

    def seed_for(self, seed_key: Any) -> int:
        """Stable 64-bit seed for (dataset, template id, seed_key): same on every run, process and rank."""
        digest = hashlib.sha256(f"{self.dataset}\x00{self.id}\x00{seed_key}".encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big")

    # -- rendering ---------------------------------------------------------------------------------
    def render(self, example: Mapping[str, Any], *, seed_key: Any,
               max_field_chars: Optional[int] = TEXT_VAR_LENGTH) -> Rendered:
        """Render one example.

        Args:
            example: the data row (HF schema of ``self.dataset``). Not modified.
            seed_key: identifies the example (usually its row index); seeds ``choice``/``random``.
            max_field_chars: truncate each ``{{ }}`` value to this many characters (None: no limit).

        Returns:
            Rendered(inputs, targets, answer_choices); targets may be ``[]`` or contain ``""``.

        Raises:
            MissingFieldError: the example lacks a referenced field (message names file, template, field).
            TemplateError: syntax error, unknown filter, sandbox violation, ``answer_choices`` in the example.
            RenderFailure: any other runtime error raised while evaluating the template on this example.
        """
        self.compile()
        assert self._compiled is not None
        main, choices_tpl = self._compiled
        if "answer_choices" in example:
            raise TemplateError(f"{self._where()}: the example has a field named 'answer_choices', which is "
                                f"reserved for the template's answer choices; rename it in a preprocessor.")
        row = copy.deepcopy(dict(example)) if self._mutating else example
        protected = {k: _escape_pipe(v) for k, v in row.items()}
        rng = _LazyRandom(self, seed_key)
        answer_choices: Optional[list[str]] = None
        if self._static_choices is not None:
            answer_choices = list(self._static_choices)
        elif choices_tpl is not None:
            text = self._run(choices_tpl, {**protected, _RNG_VAR: rng, _TRUNC_VAR: None}, "answer_choices")
            answer_choices = [_unescape_pipe(c.strip()) for c in text.split(ANSWER_SEPARATOR)]
        text = self._run(main, {**protected, "answer_choices": answer_choices, _RNG_VAR: rng,
                                _TRUNC_VAR: max_field_chars}, "jinja")
        parts = [_unescape_pipe(p).strip() for p in text.split(ANSWER_SEPARATOR)]
        return Rendered(inputs=parts[0], targets=parts[1:], answer_choices=answer_choices or [])

    def _run(self, tpl: jinja2.Template, variables: dict, which: str) -> str:
        try:
            # = tpl.render(**variables), less Jinja's per-call merge of the environment's globals into a new dict.
            return _ENV.concat(tpl.root_render_func(tpl.new_context({**_GLOBALS, **variables}, shared=True)))
        except _NullValue:
            raise MissingFieldError(f"{self._where()}: a `{{{{ }}}}` expression in `{which}` is null (None) for this row; "
                                    "it would render as the text 'None'. Fill or drop null fields with a preprocessor.",
                                    NULL_FIELD) from None
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"{self._where()}: refused by the Jinja sandbox in `{which}`: {str(e).rstrip('.')}. "
                                f"Templates may only read example fields.") from e
        except jinja2.UndefinedError as e:
            field = _undefined_field(str(e))
            raise MissingFieldError(f"{self._where()}: field {field!r} is missing from the example "
                                    f"(`{which}`: {e}). Add it with a preprocessor or pick another template.",
                                    field) from e
        except jinja2.TemplateError as e:  # e.g. an unknown filter inside a branch is only found at runtime
            raise TemplateError(f"{self._where()}: Jinja error in `{which}`: {e}. Fix the template.") from e
        except Exception as e:  # noqa: BLE001 - data-dependent errors are counted by callers
            raise RenderFailure(f"{self._where()}: {type(e).__name__} while rendering `{which}`: {e}") from e

    def render_or_skip(self, example: Mapping[str, Any], *, seed_key: Any,
                       max_field_chars: Optional[int] = TEXT_VAR_LENGTH) -> tuple[Optional[Rendered], str, str]:
        """Render, turning data-dependent failures into a skip reason instead of an exception.

        Returns:
            (rendered or None, skip reason ("" when rendered), field or detail for the reason).

        Raises:
            TemplateError: failures that are bugs of the template itself (syntax, filter, sandbox).
        """
        try:
            r = self.render(example, seed_key=seed_key, max_field_chars=max_field_chars)
        except MissingFieldError as e:
            return None, SKIP_MISSING_FIELD, e.field
        except RenderFailure as e:
            return None, SKIP_RENDER_ERROR, str(e.__cause__ or e)[:200]
        if not r.inputs:
            return None, SKIP_EMPTY_INPUT, ""
        if not r.targets or not all(r.targets):
            return None, SKIP_EMPTY_TARGET, ""
        return r, "", ""

    def to_dict(self) -> dict:
        """Plain, JSON-able description (used to fingerprint cached renders)."""
        d = dataclasses.asdict(self)
        d["metadata"] = dataclasses.asdict(self.metadata)
        return d


def _escape_pipe(value: Any) -> Any:
    return value.replace(ANSWER_SEPARATOR, PIPE_PROTECTOR) if isinstance(value, str) else value


def _unescape_pipe(text: str) -> str:
    return text.replace(PIPE_PROTECTOR, ANSWER_SEPARATOR)


NULL_FIELD = "(a null value)"  # the "field" of a MissingFieldError raised for a None value
MAX_FAILURE_FRACTION = 0.5  # above this fraction of rows failing (missing field, render error) a template is an error


def fails_on_data(skipped: Mapping[str, int], rows: int, max_failure_fraction: float = MAX_FAILURE_FRACTION) -> bool:
    """True when missing fields and render errors (not empty renders) exceed ``max_failure_fraction`` of ``rows``."""
    failures = skipped.get(SKIP_MISSING_FIELD, 0) + skipped.get(SKIP_RENDER_ERROR, 0)
    return bool(rows) and failures / rows > max_failure_fraction


def _undefined_field(message: str) -> str:
    m = re.search(r"'list object' has no attribute '(-?\d+)'", message)
    if m:  # answer_choices[label] with label "1": the data holds the index as a string
        return (f"[{m.group(1)!r}] (a list indexed with the string {m.group(1)!r}: the field is a str in the data; "
                "cast it to int with the `cast` preprocessor, e.g. {name: cast, args: {field: label, to: int}})")
    m = re.search(r"has no attribute '([^']+)'", message) or re.search(r"'([^']+)' is undefined", message)
    if m:
        return m.group(1)
    m = re.search(r"has no element (\S+)", message)  # e.g. answer_choices[label] with an out-of-range label
    if m and m.group(1) == "None":
        return "[None] (a list indexed with a null field: drop such rows or fill the field with a preprocessor)"
    return f"[{m.group(1)}] (an index out of range)" if m else message


# ------------------------------------------------------------------------------------------- environment


@jinja2.pass_context
def _seeded_choice(context: jinja2.runtime.Context, seq: Sequence[Any]) -> Any:
    """PromptSource's ``choice`` filter, but drawn from the per-render seeded RNG."""
    rng = context.get(_RNG_VAR)
    if not isinstance(rng, _LazyRandom):  # internal invariant: render() always passes it
        raise jinja2.TemplateRuntimeError("choice filter used outside Template.render")
    return rng.get().choice(list(seq))


class _LazyRandom:
    """The per-render ``random.Random``, seeded by :meth:`Template.seed_for` on first use (most renders draw nothing)."""

    __slots__ = ("template", "seed_key", "rng")

    def __init__(self, template: "Template", seed_key: Any):
        self.template, self.seed_key, self.rng = template, seed_key, None

    def get(self) -> random.Random:
        if self.rng is None:
            self.rng = random.Random(self.template.seed_for(self.seed_key))
        return self.rng


def _names_mutator(ast: jinja2.nodes.Template) -> bool:
    """Whether a Jinja AST names a mutating method: ``x.append(..)``, ``x['pop'](..)``, ``x|attr('update')``."""
    return (any(node.attr in _MUTATORS for node in ast.find_all(jinja2.nodes.Getattr))
            or any(isinstance(node.value, str) and node.value in _MUTATORS for node in ast.find_all(jinja2.nodes.Const)))


def _has_jinja_syntax(source: str) -> bool:
    return any(mark in source for mark in ("{{", "{%", "{#"))


def _most_frequent(items: Iterable[Any]) -> Optional[list[Any]]:
    """PromptSource's ``most_frequent`` filter: the items that occur most often, in first-seen order."""
    counts = Counter(items).most_common()
    if not counts:
        return None
    top = counts[0][1]
    return [item for item, c in counts if c == top]


class _NullValue(Exception):
    """A ``{{ }}`` expression evaluated to None: a null field would otherwise render as the text "None"."""


@jinja2.pass_context
def _truncating_finalize(context: jinja2.runtime.Context, value: Any) -> Any:
    """Applied to every ``{{ }}`` value: PromptSource's ``| string | truncate(TEXT_VAR_LENGTH)``.

    A None value raises instead of printing "None" into the prompt; the row is counted as a missing field.
    """
    if value is None:
        raise _NullValue()
    limit = context.get(_TRUNC_VAR)
    if limit is None:
        return value
    return jinja2.filters.do_truncate(context.environment, str(value), limit)


def _make_environment() -> SandboxedEnvironment:
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, finalize=_truncating_finalize,
                               keep_trailing_newline=False, autoescape=False)
    env.filters["choice"] = _seeded_choice
    env.filters["random"] = _seeded_choice  # Jinja's builtin is unseeded too
    env.filters["most_frequent"] = _most_frequent
    env.globals["zip"] = zip
    return env


# Built once and never mutated: all per-render state travels in the render context.
_ENV = _make_environment()
_GLOBALS = dict(_ENV.globals)
# (jinja, answer_choices) -> (compiled jinja, compiled answer_choices, mutating, static choices): a template is
# compiled once per process, not once per render batch (``datasets.map`` rebuilds Template objects per batch).
_COMPILED: dict[tuple[str, Optional[str]], tuple] = {}


# ---------------------------------------------------------------------------------------- collections


class TemplateCollection:
    """The templates of one templates.yaml, in file order.

    Attributes:
        path: the file. dataset: ``"<dataset>/<subset>"``. templates: list of Template.
    """

    def __init__(self, path: str, dataset: str, templates: list[Template]):
        self.path = path
        self.dataset = dataset
        self.templates = templates

    def __len__(self) -> int:
        return len(self.templates)

    def __iter__(self) -> Iterator[Template]:
        return iter(self.templates)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.templates]

    def __getitem__(self, name: str) -> Template:
        for t in self.templates:
            if t.name == name:
                return t
        close = difflib.get_close_matches(name, self.names, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise TemplateError(f"{self.path}: no template named {name!r}.{hint} Known: {self.names}")

    def select(self, names: Optional[Sequence[str]] = None, original_task: Optional[bool] = None,
               choices_in_prompt: Optional[bool] = None,
               languages: Optional[Sequence[str]] = None) -> list[Template]:
        """Filter templates; every given criterion must hold (None = no filter).

        Args:
            names: exact template names (each must exist; order of the file is kept).
            original_task / choices_in_prompt: metadata flags to match.
            languages: keep templates whose metadata lists any of these languages.

        Returns:
            The selected templates (may be empty).

        Raises:
            TemplateError: a name does not exist (with close matches).
        """
        chosen = self.templates
        if names is not None:
            wanted = {self[n].name for n in names}  # __getitem__ raises on unknown names
            chosen = [t for t in chosen if t.name in wanted]
        if original_task is not None:
            chosen = [t for t in chosen if t.metadata.original_task is original_task]
        if choices_in_prompt is not None:
            chosen = [t for t in chosen if t.metadata.choices_in_prompt is choices_in_prompt]
        if languages is not None:
            langs = set(languages)
            chosen = [t for t in chosen if langs & set(t.metadata.languages)]
        return list(chosen)


def parse_templates(text: str, path: str = "<string>") -> TemplateCollection:
    """Parse the text of a templates.yaml.

    Raises:
        TemplateError: invalid YAML, unknown tag, or a template entry without ``name``/``jinja``.
    """
    try:
        doc = load_yaml(text, path, loader=PromptSourceLoader)
    except yaml.YAMLError as e:
        raise TemplateError(f"{path}: invalid templates YAML: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("templates", {}), dict):
        raise TemplateError(f"{path}: expected a mapping with 'dataset' and a 'templates' mapping")
    dataset = str(doc.get("dataset") or "")
    if doc.get("subset"):
        dataset = f"{dataset}/{doc['subset']}"
    templates = []
    for key, raw in (doc.get("templates") or {}).items():
        if not isinstance(raw, dict) or "jinja" not in raw or "name" not in raw:
            raise TemplateError(f"{path}: template {key!r} needs at least 'name' and 'jinja'")
        meta = raw.get("metadata") or {}
        templates.append(Template(
            id=str(raw.get("id") or key),
            name=str(raw["name"]),
            jinja=str(raw["jinja"]),
            answer_choices=None if raw.get("answer_choices") is None else str(raw["answer_choices"]),
            metadata=TemplateMetadata(
                original_task=meta.get("original_task"),
                choices_in_prompt=meta.get("choices_in_prompt"),
                metrics=tuple(meta.get("metrics") or ()),
                languages=tuple(meta.get("languages") or ()),
            ),
            reference=str(raw.get("reference") or ""),
            dataset=dataset,
            file=path,
        ))
    return TemplateCollection(path=path, dataset=dataset, templates=templates)


def load_templates(path: str | Path) -> TemplateCollection:
    """Load a PromptSource templates.yaml with the safe loader.

    Raises:
        TemplateError: the file is missing, not UTF-8, or not valid templates YAML.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise TemplateError(f"templates file not found: {p}") from e
    except UnicodeDecodeError as e:
        raise TemplateError(f"{p}: not valid UTF-8 at byte {e.start}") from e
    return parse_templates(text, str(p))


# ------------------------------------------------------------------------------------------------- lint


def _detail_counts(rows: Sequence[Mapping[str, Any]], template: Template,
                   max_field_chars: Optional[int]) -> dict:
    skipped: Counter = Counter()
    example_field: dict[str, str] = {}
    gold_missing, first_gold_missing = 0, None
    for i, row in enumerate(rows):
        rendered, reason, detail = template.render_or_skip(row, seed_key=i, max_field_chars=max_field_chars)
        if reason:
            skipped[reason] += 1
            example_field.setdefault(reason, f"row {i}: {detail}" if detail else f"row {i}")
        elif rendered.answer_choices and rendered.targets[0].strip() not in [c.strip() for c in rendered.answer_choices]:
            # Rank classification scores the answer choices; a gold target outside them is never right.
            gold_missing += 1
            first_gold_missing = first_gold_missing or (f"row {i}: target {rendered.targets[0]!r} is not one of "
                                                        f"{rendered.answer_choices}")
    ok = len(rows) - sum(skipped.values())
    return {"rows": len(rows), "rendered": ok, "success_rate": ok / len(rows) if rows else None,
            "skipped": dict(skipped), "first_skip": example_field,
            "gold_not_in_choices": gold_missing, "first_gold_not_in_choices": first_gold_missing}


def lint_templates(paths: Sequence[str | Path],
                   data: Optional[Mapping[str, Sequence[Mapping[str, Any]]]] = None,
                   *, max_rows: Optional[int] = None,
                   max_field_chars: Optional[int] = TEXT_VAR_LENGTH) -> dict:
    """Check template files: they load, compile, have unique names and metadata; optionally render data.

    Args:
        paths: templates.yaml files or folders (searched recursively for templates.yaml).
        data: optional rows in the HF schema, keyed by dataset name (``"super_glue/rte"``) or by the
            resolved path of a templates file. ``train.data.tasks.lint_data(task_file)`` builds this from tasks.
        max_rows: render at most this many rows per dataset.
        max_field_chars: as in :meth:`Template.render`.

    Returns:
        JSON-able report: ``{"files": [{"path", "dataset", "templates", "load_errors": [str],
        "warnings": [str], "render": {name: {rows, rendered, success_rate, skipped, first_skip}} | None}],
        "summary": {"files", "templates", "load_errors", "files_with_errors"}}``.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.rglob("templates.yaml")) if p.is_dir() else [p])
    report: dict = {"files": [], "summary": {}}
    for f in files:
        entry: dict = {"path": str(f), "dataset": None, "templates": 0, "load_errors": [], "warnings": [],
                       "render": None}
        report["files"].append(entry)
        try:
            coll = load_templates(f)
        except TemplateError as e:
            entry["load_errors"].append(str(e))
            continue
        entry["dataset"], entry["templates"] = coll.dataset, len(coll)
        for name, n in Counter(coll.names).items():
            if n > 1:
                entry["warnings"].append(f"template name {name!r} appears {n} times")
        for t in coll:
            try:
                t.check()
                t.check_has_target()
            except TemplateError as e:
                entry["load_errors"].append(str(e))
            if t.metadata.original_task is None or not t.metadata.languages:
                entry["warnings"].append(f"template {t.name!r}: incomplete metadata")
        rows = None
        if data is not None:
            rows = data.get(str(f.resolve())) or data.get(coll.dataset)
        if rows is not None:
            rows = list(rows)[:max_rows] if max_rows else list(rows)
            entry["render"] = {}
            for t in coll:
                try:
                    entry["render"][t.name] = _detail_counts(rows, t, max_field_chars)
                except TemplateError as e:
                    entry["render"][t.name] = {"rows": len(rows), "rendered": 0, "success_rate": 0.0,
                                               "skipped": {}, "error": str(e)}
    report["summary"] = {
        "files": len(report["files"]),
        "templates": sum(e["templates"] for e in report["files"]),
        "load_errors": sum(len(e["load_errors"]) for e in report["files"]),
        "files_with_errors": [e["path"] for e in report["files"] if e["load_errors"]],
        "gold_not_in_choices": sum(1 for e in report["files"] for r in (e["render"] or {}).values()
                                   if r.get("gold_not_in_choices")),
        "failing_templates": [f"{e['dataset']} / {name}" for e in report["files"] for name, r in (e["render"] or {}).items()
                              if r.get("error") or fails_on_data(r["skipped"], r["rows"])],
    }
    return report


def format_lint_report(report: Mapping[str, Any]) -> str:
    """Render :func:`lint_templates`'s report as a plain-text table (one line per file, then errors)."""
    lines = [f"{'dataset':<40} {'templates':>9} {'errors':>6} {'render ok':>10}  file"]
    for e in report["files"]:
        rate = ""
        if e.get("render"):
            total = sum(r["rows"] for r in e["render"].values())
            ok = sum(r["rendered"] for r in e["render"].values())
            rate = f"{ok / total:.1%}" if total else "n/a"
        lines.append(f"{(e['dataset'] or '?'):<40} {e['templates']:>9} {len(e['load_errors']):>6} "
                     f"{rate:>10}  {e['path']}")
    for e in report["files"]:
        for err in e["load_errors"]:
            lines.append(f"ERROR {err}")
        for name, r in (e.get("render") or {}).items():
            if r.get("error") or r["skipped"]:
                why = r.get("error") or json.dumps(r["first_skip"])
                lines.append(f"SKIP  {e['dataset']} / {name}: {r['rendered']}/{r['rows']} rendered; {why}")
            if r.get("gold_not_in_choices"):
                lines.append(f"GOLD  {e['dataset']} / {name}: {r['gold_not_in_choices']}/{r['rendered']} rendered rows have a "
                             f"target outside answer_choices, so rank classification skips them; "
                             f"{r['first_gold_not_in_choices']}. Make the target one of the choices.")
    s = report["summary"]
    gold = f", {s['gold_not_in_choices']} templates with targets outside their answer_choices" if s.get("gold_not_in_choices") else ""
    failing = f", {len(s['failing_templates'])} templates failing on the data" if s.get("failing_templates") else ""
    lines.append(f"{s['files']} files, {s['templates']} templates, {s['load_errors']} load errors{failing}{gold}")
    return "\n".join(lines)
