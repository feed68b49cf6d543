"""Mixtures: sampling rates from a mixture YAML, and a seeded, resumable, shardable stream of examples.

A mixture file holds a ``mixture:`` section (this module) next to ``tasks:`` / ``include:`` (train/data/tasks.py)::

    mixture:
      rate: {type: examples_proportional, maximum: 500000}
      members:
        - task: ag_news
        - {task: rte, few_shot: {k: 32, seed: 0}}   # k rows drawn with a seed; overrides the task's few_shot
        - mixture: nested.yaml        # its own rate; its members share the rate it gets here
      languages: {type: temperature, alpha: 0.3}   # optional: rates over languages too (below)

Rate types (``n`` = examples of a member after prompting, tokenizing and filtering):

=================  =============================================  ==========================================
type               rate of a member                               keys
=================  =============================================  ==========================================
weights            ``weight`` (given on every member)             -
examples_          ``min(n, maximum)``                            ``maximum`` (optional; no cap if absent)
proportional
temperature        ``min(n, maximum) ** (1 / temperature)``       ``temperature``, ``maximum`` (optional);
                   (cap first, as in T5 / seqio)
equal              ``1``                                          -
t0_per_template    every (task, template) pair is its own         ``cap`` (default 500000), ``rule``
                   source: ``min(n_t, cap / k)`` for ``rule:      (``min`` default | ``step``)
                   min``; ``step`` is t-zero's released code:
                   ``n_t`` if the task has ``<= cap`` rows per
                   template, else ``cap / k``
=================  =============================================  ==========================================

T0 made each (dataset, template) pair its own seqio task. Here a task holds all its templates, so under
``t0_per_template`` the sampler splits a task into one *sub-source* per template (``n_t`` = examples of
that template, ``k`` = number of templates of the task); every other rate type samples a task's rows
uniformly whatever their template. A nested mixture counts as one member whose ``n`` is the sum of its
examples (``t0_per_template`` treats it as one template); its members share that rate in proportion to
their own rates, so rates compose multiplicatively.

Languages (optional ``languages:``, BLOOMZ / xP3 / mT5 style). The mixture is first resolved as above into
leaf shares ``p_leaf``; the leaves are then grouped by their task's ``metadata.language`` and the languages
get rates of their own (``n_L`` = examples of the tasks of language ``L``)::

    P(leaf) = P(L) * p_leaf / sum(p of the leaves of L),    P(L) = rate_L / sum over languages of rate_L

=====================  ===============================================  =====================================
type                   rate of a language                               keys
=====================  ===============================================  =====================================
examples_proportional  ``min(n_L, maximum)`` (xP3)                      ``maximum`` (optional)
temperature            ``min(n_L, maximum) ** alpha`` with              exactly one of ``alpha`` /
                       ``alpha = 1 / temperature`` (mT5: alpha = 0.3)   ``temperature``; ``maximum`` (optional)
weights                ``weights[L]``                                   ``weights: {en: 3, zh: 1}``, one per language
equal                  ``1``                                            -
=====================  ===============================================  =====================================

So within a language the tasks (or templates) keep the proportions ``rate`` gave them. Only the top-level
mixture may have ``languages:`` (a nested file with one is an error); every task of the mixture then needs a
``metadata.language``.

:class:`MixtureStream` is an infinite stream of ``{"task", "index", "input_ids", "target_ids"}``:

* The source of position ``i`` is a pure function of ``(seed, i)``: positions are drawn in blocks
  of ``block_size`` from a generator seeded with ``(seed, block)``.
* The ``k``-th draw of a source is row ``perm_e(k mod n)`` of epoch ``e = k // n``, where ``perm_e`` is a
  keyed Feistel permutation of ``range(n)`` keyed by ``(seed, source name, e)``: a fresh shuffle every
  epoch, in O(1) memory whatever ``n``.
* So the state is ``(position, per-source counts at the start of the current block)``: restoring it
  regenerates one block, never replays the stream.
* ``lane(l, lanes)`` splits the stream into ``lanes`` independent lanes (data-parallel training builds
  each lane's rows on one rank, see :mod:`train.data.lanes`). Lane ``l`` draws its own sources from a
  generator seeded with ``(seed, lanes, l, block)``, and its ``k``-th draw of a source takes the source's
  *global* draw ``g = k * lanes + l``, i.e. row ``perm_e(g mod n)`` with ``e = g // n``: lanes interleave
  each source's epoch shuffle, so no two lanes take the same row within an epoch, and a lane's cost does
  not depend on how many lanes there are. ``lanes=1`` is the stream above.
"""

from __future__ import annotations

import bisect
import difflib
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from train.data.few_shot import FewShotSpec, overrides_conflict, parse_few_shot
from train.errors import ConfigError, DataError
from train.yamlfile import load_yaml

