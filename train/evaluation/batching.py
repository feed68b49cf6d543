"""Batching for scoring and generation: cost-aware batches, padding, prefix-LM masks, KV-cache plumbing.

Every sequence is padded with explicit position ids and masks, so a score does not depend on the batch
it was put in, nor on the tokenizer's padding side.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from train.errors import ConfigError


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


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
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


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument: ``cache`` in recent transformers 5.x, ``past_key_values`` before."""
    import inspect

    forward = getattr(model, "module", model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def output_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def prefix_prompt_mask(prompt_mask: torch.Tensor, dtype) -> tuple[torch.Tensor, float]:
    """4-D additive prompt-pass mask for prefix-LM: every prompt position sees every real prompt token.

    prompt_mask (B, P) -> (B, 1, P, P) float mask (0 allowed, finfo.min masked), and that minimum.
    """
    neg = torch.finfo(dtype).min
    pm = prompt_mask.bool()
    prompt_allowed = pm[:, None, None, :].expand(-1, 1, pm.shape[1], -1)  # (B, 1, P, P), every query sees all real keys
    prompt_4d = torch.zeros(prompt_allowed.shape, dtype=dtype, device=pm.device).masked_fill(~prompt_allowed, neg)
    return prompt_4d, neg
