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

Answer choices (``choices=True``, set when T-Few's unlikelihood or rank-classification loss is on): an
example's WRONG choices (``choice_ids`` / ``choice_lengths`` from :mod:`train.data.tokenization`; the gold
choice is the target itself) belong to its segment and take row capacity. Every token gets a *branch*
id within its segment: 0 = input (decoders), 1 = the target (the gold choice), 2, 3, ... = the wrong
choices. Enc-dec puts the choices in the target row, each restarting its positions at 0 (so each gets
its own decoder start token)::

    inputs   tokens      a1 a2 </s> b1 </s>
             segment_ids  1  1   1   2   2
    targets  tokens      x1 </s> n1 n2 </s> m1 </s> y1 </s>      x = gold, n and m = wrong choices of a
             segment_ids  1   1   1  1   1   1   1   2   2
             branch_ids   1   1   2  2   2   3   3   1   1      (target_branch_ids)
             positions    0   1   0  1   2   0   1   0   1

Decoder / prefix-LM append the wrong choices after the target, with the positions the target has (they
continue from the input length), so each choice reads as if it directly followed the input::

    tokens       a1 a2 x1 </s> n1 n2 </s> b1 y1 </s>
    segment_ids   1  1  1   1   1  1   1   2  2   2
    branch_ids    0  0  1   1   2  2   2   0  1   1
    positions     0  1  2   3   2  3   4   0  1   2
    prefix_mask   1  1  0   0   0  0   0   1  0   0
    loss_mask     0  0  1   1   0  0   0   0  1   1    (choices carry no LM loss)