MIXTURE_KEYS = ("rate", "members", "languages")
MEMBER_KEYS = ("task", "mixture", "weight", "few_shot")
RATE_KEYS = {
    "weights": ("type",),
    "examples_proportional": ("type", "maximum"),
    "temperature": ("type", "temperature", "maximum"),
    "equal": ("type",),
    "t0_per_template": ("type", "cap", "rule"),
}
LANGUAGE_RATE_KEYS = {
    "examples_proportional": ("type", "maximum"),
    "temperature": ("type", "alpha", "temperature", "maximum"),
    "weights": ("type", "weights"),
    "equal": ("type",),
}
T0_RULES = ("min", "step")
T0_DEFAULT_CAP = 500_000  # t-zero's MAX_EXAMPLES_PER_DATASET
REPEAT_WARNING_EPOCHS = 4.0  # data-constrained scaling laws: returns fall off beyond ~4 epochs
DEFAULT_BLOCK_SIZE = 4096
STATE_FORMAT = 2  # 2: lanes (format 1 had rank/world_size sharding of one global stream)
TEMPLATE_SEPARATOR = "::"  # source name of a per-template sub-source: "<task>::<template>"

ExampleCounts = Mapping[str, "int | Mapping[str, int]"]


# --------------------------------------------------------------------------------------------------
# Spec: the typed, validated `mixture:` section
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateSpec:
    """How a mixture turns member sizes into rates. Unused fields are None."""

    type: str
    maximum: float | None = None
    temperature: float | None = None
    cap: float | None = None
    rule: str | None = None

    def member_rate(self, examples: int, weight: float | None) -> float:
        """Rate of a whole member (a task, or a nested mixture with ``examples`` in total)."""
        if self.type == "weights":
            assert weight is not None, "validated at parse time"
            return float(weight)
        if self.type == "equal":
            return 1.0
        capped = float(examples) if self.maximum is None else min(float(examples), self.maximum)
        if self.type == "examples_proportional":
            return capped
        if self.type == "temperature":
            return capped ** (1.0 / self.temperature)
        if self.type == "t0_per_template":  # a member seen as one template
            return self.template_rates({"": examples})[""]
        raise AssertionError(f"unhandled rate type {self.type}")

    def template_rates(self, per_template: Mapping[str, int]) -> dict[str, float]:
        """T0 per-template rates of one task: template -> rate (see the module docstring)."""
        assert self.type == "t0_per_template" and self.cap is not None
        share = self.cap / len(per_template)
        if self.rule == "step":
            rows = max(per_template.values())
            return {t: (share if rows > self.cap else float(n)) for t, n in per_template.items()}
        return {t: min(float(n), share) for t, n in per_template.items()}


@dataclass(frozen=True)
class LanguageSpec:
    """The ``mixture.languages:`` section: the rate of each language (see the module docstring)."""

    where: str  # "<file>: mixture.languages", for error messages
    rate: RateSpec  # its member_rate(n_L, weight) is the rate of a language
    weights: dict[str, float] | None = None  # language -> weight, for type 'weights'


@dataclass(frozen=True)
class MemberSpec:
    """One entry of ``mixture.members``: exactly one of ``task`` / ``mixture`` is set.

    ``few_shot`` overrides the task's own setting when ``overrides_few_shot`` (``few_shot: null`` = all rows).
    """

    where: str  # "<file>: mixture.members[i]", for error messages
    task: str | None = None
    mixture: MixtureSpec | None = None
    weight: float | None = None
    few_shot: FewShotSpec | None = None
    overrides_few_shot: bool = False


@dataclass(frozen=True)
class MixtureSpec:
    """The ``mixture:`` section of one file, nested mixtures already loaded."""

    path: Path
    rate: RateSpec
    members: tuple[MemberSpec, ...]
    languages: LanguageSpec | None = None  # top-level mixtures only

    def task_names(self) -> list[str]:
        """Every task the mixture (and its nested mixtures) samples from, sorted."""
        names: set[str] = set()
        for member in self.members:
            if member.task is not None:
                names.add(member.task)
            else:
                names.update(member.mixture.task_names())
        return sorted(names)

    def few_shot_overrides(self) -> dict[str, tuple[FewShotSpec | None, str]]:
        """task -> (its members' few-shot setting, where it was set), nested mixtures included.

        Raises:
            ConfigError: two members give the same task different settings (a task is rendered once).
        """
        out: dict[str, tuple[FewShotSpec | None, str]] = {}
        for member in self.members:
            found = member.mixture.few_shot_overrides() if member.mixture is not None else (
                {member.task: (member.few_shot, member.where)} if member.overrides_few_shot else {})
            for task, (spec, where) in found.items():
                if task in out and out[task][0] != spec:
                    raise overrides_conflict(task, out[task][0], spec, out[task][1], where)
                out.setdefault(task, (spec, where))
        return out


