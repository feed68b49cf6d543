"""Prompted eval examples -> tokenized items: one :class:`RankItem` per example with answer choices, one
:class:`GenItem` per example scored on generated text, grouped by (dataset, template).

How a prompt and an answer choice become tokens is the *scoring convention* (:class:`Scoring`), recorded in
every results JSON. Two are built in:

``t0`` (the default; how T0 scored, and how this stack trains):

    encdec            encoder input = tokens(inputs) + [eos]     choice = tokens(choice) + [eos]
    decoder/prefix_lm prompt        = tokens(inputs)             choice = tokens(" " + choice) + [eos]

``lm-eval`` (lm-evaluation-harness's ``loglikelihood(context, continuation)`` with its HF model class, the
continuation being ``" " + choice``, its default ``target_delimiter``):

    encdec            encoder input = tokenizer(inputs)          choice = tokens(" " + choice)
                      (the tokenizer's own special tokens: T5's appends eos)
    decoder/prefix_lm whole = tokenizer(inputs + " " + choice);  prompt = tokenizer(inputs);
                      choice = whole[len(prompt):]   (tokenized together, then split; a trailing space of
                      the prompt moves to the choice; BOS only where the tokenizer adds it)

The choice's eos (``choice_eos``) and the separator (``choice_separator``) can also be set on their own.

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
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from train.errors import ConfigError, DataError
from train.evaluation.metrics import GENERATION_METRICS

MODEL_KINDS = ("encdec", "decoder", "prefix_lm")
REQUIRED_KEYS = ("inputs", "targets", "dataset", "template")

# Skip reasons (counted per (dataset, template), reported in results and the table).
SKIP_NO_CHOICES = "no_answer_choices"
SKIP_GOLD_NOT_IN_CHOICES = "gold_not_in_choices"
SKIP_NO_TARGETS = "no_targets"
SKIP_UNSUPPORTED_METRIC = "unsupported_metric"
SKIP_EMPTY_CHOICE = "empty_choice_tokens"  # a choice with no token to score (no eos, empty text)


@dataclass(frozen=True)
class Scoring:
    """How a prompt and its answer choices are tokenized for rank classification (see the module docstring).

    Attributes:
        name: "t0", "lm-eval", or "custom" once a field is changed from its preset.
        choice_eos: every answer choice ends with eos (T0; the model is trained to end its answers so).
        choice_separator: text put between prompt and choice; None = the preset's per-kind default
            (t0: "" for encdec, " " for decoders; lm-eval: " " for both).
        joint_tokenization: decoder choices are tokenized with their prompt and split off (the harness),
            not on their own.
        tokenizer_special_tokens: prompts get the tokenizer's own special tokens (BOS, T5's eos) instead of
            this stack's (encdec: + eos; decoder: none).
    """

    name: str = "t0"
    choice_eos: bool = True
    choice_separator: Optional[str] = None
    joint_tokenization: bool = False
    tokenizer_special_tokens: bool = False

    def separator(self, kind: str) -> str:
        if self.choice_separator is not None:
            return self.choice_separator
        return "" if kind == "encdec" and self.name == "t0" else " "

    def max_prompt_tokens(self, kind: str, model_config, tokenizer) -> Optional[int]:
        """The prompt cap this convention implies: under lm-eval, an encoder input keeps its last
        :func:`harness_max_length` tokens as the harness cuts it; otherwise None (no cut)."""
        if kind == "encdec" and self.tokenizer_special_tokens:
            return harness_max_length(model_config, tokenizer)
        return None

    def describe(self, kind: str, length_normalized: bool = False) -> dict:
        """The ``scoring`` entry of a results JSON: every setting, resolved for ``kind``."""
        out = asdict(self)
        out.update(choice_separator=self.separator(kind), kind=kind,
                   score="mean token log-probability (length-normalised)" if length_normalized
                   else "summed token log-probability")
        return out


def harness_max_length(model_config, tokenizer) -> int:
    """The prompt length lm-evaluation-harness's HF model class allows: the model config's ``n_positions``,
    ``max_position_embeddings`` or ``n_ctx``, else the tokenizer's ``model_max_length``, else 2048."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**9 else 2048


SCORINGS = {"t0": Scoring(), "lm-eval": Scoring("lm-eval", choice_eos=False, joint_tokenization=True,
                                                tokenizer_special_tokens=True)}


def resolve_scoring(name: str = "t0", *, choice_eos: Optional[bool] = None,
                    choice_separator: Optional[str] = None) -> Scoring:
    """A preset (``t0`` | ``lm-eval``) with optional overrides; a changed preset is named "custom".

    Raises:
        ConfigError: an unknown preset.
    """
    if name not in SCORINGS:
        raise ConfigError(f"unknown scoring convention {name!r}; valid: {', '.join(SCORINGS)} (eval.scoring / "
                          "mtf eval --scoring). t0 ends every answer choice with eos as training does; lm-eval "
                          "reproduces lm-evaluation-harness's loglikelihood requests.")
    preset = SCORINGS[name]
    changed = {k: v for k, v in (("choice_eos", choice_eos), ("choice_separator", choice_separator))
               if v is not None and v != getattr(preset, k)}
    return replace(preset, name="custom", **changed) if changed else preset


