"""Rank classification, per architecture: the log-probability of every answer choice's tokens.

Two scores are kept side by side: the sum of the choice's token log-probabilities (what T0 uses) and the
same divided by the number of choice tokens (length-normalised). The prediction is the argmax; ties go to
the first choice.

How the forward passes are shared (the reason this is faster than t-zero, which re-runs the whole model
once per choice)::

    encdec:    encoder(prompt_1..prompt_B)  ONCE  -> states (B, S, d)
               index_select over choices          -> states (N, S, d), N = total choices in the batch
               decoder(choice_1..choice_N, cross-attending to the repeated states)
    decoder:   model(prompt_1..prompt_B, use_cache) ONCE -> past_key_values (B, ...) + next-token logits
    prefix_lm  cache.batch_select_indices(choice -> example) -> (N, ...)
               model(choice_1..choice_N, past_key_values, explicit position ids and mask)

Scores match one forward pass per choice to 1e-5 and do not depend on batch size or padding side
(tests/test_evaluation.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from train.errors import ConfigError
from train.evaluation.batching import (cache_kwarg, make_batches, model_device_dtype, output_cache, pad_sequences,
                                       prefix_prompt_mask)
from train.evaluation.distributed import DistContext
from train.evaluation.items import MODEL_KINDS, RankItem


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


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of fp32 log-probabilities of ``labels`` under ``logits`` where mask is 1.

    logits (N, C, V), labels (N, C), mask (N, C) -> (N,)
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, C)
    return (picked.double() * mask).sum(-1)  # fp64 sum: scores of long choices stay exact to ~1e-7


def _score_encdec(model, items: list[RankItem], pad_id: int, side: str) -> list[list[float]]:
    device, _ = model_device_dtype(model)
    enc_ids, enc_mask = pad_sequences([it.prompt_ids for it in items], pad_id, side)
    enc_ids, enc_mask = enc_ids.to(device), enc_mask.to(device)
    # The encoder runs ONCE per example; its states are repeated over that example's choices.
    enc_states = model.get_encoder()(input_ids=enc_ids, attention_mask=enc_mask).last_hidden_state  # (B, S, d)
    owner = torch.tensor([b for b, it in enumerate(items) for _ in it.choice_ids], device=device)  # (N,)
    choices = [c for it in items for c in it.choice_ids]
    labels, lab_mask = pad_sequences(choices, pad_id, "right")  # (N, C)
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
    totals = token_logprobs(out.logits, labels, lab_mask).tolist()
    return split_by_item(totals, items)


def split_by_item(flat: list[float], items: list[RankItem]) -> list[list[float]]:
    res, k = [], 0
    for it in items:
        res.append(flat[k : k + len(it.choice_ids)])
        k += len(it.choice_ids)
    return res


def _choice_mask_4d(prompt_mask_n: torch.Tensor, choice_len: int, dtype, neg: float) -> torch.Tensor:
    """Choice-pass mask for prefix-LM: all real prompt keys, causal over the choice.

    prompt_mask_n (N, P) -> (N, 1, C, P + C) float mask.
    """
    n, p = prompt_mask_n.shape
    causal = torch.ones(choice_len, choice_len, dtype=torch.bool, device=prompt_mask_n.device).tril()  # (C, C)
    keys_prompt = prompt_mask_n.bool()[:, None, None, :].expand(n, 1, choice_len, p)  # (N, 1, C, P)
    allowed = torch.cat([keys_prompt, causal[None, None].expand(n, 1, -1, -1)], dim=-1)  # (N, 1, C, P + C)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, neg)


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes per-row ``logits_to_keep`` positions (transformers >= 5 causal LMs)."""
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _score_decoder(model, items: list[RankItem], pad_id: int, side: str, prefix_lm: bool) -> list[list[float]]:
    device, dtype = model_device_dtype(model)
    prompts = [it.prompt_ids for it in items]
    p_ids, p_mask = pad_sequences(prompts, pad_id, side)
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P) real tokens at 0..len-1 whatever the side
    p_len = p_mask.sum(-1)  # (B,)
    if prefix_lm:
        attn, neg = prefix_prompt_mask(p_mask, dtype)
    else:
        attn = p_mask
    last = (p_len - 1) if side == "right" else torch.full_like(p_len, p_ids.shape[1] - 1)
    if _keeps_logits(model):  # only the last prompt position's logits: the vocabulary projection is the big cost
        out = model(input_ids=p_ids, attention_mask=attn, position_ids=p_pos, use_cache=True,
                    logits_to_keep=last[:, None])
        next_logits = out.logits[:, 0]  # (B, V): predicts choice token 0
    else:
        out = model(input_ids=p_ids, attention_mask=attn, position_ids=p_pos, use_cache=True)
        next_logits = out.logits[torch.arange(len(items), device=device), last]

    owner = torch.tensor([b for b, it in enumerate(items) for _ in it.choice_ids], device=device)  # (N,)
    choices = [c for it in items for c in it.choice_ids]
    c_ids, c_mask = pad_sequences(choices, pad_id, "right")  # (N, C)
    c_ids, c_mask = c_ids.to(device), c_mask.to(device)
    cache = output_cache(out)
    cache.batch_select_indices(owner)  # (B, ...) -> (N, ...): the prompt is computed once per example
    pm_n = p_mask.index_select(0, owner)  # (N, P)
    c_pos = p_len.index_select(0, owner)[:, None] + torch.arange(c_ids.shape[1], device=device)[None]  # (N, C)
    if prefix_lm:
        attn = _choice_mask_4d(pm_n, c_ids.shape[1], dtype, neg)
    else:
        attn = torch.cat([pm_n, torch.ones_like(c_mask)], dim=-1)  # (N, P + C); choice pads come last, causal
    out2 = model(
        input_ids=c_ids, attention_mask=attn, position_ids=c_pos, use_cache=True, **{cache_kwarg(model): cache}
    )
    # Choice token k is predicted by position k-1 of the choice pass (k >= 1) or by the prompt (k = 0).
    logits = torch.cat([next_logits.index_select(0, owner)[:, None], out2.logits[:, :-1]], dim=1)  # (N, C, V)
    totals = token_logprobs(logits, c_ids, c_mask).tolist()
    return split_by_item(totals, items)


def score_rank_items(
    model,
    items: Sequence[RankItem],
    kind: str,
    *,
    batch_size: int = 8,
    max_tokens_per_batch: int | None = None,
    dist: DistContext | None = None,
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
