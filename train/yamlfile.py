"""YAML, read one way everywhere (run configs, mixture and task files, PromptSource templates, overrides).

The loader is a safe loader (no Python objects are ever built; the C one when available) that also
refuses a mapping with the same key twice. PyYAML keeps the last value silently, so a block pasted twice
would train with a value the user did not read first; here it is an error naming both lines.
"""

from __future__ import annotations

import io
from typing import Any

import yaml

_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(_SafeLoader):  # type: ignore[misc, valid-type]
    """``yaml.SafeLoader`` that raises on duplicate mapping keys (``<<`` merges may still be overridden)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first_seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first_seen.get(key)
                except TypeError:  # an unhashable key: SafeConstructor reports it itself
                    continue
                if earlier is not None:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"found the key {key!r} twice (first on line {earlier.line + 1}); keep one of them",
                        key_node.start_mark)
                first_seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


class _Named(io.StringIO):
    """Text with a ``name``, so that error marks say which file (PyYAML reads ``stream.name``)."""

    def __init__(self, text: str, name: str):
        super().__init__(text)
        self.name = name


def load_yaml(text: str, name: str = "<string>", loader: type = StrictLoader) -> Any:
    """Parse YAML text strictly (see :class:`StrictLoader`).

    Args:
        text: the YAML document.
        name: the file it came from, shown in error marks.
        loader: :class:`StrictLoader` or a subclass (e.g. one that reads PromptSource tags).

    Raises:
        yaml.YAMLError: invalid syntax, a disallowed tag or a duplicate key; its text gives file, line and column.
    """
    return yaml.load(_Named(text, name), Loader=loader)  # noqa: S506 - loader is a StrictLoader (a SafeLoader)
