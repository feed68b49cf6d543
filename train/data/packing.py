"""Exact packing: tokenized examples -> fixed-capacity rows with segment ids and per-segment positions.

Several short examples share one row; each keeps its own segment id (1, 2, ...; 0 is padding, added
later by :mod:`train.modeling.features`) and its own positions (restarting at 0). The feature converter turns
segment ids into block-diagonal attention masks, so packed training computes exactly what unpacked
training computes, only with less padding.

Enc-dec (``kind="encdec"``), two parallel rows; an example goes into a row only if its input fits the
input row AND its target fits the target row::

    inputs   (max_input_tokens=8)       targets  (max_target_tokens=5)
    tokens      a1 a2 a3 </s> b1 b2 </s>  .       tokens      x1 </s> y1 y2 </s>
    segment_ids  1  1  1   1   2  2   2   0       segment_ids  1   1   2  2   2
    positions    0  1  2   3   0  1   2   0       positions    0   1   0  1   2
                                     ^ padding (added by features, not by the packer)

Decoder / prefix-LM (``kind="decoder"`` or ``"prefix_lm"``), one row of ``max_tokens``; each example is
its input followed by its target::

    tokens       a1 a2 a3 x1 </s> b1 b2 y1 y2 </s>
    segment_ids   1  1  1  1   1   2  2  2  2   2
    positions     0  1  2  3   4   0  1  2  3   4
    prefix_mask   1  1  1  0   0   1  1  0  0   0    (input tokens: bidirectional for prefix_lm)
    loss_mask     0  0  0  1   1   0  0  1  1   1    (target tokens: the only ones with a loss)

Algorithm: streaming best fit over a bounded window. At most ``window`` rows are open. Each example
goes into the open row where it fits most tightly (ties: the oldest row); if it fits nowhere, a new
row is opened, and when ``window`` rows are already open the fullest one is emitted first. A row
that can take no more tokens is emitted at once. Memory is bounded by ``window`` rows, so this works
on an infinite mixture stream.

Exact resume: the packer is a *pull* object. ``next_row(source)`` pulls examples from ``source`` only
until one row is ready, and all buffered state (open rows, ready rows, counters) lives in the packer,
never in generator locals. So, between two rows, ``packer.state_dict()`` together with the source's
own state describes the position exactly; a fresh packer given ``load_state_dict(state)`` and the
restored source produces the same following rows. (This breaks if something prefetches from the
source behind the packer's back, e.g. DataLoader workers reading the same iterator.)

Over-long examples follow ``overlong_policy`` and are counted in :attr:`Packer.stats`:

- ``"truncate_left"`` / ``"truncate_right"``: cut tokens from the start / end of the input until the
  example fits; if the target alone leaves no room (enc-dec: target > ``max_target_tokens``; decoder:
  target >= ``max_tokens``), the example is dropped.
- ``"truncate_target"``: cut the end of the target; if the input alone leaves no room, dropped.
- ``"drop"``: drop every over-long example.

``pack=False`` emits one example per row through the same code path (for unpacked training, e.g. mT0).
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from train.errors import ConfigError, DataError

KINDS = ("encdec", "decoder", "prefix_lm")
OVERLONG_POLICIES = ("truncate_left", "truncate_right", "truncate_target", "drop")
STATE_VERSION = 1
MAX_DROPS_IN_A_ROW = 10_000  # consecutive over-long drops after which packing gives up with an error

# Counter names in Packer.stats (all ints); efficiency figures are derived by Packer.efficiency().
_COUNTERS = (
    "examples_seen",  # examples pulled from the source
    "examples_packed",  # examples that made it into an emitted row
    "rows",  # rows emitted
    "input_tokens",  # real tokens in emitted rows (enc-dec: input row; decoder: the input part)
    "target_tokens",  # real tokens in emitted rows (enc-dec: target row; decoder: the target part)
    "truncated_inputs",  # examples whose input was cut
    "truncated_targets",  # examples whose target was cut
    "truncated_tokens",  # tokens removed by truncation, both parts
    "dropped_overlong",  # examples dropped by the over-long policy
)


class Packer:
    """Streaming best-fit packer with exact, JSON-able resume state.

    Args:
        kind: "encdec", "decoder" or "prefix_lm".
        max_input_tokens: enc-dec input row capacity (required for "encdec").
        max_target_tokens: enc-dec target row capacity (required for "encdec").
        max_tokens: decoder row capacity (required for "decoder"/"prefix_lm").
        pack: False emits one example per row (unpacked training through the same path).
        window: how many rows may be open at once (memory bound and packing quality).
        overlong_policy: one of OVERLONG_POLICIES, see the module docstring.

    Raises:
        ConfigError: unknown kind or policy, missing or non-positive capacity, window < 1.
    """

    def __init__(
        self,
        kind: str,
        *,
        max_input_tokens: int | None = None,
        max_target_tokens: int | None = None,
        max_tokens: int | None = None,
        pack: bool = True,
        window: int = 16,
        overlong_policy: str = "truncate_left",
    ) -> None:
        if kind not in KINDS:
            raise ConfigError(f"packing: unknown model kind {kind!r}; expected one of {list(KINDS)}")
        if overlong_policy not in OVERLONG_POLICIES:
            raise ConfigError(
                f"packing: unknown overlong_policy {overlong_policy!r}; expected one of {list(OVERLONG_POLICIES)}"
            )
        if kind == "encdec":
            needed = {"max_input_tokens": max_input_tokens, "max_target_tokens": max_target_tokens}
        else:
            needed = {"max_tokens": max_tokens}
        for key, value in needed.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"packing: kind {kind!r} needs a positive integer {key}, got {value!r}")
        if kind != "encdec" and max_tokens < 2:
            raise ConfigError(f"packing: max_tokens must be >= 2 (one input and one target token), got {max_tokens}")
        if not isinstance(window, int) or window < 1:
            raise ConfigError(f"packing: window must be a positive integer, got {window!r}")
        self.kind = kind
        self.max_input_tokens = max_input_tokens
        self.max_target_tokens = max_target_tokens
        self.max_tokens = max_tokens
        self.pack = pack
        self.window = window if pack else 1
        self.overlong_policy = overlong_policy
        self._bins: list[list[dict]] = []  # open rows, oldest first; each a list of examples
        self._sizes: list[tuple[int, int]] = []  # (input, target) tokens used by each open row; derived state
        self._ready: deque[dict] = deque()  # rows built and waiting to be returned
        self._exhausted = False
        self.stats: dict[str, int] = {name: 0 for name in _COUNTERS}
        self._dropped_in_a_row = 0  # derived, not saved: it only decides when to give up on a stream

    # ------------------------------------------------------------------ public API

    def next_row(self, source: Iterator[dict]) -> dict:
        """Pull examples from ``source`` until one row is complete, and return it.

        Args:
            source: an iterator of tokenized examples ({"input_ids", "target_ids", "task", ...}).

        Returns:
            A packed row (see the module docstring and COMMON.md for the fields), plain Python lists.

        Raises:
            StopIteration: ``source`` is exhausted and every buffered row has been returned.
            DataError: an example lacks input_ids/target_ids or has an empty part.
        """
        while not self._ready:
            if self._exhausted:
                if not self._bins:
                    raise StopIteration
                self._emit(self._fullest_bin())
                continue
            try:
                example = next(source)
            except StopIteration:
                self._exhausted = True
                continue
            self._add(example)
        return self._ready.popleft()

    def rows(self, source: Iterable[dict]) -> Iterator[dict]:
        """Yield rows until ``source`` ends (forever for an infinite stream).

        The generator keeps no state of its own: between two yielded rows, :meth:`state_dict` is exact.
        """
        iterator = iter(source)
        while True:
            try:
                row = self.next_row(iterator)
            except StopIteration:
                return
            yield row

    def state_dict(self) -> dict[str, Any]:
        """Buffered examples, ready rows and counters, JSON-able; size bounded by ``window`` rows."""
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "bins": copy.deepcopy(self._bins),
            "ready": copy.deepcopy(list(self._ready)),
            "exhausted": self._exhausted,
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ConfigError: the state was saved with another version or packing configuration (resuming
                it would silently change the rows).
        """
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"packing: checkpoint packer state has version {state.get('version')!r}, this code reads "
                f"{STATE_VERSION}; resume with the code that wrote it"
            )
        if state["config"] != self._config():
            raise ConfigError(
                f"packing: checkpoint packer config {state['config']} differs from the run's {self._config()}; "
                "restore the original packing settings to resume exactly"
            )
        self._bins = copy.deepcopy(state["bins"])
        self._sizes = [self._used(b) for b in self._bins]
        self._ready = deque(copy.deepcopy(state["ready"]))
        self._exhausted = bool(state["exhausted"])
        self.stats = {name: int(state["stats"].get(name, 0)) for name in _COUNTERS}

    def efficiency(self) -> dict[str, float]:
        """Packing efficiency over the rows emitted so far.

        Returns:
            enc-dec: {"input_efficiency", "target_efficiency", "examples_per_row"}; decoder kinds:
            {"efficiency", "examples_per_row"}. Efficiency = real tokens / row capacity.
        """
        rows = max(self.stats["rows"], 1)
        out = {"examples_per_row": self.stats["examples_packed"] / rows}
        if self.kind == "encdec":
            out["input_efficiency"] = self.stats["input_tokens"] / (rows * self.max_input_tokens)
            out["target_efficiency"] = self.stats["target_tokens"] / (rows * self.max_target_tokens)
        else:
            real = self.stats["input_tokens"] + self.stats["target_tokens"]
            out["efficiency"] = real / (rows * self.max_tokens)
        return out

    # ------------------------------------------------------------------ internals

    def _config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "max_input_tokens": self.max_input_tokens,
            "max_target_tokens": self.max_target_tokens,
            "max_tokens": self.max_tokens,
            "pack": self.pack,
            "window": self.window,
            "overlong_policy": self.overlong_policy,
        }

    def _add(self, raw: dict) -> None:
        self.stats["examples_seen"] += 1
        example = self._fit(self._validated(raw))
        if example is None:
            self._dropped_in_a_row += 1
            if self._dropped_in_a_row >= MAX_DROPS_IN_A_ROW:  # an infinite stream would never give a row
                raise DataError(
                    f"packing: the last {self._dropped_in_a_row:,} examples were all dropped as over-long "
                    f"(data.overlong={self.overlong_policy!r}; e.g. task {raw.get('task', '?')!r} with "
                    f"{len(raw['input_ids'])} input and {len(raw['target_ids'])} target tokens against rows of "
                    f"{self._capacity()}). Raise the row capacity or use a truncate_* policy.")
            return
        self._dropped_in_a_row = 0
        if not self.pack:
            self._emit([example])
            return
        best = self._best_bin(example)
        n_in, n_tgt = len(example["input_ids"]), len(example["target_ids"])
        if best is None:
            if len(self._bins) >= self.window:
                self._emit(self._fullest_bin())
            self._bins.append([example])
            self._sizes.append((n_in, n_tgt))
            best = len(self._bins) - 1
        else:
            self._bins[best].append(example)
            used_in, used_tgt = self._sizes[best]
            self._sizes[best] = (used_in + n_in, used_tgt + n_tgt)
        if self._is_full(self._sizes[best]):
            self._emit(best)

    def _capacity(self) -> str:
        if self.kind == "encdec":
            return f"{self.max_input_tokens} input + {self.max_target_tokens} target tokens"
        return f"{self.max_tokens} tokens"

    def _validated(self, raw: dict) -> dict:
        where = f"task {raw.get('task', '?')!r}, index {raw.get('index', '?')!r}"
        for key in ("input_ids", "target_ids"):
            if key not in raw:
                raise DataError(f"packing: example ({where}) has no {key!r}; tokenize examples before packing")
            if len(raw[key]) == 0:
                raise DataError(
                    f"packing: example ({where}) has an empty {key!r}; every example needs at least one input "
                    "and one target token (check the template renders non-empty text)"
                )
        # Keep only what rows need; the buffered state stays small and JSON-able.
        return {
            "input_ids": [int(t) for t in raw["input_ids"]],
            "target_ids": [int(t) for t in raw["target_ids"]],
            "task": str(raw.get("task", "")),
            "index": raw.get("index"),
        }

    def _fit(self, ex: dict) -> dict | None:
        """Apply the over-long policy. Returns the (possibly truncated) example, or None if dropped."""
        n_in, n_tgt = len(ex["input_ids"]), len(ex["target_ids"])
        if self.kind == "encdec":
            in_budget, tgt_budget = self.max_input_tokens, self.max_target_tokens
        else:
            # One shared row: the part being cut gets whatever the other part leaves.
            in_budget = self.max_tokens - n_tgt
            tgt_budget = self.max_tokens - n_in
        if self.kind == "encdec":
            fits = n_in <= in_budget and n_tgt <= tgt_budget
        else:
            fits = n_in + n_tgt <= self.max_tokens
        if fits:
            return ex
        policy = self.overlong_policy
        if policy in ("truncate_left", "truncate_right"):
            other_fits = n_tgt <= self.max_target_tokens if self.kind == "encdec" else in_budget >= 1
            if not other_fits:
                self.stats["dropped_overlong"] += 1
                return None
            keep = in_budget
            ids = ex["input_ids"]
            ex["input_ids"] = ids[len(ids) - keep :] if policy == "truncate_left" else ids[:keep]
            self.stats["truncated_inputs"] += 1
            self.stats["truncated_tokens"] += n_in - keep
            return ex
        if policy == "truncate_target":
            other_fits = n_in <= self.max_input_tokens if self.kind == "encdec" else tgt_budget >= 1
            if not other_fits:
                self.stats["dropped_overlong"] += 1
                return None
            ex["target_ids"] = ex["target_ids"][:tgt_budget]
            self.stats["truncated_targets"] += 1
            self.stats["truncated_tokens"] += n_tgt - tgt_budget
            return ex
        self.stats["dropped_overlong"] += 1
        return None

    def _used(self, bin_: list[dict]) -> tuple[int, int]:
        n_in = sum(len(ex["input_ids"]) for ex in bin_)
        n_tgt = sum(len(ex["target_ids"]) for ex in bin_)
        return n_in, n_tgt

    def _slack_after(self, used: tuple[int, int], ex: dict) -> float | None:
        """Free fraction left in the row after adding ``ex`` (tighter part for enc-dec); None if it does not fit."""
        n_in, n_tgt = used
        n_in += len(ex["input_ids"])
        n_tgt += len(ex["target_ids"])
        if self.kind == "encdec":
            if n_in > self.max_input_tokens or n_tgt > self.max_target_tokens:
                return None
            return min(1 - n_in / self.max_input_tokens, 1 - n_tgt / self.max_target_tokens)
        if n_in + n_tgt > self.max_tokens:
            return None
        return 1 - (n_in + n_tgt) / self.max_tokens

    def _best_bin(self, ex: dict) -> int | None:
        best, best_slack = None, None
        for i, used in enumerate(self._sizes):
            slack = self._slack_after(used, ex)
            if slack is not None and (best_slack is None or slack < best_slack):  # strict: oldest wins ties
                best, best_slack = i, slack
        return best

    def _fill(self, used: tuple[int, int]) -> float:
        n_in, n_tgt = used
        if self.kind == "encdec":
            return max(n_in / self.max_input_tokens, n_tgt / self.max_target_tokens)
        return (n_in + n_tgt) / self.max_tokens

    def _fullest_bin(self) -> int:
        fills = [self._fill(used) for used in self._sizes]
        return fills.index(max(fills))  # first maximum: the oldest row wins ties

    def _is_full(self, used: tuple[int, int]) -> bool:
        # Every example has >= 1 token in each part, so a full part (enc-dec) or a full row (decoder)
        # cannot take another example.
        n_in, n_tgt = used
        if self.kind == "encdec":
            return n_in >= self.max_input_tokens or n_tgt >= self.max_target_tokens
        return n_in + n_tgt >= self.max_tokens

    def _emit(self, which: int | list[dict]) -> None:
        if isinstance(which, int):
            bin_ = self._bins.pop(which)
            self._sizes.pop(which)
        else:
            bin_ = which
        self._ready.append(build_row(bin_, self.kind))
        n_in, n_tgt = self._used(bin_)
        self.stats["rows"] += 1
        self.stats["examples_packed"] += len(bin_)
        self.stats["input_tokens"] += n_in
        self.stats["target_tokens"] += n_tgt


