"""Zero-shot evaluation: rank classification and generation (metrics and aggregation: train.eval_results).

Rank classification scores every answer choice of a prompted example by the log-probability the model
gives to the choice's target tokens, exactly as training would have produced them:

    encdec            encoder input = tokens(inputs) + [eos]     choice = tokens(choice) + [eos]
    decoder/prefix_lm prompt        = tokens(inputs)             choice = tokens(" " + choice) + [eos]

Two scores are reported side by side: the sum of the choice's token log-probabilities (what T0 uses)
and the same divided by the number of choice tokens (length-normalised). The prediction is the argmax;
ties go to the first choice.

How the forward passes are shared (the reason this is faster than t-zero, which re-runs the whole
model once per choice)::

    encdec:    encoder(prompt_1..prompt_B)  ONCE  -> states (B, S, d)
               index_select over choices          -> states (N, S, d), N = total choices in the batch
               decoder(choice_1..choice_N, cross-attending to the repeated states)
    decoder:   model(prompt_1..prompt_B, use_cache) ONCE -> past_key_values (B, ...) + next-token logits
    prefix_lm  cache.batch_select_indices(choice -> example) -> (N, ...)
               model(choice_1..choice_N, past_key_values, explicit position ids and mask)

Every sequence is padded on the right with explicit position ids and masks, so a score does not depend
on the batch it was put in, nor on the tokenizer's padding side (tests check 1e-5 for batch sizes 1, 3, 8).

Distributed: example ``i`` is scored by rank ``i % world_size``; ranks exchange ``(global_index, scores)``
with ``gather_object`` and the merged result has every example exactly once (accelerate's
``gather_for_metrics`` would duplicate the last batch). Under DeepSpeed ZeRO-3 every rank must call the
model the same number of times (each forward all-gathers parameters), so ranks with fewer batches run
dummy batches whose results are dropped, and generation uses ``generate(synced_gpus=True)``.

Aggregation follows the T0 paper: per (dataset, template) accuracy or metric; per dataset median (the
headline number), mean, min and max over templates; per task cluster and per language the mean of the
dataset medians.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from train.errors import ConfigError, DataError
from train.eval_results import GENERATION_METRICS, _mean, aggregate, generation_metrics

MODEL_KINDS = ("encdec", "decoder", "prefix_lm")
REQUIRED_KEYS = ("inputs", "targets", "dataset", "template")

# Skip reasons (counted per (dataset, template), reported in results and the table).
SKIP_NO_CHOICES = "no_answer_choices"
SKIP_GOLD_NOT_IN_CHOICES = "gold_not_in_choices"
SKIP_NO_TARGETS = "no_targets"
SKIP_UNSUPPORTED_METRIC = "unsupported_metric"



# --------------------------------------------------------------------------------------------------
# Preparing examples
# --------------------------------------------------------------------------------------------------


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
class _Group:
    """Bookkeeping for one (dataset, template)."""

    dataset: str
    template: str
    task: str
    mode: str = "rank"  # "rank" | "generate"
    metrics: tuple[str, ...] = ()
    indices: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    num_choices: list[int] = field(default_factory=list)


def _flatten_examples(examples_by_task: Mapping[str, Sequence[dict]] | Sequence[dict]) -> list[dict]:
    if isinstance(examples_by_task, Mapping):
        return [ex for task in examples_by_task for ex in examples_by_task[task]]
    return list(examples_by_task)


def _normalize_metric_names(names: Iterable[str] | None) -> list[str]:
    return [str(n).strip().lower() for n in (names or [])]


def _encode(tokenizer, text: str, cache: dict[str, list[int]]) -> list[int]:
    ids = cache.get(text)
    if ids is None:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        cache[text] = ids
    return ids


class ZeroShotEvaluator:
    """Tokenizes an evaluation set once; call it with a model to evaluate (cheap to re-run in training).

    Args:
        tokenizer: a Hugging Face tokenizer with an eos token.
        examples_by_task: prompted examples (see COMMON contract), flat or grouped by task name.
        kind: "encdec", "decoder" or "prefix_lm".
        metrics: optional mapping "dataset/template" or "dataset" -> PromptSource metric names, used for
            templates without answer choices (generation). An example's own "metrics" key wins.
        clusters: optional mapping dataset -> task cluster (nli, coreference, ...). An example's own
            "cluster" key is used when the mapping lacks the dataset.
        languages: optional mapping dataset -> language; else the example's "language" key, else "en".
        max_examples_per_template: keep only the first N examples of each (dataset, template).
        max_input_tokens: truncate long prompts (encdec keeps the first tokens + eos, decoder kinds keep
            the last ones, next to the answer). None = no truncation.

    Raises:
        ConfigError: unknown kind, tokenizer without eos.
        DataError: an example lacks a required key, or no example at all can be evaluated.
    """

    def __init__(
        self,
        tokenizer,
        examples_by_task: Mapping[str, Sequence[dict]] | Sequence[dict],
        *,
        kind: str,
        metrics: Mapping[str, Sequence[str]] | None = None,
        clusters: Mapping[str, str] | None = None,
        languages: Mapping[str, str] | None = None,
        max_examples_per_template: int | None = None,
        max_input_tokens: int | None = None,
    ):
        if kind not in MODEL_KINDS:
            raise ConfigError(f"evaluation: unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
        if tokenizer.eos_token_id is None:
            raise ConfigError("evaluation: the tokenizer has no eos token; choices must end with eos as in training")
        self.tokenizer = tokenizer
        self.kind = kind
        self.eos = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad = int(pad) if pad is not None else self.eos
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = int(bos) if bos is not None else self.eos
        self.clusters = dict(clusters or {})
        self.languages = dict(languages or {})
        self.rank_items: list[RankItem] = []
        self.gen_items: list[GenItem] = []
        self.groups: dict[tuple[str, str], _Group] = {}
        self.group_of: dict[int, tuple[str, str]] = {}
        self.cluster_of: dict[str, str] = {}
        self.language_of: dict[str, str] = {}
        self._prepare(_flatten_examples(examples_by_task), metrics or {}, max_examples_per_template, max_input_tokens)

    # -- preparation ---------------------------------------------------------------------------------

    def _prompt_ids(self, text: str, cache: dict, max_input_tokens: int | None) -> list[int]:
        ids = _encode(self.tokenizer, text, cache)
        if self.kind == "encdec":
            if max_input_tokens is not None:
                ids = ids[: max(max_input_tokens - 1, 0)]
            return ids + [self.eos]
        if max_input_tokens is not None and len(ids) > max_input_tokens:
            ids = ids[len(ids) - max_input_tokens :]
        # A decoder needs at least one prompt position to predict the first choice token from.
        return ids if ids else [self.bos]

    def _choice_ids(self, text: str, cache: dict) -> list[int]:
        text = text if self.kind == "encdec" else " " + text
        return _encode(self.tokenizer, text, cache) + [self.eos]

    def _prepare(self, examples: list[dict], metrics: Mapping, cap: int | None, max_input_tokens: int | None) -> None:
        # Validate everything before scoring anything: a contract violation fails here, never midway.
        for pos, ex in enumerate(examples):
            missing = [k for k in REQUIRED_KEYS if k not in ex]
            if missing:
                raise DataError(
                    f"evaluation example #{pos} (dataset={ex.get('dataset')!r}, template={ex.get('template')!r}) "
                    f"lacks {missing}; prompted examples need {list(REQUIRED_KEYS)} (+ answer_choices)"
                )
        cache: dict[str, list[int]] = {}
        for ex in examples:
            key = (str(ex["dataset"]), str(ex["template"]))
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = _Group(key[0], key[1], str(ex.get("task", f"{key[0]}/{key[1]}")))
            if cap is not None and len(group.indices) + sum(group.skipped.values()) >= cap:
                continue
            dataset = key[0]
            if dataset not in self.cluster_of:
                self.cluster_of[dataset] = self.clusters.get(dataset, ex.get("cluster") or "other")
                self.language_of[dataset] = self.languages.get(dataset, ex.get("language") or "en")
            targets = [str(t) for t in (ex.get("targets") or [])]
            choices = [str(c) for c in (ex.get("answer_choices") or [])]
            if not targets:
                group.skipped[SKIP_NO_TARGETS] += 1
                continue
            index = len(self.group_of)
            if choices:
                stripped = [c.strip() for c in choices]
                if targets[0].strip() not in stripped:
                    group.skipped[SKIP_GOLD_NOT_IN_CHOICES] += 1
                    continue
                gold = sorted({stripped.index(t.strip()) for t in targets if t.strip() in stripped})
                self.rank_items.append(
                    RankItem(
                        index,
                        self._prompt_ids(str(ex["inputs"]), cache, max_input_tokens),
                        [self._choice_ids(c, cache) for c in choices],
                        gold,
                    )
                )
                group.num_choices.append(len(choices))
            else:
                names = _normalize_metric_names(
                    ex.get("metrics") or metrics.get(f"{key[0]}/{key[1]}") or metrics.get(key[0])
                )
                if not names:
                    group.skipped[SKIP_NO_CHOICES] += 1
                    continue
                computed = tuple(dict.fromkeys(m for n in names for m in GENERATION_METRICS.get(n, ())))
                if not computed:
                    group.skipped[f"{SKIP_UNSUPPORTED_METRIC}:{','.join(names)}"] += 1
                    continue
                group.mode, group.metrics = "generate", computed
                self.gen_items.append(
                    GenItem(index, self._prompt_ids(str(ex["inputs"]), cache, max_input_tokens), targets)
                )
            group.indices.append(index)
            self.group_of[index] = key
        if not self.group_of:
            detail = "; ".join(f"{d}/{t}: {dict(g.skipped)}" for (d, t), g in self.groups.items())
            raise DataError(
                f"evaluation: no example can be evaluated ({detail or 'no examples given'}). Rank classification "
                "needs answer_choices containing targets[0]; generation needs template metrics "
                f"(one of {sorted(GENERATION_METRICS)})"
            )

    # -- running -------------------------------------------------------------------------------------

    def __call__(
        self,
        model,
        *,
        accelerator=None,
        batch_size: int = 8,
        max_tokens_per_batch: int | None = None,
        max_new_tokens: int = 64,
        num_beams: int = 1,
    ) -> dict:
        """Evaluate ``model``; returns the results dict (see :func:`aggregate`).

        Args:
            model: a Hugging Face model of this evaluator's kind (possibly wrapped by DeepSpeed).
            accelerator: an ``accelerate.Accelerator`` to shard examples over its processes; None uses
                ``torch.distributed`` when it is initialised, else one process.
            batch_size: at most this many examples per forward.
            max_tokens_per_batch: optional padded-token budget per forward (prompts + all choices).
            max_new_tokens, num_beams: generation settings for templates without answer choices.
        """
        dist = _DistContext.from_accelerator(accelerator)
        # Call the bare module: a DDP wrapper's forward would sync buffers (a collective) on every call,
        # which hangs when ranks run different numbers of batches. ZeRO-3 hooks live on the module itself.
        model = getattr(model, "module", model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                local_rank = [it for it in self.rank_items if it.index % dist.world_size == dist.rank]
                local_gen = [it for it in self.gen_items if it.index % dist.world_size == dist.rank]
                sync = dist.world_size > 1 and _is_zero3(model)
                scores = score_rank_items(
                    model, local_rank, self.kind, batch_size=batch_size,
                    max_tokens_per_batch=max_tokens_per_batch, dist=dist if sync else None, pad_id=self.pad,
                )
                preds = generate_predictions(
                    model, self.tokenizer, local_gen, self.kind, batch_size=batch_size,
                    max_new_tokens=max_new_tokens, num_beams=num_beams, dist=dist if sync else None,
                    pad_id=self.pad, eos_id=self.eos,
                )
        finally:
            model.train(was_training)
        gathered = dist.gather(
            [(i, s, None) for i, s in scores.items()] + [(i, None, p) for i, p in preds.items()]
        )
        seen = [i for i, _, _ in gathered]
        assert len(seen) == len(set(seen)), "an example was scored by two ranks"
        all_scores = {i: s for i, s, _ in gathered if s is not None}
        all_preds = {i: p for i, _, p in gathered if p is not None}
        results = self._results(all_scores, all_preds)
        results["meta"] = {
            "kind": self.kind,
            "num_processes": dist.world_size,
            "num_examples": len(self.group_of),
            "num_beams": num_beams,
            "max_new_tokens": max_new_tokens,
        }
        return results

    def _results(self, scores: dict[int, "ChoiceScores"], preds: dict[int, str]) -> dict:
        refs = {it.index: it.references for it in self.gen_items}
        golds = {it.index: it.gold for it in self.rank_items}
        per_template: dict[str, dict[str, dict]] = defaultdict(dict)
        for (dataset, template), g in self.groups.items():
            row: dict[str, Any] = {
                "task": g.task,
                "n": len(g.indices),
                "skipped": dict(sorted(g.skipped.items())),
                "num_skipped": sum(g.skipped.values()),
            }
            if g.mode == "rank":
                correct = [scores[i].argmax() in golds[i] for i in g.indices]
                correct_ln = [scores[i].argmax(length_normalized=True) in golds[i] for i in g.indices]
                row.update(
                    metric="accuracy",
                    accuracy=_mean(correct),
                    accuracy_length_normalized=_mean(correct_ln),
                    chance=_mean([1.0 / k for k in g.num_choices]),
                )
            else:
                values = generation_metrics([preds[i] for i in g.indices], [refs[i] for i in g.indices], g.metrics)
                row.update(values, metric=g.metrics[0], chance=None)
            row["score"] = row.get(row["metric"])
            per_template[dataset][template] = row
        return aggregate(per_template, self.cluster_of, self.language_of)


def evaluate(
    model,
    tokenizer,
    examples_by_task: Mapping[str, Sequence[dict]] | Sequence[dict],
    *,
    kind: str,
    batch_size: int = 8,
    max_tokens_per_batch: int | None = None,
    max_examples_per_template: int | None = None,
    accelerator=None,
    clusters: Mapping[str, str] | None = None,
    languages: Mapping[str, str] | None = None,
    metrics: Mapping[str, Sequence[str]] | None = None,
    max_input_tokens: int | None = None,
    max_new_tokens: int = 64,
    num_beams: int = 1,
) -> dict:
    """One-shot zero-shot evaluation (tokenize + score + aggregate). See :class:`ZeroShotEvaluator`.

    Returns:
        ``{"templates": {dataset: {template: row}}, "datasets": {...}, "clusters": {...},
        "languages": {...}, "meta": {...}}``; each template row has n, skipped, accuracy and
        accuracy_length_normalized (or generation metrics), chance and score.
    """
    evaluator = ZeroShotEvaluator(
        tokenizer, examples_by_task, kind=kind, metrics=metrics, clusters=clusters, languages=languages,
        max_examples_per_template=max_examples_per_template, max_input_tokens=max_input_tokens,
    )
    return evaluator(
        model, accelerator=accelerator, batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch,
        max_new_tokens=max_new_tokens, num_beams=num_beams,
    )


# --------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------


@dataclass
class _DistContext:
    world_size: int = 1
    rank: int = 0

    @classmethod
    def from_accelerator(cls, accelerator) -> "_DistContext":
        if accelerator is not None:
            return cls(int(accelerator.num_processes), int(accelerator.process_index))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_world_size(), torch.distributed.get_rank())
        return cls()

    def gather(self, items: list) -> list:
        """Concatenate every rank's list (rank order); no padding, no duplicates."""
        if self.world_size == 1:
            return list(items)
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, items)
        return [x for part in out for x in part]

    def max_int(self, value: int) -> int:
        return max(self.gather([value])) if self.world_size > 1 else value