def _unknown_key_error(key: Any, allowed: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'.{hint} Valid keys: {', '.join(allowed)}.")


def _check_keys(mapping: Mapping, allowed: Sequence[str], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise _unknown_key_error(key, allowed, where)


def _number(value: Any, where: str, *, minimum: float, inclusive: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value < minimum if inclusive else value <= minimum):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ConfigError(f"{where} must be a number {bound}, got {value!r}.")
    return float(value)


def _rate_type(raw: Any, kinds: Mapping[str, Sequence[str]], where: str, example: str) -> str:
    """The ``type`` of a rate mapping, its keys checked against that type's (``kinds``: type -> keys)."""
    if not isinstance(raw, Mapping) or "type" not in raw:
        raise ConfigError(f"{where} must be a mapping with a 'type' (one of {', '.join(kinds)}), got {raw!r}. "
                          f"Example: {example}")
    rate_type = raw["type"]
    if rate_type not in kinds:
        close = difflib.get_close_matches(str(rate_type), list(kinds), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}.type: unknown rate type '{rate_type}'.{hint} Valid types: {', '.join(kinds)}.")
    _check_keys(raw, kinds[rate_type], where)
    return rate_type


def _parse_rate(raw: Any, where: str) -> RateSpec:
    rate_type = _rate_type(raw, RATE_KEYS, where, "rate: {type: examples_proportional, maximum: 500000}")
    maximum = raw.get("maximum")
    if maximum is not None:
        maximum = _number(maximum, f"{where}.maximum", minimum=0, inclusive=False)
    if rate_type == "temperature":
        if "temperature" not in raw:
            raise ConfigError(f"{where}: rate type 'temperature' needs a 'temperature' key (e.g. 2.0).")
        temperature = _number(raw["temperature"], f"{where}.temperature", minimum=0, inclusive=False)
        return RateSpec(type=rate_type, maximum=maximum, temperature=temperature)
    if rate_type == "t0_per_template":
        cap = _number(raw.get("cap", T0_DEFAULT_CAP), f"{where}.cap", minimum=1, inclusive=True)
        rule = raw.get("rule", "min")
        if rule not in T0_RULES:
            raise ConfigError(f"{where}.rule: unknown rule {rule!r}; valid: {', '.join(T0_RULES)}.")
        return RateSpec(type=rate_type, cap=cap, rule=rule)
    return RateSpec(type=rate_type, maximum=maximum)


def _parse_languages(raw: Any, where: str) -> LanguageSpec:
    rate_type = _rate_type(raw, LANGUAGE_RATE_KEYS, where, "languages: {type: temperature, alpha: 0.3}")
    if rate_type == "weights":
        table = raw.get("weights")
        if not isinstance(table, Mapping) or not table:
            raise ConfigError(f"{where}.weights must be a mapping language -> weight, e.g. {{en: 3, zh: 1}}; "
                              f"got {table!r}.")
        weights = {}
        for code, weight in table.items():
            if not isinstance(code, str):  # YAML 1.1 reads a bare `no` (Norwegian) as False
                raise ConfigError(f"{where}.weights: language {code!r} is not a string; quote it, e.g. 'no': 1.")
            weights[code] = _number(weight, f"{where}.weights.{code}", minimum=0, inclusive=False)
        return LanguageSpec(where=where, rate=RateSpec(type="weights"), weights=weights)
    maximum = raw.get("maximum")
    if maximum is not None:
        maximum = _number(maximum, f"{where}.maximum", minimum=0, inclusive=False)
    if rate_type == "temperature":
        if ("alpha" in raw) == ("temperature" in raw):
            raise ConfigError(f"{where}: type 'temperature' needs exactly one of 'alpha' (rate = n ** alpha; mT5 "
                              "uses 0.3) or 'temperature' (= 1 / alpha).")
        if "alpha" in raw:
            temperature = 1.0 / _number(raw["alpha"], f"{where}.alpha", minimum=0, inclusive=False)
        else:
            temperature = _number(raw["temperature"], f"{where}.temperature", minimum=0, inclusive=False)
        return LanguageSpec(where=where, rate=RateSpec(type=rate_type, maximum=maximum, temperature=temperature))
    return LanguageSpec(where=where, rate=RateSpec(type=rate_type, maximum=maximum))


def _read_yaml(path: Path, where: str) -> Mapping:
    if not path.is_file():
        raise ConfigError(f"{where}: mixture file {path} does not exist.")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({err}).") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: a mixture file must be a mapping with a 'mixture:' section.")
    return raw


def load_mixture_spec(path: str | Path, _stack: tuple[Path, ...] = ()) -> MixtureSpec:
    """Read and validate the ``mixture:`` section of a mixture file (nested mixtures included).

    Args:
        path: the mixture YAML. Nested ``mixture:`` members are resolved relative to its folder.

    Returns:
        The typed spec. Task names are checked later, by :func:`plan_mixture`, against the tasks loaded.

    Raises:
        ConfigError: missing file, bad YAML, unknown key (with the closest valid one), a rate, weight,
            maximum or temperature <= 0, a cap < 1, a member with both / neither of task and mixture, a
            duplicate member, an empty ``members`` list, a cycle of nested mixtures, a bad ``few_shot``
            (see :func:`train.data.few_shot.parse_few_shot`), a bad ``languages`` section, or one in a
            nested mixture.
    """
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise ConfigError(f"{path}: nested mixtures form a cycle: {chain}. Remove one of these includes.")
    raw = _read_yaml(path, str(_stack[-1]) if _stack else "mixture")
    # other top-level sections (tasks, include, eval, ...) belong to train/data/tasks.py, which validates them
    if "mixture" not in raw:
        raise ConfigError(f"{path}: no 'mixture:' section (needs 'rate' and 'members').")
    section = raw["mixture"]
    where = f"{path}: mixture"
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where} must be a mapping with 'rate' and 'members'.")
    _check_keys(section, MIXTURE_KEYS, where)
    for key in ("rate", "members"):
        if key not in section:
            raise ConfigError(f"{where}: missing '{key}'.")
    rate = _parse_rate(section["rate"], f"{where}.rate")
    languages = None
    if "languages" in section:
        if _stack:
            raise ConfigError(f"{where}.languages: only the top-level mixture's 'languages:' applies, and this file "
                              f"is nested in {_stack[0]}. Move it there, or remove it here.")
        languages = _parse_languages(section["languages"], f"{where}.languages")
    members_raw = section["members"]
    if not isinstance(members_raw, list) or not members_raw:
        raise ConfigError(f"{where}.members must be a non-empty list of '- task: NAME' / '- mixture: FILE'.")
    members: list[MemberSpec] = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(members_raw):
        mwhere = f"{where}.members[{i}]"
        if isinstance(entry, str):  # shorthand: `members: [ag_news, trec]`
            entry = {"task": entry}
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{mwhere} must be a task name or a mapping like '- task: NAME', got {entry!r}.")
        _check_keys(entry, MEMBER_KEYS, mwhere)
        if ("task" in entry) == ("mixture" in entry):
            raise ConfigError(f"{mwhere} needs exactly one of 'task' or 'mixture', got {dict(entry)!r}.")
        weight = None
        if rate.type == "weights":
            if "weight" not in entry:
                raise ConfigError(f"{mwhere}: rate type 'weights' needs a 'weight' on every member.")
            weight = _number(entry["weight"], f"{mwhere}.weight", minimum=0, inclusive=False)
        elif "weight" in entry:
            raise ConfigError(
                f"{mwhere}.weight is only used with rate type 'weights' (this mixture uses '{rate.type}'). "
                "Remove it, or use rate: {type: weights}."
            )
        if "task" in entry:
            name = entry["task"]
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{mwhere}.task must be a task name, got {name!r}.")
            key = ("task", name)
            member = MemberSpec(where=mwhere, task=name, weight=weight,
                                few_shot=parse_few_shot(entry.get("few_shot"), f"{mwhere} (task '{name}')"),
                                overrides_few_shot="few_shot" in entry)
        else:
            ref = entry["mixture"]
            if not isinstance(ref, str) or not ref:
                raise ConfigError(f"{mwhere}.mixture must be a file path, got {ref!r}.")
            if "few_shot" in entry:
                raise ConfigError(f"{mwhere}: few_shot applies to a task member; set it on the members or tasks of "
                                  f"{ref}.")
            nested_path = (path.parent / ref).resolve()
            key = ("mixture", str(nested_path))
            nested = load_mixture_spec(nested_path, (*_stack, path))
            member = MemberSpec(where=mwhere, mixture=nested, weight=weight)
        if key in seen:
            raise ConfigError(f"{mwhere}: {key[0]} '{key[1]}' is listed twice in the same mixture.")
        seen.add(key)
        members.append(member)
    return MixtureSpec(path=path, rate=rate, members=tuple(members), languages=languages)