@dataclass
class RankItem:
    """One tokenized rank-classification example.

    Attributes:
        index: position of the example in the flattened evaluation list (global, same on every rank).
        prompt_ids: encoder input (encdec) or prompt tokens (decoder / prefix_lm).
        choice_ids: one token list per answer choice (ending with eos under the t0 convention).
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
    """Prompt and choice token ids for one model kind and scoring convention.

    Every distinct text is tokenized once, and all texts of an eval set in one batched tokenizer call
    (:meth:`prepare`): the fast tokenizers encode a batch in parallel, which is several times faster than
    one call per text.
    """

    def __init__(self, tokenizer, kind: str, max_input_tokens: int | None, scoring: Scoring):
        self.tokenizer, self.kind, self.max_input_tokens, self.scoring = tokenizer, kind, max_input_tokens, scoring
        self.eos = int(tokenizer.eos_token_id)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = int(bos) if bos is not None else self.eos
        self.separator = scoring.separator(kind)
        self.cache: dict[tuple[str, bool], list[int]] = {}

    def prepare(self, examples: Sequence[dict]) -> None:
        """Tokenize every prompt and choice text of ``examples`` in batched calls."""
        wanted: dict[tuple[str, bool], None] = {}
        for ex in examples:
            prompt = str(ex["inputs"])
            wanted[self._prompt_text(prompt)] = None
            for choice in ex.get("answer_choices") or ():
                for key in self._choice_texts(prompt, str(choice)):
                    wanted[key] = None
        for specials in (False, True):
            todo = [text for text, sp in wanted if sp is specials and (text, sp) not in self.cache]
            if todo:
                encoded = self.tokenizer(todo, add_special_tokens=specials)["input_ids"]
                self.cache.update(((text, specials), list(ids)) for text, ids in zip(todo, encoded))

    def _encode(self, key: tuple[str, bool]) -> list[int]:
        ids = self.cache.get(key)
        if ids is None:
            text, specials = key
            ids = self.cache[key] = list(self.tokenizer(text, add_special_tokens=specials)["input_ids"])
        return ids

    def _split(self, prompt: str, choice: str) -> tuple[str, str]:
        """(context, continuation); under joint tokenization the prompt's trailing whitespace joins the choice."""
        continuation = self.separator + choice
        if not self.scoring.joint_tokenization:
            return prompt, continuation
        context = prompt.rstrip()
        return context, prompt[len(context):] + continuation

    def _prompt_text(self, prompt: str) -> tuple[str, bool]:
        return self._split(prompt, "")[0], self.scoring.tokenizer_special_tokens

    def _choice_texts(self, prompt: str, choice: str) -> list[tuple[str, bool]]:
        """The texts whose tokens make a choice: (context + continuation, context) or (continuation,)."""
        context, continuation = self._split(prompt, choice)
        if self.kind != "encdec" and self.scoring.joint_tokenization and context:
            specials = self.scoring.tokenizer_special_tokens
            return [(context + continuation, specials), (context, specials)]
        return [(continuation, False)]

    def prompt(self, text: str) -> list[int]:
        ids, cap = self._encode(self._prompt_text(text)), self.max_input_tokens
        if self.kind == "encdec":
            if self.scoring.tokenizer_special_tokens:  # the harness keeps the end of an over-long encoder input
                return ids[-cap:] if cap is not None and len(ids) > cap else ids
            ids = ids + [self.eos]
            if cap is not None and len(ids) > cap:
                ids = ids[: max(cap - 1, 0)] + ids[-1:]  # the start of the prompt and its final (eos) token
            return ids
        if cap is not None and len(ids) > cap:
            ids = ids[len(ids) - cap :]  # decoders keep the end of the prompt, next to the answer
        # A decoder needs at least one prompt position to predict the first choice token from.
        return ids if ids else [self.bos]

    def choice(self, text: str, prompt: str) -> list[int]:
        texts = self._choice_texts(prompt, text)
        if len(texts) == 2:  # tokenized with the prompt, then split off it (the harness's decoder requests)
            ids = self._encode(texts[0])[len(self._encode(texts[1])):]
        else:
            ids = self._encode(texts[0])
        return ids + [self.eos] if self.scoring.choice_eos else list(ids)


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
    scoring: Scoring = SCORINGS["t0"],
) -> EvalItems:
    """Validate and tokenize prompted eval examples (arguments: see :class:`ZeroShotEvaluator`).

    ``max_examples_per_template`` keeps the examples of source rows ``0..N-1`` (``example_index``; the n-th
    example of its (dataset, template) when absent): the rows ``mtf eval --max-examples-per-template N``
    renders, so a capped eval during training scores what the command scores.

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
    encoder = _Encoder(tokenizer, kind, max_input_tokens, scoring)
    out = EvalItems()
    if max_examples_per_template is not None:
        examples = _first_per_pair(examples, max_examples_per_template)
    encoder.prepare(examples)
    for ex in examples:
        key = (str(ex["dataset"]), str(ex["template"]))
        group = out.groups.get(key)
        if group is None:
            group = out.groups[key] = EvalGroup(key[0], key[1], str(ex.get("task", f"{key[0]}/{key[1]}")))
        position = len(group.indices) + sum(group.skipped.values())  # examples of this pair before this one
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
            prompt = str(ex["inputs"])
            choice_ids = [encoder.choice(c, prompt) for c in choices]
            if not all(choice_ids):
                group.skipped[SKIP_EMPTY_CHOICE] += 1
                continue
            out.rank_items.append(RankItem(index, encoder.prompt(prompt), choice_ids, gold))
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


def _row(ex: Mapping, position: int) -> int:
    """The example's source row (``example_index``), else its position within its (dataset, template)."""
    row = ex.get("example_index")
    return position if row is None else int(row)


def _first_per_pair(examples: Sequence[dict], cap: int) -> list[dict]:
    """The examples a capped eval keeps: those of source rows ``0..cap-1`` (see :func:`build_eval_items`)."""
    seen: Counter = Counter()
    out = []
    for ex in examples:
        key = (ex["dataset"], ex["template"])
        if _row(ex, seen[key]) < cap:
            out.append(ex)
        seen[key] += 1
    return out
