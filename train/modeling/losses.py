"""Per-token NLL and loss normalisation with GLOBAL denominators.

A training step sees several micro-batches (gradient accumulation) on several ranks (data parallel). A
"mean" is only right if its denominator counts the whole step, so each mode is split into a local
numerator and a local denominator::

    denominator = sum(local_denominator(mb, mode) for mb in step_micro_batches)   # before any backward
    denominator = all_reduce_sum(denominator)                                     # across ranks
    for mb in step_micro_batches:
        nll = token_nll(model_forward(model, mb, kind), mb["labels"])
        scaled_loss(local_numerator(nll, mb, mode), denominator, mode=mode, world_size=W).backward()

``scaled_loss`` returns ``numerator / denominator * world_size``: DDP AVERAGES gradients over ranks
(divides their sum by W), so multiplying by W makes the final gradient the gradient of
``sum over all ranks and micro-batches of numerator / global denominator``. The gradient of a step is then
independent of how the global batch is split into ranks, micro-batches and rows.

Modes (``labels`` == IGNORE_INDEX contributes nothing; an "example" is one segment of a packed row):

- ``token_mean``: every target token in the global batch weighs the same. num = sum NLL; den = #tokens.
- ``sequence_mean``: every example weighs the same (T5X ``AVERAGE_PER_SEQUENCE``, mT0): the mean NLL of
  each example, averaged over examples. num = sum over examples of (mean NLL of its tokens);
  den = #examples with at least one target token.
- ``target_mean``: BLOOMZ ``--norm-target-loss``: each target token weighted 1/len(its target), summed and
  divided by the number of targets. num = sum NLL_t / len(target(t)); den = #targets. With global
  denominators this is algebraically the SAME number as ``sequence_mean`` (sum_s (1/n_s) sum_{t in s} NLL_t
  = sum_s mean_s); it is kept as a separate name, computed the per-token way Megatron does, for BLOOMZ
  users. What differed in Megatron-DeepSpeed is the denominator: #targets per MICRO-batch, then
  micro-batch means averaged, so examples in sparsely packed micro-batches weighed more. Here both use
  the global count. "len" is the length of the target as it appears in the row (after truncation).
- ``sum``: no normalisation: num = sum NLL; the denominator is ignored (``local_denominator`` returns 0).

T-Few's choice losses (Liu et al. 2022, t-few ``EncoderDecoder.py``) are computed from the answer choices
that rows packed with ``choices=True`` carry (the ``choice_*`` gather tensors of
:mod:`train.modeling.features`), in the same numerator / global-denominator form, whatever the mode:

- ``unlikelihood``: push the wrong choices down. num = sum over wrong-choice tokens of
  ``-log(1 - p(token) + 0.01)``; den = #wrong-choice tokens.
- ``rank_classification`` (length-normalised): score each choice by the mean log-probability of its
  tokens; num = sum over examples with a choice set of the cross-entropy of softmax(scores) against the
  gold choice; den = #examples with a choice set.

The step loss is ``sum_k weight_k * num_k / global_den_k`` (``trainer.loss_weights``; LOSS_NAMES): see
:func:`local_numerators`, :func:`local_denominators` and :func:`weighted_loss`. An example without a
choice set contributes only its LM loss; a loss whose global denominator is 0 contributes 0.

Memory-lean loss (``trainer.loss_chunk_tokens``): given the :class:`~train.modeling.features.HeadInputs`
of :func:`~train.modeling.features.head_inputs` instead of logits, :func:`local_numerators` applies the
output layer itself, only at the positions a loss reads (labels, answer-choice tokens), ``chunk`` of them
at a time under ``torch.utils.checkpoint`` (:func:`chunked_token_nll`): peak memory O(chunk x vocab)
instead of O(tokens x vocab). The per-token NLL then goes through the same normalisation code, so the
numerators and gradients equal the full-logits ones up to float rounding.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from train.errors import ConfigError
from train.modeling.features import IGNORE_INDEX, HeadInputs

MODES = ("token_mean", "sequence_mean", "target_mean", "sum")
LOSS_NAMES = ("lm", "unlikelihood", "rank_classification")  # the keys of trainer.loss_weights
UNLIKELIHOOD_EPS = 0.01  # t-few: -log(1 - p + 1e-2), so a certain wrong token costs log(100), not infinity


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"losses: unknown loss normalisation {mode!r}; expected one of {list(MODES)}")


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in fp32.

    Args:
        logits: (batch, seq, vocab), any float dtype; ``logits[b, t]`` predicts ``labels[b, t]``.
        labels: (batch, seq) int64, IGNORE_INDEX where there is no loss.

    Returns:
        (batch, seq) fp32 NLL, exactly 0 where labels == IGNORE_INDEX.
    """
    batch, seq, vocab = logits.shape
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(batch * seq, vocab),
        labels.reshape(batch * seq),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(batch, seq)


