"""Small, pure preprocessors that turn a source row into the HF schema a PromptSource template expects.

Two kinds, both bound from task YAML by name (``preprocessors: [{name: rename, args: {...}}]``) and applied
in order by :mod:`train.data.tasks`:

* ``example`` preprocessors: ``fn(example: dict, **args) -> dict`` (one row in, one row out);
* ``rows`` preprocessors: ``fn(example: dict, **args) -> list[dict]`` (one row in, zero or more out), e.g.
  ``explode`` turns a DREAM dialogue with 3 questions into 3 rows.

They do no I/O and keep no state, and they never modify their input (they return a new dict). A missing
field raises ``KeyError``; the task layer turns that into a ``DataError`` naming task, file and row.

Example (the SuperGLUE release format of WSC -> HF ``super_glue/wsc.fixed`` fields)::

    preprocessors:
      - {name: flatten, args: {field: target}}            # target.span1_text -> span1_text, ...
      - {name: map_values, args: {field: label, mapping: {false: 0, true: 1}}}
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import re
import typing
from typing import Any, Callable, NewType, Optional, Sequence

from train.errors import ConfigError

Regex = NewType("Regex", str)  # an argument annotated Regex must compile (checked when the task file loads)


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    name: str
    fn: Callable[..., Any]
    kind: str  # "example" | "rows"


class PreprocessorRegistry:
    """Name -> preprocessor. Registering a duplicate raises; a missing name lists the known ones."""

    def __init__(self) -> None:
        self._items: dict[str, Preprocessor] = {}
        self._builtin: set[str] = set()

    def register(self, name: str, kind: str = "example", *, builtin: bool = False) -> Callable:
        """Decorator registering ``fn`` under ``name``.

        Raises:
            ConfigError: ``name`` is already registered, or ``kind`` is unknown.
        """
        if kind not in ("example", "rows"):
            raise ConfigError(f"preprocessor {name!r}: kind must be 'example' or 'rows', not {kind!r}")

        def deco(fn: Callable) -> Callable:
            if name in self._items:
                raise ConfigError(f"preprocessor {name!r} is already registered")
            self._items[name] = Preprocessor(name, fn, kind)
            if builtin:
                self._builtin.add(name)
            return fn

        return deco

    def get(self, name: str, where: str = "") -> Preprocessor:
        """Raises ConfigError with a did-you-mean and the known names when ``name`` is unknown.

        Args:
            where: the entry that names it (``FILE: task 'T'.preprocessors[i]``); it starts the message.
        """
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where + ': ' if where else ''}unknown preprocessor {name!r}.{hint} "
                              f"Known: {sorted(self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def reset(self) -> None:
        """Forget everything registered outside this module (for tests)."""
        self._items = {k: v for k, v in self._items.items() if k in self._builtin}

    def check_args(self, name: str, args: Any, where: str) -> None:
        """Validate ``args`` against the function signature before any data is read.

        Names are checked, and so are the shapes the annotations give: a list (``Sequence``/``list``)
        argument must be a list, a mapping (``dict``/``Mapping``) one a mapping, a ``str`` one a string,
        a number one a number (each may be null when the annotation is ``Optional``), and a ``Regex``
        one must compile. Arguments without a usable annotation take any value.

        Raises:
            ConfigError: an unknown preprocessor, ``args`` that is not a mapping, unknown or missing
                arguments (with a did-you-mean), or an argument of the wrong shape; each names ``where``.
        """
        p = self.get(name, where)
        params = dict(inspect.signature(p.fn).parameters)
        params.pop(next(iter(params)))  # the example
        if not isinstance(args, dict):
            shown = ", ".join(f"{k}: ..." for k in params)
            raise ConfigError(f"{where}: `args` of preprocessor {name!r} must be a mapping of argument names to "
                              f"values, not a {type(args).__name__} ({args!r}); write `args: {{{shown}}}`.")
        for key in args:
            if key not in params:
                close = difflib.get_close_matches(key, params, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{where}: preprocessor {name!r} has no argument {key!r}.{hint} "
                                  f"Arguments: {sorted(params)}")
        missing = [k for k, v in params.items() if v.default is inspect.Parameter.empty and k not in args]
        if missing:
            raise ConfigError(f"{where}: preprocessor {name!r} needs argument(s) {missing}")
        try:
            hints = typing.get_type_hints(p.fn)
        except Exception:  # noqa: BLE001 - a user preprocessor's annotations may not resolve: check names only
            hints = {}
        for key, value in args.items():
            if key in hints:
                _check_shape(name, key, value, hints[key], where)


def _check_shape(name: str, key: str, value: Any, hint: Any, where: str) -> None:
    """Raise a ConfigError naming ``where``, the argument and the fix when ``value`` does not fit ``hint``."""
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) != 1:
            return
        hint = rest[0]
    origin = typing.get_origin(hint) or hint
    at = f"{where}: preprocessor {name!r} argument {key!r}"
    got = "not null" if value is None else f"not the {type(value).__name__} {value!r}"
    if hint is Regex:
        if not isinstance(value, str):
            raise ConfigError(f"{at} must be a regular expression as a string, {got}; quote it.")
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(f"{at}: {value!r} is not a valid Python regular expression ({err}); escape special "
                              "characters with a backslash (in YAML, inside single quotes: '\\(').") from None
    elif origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            example = f"[{value}]" if isinstance(value, (str, int, float)) else "[a, b]"
            raise ConfigError(f"{at} must be a YAML list, {got}; write `{key}: {example}`.")
    elif origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{at} must be a YAML mapping, {got}; write `{key}: {{from: to, ...}}`.")
    elif hint is str:
        if value is None or isinstance(value, (list, dict)):
            raise ConfigError(f"{at} must be one string, {got}.")
        if not isinstance(value, str):  # YAML reads 2016, 1.0, yes and null as other types
            raise ConfigError(f"{at} must be a string, {got}; quote it: `{key}: \"{value}\"`.")
    elif hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{at} must be a number, {got}; write it without quotes.")


PREPROCESSORS = PreprocessorRegistry()
_register = PREPROCESSORS.register


def _get_path(example: dict, dotted: str) -> Any:
    """``a.b`` reads ``example["a"]["b"]``; a key that itself contains a dot is tried first."""
    if dotted in example:
        return example[dotted]
    value: Any = example
    for part in dotted.split("."):
        value = value[part]  # KeyError names the missing part
    return value


@_register("rename", builtin=True)
def rename(example: dict, mapping: dict[str, str]) -> dict:
    """Rename fields: ``{old: new}``. A dotted ``old`` (``explanation.selected``) reads a nested field."""
    out = dict(example)
    for old, new in mapping.items():
        value = _get_path(example, old)
        out.pop(old, None)
        out[new] = value
    return out


@_register("select", builtin=True)
def select(example: dict, fields: Sequence[str]) -> dict:
    """Keep only ``fields`` (in that order)."""
    return {f: example[f] for f in fields}


@_register("drop", builtin=True)
def drop(example: dict, fields: Sequence[str]) -> dict:
    """Remove ``fields`` (missing ones are ignored)."""
    return {k: v for k, v in example.items() if k not in set(fields)}


@_register("set", builtin=True)
def set_value(example: dict, field: str, value: Any) -> dict:
    """Set a constant field."""
    return {**example, field: value}


@_register("flatten", builtin=True)
def flatten(example: dict, field: str, prefix: str = "") -> dict:
    """Move the keys of a nested mapping to the top level: ``target: {span1_text}`` -> ``span1_text``."""
    nested = example[field]
    if not isinstance(nested, dict):
        raise TypeError(f"field {field!r} is a {type(nested).__name__}, not a mapping")
    out = {k: v for k, v in example.items() if k != field}
    out.update({f"{prefix}{k}": v for k, v in nested.items()})
    return out


@_register("map_values", builtin=True)
def map_values(example: dict, field: str, mapping: dict, into: Optional[str] = None) -> dict:
    """Map a field's value through ``mapping`` (e.g. ``{entailment: 0, not_entailment: 1}``).

    Keys are compared as given and, failing that, as strings (so YAML ``true``/``"true"``/``1``/``"1"``
    all work). An unmapped value raises ``ValueError``.
    """
    value = example[field]
    if value in mapping:
        new = mapping[value]
    else:
        by_str = {str(k).lower(): v for k, v in mapping.items()}
        key = str(value).lower()
        if key not in by_str:
            raise ValueError(f"value {value!r} of field {field!r} is not in the mapping {sorted(map(str, mapping))}")
        new = by_str[key]
    return {**example, (into or field): new}


@_register("cast", builtin=True)
def cast(example: dict, field: str, to: str) -> dict:
    """Cast a field to ``int``, ``float``, ``str`` or ``bool``."""
    types = {"int": int, "float": float, "str": str, "bool": bool}
    if to not in types:
        raise ValueError(f"cast: 'to' must be one of {sorted(types)}, not {to!r}")
    return {**example, field: types[to](example[field])}


@_register("add", builtin=True)
def add(example: dict, field: str, value: float) -> dict:
    """Add a number to a numeric field (e.g. 1-based class ids -> 0-based: ``value: -1``)."""
    return {**example, field: example[field] + value}


@_register("join", builtin=True)
def join(example: dict, fields: Sequence[str], into: str, separator: str = " ") -> dict:
    """Join string fields: AG News ``Title`` + ``Description`` -> ``text``."""
    return {**example, into: separator.join(str(_get_path(example, f)) for f in fields)}


@_register("split", builtin=True)
def split(example: dict, field: str, separator: str, into: Optional[str] = None) -> dict:
    """Split a string field into a list (CommonGen ``"dog_N#run_V"`` -> ``["dog_N", "run_V"]``)."""
    return {**example, (into or field): str(example[field]).split(separator)}


@_register("regex_replace", builtin=True)
def regex_replace(example: dict, field: str, pattern: Regex, replacement: str = "",
                  into: Optional[str] = None) -> dict:
    """``re.sub`` on a string field, or on each element of a list field."""
    value = example[field]
    rx = re.compile(pattern)
    new = [rx.sub(replacement, str(v)) for v in value] if isinstance(value, list) else rx.sub(replacement, str(value))
    return {**example, (into or field): new}


@_register("class_label", builtin=True)
def class_label(example: dict, field: str, names: Sequence[str], into: Optional[str] = None) -> dict:
    """Label name -> index in ``names`` (the HF ``ClassLabel`` order), e.g. TREC ``"LOC:city"`` -> 32."""
    value = example[field]
    try:
        index = list(names).index(value)
    except ValueError:
        raise ValueError(f"value {value!r} of field {field!r} is not one of the {len(names)} class names") from None
    return {**example, (into or field): index}


@_register("lookup", builtin=True)
def lookup(example: dict, values: str, keys: str, key: str, into: str) -> dict:
    """``into = values[keys.index(key)]``: CommonsenseQA ``choices.text[choices.label.index(answerKey)]``."""
    vals, ks, k = _get_path(example, values), _get_path(example, keys), _get_path(example, key)
    if k not in ks:
        raise ValueError(f"{key}={k!r} is not among {keys}={ks!r}")
    return {**example, into: vals[list(ks).index(k)]}


@_register("explode", kind="rows", builtin=True)
def explode(example: dict, field: str, into: Optional[str] = None) -> list[dict]:
    """One output row per element of the list ``field``.

    A mapping element is merged into the row (DREAM: ``questions: [{question, choice, answer}]`` ->
    rows with ``question``, ``choice``, ``answer``); any other element is stored under ``into``
    (CommonGen: ``scene: [s1, s2]`` -> rows with ``target: s1`` / ``target: s2``). An empty list gives no row.
    """
    items = example[field]
    if not isinstance(items, (list, tuple)):  # a string would give one row per character
        raise TypeError(f"field {field!r} is a {type(items).__name__} ({str(items)[:40]!r}), not a list; "
                        "turn it into one first (e.g. with split) or drop the explode")
    base = {k: v for k, v in example.items() if k != field}
    rows = []
    for item in items:
        if isinstance(item, dict) and into is None:
            rows.append({**base, **item})
        else:
            rows.append({**base, (into or field): item})
    return rows
