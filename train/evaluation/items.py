"""Prompted eval examples -> tokenized items: one :class:`RankItem` per example with answer choices, one
:class:`GenItem` per example scored on generated text, grouped by (dataset, template).

Tokens are laid out exactly as training produced them:

    encdec            encoder input = tokens(inputs) + [eos]     choice = tokens(choice) + [eos]
    decoder/prefix_lm prompt        = tokens(inputs)             choice = tokens(" " + choice) + [eos]

Every example is validated before anything is tokenized, so a contract violation fails here and never
midway through scoring. Examples that cannot be scored are counted per (dataset, template) under a
skip reason and reported next to the scores.

Each item also knows its example, ``(task, example_index)``: the same source row rendered by several
templates, which the T-Few protocol (:mod:`train.evaluation.results`) needs. An example without an
``example_index`` counts as the n-th example of its (dataset, template).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from train.errors import ConfigError, DataError
from train.evaluation.metrics import GENERATION_METRICS

MODEL_KINDS = ("encdec", "decoder", "prefix_lm")
REQUIRED_KEYS = ("inputs", "targets", "dataset", "template")

# Skip reasons (counted per (dataset, template), reported in results and the table).
SKIP_NO_CHOICES = "no_answer_choices"
SKIP_GOLD_NOT_IN_CHOICES = "gold_not_in_choices"
SKIP_NO_TARGETS = "no_targets"
SKIP_UNSUPPORTED_METRIC = "unsupported_metric"


@dataclass
class RankItem:
    """One tokenized rank-classification example.

    Attributes:
        index: position of the example in the flattened evaluation list (global, same on every rank).
        prompt_ids: encoder input (encdec) or prompt tokens (decoder / prefix_lm).
        choice_ids: one token list per answer choice, each ending with eos.
        gold: indices of the choices that count as correct (targets[0] first).
    """

    index: int
    prompt_ids: list[int]
    choice_ids: list[list[int]]
    gold: list[int]

    def cost(self) -> tuple[int, int]:
        return len(self.prompt_ids), max(len(c) for c in self.choice_ids)


@dataclass
class GenItem:
    """One generation example: the prompt tokens and the reference texts."""

    index: int
    prompt_ids: list[int]
    references: list[str]


@dataclass
class EvalGroup:
    """Bookkeeping for one (dataset, template)."""

    dataset: str
    template: str
    task: str
    mode: str = "rank"  # "rank" | "generate"
    metrics: tuple[str, ...] = ()
    indices: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    num_choices: list[int] = field(default_factory=list)


@dataclass
class EvalItems:
    """Everything scoring and aggregation need, built once per eval set (cheap to re-score in training)."""

    rank_items: list[RankItem] = field(default_factory=list)
    gen_items: list[GenItem] = field(default_factory=list)
    groups: dict[tuple[str, str], EvalGroup] = field(default_factory=dict)
    group_of: dict[int, tuple[str, str]] = field(default_factory=dict)  # item index -> (dataset, template)
    example_of: dict[int, tuple[str, int]] = field(default_factory=dict)  # item index -> (task, example_index)
    cluster_of: dict[str, str] = field(default_factory=dict)
    language_of: dict[str, str] = field(default_factory=dict)


def flatten_examples(examples_by_task: Mapping[str, Sequence[dict]] | Sequence[dict]) -> list[dict]:
    if isinstance(examples_by_task, Mapping):
        return [ex for task in examples_by_task for ex in examples_by_task[task]]
    return list(examples_by_task)


def _normalize_metric_names(names: Iterable[str] | None) -> list[str]:
    return [str(n).strip().lower() for n in (names or [])]


class _Encoder:
    """Prompt and choice token ids for one model kind, each distinct text tokenized once."""

    def __init__(self, tokenizer, kind: str, max_input_tokens: int | None):
        self.tokenizer, self.kind, self.max_input_tokens = tokenizer, kind, max_input_tokens
        self.eos = int(tokenizer.eos_token_id)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = int(bos) if bos is not None else self.eos
        self.cache: dict[str, list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        ids = self.cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self.cache[text] = ids
        return ids

    def prompt(self, text: str) -> list[int]:
        ids, cap = self._encode(text), self.max_input_tokens
        if self.kind == "encdec":
            if cap is not None:
                ids = ids[: max(cap - 1, 0)]
            return ids + [self.eos]
        if cap is not None and len(ids) > cap:
            ids = ids[len(ids) - cap :]  # decoders keep the end of the prompt, next to the answer
        # A decoder needs at least one prompt position to predict the first choice token from.
        return ids if ids else [self.bos]

    def choice(self, text: str) -> list[int]:
        return self._encode(text if self.kind == "encdec" else " " + text) + [self.eos]


def build_eval_items(
    tokenizer,
    examples_by_task: Mapping[str, Sequence[dict]] | Sequence[dict],
    *,
    kind: str,
    metrics: Mapping[str, Sequence[str]] | None = None,
    clusters: Mapping[str, str] | None = None,
    languages: Mapping[str, str] | None = None,
    max_examples_per_template: int | None = None,
    max_input_tokens: int | None = None,
) -> EvalItems:
    """Validate and tokenize prompted eval examples (arguments: see :class:`ZeroShotEvaluator`).

    Raises:
        ConfigError: unknown kind, tokenizer without eos.
        DataError: an example lacks a required key, or no example at all can be evaluated.
    """
    if kind not in MODEL_KINDS:
        raise ConfigError(f"evaluation: unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    if tokenizer.eos_token_id is None:
        raise ConfigError("evaluation: the tokenizer has no eos token; choices must end with eos as in training")
    examples = flatten_examples(examples_by_task)
    for pos, ex in enumerate(examples):
        missing = [k for k in REQUIRED_KEYS if k not in ex]
        if missing:
            raise DataError(
                f"evaluation example #{pos} (dataset={ex.get('dataset')!r}, template={ex.get('template')!r}) "
                f"lacks {missing}; prompted examples need {list(REQUIRED_KEYS)} (+ answer_choices)"
            )
    metrics, clusters, languages = metrics or {}, dict(clusters or {}), dict(languages or {})
    encoder = _Encoder(tokenizer, kind, max_input_tokens)
    out = EvalItems()
    cap = max_examples_per_template
    for ex in examples:
        key = (str(ex["dataset"]), str(ex["template"]))
        group = out.groups.get(key)
        if group is None:
            group = out.groups[key] = EvalGroup(key[0], key[1], str(ex.get("task", f"{key[0]}/{key[1]}")))
        position = len(group.indices) + sum(group.skipped.values())  # examples of this pair before this one
        if cap is not None and position >= cap:
            continue
        dataset = key[0]
        if dataset not in out.cluster_of:
            out.cluster_of[dataset] = clusters.get(dataset, ex.get("cluster") or "other")
            out.language_of[dataset] = languages.get(dataset, ex.get("language") or "en")
        targets = [str(t) for t in (ex.get("targets") or [])]
        choices = [str(c) for c in (ex.get("answer_choices") or [])]
        if not targets:
            group.skipped[SKIP_NO_TARGETS] += 1
            continue
        index = len(out.group_of)
        if choices:
            stripped = [c.strip() for c in choices]
            if targets[0].strip() not in stripped:
                group.skipped[SKIP_GOLD_NOT_IN_CHOICES] += 1
                continue
            gold = sorted({stripped.index(t.strip()) for t in targets if t.strip() in stripped})
            out.rank_items.append(RankItem(index, encoder.prompt(str(ex["inputs"])),
                                           [encoder.choice(c) for c in choices], gold))
            group.num_choices.append(len(choices))
        else:
            names = _normalize_metric_names(ex.get("metrics") or metrics.get(f"{key[0]}/{key[1]}") or metrics.get(key[0]))
            if not names:
                group.skipped[SKIP_NO_CHOICES] += 1
                continue
            computed = tuple(dict.fromkeys(m for n in names for m in GENERATION_METRICS.get(n, ())))
            if not computed:
                group.skipped[f"{SKIP_UNSUPPORTED_METRIC}:{','.join(names)}"] += 1
                continue
            group.mode, group.metrics = "generate", computed
            out.gen_items.append(GenItem(index, encoder.prompt(str(ex["inputs"])), targets))
        group.indices.append(index)
        out.group_of[index] = key
        example_index = ex.get("example_index")
        out.example_of[index] = (str(ex.get("task", group.task)), int(position if example_index is None else example_index))
    if not out.group_of:
        detail = "; ".join(f"{d}/{t}: {dict(g.skipped)}" for (d, t), g in out.groups.items())
        raise DataError(
            f"evaluation: no example can be evaluated ({detail or 'no examples given'}). Rank classification "
            "needs answer_choices containing targets[0]; generation needs template metrics "
            f"(one of {sorted(GENERATION_METRICS)})"
        )
    return out