# --------------------------------------------------------------------------------------------------
# Plan: spec + example counts -> sources with probabilities
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedSource:
    """One leaf of the mixture: a whole task (``template`` None) or one template of a task."""

    task: str
    template: str | None
    examples: int
    probability: float  # share of samples; all sources of a plan sum to 1
    language: str | None = None  # the task's metadata.language, when the planner was given it

    @property
    def name(self) -> str:
        return self.task if self.template is None else f"{self.task}{TEMPLATE_SEPARATOR}{self.template}"


@dataclass(frozen=True)
class MixturePlan:
    """The resolved mixture: its spec and its leaf sources, sorted by name."""

    spec: MixtureSpec
    sources: tuple[PlannedSource, ...]

    def task_shares(self) -> dict[str, float]:
        """Planned share of samples per task (templates summed)."""
        shares: dict[str, float] = {}
        for source in self.sources:
            shares[source.task] = shares.get(source.task, 0.0) + source.probability
        return shares

    def language_shares(self) -> dict[str | None, float]:
        """Planned share of samples per language (None: tasks without a language, or none given)."""
        shares: dict[str | None, float] = {}
        for source in self.sources:
            shares[source.language] = shares.get(source.language, 0.0) + source.probability
        return shares

    def task_language_shares(self) -> dict[tuple[str, str | None], float]:
        """Planned share of samples per (task, language), templates summed."""
        shares: dict[tuple[str, str | None], float] = {}
        for source in self.sources:
            key = (source.task, source.language)
            shares[key] = shares.get(key, 0.0) + source.probability
        return shares


def _per_template(count: int | Mapping[str, int], task: str) -> dict[str, int] | None:
    """Normalise one entry of the counts mapping; None for a plain (whole-task) count."""
    if isinstance(count, Mapping):
        return {str(t): int(n) for t, n in count.items()}
    if isinstance(count, (int, np.integer)) and not isinstance(count, bool):
        return None
    raise DataError(f"example count of task '{task}' must be an int or a mapping template -> int, got {count!r}.")


