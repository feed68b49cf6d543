"""Distributed eval without duplicates: example ``i`` is scored by rank ``i % world_size``; ranks exchange
``(global_index, scores)`` with ``all_gather_object`` and the merged result has every example exactly once
(accelerate's ``gather_for_metrics`` would duplicate the last batch).

Under DeepSpeed ZeRO-3 every rank must call the model the same number of times (each forward all-gathers
parameters), so ranks with fewer batches run dummy batches (:meth:`DistContext.max_int` says how many).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DistContext:
    world_size: int = 1
    rank: int = 0

    @classmethod
    def from_accelerator(cls, accelerator) -> "DistContext":
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


def is_zero3(model) -> bool:
    """True when parameters are ZeRO-3 partitioned (DeepSpeed marks them with ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())