:mod:`train.modeling.features` lets a token attend only to its own branch (plus, for decoders, its
segment's input), so every choice is scored exactly as if run alone after the input. Over-long choices:
the choices never cause truncation. The example is first fitted by ``overlong_policy`` as above; if its
target was cut (the gold choice would no longer be whole) or its wrong choices do not fit next to it in
an empty row (enc-dec: target + choices > ``max_target_tokens``; decoder: input + target + choices >
``max_tokens``), the choice set is dropped, counted in ``stats["dropped_choice_sets"]``, and the example
keeps its LM loss. With ``choices=False`` (the default) choice columns are ignored and rows, counters and
state are exactly those of a packer that never heard of choices.
"""

from __future__ import annotations

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
_CHOICE_COUNTERS = (  # only with choices=True
    "choice_sets",  # examples packed with a usable choice set (gold + >= 1 wrong choice)
    "choice_tokens",  # wrong-choice tokens in emitted rows
    "dropped_choice_sets",  # choice sets dropped by the over-long rule (their examples keep the LM loss)
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
        choices: carry each example's wrong answer choices in its segment (T-Few's choice losses).

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
        choices: bool = False,
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
        self.choices = bool(choices)
        self._counters = _COUNTERS + (_CHOICE_COUNTERS if self.choices else ())
        self._bins: list[list[dict]] = []  # open rows, oldest first; each a list of examples
        self._sizes: list[tuple[int, int]] = []  # (input, target) tokens used by each open row; derived state
        self._ready: deque[dict] = deque()  # rows built and waiting to be returned
        self._exhausted = False
        self.stats: dict[str, int] = {name: 0 for name in self._counters}
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
            "bins": _plain_copy(self._bins),
            "ready": _plain_copy(list(self._ready)),
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
        self._bins = _plain_copy(state["bins"])
        self._sizes = [self._used(b) for b in self._bins]
        self._ready = deque(_plain_copy(state["ready"]))
        self._exhausted = bool(state["exhausted"])
        self.stats = {name: int(state["stats"].get(name, 0)) for name in self._counters}

    def efficiency(self) -> dict[str, float]:
        """Packing efficiency over the rows emitted so far; see :func:`efficiency_of`."""
        return efficiency_of(self.stats, self.kind, max_input_tokens=self.max_input_tokens,
                             max_target_tokens=self.max_target_tokens, max_tokens=self.max_tokens)

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
            **({"choices": True} if self.choices else {}),  # absent when off: older checkpoints still resume
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
        n_in, n_tgt = _parts(example)
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
        example = {
            "input_ids": [int(t) for t in raw["input_ids"]],
            "target_ids": [int(t) for t in raw["target_ids"]],
            "task": str(raw.get("task", "")),
            "index": raw.get("index"),
        }
        if self.choices and raw.get("choice_lengths") is not None and len(raw["choice_lengths"]) > 0:
            lengths, flat = [int(n) for n in raw["choice_lengths"]], [int(t) for t in raw.get("choice_ids", ())]
            if min(lengths) < 1 or sum(lengths) != len(flat):
                raise DataError(f"packing: example ({where}) has choice_lengths {lengths} that do not split its "
                                f"{len(flat)} choice_ids into non-empty choices; re-tokenize the data")
            starts = [sum(lengths[:i]) for i in range(len(lengths))]
            example["choices"] = [flat[a : a + n] for a, n in zip(starts, lengths)]  # the wrong choices
        return example

    def _fit(self, ex: dict) -> dict | None:
        """Apply the over-long policy, then the choices rule. Returns the (possibly truncated) example, or None."""
        n_tgt = len(ex["target_ids"])
        fitted = self._fit_lm(ex)
        if fitted is None or "choices" not in fitted:
            return fitted
        extra = sum(len(c) for c in fitted["choices"])
        if self.kind == "encdec":
            fits = len(fitted["target_ids"]) + extra <= self.max_target_tokens
        else:
            fits = len(fitted["input_ids"]) + len(fitted["target_ids"]) + extra <= self.max_tokens
        if not fits or len(fitted["target_ids"]) < n_tgt:  # a cut target is no longer the gold choice
            del fitted["choices"]
            self.stats["dropped_choice_sets"] += 1
        return fitted

    def _fit_lm(self, ex: dict) -> dict | None:
        """Apply the over-long policy to input and target. Returns the (possibly truncated) example, or None."""
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
        parts = [_parts(ex) for ex in bin_]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def _best_bin(self, ex: dict) -> int | None:
        """The open row ``ex`` fits most tightly: least free fraction left after adding it (enc-dec: the tighter
        part's), ties to the oldest row; None if it fits in none. The hot loop of packing: one pass over
        ``self._sizes``, the example's parts counted once."""
        ex_in, ex_tgt = _parts(ex)
        best, best_slack = None, None
        if self.kind == "encdec":
            cap_in, cap_tgt = self.max_input_tokens, self.max_target_tokens
            for i, (n_in, n_tgt) in enumerate(self._sizes):
                n_in += ex_in
                n_tgt += ex_tgt
                if n_in > cap_in or n_tgt > cap_tgt:
                    continue
                slack = min(1 - n_in / cap_in, 1 - n_tgt / cap_tgt)
                if best_slack is None or slack < best_slack:  # strict: the oldest row wins ties
                    best, best_slack = i, slack
            return best
        cap, ex_all = self.max_tokens, ex_in + ex_tgt
        for i, (n_in, n_tgt) in enumerate(self._sizes):
            n = n_in + n_tgt + ex_all
            if n > cap:
                continue
            slack = 1 - n / cap
            if best_slack is None or slack < best_slack:
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
        self._ready.append(build_row(bin_, self.kind, choices=self.choices))
        self.stats["rows"] += 1
        self.stats["examples_packed"] += len(bin_)
        self.stats["input_tokens"] += sum(len(ex["input_ids"]) for ex in bin_)
        self.stats["target_tokens"] += sum(len(ex["target_ids"]) for ex in bin_)
        if self.choices:
            self.stats["choice_sets"] += sum("choices" in ex for ex in bin_)
            self.stats["choice_tokens"] += sum(len(c) for ex in bin_ for c in ex.get("choices", ()))


def _plain_copy(value: Any) -> Any:
    """A copy of packer state (dicts, lists, scalars; each list holds one kind): token lists are copied by
    ``list()`` at C speed, where ``copy.deepcopy`` visits every token (15 s for a T0-size state)."""
    if isinstance(value, dict):
        return {key: _plain_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        if value and isinstance(value[0], (list, dict)):
            return [_plain_copy(item) for item in value]
        return list(value)
    return value


def _parts(ex: dict) -> tuple[int, int]:
    """(input, target-part) tokens an example occupies; its wrong choices count in the target part."""
    return len(ex["input_ids"]), len(ex["target_ids"]) + sum(len(c) for c in ex.get("choices", ()))


def count_choice_sets(rows: list[dict]) -> int:
    """Examples with a usable choice set in packed rows (segments holding a branch >= 2)."""
    n = 0
    for row in rows:
        branch = row.get("target_branch_ids", row.get("branch_ids"))
        segments = row.get("target_segment_ids", row.get("segment_ids"))
        if branch is not None:
            n += len({s for s, b in zip(segments, branch) if b >= 2})
    return n


def build_row(examples: list[dict], kind: str, *, choices: bool = False) -> dict:
    """Concatenate examples into one packed row (no padding).

    Args:
        examples: tokenized examples that fit the row together; with ``choices``, an example's optional
            "choices" (its wrong choices' token lists) go into its segment as branches 2, 3, ...
        kind: "encdec", "decoder" or "prefix_lm".
        choices: also emit branch ids ("target_branch_ids" for enc-dec, "branch_ids" for decoders), even
            when no example has choices, so every row of a run has the same fields.

    Returns:
        The packed-row dict of COMMON.md, plus "indices" (each segment's source index, or None).
    """
    row: dict[str, list] = {"tasks": [ex.get("task", "") for ex in examples]}
    row["indices"] = [ex.get("index") for ex in examples]
    if kind == "encdec":
        for part, key in (("input", "input_ids"), ("target", "target_ids")):
            ids, seg, pos, branch = [], [], [], []
            for s, ex in enumerate(examples, start=1):
                # the target part: the target (branch 1), then each wrong choice (2, 3, ...), positions from 0
                spans = [ex[key]] + (list(ex.get("choices", ())) if part == "target" and choices else [])
                for b, tokens in enumerate(spans, start=1):
                    ids += tokens
                    seg += [s] * len(tokens)
                    pos += list(range(len(tokens)))
                    branch += [b] * len(tokens)
            row[f"{part}_ids"], row[f"{part}_segment_ids"], row[f"{part}_positions"] = ids, seg, pos
            if part == "target" and choices:
                row["target_branch_ids"] = branch
        return row
    ids, seg, pos, loss_mask, prefix_mask, branch = [], [], [], [], [], []
    for s, ex in enumerate(examples, start=1):
        n_in, n_tgt = len(ex["input_ids"]), len(ex["target_ids"])
        ids += ex["input_ids"] + ex["target_ids"]
        seg += [s] * (n_in + n_tgt)
        pos += list(range(n_in + n_tgt))
        loss_mask += [0] * n_in + [1] * n_tgt
        prefix_mask += [1] * n_in + [0] * n_tgt
        branch += [0] * n_in + [1] * n_tgt
        for b, tokens in enumerate(ex.get("choices", ()) if choices else (), start=2):
            n = len(tokens)  # a wrong choice takes the target's place: positions continue from the input
            ids += tokens
            seg += [s] * n
            pos += list(range(n_in, n_in + n))
            loss_mask += [0] * n
            prefix_mask += [0] * n
            branch += [b] * n
    row.update(input_ids=ids, segment_ids=seg, positions=pos, loss_mask=loss_mask, prefix_mask=prefix_mask)
    if choices:
        row["branch_ids"] = branch
    return row


def efficiency_of(stats: dict, kind: str, *, max_input_tokens: int | None = None, max_target_tokens: int | None = None,
                  max_tokens: int | None = None) -> dict[str, float]:
    """Packing efficiency of :attr:`Packer.stats` counters (one packer's, or several packers' summed).

    Returns:
        enc-dec: {"input_efficiency", "target_efficiency", "examples_per_row"}; decoder kinds:
        {"efficiency", "examples_per_row"}. Efficiency = real tokens / row capacity. Empty without counters.
    """
    if not stats:
        return {}
    rows = max(stats["rows"], 1)
    out = {"examples_per_row": stats["examples_packed"] / rows}
    if kind == "encdec":
        out["input_efficiency"] = stats["input_tokens"] / (rows * max_input_tokens)
        targets = stats["target_tokens"] + stats.get("choice_tokens", 0)  # both fill the target row
        out["target_efficiency"] = targets / (rows * max_target_tokens)
    else:
        real = stats["input_tokens"] + stats["target_tokens"] + stats.get("choice_tokens", 0)
        out["efficiency"] = real / (rows * max_tokens)
    return out