def _resolve(spec: MixtureSpec, counts: ExampleCounts) -> tuple[list[tuple[str, str | None, int, float]], int]:
    """Leaves (task, template, examples, share within ``spec``) and the total examples of ``spec``."""
    rates: list[float] = []
    member_leaves: list[list[tuple[str, str | None, int, float]]] = []
    total_examples = 0
    for member in spec.members:
        if member.mixture is not None:
            leaves, examples = _resolve(member.mixture, counts)
            rates.append(spec.rate.member_rate(examples, member.weight))
            member_leaves.append(leaves)
            total_examples += examples
            continue
        task = member.task
        if task not in counts:
            close = difflib.get_close_matches(task, list(counts), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{member.where}.task: unknown task '{task}'.{hint} "
                f"Known tasks: {', '.join(sorted(counts)) or '(none)'}. Define it under 'tasks:' or fix the name."
            )
        per_template = _per_template(counts[task], task)
        examples = sum(per_template.values()) if per_template is not None else int(counts[task])
        if examples <= 0:
            raise DataError(
                f"{member.where}.task: task '{task}' has no examples after prompting and filtering. "
                "Check its split, filters and templates, or remove it from the mixture."
            )
        total_examples += examples
        if spec.rate.type == "t0_per_template" and per_template is not None:
            template_rates = spec.rate.template_rates(per_template)
            rate = sum(template_rates.values())
            leaves = [
                (task, t, n, template_rates[t] / rate) for t, n in sorted(per_template.items()) if n > 0
            ]
        else:
            rate = spec.rate.member_rate(examples, member.weight)
            leaves = [(task, None, examples, 1.0)]
        rates.append(rate)
        member_leaves.append(leaves)
    total_rate = sum(rates)
    assert total_rate > 0, "every member rate is > 0 by validation"
    resolved = [
        (task, template, n, share * rate / total_rate)
        for rate, leaves in zip(rates, member_leaves)
        for task, template, n, share in leaves
    ]
    return resolved, total_examples


Leaves = dict[tuple[str, str | None], tuple[int, float]]  # (task, template) -> (examples, share)


def _by_language(spec: LanguageSpec, leaves: Leaves, counts: ExampleCounts,
                 languages: Mapping[str, str | None]) -> Leaves:
    """``leaves`` reweighted so that each language gets its rate (see the module docstring)."""
    language_of: dict[str, str] = {}
    for task, _ in leaves:
        code = languages.get(task)
        if not code:
            raise ConfigError(f"{spec.where}: task '{task}' has no language. Set `metadata.language` (an ISO 639 "
                              "code such as en) in its task file, or remove 'languages:' from the mixture.")
        language_of[task] = code
    examples: dict[str, int] = {}  # n_L: every task counted once, however many leaves it has
    for task, code in language_of.items():
        per_template = _per_template(counts[task], task)
        n = sum(per_template.values()) if per_template is not None else int(counts[task])
        examples[code] = examples.get(code, 0) + n
    codes = sorted(examples)
    if spec.weights is not None:
        for code in spec.weights:
            if code not in examples:
                close = difflib.get_close_matches(code, codes, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"{spec.where}.weights.{code}: no task of the mixture has language '{code}'.{hint} "
                                  f"The mixture's languages: {', '.join(codes)}.")
        missing = [code for code in codes if code not in spec.weights]
        if missing:
            raise ConfigError(f"{spec.where}.weights: no weight for the mixture's language(s) {', '.join(missing)}; "
                              "give every language of the mixture a weight.")
    rates = {code: spec.rate.member_rate(n, spec.weights[code] if spec.weights else None)
             for code, n in examples.items()}
    total_rate = sum(rates.values())
    within: dict[str, float] = {}  # sum of the leaf shares of each language
    for (task, _), (_, p) in leaves.items():
        within[language_of[task]] = within.get(language_of[task], 0.0) + p
    return {(task, template): (n, rates[language_of[task]] / total_rate * p / within[language_of[task]])
            for (task, template), (n, p) in leaves.items()}


def plan_mixture(
    spec: MixtureSpec, counts: ExampleCounts, languages: Mapping[str, str | None] | None = None
) -> MixturePlan:
    """Compute every source's share of samples.

    Args:
        spec: from :func:`load_mixture_spec`.
        counts: task -> examples after prompting, tokenizing and filtering (not raw rows), or task ->
            {template: examples} (needed for per-template sources under ``t0_per_template``; see
            :func:`count_examples`).
        languages: task -> its ``metadata.language`` (or None). Needed when the spec has ``languages:``;
            otherwise it only labels the sources (for :meth:`MixturePlan.language_shares`).

    Returns:
        The plan; a (task, template) reached through several nested mixtures gets the sum of its shares.

    Raises:
        ConfigError: a member names a task that is not in ``counts`` (the message lists the known ones);
            under ``languages:``, a task without a language, or a ``weights`` table that names a language
            no task has or misses one the tasks have.
        DataError: a member task has zero examples.
    """
    resolved, _ = _resolve(spec, counts)
    merged: Leaves = {}
    for task, template, n, p in resolved:
        old = merged.get((task, template), (n, 0.0))
        merged[(task, template)] = (n, old[1] + p)
    languages = languages or {}
    if spec.languages is not None:
        merged = _by_language(spec.languages, merged, counts, languages)
    sources = [PlannedSource(task, template, n, p, languages.get(task)) for (task, template), (n, p) in merged.items()]
    sources.sort(key=lambda s: s.name)
    return MixturePlan(spec=spec, sources=tuple(sources))


