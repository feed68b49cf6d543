"""Data off the critical path: the next steps' rows, micro-batches and counts, built ahead in a thread.

One step's data on one rank is a :class:`PreparedStep`: the packed rows of the rank's lanes collated
into micro-batch tensors, the step's additive data counts, and a snapshot of the lanes' state
taken right after those rows were built. :class:`StepFeed` hands the loop one prepared step at a time:

- ``depth == 0``: each step is prepared inside the loop, when asked for (the data time is in the step);
- ``depth > 0``: a background thread prepares up to ``depth`` steps ahead into a bounded queue while the
  model trains (packing and collating are Python, but the model's kernels release the GIL, so the two
  overlap; on a GPU the whole step does).

Exactness. The thread is the only code that touches the lanes once the feed starts, and it prepares the
steps strictly in order, so the rows of step ``n`` are the same for every depth. What a checkpoint stores
is :meth:`StepFeed.state_dict`: the snapshot of the last step the loop *consumed*, never the lanes' live
state (which is up to ``depth`` steps ahead). A resume therefore restarts the data exactly after the last
trained step, whatever the depth of the run that wrote it or of the run that resumes.

Failures. An exception in the thread (a template that fails on a row, a damaged cache) is handed to the
loop, which raises it when it asks for that step; steps prepared before it are trained first.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass
class PreparedStep:
    """One rank's data of one step."""

    step: int  # the step these rows train (1-based, global)
    micro_batches: list[dict]  # the rows collated (CPU tensors; pinned when the model is on a GPU)
    counts: dict[str, float]  # :func:`train.data.pipeline.step_counts` of the rows
    data_state: dict  # the lanes' state right after building these rows: what a checkpoint after this step holds


@dataclass
class _Failed:
    """What the thread puts on the queue instead of a step when preparing it raised."""

    error: BaseException


class StepFeed:
    """Prepared steps ``first_step, first_step + 1, ..., last_step``, built ahead by up to ``depth`` steps.

    Args:
        prepare: builds :class:`PreparedStep` ``n`` from the lanes (called with n = first_step, first_step + 1, ...
            in order, from one thread at a time).
        initial_state: the lanes' state before ``first_step`` (after a resume): :meth:`state_dict` until a step
            is consumed.
        first_step, last_step: the steps to prepare (inclusive).
        depth: steps prepared ahead; 0 prepares each one when :meth:`next` asks for it.
    """

    def __init__(self, prepare: Callable[[int], PreparedStep], *, initial_state: dict, first_step: int,
                 last_step: int, depth: int):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._prepare = prepare
        self._state = initial_state
        self._next_step = first_step
        self._last_step = last_step
        self.depth = depth
        self.wait_seconds = 0.0  # total time the loop waited for data
        self._stop = threading.Event()
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        if depth > 0 and first_step <= last_step:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._work, name="mtf-data-prefetch", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        step = self._next_step
        while step <= self._last_step and not self._stop.is_set():
            try:
                item: Any = self._prepare(step)
            except BaseException as err:  # noqa: BLE001 - handed to the loop, which raises it in its own thread
                item = _Failed(err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failed):
                return
            step += 1

    def next(self) -> tuple[PreparedStep, float]:
        """The next step's data and the seconds the loop waited for it (all of its preparation at depth 0)."""
        if self._next_step > self._last_step:
            raise RuntimeError(f"the feed was asked for step {self._next_step}, past its last step {self._last_step}")
        start = time.perf_counter()
        if self._queue is None:
            item: Any = self._prepare(self._next_step)
        else:
            item = self._queue.get()
            if isinstance(item, _Failed):
                self.close()
                raise item.error
        waited = time.perf_counter() - start
        if item.step != self._next_step:  # the thread prepares in order; anything else is a bug, not bad data
            raise RuntimeError(f"data prefetch handed step {item.step} where step {self._next_step} was due")
        self._next_step += 1
        self._state = item.data_state
        self.wait_seconds += waited
        return item, waited

    def state_dict(self) -> dict:
        """The lanes' state after the last consumed step (before the first one: the state the feed started from)."""
        return self._state

    def close(self) -> None:
        """Stop the thread (it finishes the step it is preparing, then exits); idempotent."""
        self._stop.set()
        if self._thread is not None:
            if self._queue is not None:
                try:  # unblock a thread waiting on a full queue
                    while True:
                        self._queue.get_nowait()
                except queue.Empty:
                    pass
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> "StepFeed":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