def build_row(examples: list[dict], kind: str) -> dict:
    """Concatenate examples into one packed row (no padding).

    Args:
        examples: tokenized examples that fit the row together.
        kind: "encdec", "decoder" or "prefix_lm".

    Returns:
        The packed-row dict of COMMON.md, plus "indices" (each segment's source index, or None).
    """
    row: dict[str, list] = {"tasks": [ex.get("task", "") for ex in examples]}
    row["indices"] = [ex.get("index") for ex in examples]
    if kind == "encdec":
        for part, key in (("input", "input_ids"), ("target", "target_ids")):
            ids, seg, pos = [], [], []
            for s, ex in enumerate(examples, start=1):
                n = len(ex[key])
                ids += ex[key]
                seg += [s] * n
                pos += list(range(n))
            row[f"{part}_ids"], row[f"{part}_segment_ids"], row[f"{part}_positions"] = ids, seg, pos
        return row
    ids, seg, pos, loss_mask, prefix_mask = [], [], [], [], []
    for s, ex in enumerate(examples, start=1):
        n_in, n_tgt = len(ex["input_ids"]), len(ex["target_ids"])
        ids += ex["input_ids"] + ex["target_ids"]
        seg += [s] * (n_in + n_tgt)
        pos += list(range(n_in + n_tgt))
        loss_mask += [0] * n_in + [1] * n_tgt
        prefix_mask += [1] * n_in + [0] * n_tgt
    row.update(input_ids=ids, segment_ids=seg, positions=pos, loss_mask=loss_mask, prefix_mask=prefix_mask)
    return row