def count_examples(datasets: Mapping[str, Any]) -> dict[str, int | dict[str, int]]:
    """Example counts of tokenized datasets, per template when the dataset has a ``template`` column.

    Args:
        datasets: task -> ``datasets.Dataset`` (after prompting, tokenizing, filtering).

    Returns:
        task -> {template: count} if the dataset has a ``template`` column, else task -> count.
    """
    counts: dict[str, int | dict[str, int]] = {}
    for task, dataset in datasets.items():
        if "template" in dataset.column_names:
            names, groups = _template_groups(dataset)
            counts[task] = {name: len(group) for name, group in zip(names, groups)}
        else:
            counts[task] = len(dataset)
    return counts


# --------------------------------------------------------------------------------------------------
# Row lookup: a columnar view of the tokenized Arrow table (memory-mapped when the dataset is cached)
# --------------------------------------------------------------------------------------------------


CHOICE_COLUMNS = ("choice_ids", "choice_lengths")  # optional; passed through to the packer when present


class _TokenColumns:
    """Fast ``row -> (input_ids, target_ids)`` straight from the Arrow buffers (no per-row decoding).

    ``Dataset.__getitem__`` decodes a row through the formatter (tens of microseconds); slicing the
    list column's flat values with its offsets is a few microseconds and copies nothing up front, so
    memory stays flat whatever the dataset size.
    """

    def __init__(self, dataset: Any, task: str):
        for column in ("input_ids", "target_ids"):
            if column not in dataset.column_names:
                raise DataError(
                    f"task '{task}': the dataset has no '{column}' column; tokenize it first "
                    "(train.data.tokenization.tokenize_prompted)."
                )
        # A filtered/selected dataset keeps an indices mapping over its table; materialise it once so
        # row numbers below are the dataset's own row numbers.
        if getattr(dataset, "_indices", None) is not None:
            dataset = dataset.flatten_indices()
        self.num_rows = len(dataset)
        table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
        self._columns = [self._chunks(table.column(c)) for c in ("input_ids", "target_ids")]
        # The wrong answer choices ride along when tokenization made them (T-Few's choice losses, packing.py).
        has_choices = all(c in dataset.column_names for c in CHOICE_COLUMNS)
        self._choices = [self._chunks(table.column(c)) for c in CHOICE_COLUMNS] if has_choices else []

    @staticmethod
    def _chunks(column: Any) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
        starts, offsets, values = [], [], []
        row = 0
        for chunk in column.chunks:
            if len(chunk) == 0:
                continue
            starts.append(row)
            offsets.append(chunk.offsets.to_numpy())
            values.append(chunk.values.to_numpy(zero_copy_only=False))
            row += len(chunk)
        return starts, offsets, values

    def get(self, row: int) -> tuple[list[int], list[int]]:
        out = []
        for starts, offsets, values in self._columns:
            c = bisect.bisect_right(starts, row) - 1
            local = row - starts[c]
            off = offsets[c]
            out.append(values[c][off[local] : off[local + 1]].tolist())
        return out[0], out[1]

    def choices(self, row: int) -> dict[str, list[int]]:
        """``{"choice_ids", "choice_lengths"}`` of ``row`` (see train.data.tokenization), {} without those columns."""
        out = {}
        for name, (starts, offsets, values) in zip(CHOICE_COLUMNS, self._choices):
            c = bisect.bisect_right(starts, row) - 1
            off = offsets[c]
            out[name] = values[c][off[row - starts[c]] : off[row - starts[c] + 1]].tolist()
        return out

    def lengths(self) -> np.ndarray:
        """(num_rows,) tokens per example, input + target."""
        total = np.zeros(self.num_rows, dtype=np.int64)
        for starts, offsets, _ in self._columns:
            for start, off in zip(starts, offsets):
                total[start : start + len(off) - 1] += np.diff(off)
        return total


def _template_groups(dataset: Any) -> tuple[list[str], list[range | np.ndarray]]:
    """Template names and their rows: a range when the template's rows are contiguous (O(1) memory)."""
    if getattr(dataset, "_indices", None) is not None:  # see _TokenColumns
        dataset = dataset.flatten_indices()
    column = dataset.data.column("template")
    encoded = column.combine_chunks().dictionary_encode()
    names = [str(v) for v in encoded.dictionary.to_pylist()]
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    change = np.flatnonzero(np.diff(codes)) + 1
    run_starts = np.concatenate([[0], change]) if len(codes) else np.zeros(0, dtype=np.int64)
    run_codes = codes[run_starts] if len(codes) else codes
    groups: list[range | np.ndarray] = []
    for code in range(len(names)):
        runs = np.flatnonzero(run_codes == code)
        if len(runs) == 1:
            start = int(run_starts[runs[0]])
            end = int(run_starts[runs[0] + 1]) if runs[0] + 1 < len(run_starts) else len(codes)
            groups.append(range(start, end))
        else:
            groups.append(np.flatnonzero(codes == code))
    order = sorted(range(len(names)), key=lambda i: names[i])
    return [names[i] for i in order], [groups[i] for i in order]


# --------------------------------------------------------------------------------------------------
# Keyed permutations (Feistel network + cycle walking), vectorised over numpy uint64 arrays
# --------------------------------------------------------------------------------------------------

