"""Data lanes: a step's global batch built as independent (mixture lane, packer) pairs, so each rank packs only its rows.

A step's global batch of ``R`` packed rows is ``L`` lanes of ``R / L`` rows each, in lane order::

    global rows   | lane 0 | lane 1 | lane 2 | lane 3 | lane 4 | lane 5 | lane 6 | lane 7 |     L = 8
    2 ranks       |            rank 0                 |            rank 1                 |
    4 ranks       |     rank 0      |     rank 1      |     rank 2      |     rank 3      |

Lane ``l`` is its own mixture stream (:meth:`~train.data.mixtures.MixtureStream.lane_stream`: its own
source draws, and the ``l``-th of every ``L`` draws of each source's epoch shuffle, so no two lanes train
on the same row within an epoch) feeding its own :class:`~train.data.packing.Packer`. ``L`` comes from the
config and the global batch (``data.lanes``), never from the number of ranks, and rank ``r`` of ``W``
builds lanes ``[r L / W, (r + 1) L / W)``: exactly the contiguous slice of the global rows it trains on.
So:

* the global rows and each rank's slice are the same for every ``W`` that divides ``L`` (1 process
  trains on what ``N`` processes train on);
* a rank's data work is ``R / W`` rows per step, however many ranks there are (the design before lanes
  had every rank pack all ``R`` rows and keep its slice);
* the resumable state is every lane's (stream, packer) state. A checkpoint gathers all lanes; a resume,
  with any ``W`` that divides ``L``, loads its own lanes from it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from train.errors import ConfigError

STATE_FORMAT = 1
MAX_AUTO_LANES = 64  # data.lanes=auto: the largest divisor of the global rows up to this


def resolve_lanes(lanes: int | str, global_rows: int, world_size: int) -> int:
    """The number of lanes: ``data.lanes`` as an int, or ``"auto"``: the largest divisor of the global rows
    that is at most :data:`MAX_AUTO_LANES` (it bounds the packer state a checkpoint holds, ``lanes x
    data.pack_window`` open rows; every power-of-two rank count up to 64 divides it when the global batch is
    a power of two).

    Raises:
        ConfigError: the lanes do not divide the global rows, or the ranks do not divide the lanes.
    """
    if lanes == "auto":
        resolved = max(d for d in range(1, min(global_rows, MAX_AUTO_LANES) + 1) if global_rows % d == 0)
        how = f"data.lanes=auto resolved to {resolved} (the largest divisor of the {global_rows}-row global batch up to {MAX_AUTO_LANES})"
    else:
        resolved, how = int(lanes), f"data.lanes={lanes}"
        if resolved < 1 or global_rows % resolved:
            raise ConfigError(f"{how} must divide the global batch of {global_rows} rows; "
                              f"choose one of {_divisors(global_rows)} or `auto`.")
    if resolved % world_size:
        fits = [d for d in _divisors(global_rows) if d % world_size == 0]
        raise ConfigError(f"{how} does not split over {world_size} ranks: each rank builds whole lanes. "
                          f"Set `data.lanes` to one of {fits} (multiples of {world_size} that divide the global batch); "
                          "keep that value for every resume.")
    return resolved


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class DataLanes:
    """This rank's lanes: each a mixture lane and a packer, built from a 1-lane stream and a packer factory.

    Args:
        stream: the 1-lane mixture stream (its sources and seed; it is not consumed).
        make_packer: returns a fresh packer (one per lane).
        lanes: ``L``, from :func:`resolve_lanes`.
        global_rows: rows per step, all ranks together (a multiple of ``lanes``).
        rank, world_size: this process and the number of processes (``world_size`` divides ``lanes``).
    """

    def __init__(self, stream: Any, make_packer: Callable[[], Any], *, lanes: int, global_rows: int,
                 rank: int = 0, world_size: int = 1):
        if global_rows % lanes or lanes % world_size:
            raise ConfigError(f"{lanes} lanes must divide the {global_rows} global rows and be a multiple of {world_size} ranks.")
        self.lanes = lanes
        self.rows_per_lane = global_rows // lanes
        per_rank = lanes // world_size
        self.mine = range(rank * per_rank, (rank + 1) * per_rank)
        self.sources = stream.sources
        self._streams = {lane: stream.lane_stream(lane, lanes) for lane in self.mine}
        self._packers = {lane: make_packer() for lane in self.mine}

    def next_rows(self) -> list[dict]:
        """This rank's rows of the next step: ``rows_per_lane`` rows of each of its lanes, in lane order."""
        return [self._packers[lane].next_row(self._streams[lane]) for lane in self.mine for _ in range(self.rows_per_lane)]

    @property
    def stats(self) -> Counter:
        """The packers' counters (:data:`train.data.packing._COUNTERS`) summed over this rank's lanes."""
        total: Counter = Counter()
        for packer in self._packers.values():
            total.update(packer.stats)
        return total

    @property
    def packer(self) -> Any:
        """One of this rank's packers (all are configured alike): for its kind and capacities."""
        return self._packers[self.mine.start]

    def state_dict(self) -> dict:
        """This rank's lanes' positions (JSON-able); merge all ranks' with :func:`merge_states` for a checkpoint."""
        return {"format": STATE_FORMAT, "lanes": self.lanes, "rows_per_lane": self.rows_per_lane,
                "lane_states": {str(lane): {"stream": self._streams[lane].state_dict(),
                                            "packer": self._packers[lane].state_dict()} for lane in self.mine}}

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's lanes from a merged state (any rank count's).

        Raises:
            ConfigError: another lane layout or format (change ``data.lanes`` back), or a lane is missing;
                the mixture and packer states refuse their own mismatches.
        """
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"the checkpoint's data state has format {state.get('format')!r}, this code reads "
                              f"{STATE_FORMAT} (data lanes); resume with the code that wrote it, or start a new run.")
        for key in ("lanes", "rows_per_lane"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(f"cannot resume the data: the checkpoint has {key}={state.get(key)!r}, this run "
                                  f"{getattr(self, key)!r}. Resume with the same `data.lanes` and global batch size.")
        saved = state.get("lane_states") or {}
        missing = [lane for lane in self.mine if str(lane) not in saved]
        if missing:
            raise ConfigError(f"the checkpoint's data state lacks lane(s) {missing}: it was not written whole.")
        for lane in self.mine:
            self._streams[lane].load_state_dict(saved[str(lane)]["stream"])
            self._packers[lane].load_state_dict(saved[str(lane)]["packer"])


def merge_states(states: Sequence[dict]) -> dict:
    """One checkpointable state from every rank's :meth:`DataLanes.state_dict`."""
    merged = {key: states[0][key] for key in ("format", "lanes", "rows_per_lane")}
    merged["lane_states"] = {}
    for state in states:
        merged["lane_states"].update(state["lane_states"])
    if len(merged["lane_states"]) != merged["lanes"]:
        raise ConfigError(f"data lanes: gathered {len(merged['lane_states'])} lane states for {merged['lanes']} lanes.")
    merged["lane_states"] = dict(sorted(merged["lane_states"].items(), key=lambda item: int(item[0])))
    return merged
