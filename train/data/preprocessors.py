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

import dataclasses
import difflib
import inspect
import re
from typing import Any, Callable, Optional, Sequence

from train.errors import ConfigError


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

    def get(self, name: str) -> Preprocessor:
        """Raises ConfigError with a did-you-mean and the known names when ``name`` is unknown."""
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown preprocessor {name!r}.{hint} Known: {sorted(self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def reset(self) -> None:
        """Forget everything registered outside this module (for tests)."""
        self._items = {k: v for k, v in self._items.items() if k in self._builtin}

    def check_args(self, name: str, args: dict, where: str) -> None:
        """Validate ``args`` against the function signature before any data is read.

        Raises:
            ConfigError: unknown or missing arguments (with a did-you-mean).
        """
        p = self.get(name)
        params = dict(inspect.signature(p.fn).parameters)
        params.pop(next(iter(params)))  # the example
        for key in args:
            if key not in params:
                close = difflib.get_close_matches(key, params, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{where}: preprocessor {name!r} has no argument {key!r}.{hint} "
                                  f"Arguments: {sorted(params)}")
        missing = [k for k, v in params.items() if v.default is inspect.Parameter.empty and k not in args]
        if missing:
            raise ConfigError(f"{where}: preprocessor {name!r} needs argument(s) {missing}")


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
def regex_replace(example: dict, field: str, pattern: str, replacement: str = "",
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
    base = {k: v for k, v in example.items() if k != field}
    rows = []
    for item in items:
        if isinstance(item, dict) and into is None:
            rows.append({**base, **item})
        else:
            rows.append({**base, (into or field): item})
    return rows