_FEISTEL_ROUNDS = 6
_U64 = np.uint64


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-mixed bijection of uint64 (wrapping arithmetic is intended)."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _permute(offsets: np.ndarray, sizes: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Element-wise ``perm_key(offset)``: a bijection of ``range(size)`` chosen by ``key``.

    Args:
        offsets, sizes, keys: (m,) arrays; ``0 <= offsets < sizes``.

    Returns:
        (m,) int64 permuted offsets.
    """
    with np.errstate(over="ignore"):
        x = offsets.astype(_U64)
        n = sizes.astype(_U64)
        bits = np.ones(len(n), dtype=np.int64)
        big = sizes > 1
        bits[big] = np.floor(np.log2((sizes[big] - 1).astype(np.float64))).astype(np.int64) + 1
        bits += (np.left_shift(np.int64(1), bits) < sizes).astype(np.int64)  # guard float rounding
        bits += bits & 1  # an even width splits into two equal halves
        half = (bits // 2).astype(_U64)
        mask = (_U64(1) << half) - _U64(1)
        round_keys = [_mix64(keys ^ _mix64(np.full(len(keys), r + 1, dtype=_U64))) for r in range(_FEISTEL_ROUNDS)]
        todo = np.arange(len(x))
        y = x.copy()
        while len(todo):
            v, h, m = y[todo], half[todo], mask[todo]
            left, right = v >> h, v & m
            for rk in round_keys:
                left, right = right, left ^ (_mix64(right ^ rk[todo]) & m)
            y[todo] = (left << h) | right
            # cycle walking: re-encrypt values that fell outside range(n); the domain is < 4n wide.
            todo = todo[y[todo] >= n[todo]]
    return y.astype(np.int64)


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


# --------------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSource:
    """A source of the stream: rows ``rows`` of the tokenized dataset of ``task``."""

    name: str
    task: str
    probability: float
    columns: _TokenColumns
    rows: range | np.ndarray  # dataset rows of this source (a range for a whole task / contiguous template)


class MixtureStream:
    """Infinite, seeded, exactly resumable stream over the sources of a mixture, splittable into lanes.

    Yields ``{"task": str, "index": int, "input_ids": list[int], "target_ids": list[int]}`` where
    ``index`` is the row of the task's tokenized dataset, plus ``choice_ids`` / ``choice_lengths`` when the
    dataset has those columns.
    """

    def __init__(
        self,
        sources: Sequence[StreamSource],
        seed: int,
        *,
        lane: int = 0,
        lanes: int = 1,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        if not sources:
            raise ConfigError("a mixture stream needs at least one source.")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"the mixture seed must be an int >= 0, got {seed!r}.")
        if lanes < 1 or not 0 <= lane < lanes:
            raise ConfigError(f"lane {lane} is not in range(lanes={lanes}).")
        for s in sources:
            if len(s.rows) == 0:
                raise DataError(f"source '{s.name}' has no examples; remove it from the mixture.")
        self.sources = tuple(sources)
        self.seed = int(seed)
        self.lane = lane
        self.lanes = lanes
        self.block_size = block_size
        probs = np.array([s.probability for s in sources], dtype=np.float64)
        if not np.all(probs > 0):
            raise ConfigError("every source probability must be > 0.")
        self._cumulative = np.cumsum(probs / probs.sum())
        self._cumulative[-1] = 1.0
        self._sizes = np.array([len(s.rows) for s in sources], dtype=np.int64)
        self._source_keys = np.array([_name_key(s.name) for s in sources], dtype=_U64)
        self._seed_key = _mix64(np.array([self.seed], dtype=_U64))[0]
        self._position = 0  # next position of this lane
        self._block = 0
        self._block_counts = np.zeros(len(sources), dtype=np.int64)  # this lane's draws per source before self._block
        self._load_block()

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_plan(
        cls, plan: MixturePlan, datasets: Mapping[str, Any], seed: int, *, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> MixtureStream:
        """Build the 1-rank stream of ``plan`` over tokenized ``datasets`` (task -> ``datasets.Dataset``).

        Raises:
            ConfigError: a planned task has no dataset.
            DataError: a dataset lacks ``input_ids``/``target_ids``, or its size differs from the plan.
        """
        columns: dict[str, _TokenColumns] = {}
        templates: dict[str, dict[str, range | np.ndarray]] = {}
        sources = []
        for planned in plan.sources:
            if planned.task not in datasets:
                raise ConfigError(
                    f"no tokenized dataset for task '{planned.task}' of mixture {plan.spec.path}; "
                    f"got datasets for: {', '.join(sorted(datasets))}."
                )
            dataset = datasets[planned.task]
            if planned.task not in columns:
                columns[planned.task] = _TokenColumns(dataset, planned.task)
            if planned.template is None:
                rows: range | np.ndarray = range(columns[planned.task].num_rows)
            else:
                if planned.task not in templates:
                    names, groups = _template_groups(dataset)
                    templates[planned.task] = dict(zip(names, groups))
                rows = templates[planned.task].get(planned.template, range(0))
            if len(rows) != planned.examples:
                raise DataError(
                    f"source '{planned.name}': the dataset has {len(rows)} examples but the plan was made "
                    f"for {planned.examples}. Re-plan the mixture from the same tokenized datasets."
                )
            sources.append(StreamSource(planned.name, planned.task, planned.probability, columns[planned.task], rows))
        return cls(sources, seed, block_size=block_size)

    def lane_stream(self, lane: int, lanes: int) -> MixtureStream:
        """Lane ``lane`` of ``lanes`` of this (1-lane) stream, at its start; see the module docstring."""
        if self.lanes != 1:
            raise ConfigError(f"split a 1-lane stream into lanes; this one is already lane {self.lane} of {self.lanes}.")
        return MixtureStream(self.sources, self.seed, lane=lane, lanes=lanes, block_size=self.block_size)

    # -- block machinery ---------------------------------------------------------------------------

    def _block_sources(self, block: int) -> np.ndarray:
        """(block_size,) source id of every position of ``block``: a pure function of (seed, lanes, lane, block)."""
        key = [self.seed, block] if self.lanes == 1 else [self.seed, self.lanes, self.lane, block]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))
        ids = np.searchsorted(self._cumulative, rng.random(self.block_size), side="right")
        return np.minimum(ids, len(self.sources) - 1)

    def _load_block(self) -> None:
        """Compute source and row of every position of ``self._block``."""
        ids = self._block_sources(self._block)
        # occurrence of each position within its source (stable group rank)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        within = np.arange(len(ids)) - np.searchsorted(sorted_ids, sorted_ids, side="left")
        draws = np.empty(len(ids), dtype=np.int64)
        draws[order] = within
        draws += self._block_counts[ids]  # (block_size,) this lane's draw number k of the position's source
        draws = draws * self.lanes + self.lane  # the source's global draw g, interleaved over lanes
        self._ids = ids
        sizes = self._sizes[ids]
        epochs = draws // sizes
        keys = _mix64(_mix64(self._seed_key ^ self._source_keys[ids]) ^ epochs.astype(_U64))
        self._rows = _permute(draws % sizes, sizes, keys)

    def _seek(self, position: int) -> None:
        """Move forward to the block holding ``position`` (blocks in between only count their draws)."""
        block = position // self.block_size
        while self._block < block:
            self._block_counts += np.bincount(self._ids, minlength=len(self.sources))
            self._block += 1
            if self._block < block:
                self._ids = self._block_sources(self._block)
        self._load_block()

    # -- iteration ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        position = self._position
        j = position - self._block * self.block_size
        if j >= self.block_size:
            self._seek(position)
            j = position - self._block * self.block_size
        source = self.sources[self._ids[j]]
        offset = int(self._rows[j])
        row = source.rows[offset] if isinstance(source.rows, range) else int(source.rows[offset])
        input_ids, target_ids = source.columns.get(row)
        self._position = position + 1
        return {"task": source.task, "index": int(row), "input_ids": input_ids, "target_ids": target_ids,
                **source.columns.choices(row)}

    def take(self, count: int) -> list[dict]:
        """The next ``count`` items."""
        return [next(self) for _ in range(count)]

    # -- state -------------------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Next position of this lane (= items it has yielded)."""
        return self._position

    def epochs(self) -> dict[str, int]:
        """Current epoch of every source, as seen by this lane: the epoch of its next draw of the source."""
        j = min(self._position - self._block * self.block_size, self.block_size)
        counts = self._block_counts + np.bincount(self._ids[:j], minlength=len(self.sources))
        return {s.name: int((c * self.lanes + self.lane) // n) for s, c, n in zip(self.sources, counts, self._sizes)}

    def state_dict(self) -> dict:
        """A small JSON-able dict; :meth:`load_state_dict` on an identically built stream resumes exactly."""
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "lane": self.lane,
            "lanes": self.lanes,
            "block_size": self.block_size,
            "position": int(self._position),
            "block": int(self._block),
            "block_counts": [int(c) for c in self._block_counts],
            "sources": [[s.name, len(s.rows), float(s.probability)] for s in self.sources],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a position in O(1) (one block regenerated, nothing replayed).

        Raises:
            ConfigError: the state belongs to a different mixture, seed, lane layout or format.
        """
        expected = self.state_dict()
        for key in ("format", "seed", "lane", "lanes", "block_size"):
            if state.get(key) != expected[key]:
                raise ConfigError(
                    f"cannot resume the mixture stream: saved {key}={state.get(key)!r} but this run has "
                    f"{expected[key]!r}. Resume with the same mixture, seed and `data.lanes`."
                )
        if [list(s) for s in state.get("sources", [])] != expected["sources"]:
            saved = {s[0] for s in state.get("sources", [])}
            now = {s[0] for s in expected["sources"]}
            diff = sorted(saved ^ now) or ["(same names; sizes or rates differ)"]
            raise ConfigError(
                "cannot resume the mixture stream: its sources changed since the checkpoint "
                f"(differences: {', '.join(diff)}). Resume with the same mixture and data."
            )
        block, position = int(state["block"]), int(state["position"])
        if not block * self.block_size <= position:
            raise ConfigError(f"corrupt mixture stream state: position {position} for block {block}.")
        self._block = block
        self._block_counts = np.asarray(state["block_counts"], dtype=np.int64)
        self._position = position
        self._load_block()
        if position >= (block + 1) * self.block_size:
            self._seek(position)