def _segment_index(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat example index of every label token and the token count of each example.

    Returns:
        index: (batch, seq) int64, row * (seq + 1) + segment, 0-segment entries included.
        counts: (batch * (seq + 1),) number of label tokens of each (row, segment); segment 0 forced to 0.
        width: seq + 1.
    """
    seg = batch["loss_segment_ids"]  # (batch, seq), 0 where the label is ignored
    width = seg.shape[1] + 1
    rows = torch.arange(seg.shape[0], device=seg.device)[:, None]
    index = rows * width + seg  # (batch, seq)
    counts = torch.bincount(index[seg > 0].flatten(), minlength=seg.shape[0] * width)
    return index, counts, width


def local_numerator(nll: torch.Tensor, batch: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """The micro-batch's share of the step loss before division by the global denominator.

    Args:
        nll: (batch, seq) from :func:`token_nll`.
        batch: the collated batch (needs ``loss_segment_ids``).
        mode: one of MODES.

    Returns:
        A differentiable fp32 scalar.

    Raises:
        ConfigError: unknown mode.
    """
    _check_mode(mode)
    if mode in ("token_mean", "sum"):
        return nll.sum()
    index, counts, _ = _segment_index(batch)
    if mode == "target_mean":
        # Megatron's form: weight each token by 1 / len(its target).
        weights = torch.where(batch["loss_segment_ids"] > 0, 1.0 / counts[index].clamp(min=1).float(), 0.0)
        return (nll * weights).sum()
    # sequence_mean: per-example sums, divided by per-example counts, summed.
    sums = torch.zeros(counts.shape, dtype=nll.dtype, device=nll.device).index_add(0, index.flatten(), nll.flatten())
    present = counts > 0
    return (sums[present] / counts[present].to(nll.dtype)).sum()


def local_denominator(batch: dict[str, torch.Tensor], mode: str) -> float:
    """The micro-batch's share of the global denominator (sum it over micro-batches and ranks).

    Returns:
        #label tokens (token_mean), #examples with a label token (sequence_mean, target_mean), 0.0 (sum).
    """
    _check_mode(mode)
    if mode == "sum":
        return 0.0
    if mode == "token_mean":
        return float((batch["labels"] != IGNORE_INDEX).sum().item())
    _, counts, _ = _segment_index(batch)
    return float((counts > 0).sum().item())


def scaled_loss(
    numerator: torch.Tensor, global_denominator: float | torch.Tensor, *, mode: str, world_size: int = 1
) -> torch.Tensor:
    """What to call ``backward()`` on: ``numerator / global_denominator * world_size``.

    The ``world_size`` factor undoes DDP's gradient averaging over ranks (see the module docstring). A
    zero denominator (a step without any target token) gives a zero loss that keeps the graph.

    Args:
        numerator: from :func:`local_numerator`.
        global_denominator: sum of :func:`local_denominator` over the step's micro-batches and all ranks.
        mode: one of MODES ("sum" ignores the denominator).
        world_size: number of data-parallel ranks whose gradients DDP averages.
    """
    _check_mode(mode)
    if mode == "sum":
        return numerator * world_size
    denominator = float(global_denominator)
    if denominator <= 0:
        return numerator * 0.0
    return numerator * (world_size / denominator)


def per_example_losses(nll: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[float]:
    """Mean NLL of each example (segment), for logging and tests.

    Returns:
        One float per (row, segment) that has at least one label token, in row order then segment order.
    """
    index, counts, _ = _segment_index(batch)
    sums = torch.zeros(counts.shape, dtype=torch.float64, device=nll.device).index_add(
        0, index.flatten(), nll.detach().double().flatten()
    )
    present = counts > 0
    return (sums[present] / counts[present].double()).tolist()


# ---------------------------------------------------------------------------------------------- T-Few


def choice_token_log_probs(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probability of every answer-choice token (gold and wrong), in fp32.

    Args:
        logits: (batch, seq, vocab) from :func:`train.modeling.features.model_forward`.
        batch: a collated batch of rows packed with choices (``choice_logit_index``, ``choice_token_ids``).

    Returns:
        (T,) fp32, one entry per choice token, in the order of ``batch["choice_token_ids"]``.
    """
    flat = logits.reshape(-1, logits.shape[-1])[batch["choice_logit_index"]].float()  # (T, vocab)
    return flat.log_softmax(dim=-1).gather(1, batch["choice_token_ids"][:, None])[:, 0]


def choice_scores(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Length-normalised score of every choice: the mean log-probability of its tokens.

    Returns:
        (C,) fp32, in the order of ``batch["choice_slot"]`` (slot 0 = an example's gold choice).
    """
    return _choice_scores(choice_token_log_probs(logits, batch), batch)


def _choice_scores(logp: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(T,) choice-token log-probabilities -> (C,) mean per choice."""
    n_choices = batch["choice_slot"].shape[0]
    sums = torch.zeros(n_choices, dtype=logp.dtype, device=logp.device).index_add(0, batch["choice_token_choice"], logp)
    counts = torch.bincount(batch["choice_token_choice"], minlength=n_choices).to(logp.dtype)
    return sums / counts


def _has_choices(batch: dict[str, torch.Tensor]) -> bool:
    return "choice_slot" in batch and batch["choice_slot"].numel() > 0


def _wrong_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(T,) bool: the choice token belongs to a wrong choice."""
    return batch["choice_slot"][batch["choice_token_choice"]] > 0


def _zero(logits: torch.Tensor) -> torch.Tensor:
    # A zero that keeps the graph: a micro-batch without choices must still backward (DDP, lm weight 0).
    return logits.reshape(-1)[:1].float().sum() * 0.0


def unlikelihood_numerator(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the wrong choices' tokens of ``-log(1 - p(token) + 0.01)``; a differentiable fp32 scalar."""
    if not _has_choices(batch):
        return _zero(logits)
    return _unlikelihood(choice_token_log_probs(logits, batch), batch)


def _unlikelihood(logp: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logp = logp[_wrong_tokens(batch)]
    return -torch.log(-torch.expm1(logp) + UNLIKELIHOOD_EPS).sum()  # 1 - p as -expm1(log p): exact for small p


def unlikelihood_denominator(batch: dict[str, torch.Tensor]) -> float:
    """The micro-batch's wrong-choice tokens (sum over micro-batches and ranks for the global denominator)."""
    return float(_wrong_tokens(batch).sum().item()) if _has_choices(batch) else 0.0


def rank_classification_numerator(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over examples with a choice set of CE(softmax(mean log-prob of each choice), gold); fp32 scalar."""
    if not _has_choices(batch):
        return _zero(logits)
    return _rank_classification(choice_token_log_probs(logits, batch), batch)


def _rank_classification(logp: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    scores = _choice_scores(logp, batch)  # (C,)
    example, slot = batch["choice_example"], batch["choice_slot"]
    n_examples, width = int(example.max().item()) + 1, int(slot.max().item()) + 1
    table = torch.full((n_examples, width), float("-inf"), dtype=scores.dtype, device=scores.device)
    table = table.index_put((example, slot), scores)  # (examples, choices); -inf where an example has fewer
    gold = torch.zeros(n_examples, dtype=torch.long, device=scores.device)  # slot 0 is the gold choice
    return torch.nn.functional.cross_entropy(table, gold, reduction="sum")


def rank_classification_denominator(batch: dict[str, torch.Tensor]) -> float:
    """The micro-batch's examples with a choice set."""
    return float((batch["choice_slot"] == 0).sum().item()) if _has_choices(batch) else 0.0


def active_weights(loss_weights: object) -> dict[str, float]:
    """``{name: weight}`` of the losses with a weight > 0, in LOSS_NAMES order (a ``LossWeightsConfig``)."""
    return {name: float(getattr(loss_weights, name)) for name in LOSS_NAMES if getattr(loss_weights, name) > 0}


def local_numerators(logits: torch.Tensor | HeadInputs, batch: dict[str, torch.Tensor], mode: str,
                     names: object) -> dict[str, torch.Tensor]:
    """The micro-batch's numerator of each loss in ``names`` (a subset of LOSS_NAMES), in that order.

    Args:
        logits: (batch, seq, vocab) from :func:`~train.modeling.features.model_forward`, or the
            :class:`~train.modeling.features.HeadInputs` of :func:`~train.modeling.features.head_inputs`
            (``trainer.loss_chunk_tokens``): then the output layer runs here, chunk by chunk (see
            :func:`chunked_token_nll`), and the numerators are the same up to float rounding.
        batch, mode: as for :func:`local_numerator`.
        names: the losses to compute.
    """
    for name in names:
        if name not in LOSS_NAMES:
            raise ConfigError(f"losses: unknown loss {name!r}; expected one of {list(LOSS_NAMES)}")
    if isinstance(logits, HeadInputs):
        return _chunked_numerators(logits, batch, mode, names)
    out = {}
    for name in names:
        if name == "lm":
            out[name] = local_numerator(token_nll(logits, batch["labels"]), batch, mode)
        elif name == "unlikelihood":
            out[name] = unlikelihood_numerator(logits, batch)
        else:
            out[name] = rank_classification_numerator(logits, batch)
    return out


def chunked_token_nll(inputs: HeadInputs, index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of ``targets`` at flat positions ``index``, applying the output layer ``inputs.chunk_tokens`` rows at a time.

    Each chunk's (chunk, vocab) logits exist only inside a ``torch.utils.checkpoint`` region: the forward
    keeps the chunk's NLL and its (chunk, hidden) input, and the backward recomputes the chunk's logits to
    differentiate them. So the peak is O(chunk x vocab), not O(positions x vocab), at the price of one more
    output-layer matmul per chunk in the backward. The head is called as a module (hooks fire: DeepSpeed
    ZeRO-3 gathers its weight, a peft LoRA on it applies) under the forward pass's autocast state, and the
    NLL is computed exactly as :func:`token_nll` does (fp32 cross-entropy of the logits).

    Args:
        inputs: from :func:`~train.modeling.features.head_inputs`.
        index: (N,) int64 flat positions ``b * seq + t`` of ``inputs.hidden``.
        targets: (N,) int64 token to score at each position.

    Returns:
        (N,) fp32 NLL. Even with N == 0 it runs one empty chunk, so the result's graph reaches the head and
        the body (a micro-batch without a target must still give every parameter a gradient, for DDP).
    """
    hidden = inputs.hidden.reshape(-1, inputs.hidden.shape[-1])  # (batch * seq, hidden)
    head_nll = functools.partial(_head_nll, inputs.head)
    device_type, enabled, dtype = inputs.autocast
    parts = []
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        for start in range(0, max(index.numel(), 1), inputs.chunk_tokens):
            rows = index[start:start + inputs.chunk_tokens]
            parts.append(checkpoint(head_nll, hidden[rows], targets[start:start + inputs.chunk_tokens],
                                    use_reentrant=False))
    return torch.cat(parts)


def _head_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(chunk, hidden) -> (chunk,) fp32 NLL, as :func:`token_nll` computes it."""
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")


def _chunked_numerators(inputs: HeadInputs, batch: dict[str, torch.Tensor], mode: str,
                        names: object) -> dict[str, torch.Tensor]:
    """:func:`local_numerators` with the output layer applied only at the positions some loss reads.

    Those are the label positions (LM loss) and the choice tokens' positions (T-Few's losses): one
    chunked pass over both. The LM NLL is scattered back to (batch, seq), 0 where there is no label, and
    goes through the same :func:`local_numerator` as the unchunked path; a choice token's log-probability
    is minus its NLL.
    """
    labels = batch["labels"].reshape(-1)  # (batch * seq,)
    empty = labels.new_zeros(0)
    lm_index = (labels != IGNORE_INDEX).nonzero()[:, 0] if "lm" in names else empty
    choices = _has_choices(batch) and any(name != "lm" for name in names)
    choice_index = batch["choice_logit_index"] if choices else empty
    choice_ids = batch["choice_token_ids"] if choices else empty
    nll = chunked_token_nll(inputs, torch.cat([lm_index, choice_index]), torch.cat([labels[lm_index], choice_ids]))
    lm_nll, choice_logp = nll[:lm_index.numel()], -nll[lm_index.numel():]
    out = {}
    for name in names:
        if name == "lm":
            token = torch.zeros(labels.shape, dtype=nll.dtype, device=nll.device).index_copy(0, lm_index, lm_nll)
            out[name] = local_numerator(token.view(batch["labels"].shape), batch, mode)  # (batch, seq) NLL
        elif not choices:
            out[name] = nll.sum() * 0.0  # a zero that keeps the graph, as _zero does
        elif name == "unlikelihood":
            out[name] = _unlikelihood(choice_logp, batch)
        else:
            out[name] = _rank_classification(choice_logp, batch)
    return out


def local_denominators(batch: dict[str, torch.Tensor], mode: str, names: object) -> dict[str, float]:
    """The micro-batch's share of each loss's global denominator (sum over micro-batches and ranks)."""
    out = {}
    for name in names:
        if name == "lm":
            out[name] = local_denominator(batch, mode)
        elif name == "unlikelihood":
            out[name] = unlikelihood_denominator(batch)
        elif name == "rank_classification":
            out[name] = rank_classification_denominator(batch)
        else:
            raise ConfigError(f"losses: unknown loss {name!r}; expected one of {list(LOSS_NAMES)}")
    return out


def weighted_loss(numerators: dict[str, torch.Tensor], global_denominators: dict[str, float],
                  weights: dict[str, float], *, mode: str, world_size: int = 1) -> torch.Tensor:
    """What to call ``backward()`` on: ``sum_k weight_k * numerator_k / global_denominator_k * world_size``.

    The LM loss follows ``mode`` (see :func:`scaled_loss`); the choice losses are always means over their
    global counts. With the default weights ({"lm": 1.0}) this is exactly ``scaled_loss`` of the LM loss.
    """
    total = None
    for name, numerator in numerators.items():
        term = scaled_loss(numerator, global_denominators[name], mode=mode if name == "lm" else "token_mean",
                           world_size=world_size) * weights[name]
        total = term if total is None else total + term
    return total


def step_losses(numerator_sums: dict[str, float], global_denominators: dict[str, float],
                mode: str) -> dict[str, float | None]:
    """Each loss of a whole step from its all-reduced numerator sum: num / den (None when den is 0).

    The LM loss in ``sum`` mode is the sum itself (as :func:`scaled_loss` does).
    """
    out: dict[str, float | None] = {}
    for name, total in numerator_sums.items():
        denominator = global_denominators[name]
        if name == "lm" and mode == "sum":
            out[name] = float(total)
        elif denominator > 0:
            out[name] = float(total) / denominator
        else:
            out[name] = float(total) if name == "lm" else None
    return out
