"""Few-shot task sets: ``k`` rows of a task's split, drawn with a seed before any template is rendered.

A task definition, or a mixture member (which overrides its task's setting), asks for them::

    tasks:
      - name: rte
        ...
        few_shot: {k: 32, seed: 0}          # T-Few: 20-70 rows per task; RAFT / FewGLUE: 32
    mixture:
      members:
        - {task: rte, few_shot: {k: 64, seed: 1}}   # overrides the task's setting
        - {task: copa, few_shot: null}              # all rows, whatever the task says

The draw, over the ``n`` rows of the split *after* the task's preprocessors (the rows ``example_index``
counts)::

    order = numpy.random.Generator(numpy.random.PCG64(seed)).permutation(n)
    rows  = sorted(order[:k])

It depends on ``(n, k, seed)`` only: not on dict order, hash randomisation, ``num_proc``, caches or the
machine. Every template of the task renders the same ``k`` rows, and a larger ``k`` with the same seed
gives a superset. ``data.max_examples_per_task = N`` (a cap on loaded rows) keeps the first ``min(N, k)``
rows of ``order``: the rows ``k = min(N, k)`` would draw, so a capped quick run trains on a subset of the
full run's rows. ``k`` larger than the split is a :class:`~train.errors.DataError` (the cap never hides it).

A training run records the rows in ``<run.output_dir>/few_shot.json`` (:func:`write_record`): per
few-shot task its ``k``, seed, split, the split's size, the row indices and a SHA-256 of each row's
content (:func:`row_hash`), so a later reader can check that the files still hold the same rows.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from train.errors import ConfigError, DataError

FEW_SHOT_KEYS = ("k", "seed")
RECORD_FILE = "few_shot.json"
RECORD_FORMAT = 1
ALGORITHM = "sorted(numpy.random.Generator(numpy.random.PCG64(seed)).permutation(n)[:k])"
EXAMPLE = "few_shot: {k: 32, seed: 0}"


@dataclass(frozen=True)
class FewShotSpec:
    """``k`` rows drawn with ``seed``; ``origin`` says where it was set (for messages, not compared)."""

    k: int
    seed: int
    origin: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        return {"k": self.k, "seed": self.seed}


def _int(value: Any, minimum: int, where: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{where}.{what} must be an int >= {minimum}, got {value!r}. Example: {EXAMPLE}")
    return int(value)


def parse_few_shot(raw: Any, where: str) -> Optional[FewShotSpec]:
    """Validate a ``few_shot`` mapping (None stays None: all rows).

    Args:
        raw: the YAML value.
        where: "<file>: task 'x'" or "<file>: mixture.members[i]", prefixed to every message.

    Raises:
        ConfigError: not a mapping, an unknown key (with the closest valid one), a missing key, ``k`` not an
            int >= 1, ``seed`` not an int >= 0.
    """
    if raw is None:
        return None
    where = f"{where}: few_shot"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping with k and seed, got {raw!r}. Example: {EXAMPLE}")
    for key in raw:
        if key not in FEW_SHOT_KEYS:
            close = difflib.get_close_matches(str(key), FEW_SHOT_KEYS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'.{hint} Valid keys: {', '.join(FEW_SHOT_KEYS)}.")
    missing = [key for key in FEW_SHOT_KEYS if key not in raw]
    if missing:  # the seed is required too: which rows a run trains on must never be an implicit default
        raise ConfigError(f"{where}: missing {' and '.join(missing)}. Example: {EXAMPLE}")
    return FewShotSpec(k=_int(raw["k"], 1, where, "k"), seed=_int(raw["seed"], 0, where, "seed"), origin=where)


def draw_indices(n: int, k: int, seed: int, cap: Optional[int] = None) -> list[int]:
    """The sorted row indices of the draw (see the module docstring); ``cap`` keeps the first ``cap`` drawn.

    Raises:
        ValueError: ``k > n`` (callers turn it into a DataError naming the task).
    """
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    take = k if cap is None else min(k, cap)
    return sorted(int(i) for i in order[:take])


def row_hash(row: Mapping) -> str:
    """SHA-256 of a row's content: canonical JSON (sorted keys, no spaces, UTF-8; non-JSON values as str)."""
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class FewShotDraw:
    """The rows a few-shot task uses: indices into the preprocessed split and each row's content hash."""

    spec: FewShotSpec
    split: str
    rows_in_split: int
    indices: tuple[int, ...]
    row_sha256: tuple[str, ...]
    cap: Optional[int] = None  # data.max_examples_per_task when it was set

    def to_dict(self) -> dict:
        return {"k": self.spec.k, "seed": self.spec.seed, "set_in": self.spec.origin, "split": self.split,
                "rows_in_split": self.rows_in_split, "max_examples_per_task": self.cap, "used": len(self.indices),
                "indices": list(self.indices), "row_sha256": list(self.row_sha256)}


def draw_rows(dataset: Any, spec: FewShotSpec, *, split: str, where: str, cap: Optional[int] = None) -> FewShotDraw:
    """Draw ``spec.k`` rows of ``dataset`` (a ``datasets.Dataset`` of the preprocessed split).

    Args:
        cap: ``data.max_examples_per_task``: keep the first ``cap`` rows of the draw order.
        where: "task 'x' (file)" for messages.

    Raises:
        DataError: ``k`` exceeds the split's rows (the message names task, file, split and the row count).
    """
    n = len(dataset)
    try:
        indices = draw_indices(n, spec.k, spec.seed, cap)
    except ValueError:
        raise DataError(f"{where}: few_shot.k = {spec.k} (set in {spec.origin or 'the task'}) but split {split!r} "
                        f"has only {n} rows after preprocessing. Lower k to at most {n}, or use a larger split.") from None
    rows = dataset.select(indices).to_list()
    return FewShotDraw(spec=spec, split=split, rows_in_split=n, indices=tuple(indices),
                       row_sha256=tuple(row_hash(r) for r in rows), cap=cap)


def record(draws: Mapping[str, tuple[FewShotDraw, Mapping]]) -> dict:
    """The ``few_shot.json`` document: task -> (draw, extra fields such as dataset and task file)."""
    return {"format": RECORD_FORMAT, "algorithm": ALGORITHM,
            "row_sha256": "sha256 of the row as JSON with sorted keys, no spaces, UTF-8 (train.data.few_shot.row_hash)",
            "tasks": {name: {**dict(extra), **draw.to_dict()} for name, (draw, extra) in sorted(draws.items())}}


def write_record(output_dir: str | os.PathLike, document: Mapping) -> Path:
    """Write ``<output_dir>/few_shot.json`` atomically (temp file, then rename). Call on the main process only."""
    path = Path(output_dir) / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def overrides_conflict(task: str, a: Optional[FewShotSpec], b: Optional[FewShotSpec], where_a: str,
                       where_b: str) -> ConfigError:
    """The error for one task given two different few-shot settings by two members."""
    show = lambda s: "null (all rows)" if s is None else f"{{k: {s.k}, seed: {s.seed}}}"  # noqa: E731
    return ConfigError(f"task '{task}' gets two different few_shot settings: {show(a)} at {where_a} and {show(b)} at "
                       f"{where_b}. A task is rendered once per run; give both members the same setting.")

