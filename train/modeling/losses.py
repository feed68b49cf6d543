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
"""

from __future__ import annotations

import torch

from train.errors import ConfigError
from train.modeling.features import IGNORE_INDEX

MODES = ("token_mean", "sequence_mean", "target_mean", "sum")


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