def _is_zero3(model) -> bool:
    """True when parameters are ZeRO-3 partitioned (DeepSpeed marks them with ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Rank classification scoring
# --------------------------------------------------------------------------------------------------


@dataclass
class ChoiceScores:
    """Scores of every choice of one example: summed log-probability and token counts."""

    sum_logprob: list[float]
    num_tokens: list[int]

    def length_normalized(self) -> list[float]:
        return [s / n for s, n in zip(self.sum_logprob, self.num_tokens)]

    def argmax(self, length_normalized: bool = False) -> int:
        values = self.length_normalized() if length_normalized else self.sum_logprob
        return max(range(len(values)), key=lambda k: (values[k], -k))  # ties -> first choice


def make_batches(costs: Sequence[tuple[int, int, int]], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Group items (prompt_len, max_choice_len, num_choices) into batches, longest first.

    The padded cost of a batch is ``B * max_prompt + N * max_choice`` tokens (N = choices in the batch);
    a batch never exceeds ``batch_size`` items nor ``max_tokens`` (a single item may, alone).

    Returns:
        lists of positions into ``costs``.
    """
    if batch_size < 1:
        raise ConfigError(f"evaluation: batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i][0], -costs[i][1], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    max_p = max_c = n_choices = 0
    for i in order:
        p, c, k = costs[i]
        new_p, new_c, new_k = max(max_p, p), max(max_c, c), n_choices + k
        padded = (len(cur) + 1) * new_p + new_k * new_c
        if cur and (len(cur) >= batch_size or (max_tokens is not None and padded > max_tokens)):
            batches.append(cur)
            cur, new_p, new_c, new_k = [], p, c, k
        cur.append(i)
        max_p, max_c, n_choices = new_p, new_c, new_k
    if cur:
        batches.append(cur)
    return batches


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to (len(seqs), max_len); returns ids and a 0/1 mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if side == "right":
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        else:
            ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s) :] = 1
    return ids, mask


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument: ``cache`` in recent transformers 5.x, ``past_key_values`` before."""
    import inspect

    forward = getattr(model, "module", model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _output_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def _token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of fp32 log-probabilities of ``labels`` under ``logits`` where mask is 1.

    logits (N, C, V), labels (N, C), mask (N, C) -> (N,)
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, C)
    return (picked.double() * mask).sum(-1)  # fp64 sum: scores of long choices stay exact to ~1e-7


def _score_encdec(model, items: list[RankItem], pad_id: int, side: str) -> list[list[float]]:
    device, _ = _model_device_dtype(model)
    enc_ids, enc_mask = _pad([it.prompt_ids for it in items], pad_id, side)
    enc_ids, enc_mask = enc_ids.to(device), enc_mask.to(device)
    # The encoder runs ONCE per example; its states are repeated over that example's choices.
    enc_states = model.get_encoder()(input_ids=enc_ids, attention_mask=enc_mask).last_hidden_state  # (B, S, d)
    owner = torch.tensor([b for b, it in enumerate(items) for _ in it.choice_ids], device=device)  # (N,)
    choices = [c for it in items for c in it.choice_ids]
    labels, lab_mask = _pad(choices, pad_id, "right")  # (N, C)
    labels, lab_mask = labels.to(device), lab_mask.to(device)
    start = model.config.decoder_start_token_id
    start = pad_id if start is None else start
    dec_in = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)  # shift right
    dec_mask = torch.cat([torch.ones_like(lab_mask[:, :1]), lab_mask[:, :-1]], dim=1)
    from transformers.modeling_outputs import BaseModelOutput

    out = model(
        encoder_outputs=BaseModelOutput(last_hidden_state=enc_states.index_select(0, owner)),  # (N, S, d)
        attention_mask=enc_mask.index_select(0, owner),
        decoder_input_ids=dec_in,
        decoder_attention_mask=dec_mask,
        use_cache=False,
    )
    totals = _token_logprobs(out.logits, labels, lab_mask).tolist()
    return _split(totals, items)


def _split(flat: list[float], items: list[RankItem]) -> list[list[float]]:
    res, k = [], 0
    for it in items:
        res.append(flat[k : k + len(it.choice_ids)])
        k += len(it.choice_ids)
    return res


def _prefix_masks(prompt_mask: torch.Tensor, dtype) -> tuple[torch.Tensor, float]:
    """4-D additive prompt-pass mask for prefix-LM: every prompt position sees every real prompt token.

    prompt_mask (B, P) -> (B, 1, P, P) float mask (0 allowed, finfo.min masked), and that minimum.
    """
    neg = torch.finfo(dtype).min
    pm = prompt_mask.bool()
    prompt_allowed = pm[:, None, None, :].expand(-1, 1, pm.shape[1], -1)  # (B, 1, P, P), every query sees all real keys
    prompt_4d = torch.zeros(prompt_allowed.shape, dtype=dtype, device=pm.device).masked_fill(~prompt_allowed, neg)
    return prompt_4d, neg


def _choice_mask_4d(prompt_mask_n: torch.Tensor, choice_len: int, dtype, neg: float) -> torch.Tensor:
    """Choice-pass mask for prefix-LM: all real prompt keys, causal over the choice.

    prompt_mask_n (N, P) -> (N, 1, C, P + C) float mask.
    """
    n, p = prompt_mask_n.shape
    causal = torch.ones(choice_len, choice_len, dtype=torch.bool, device=prompt_mask_n.device).tril()  # (C, C)
    keys_prompt = prompt_mask_n.bool()[:, None, None, :].expand(n, 1, choice_len, p)  # (N, 1, C, P)
    allowed = torch.cat([keys_prompt, causal[None, None].expand(n, 1, -1, -1)], dim=-1)  # (N, 1, C, P + C)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, neg)


def _score_decoder(model, items: list[RankItem], pad_id: int, side: str, prefix_lm: bool) -> list[list[float]]:
    device, dtype = _model_device_dtype(model)
    prompts = [it.prompt_ids for it in items]
    p_ids, p_mask = _pad(prompts, pad_id, side)
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P) real tokens at 0..len-1 whatever the side
    p_len = p_mask.sum(-1)  # (B,)
    if prefix_lm:
        attn, neg = _prefix_masks(p_mask, dtype)
    else:
        attn = p_mask
    out = model(input_ids=p_ids, attention_mask=attn, position_ids=p_pos, use_cache=True)
    last = (p_len - 1) if side == "right" else torch.full_like(p_len, p_ids.shape[1] - 1)
    next_logits = out.logits[torch.arange(len(items), device=device), last]  # (B, V): predicts choice token 0

    owner = torch.tensor([b for b, it in enumerate(items) for _ in it.choice_ids], device=device)  # (N,)
    choices = [c for it in items for c in it.choice_ids]
    c_ids, c_mask = _pad(choices, pad_id, "right")  # (N, C)
    c_ids, c_mask = c_ids.to(device), c_mask.to(device)
    cache = _output_cache(out)
    cache.batch_select_indices(owner)  # (B, ...) -> (N, ...): the prompt is computed once per example
    pm_n = p_mask.index_select(0, owner)  # (N, P)
    c_pos = p_len.index_select(0, owner)[:, None] + torch.arange(c_ids.shape[1], device=device)[None]  # (N, C)
    if prefix_lm:
        attn = _choice_mask_4d(pm_n, c_ids.shape[1], dtype, neg)
    else:
        attn = torch.cat([pm_n, torch.ones_like(c_mask)], dim=-1)  # (N, P + C); choice pads come last, causal
    out2 = model(
        input_ids=c_ids, attention_mask=attn, position_ids=c_pos, use_cache=True, **{_cache_kwarg(model): cache}
    )
    # Choice token k is predicted by position k-1 of the choice pass (k >= 1) or by the prompt (k = 0).
    logits = torch.cat([next_logits.index_select(0, owner)[:, None], out2.logits[:, :-1]], dim=1)  # (N, C, V)
    totals = _token_logprobs(logits, c_ids, c_mask).tolist()
    return _split(totals, items)


def score_rank_items(
    model,
    items: Sequence[RankItem],
    kind: str,
    *,
    batch_size: int = 8,
    max_tokens_per_batch: int | None = None,
    dist: _DistContext | None = None,
    pad_id: int = 0,
    padding_side: str = "right",
) -> dict[int, ChoiceScores]:
    """Score every choice of every item; returns ``{item.index: ChoiceScores}``.

    Args:
        model: the model (called under no_grad by the caller; eval mode is the caller's job).
        items: tokenized examples (see :class:`ZeroShotEvaluator`).
        kind: "encdec", "decoder" or "prefix_lm".
        batch_size, max_tokens_per_batch: batching limits (see :func:`make_batches`).
        dist: when given (ZeRO-3, several ranks), every rank runs the same number of batches; extra
            batches repeat a dummy item and are discarded.
        pad_id: padding token id (its value never changes a score).
        padding_side: "right" (default) or "left"; exposed so tests can prove scores do not depend on it.
    """
    if kind not in MODEL_KINDS:
        raise ConfigError(f"evaluation: unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    batches = make_batches([(*it.cost(), len(it.choice_ids)) for it in items], batch_size, max_tokens_per_batch)
    num_batches = dist.max_int(len(batches)) if dist is not None else len(batches)
    dummy = RankItem(-1, [pad_id], [[pad_id]], [0])
    results: dict[int, ChoiceScores] = {}
    for b in range(num_batches):
        batch = [items[i] for i in batches[b]] if b < len(batches) else [dummy]
        if kind == "encdec":
            totals = _score_encdec(model, batch, pad_id, padding_side)
        else:
            totals = _score_decoder(model, batch, pad_id, padding_side, prefix_lm=kind == "prefix_lm")
        for it, t in zip(batch, totals):
            if it.index >= 0:
                results[it.index] = ChoiceScores(t, [len(c) for c in it.choice_ids])
    return results


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def generate_predictions(
    model,
    tokenizer,
    items: Sequence[GenItem],
    kind: str,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    dist: _DistContext | None = None,
    pad_id: int = 0,
    eos_id: int = 1,
) -> dict[int, str]:
    """Greedy (num_beams=1) or beam decoding; returns ``{item.index: text}``.

    Under ZeRO-3 with several ranks (``dist`` given) ``generate(synced_gpus=True)`` keeps ranks stepping
    together, and ranks with fewer batches run dummy ones. prefix_lm supports greedy decoding only
    (``generate`` would apply a causal mask over the prompt).

    Raises:
        ConfigError: beam search requested for prefix_lm.
    """
    if not items and dist is None:
        return {}
    if kind == "prefix_lm" and num_beams != 1:
        raise ConfigError("evaluation: prefix_lm generation supports num_beams=1 only (greedy)")
    device, dtype = _model_device_dtype(model)
    order = sorted(range(len(items)), key=lambda i: (-len(items[i].prompt_ids), i))
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    num_batches = dist.max_int(len(batches)) if dist is not None else len(batches)
    out: dict[int, str] = {}
    for b in range(num_batches):
        batch = [items[i] for i in batches[b]] if b < len(batches) else [GenItem(-1, [eos_id], [""])]
        if kind == "prefix_lm":
            prompts = [it.prompt_ids for it in batch]
            new_tokens = _greedy_prefix_lm(model, prompts, max_new_tokens, pad_id, eos_id, dtype)
        else:
            # Decoders continue the prompt, so prompts are left-padded; T5 does not care.
            ids, mask = _pad([it.prompt_ids for it in batch], pad_id, "left" if kind == "decoder" else "right")
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                num_beams=num_beams, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id,
                synced_gpus=dist is not None,
            )
            new_tokens = gen[:, ids.shape[1] :].tolist() if kind == "decoder" else gen.tolist()
        for it, toks in zip(batch, new_tokens):
            if it.index >= 0:
                out[it.index] = tokenizer.decode(toks, skip_special_tokens=True).strip()
    return out


def _greedy_prefix_lm(model, prompts, max_new_tokens: int, pad_id: int, eos_id: int, dtype) -> list[list[int]]:
    """Greedy decoding with a bidirectional prompt (prefix-LM), using the KV cache."""
    device = next(model.parameters()).device
    p_ids, p_mask = _pad(prompts, pad_id, "right")
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    p_len = p_mask.sum(-1)
    attn, neg = _prefix_masks(p_mask, dtype)
    out = model(input_ids=p_ids, attention_mask=attn, position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    logits = out.logits[torch.arange(len(prompts), device=device), p_len - 1]
    cache, generated = _output_cache(out), []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tok = logits.argmax(-1)  # (B,)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        generated.append(tok)
        done |= tok == eos_id
        if bool(done.all()):
            break
        gen_mask = torch.ones(len(prompts), step + 1, dtype=p_mask.dtype, device=device)
        full = torch.cat([p_mask, gen_mask], dim=-1)  # (B, P + step + 1): the new token sees all earlier keys
        attn = torch.zeros(len(prompts), 1, 1, full.shape[1], dtype=dtype, device=device).masked_fill(
            ~full.bool()[:, None, None, :], neg
        )
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=(p_len + step)[:, None],
                    use_cache=True, **{_cache_kwarg(model): cache})
        cache, logits = _output_cache(out), out.logits[:, -1]
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in prompts]
    return [[t for t in r if t != pad_id] for r in rows]
