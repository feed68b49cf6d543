"""Read a run directory as far as it got, never raising on what a killed or still-running run leaves behind.

A run directory holds ``config.yaml``, ``run.json`` (status and the planned mixture), ``metrics.jsonl``,
``eval/step-N.json`` and ``checkpoints/step-N/`` (each with ``trainer_state.json`` and a ``COMPLETE``
marker). Any of them may be missing, empty or cut off mid-line (kill -9 during a write); each problem
becomes a plain-language note in :attr:`RunData.notes` and the rest is read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from train.loop import checkpointing
from train.loop.rundir import RECORD_FILE, lock_is_held

STEP_FILE = re.compile(r"^step-(\d+)\.json$")


@dataclass
class RunData:
    """Everything a report shows about one run; absent parts are empty and explained in ``notes``."""

    path: Path
    name: str
    config: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)  # run.json
    train: list[dict] = field(default_factory=list)  # metrics.jsonl lines with a training loss, in step order
    evals: list[dict] = field(default_factory=list)  # eval/step-N.json results, in step order
    checkpoints: list[dict] = field(default_factory=list)  # {"path", "step", "complete"}
    exports: dict = field(default_factory=dict)  # "final" / "best" -> path
    state: dict = field(default_factory=dict)  # trainer_state.json of the newest complete checkpoint
    notes: list[str] = field(default_factory=list)

    @property
    def max_steps(self) -> Optional[int]:
        return (self.config.get("trainer") or {}).get("max_steps") or self.record.get("max_steps")

    @property
    def last_step(self) -> int:
        steps = [m["step"] for m in self.train] + [e.get("step", 0) for e in self.evals]
        return max(steps, default=int(self.state.get("step", 0)))

    @property
    def status(self) -> str:
        """completed / preempted / interrupted / max_time / failed / running / stopped (killed) / unknown."""
        status = self.record.get("status")
        if status == "running" and not lock_is_held(self.path):
            return "stopped (killed or crashed: run.json still says running and no process holds the run)"
        if status:
            return status
        if self.max_steps and self.last_step >= self.max_steps:
            return "completed"
        return "unknown (no run.json: a run from before run.json existed, or one that never started)"


def read_run(path: str | Path) -> RunData:
    """Read one run directory (see the module docstring). Never raises for damaged or missing files."""
    path = Path(path)
    run = RunData(path=path, name=path.resolve().name)
    if not path.is_dir():
        run.notes.append(f"{path} is not a directory.")
        return run
    run.config = _read_yaml(path / "config.yaml", run.notes)
    run.name = ((run.config.get("run") or {}).get("name") or run.name) if run.config else run.name
    run.record = _read_json(path / RECORD_FILE, run.notes, missing_ok=True) or {}
    run.train = _read_metrics(path / "metrics.jsonl", run.notes)
    run.evals = _read_evals(path / "eval", run.notes)
    run.checkpoints = _list_checkpoints(path)
    complete = [c for c in run.checkpoints if c["complete"]]
    if complete:
        run.state = _read_json(Path(complete[-1]["path"]) / checkpointing.STATE_FILE, run.notes) or {}
    for name in ("final", "best"):
        if (path / name / "config.json").is_file():
            run.exports[name] = str(path / name)
    if not any((run.config, run.record, run.train, run.evals, run.checkpoints)):
        run.notes.append(f"{path} holds no run files (config.yaml, run.json, metrics.jsonl, eval/, checkpoints/): "
                         "is it a run directory (`run.output_dir`), and has the run started?")
    return run


def _read_yaml(path: Path, notes: list[str]) -> dict:
    if not path.is_file():
        notes.append(f"no {path.name}: the resolved config is unknown.")
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        notes.append(f"{path.name} does not parse ({type(err).__name__}); the config is not shown.")
        return {}
    if not isinstance(data, dict):
        notes.append(f"{path.name} is not a mapping; the config is not shown.")
        return {}
    return data


def _read_json(path: Path, notes: list[str], missing_ok: bool = False) -> Optional[dict]:
    if not path.is_file():
        if not missing_ok:
            notes.append(f"no {path}.")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        notes.append(f"{path} is not valid JSON ({err}); skipped.")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path} is not a JSON object; skipped.")
        return None
    return data


def _read_metrics(path: Path, notes: list[str]) -> list[dict]:
    """Training lines of metrics.jsonl (those with ``train/loss``), one per step, the last write winning.

    A resumed run appends the steps after its checkpoint again; the later line is the one that counts.
    """
    if not path.is_file():
        notes.append("no metrics.jsonl: no training step was logged yet.")
        return []
    by_step: dict[int, dict] = {}
    bad = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(lineno)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "train/loss" in record:
            by_step[record["step"]] = record
    if bad:
        where = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        notes.append(f"metrics.jsonl: {len(bad)} line(s) are not JSON (line {where}; a run killed mid-write "
                     "leaves a cut-off last line); they were skipped.")
    return [by_step[s] for s in sorted(by_step)]


def _read_evals(folder: Path, notes: list[str]) -> list[dict]:
    if not folder.is_dir():
        notes.append("no eval/ folder: this run has no eval mixture (`eval.mixture`), or no evaluation has run yet.")
        return []
    out = []
    for path in sorted(folder.glob("step-*.json")):
        match = STEP_FILE.match(path.name)
        data = _read_json(path, notes)
        if match is None or data is None:
            continue
        if not isinstance(data.get("datasets"), dict) or not isinstance(data.get("templates"), dict):
            notes.append(f"{path} lacks `datasets` / `templates`; skipped.")
            continue
        data.setdefault("step", int(match.group(1)))
        out.append(data)
    if not out:
        notes.append("eval/ holds no readable step-N.json yet.")
    return sorted(out, key=lambda d: d["step"])


def _list_checkpoints(path: Path) -> list[dict]:
    folder = checkpointing.checkpoint_dir(path)
    if not folder.is_dir():
        return []
    out = []
    for ckpt in sorted(folder.glob("step-*")):
        match = re.match(r"^step-(\d+)$", ckpt.name)
        if match and ckpt.is_dir():
            out.append({"path": str(ckpt), "step": int(match.group(1)),
                        "complete": (ckpt / checkpointing.MARKER).is_file()})
    return sorted(out, key=lambda c: c["step"])


# ----------------------------------------------------------------------------------- derived tables


def series(run: RunData, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one training metric, skipping lines without it or with a non-number."""
    steps, values = [], []
    for m in run.train:
        value = m.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(m["step"])
            values.append(float(value))
    return steps, values


def mixture_table(run: RunData) -> list[dict]:
    """Per task: planned and realised shares of examples and tokens, epochs, from run.json and the counters.

    Planned example shares come from run.json's mixture (the stream's rates; templates summed per task);
    planned token shares weigh them by each task's mean tokens per example as trained. Realised counts are
    the latest of metrics.jsonl's ``tasks/*`` and ``task_tokens/*`` (or the newest checkpoint's counters).
    """
    last = run.train[-1] if run.train else {}
    examples = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("tasks/")} or \
        dict(run.state.get("task_counts") or {})
    tokens = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("task_tokens/")} or \
        dict(run.state.get("task_tokens") or {})
    planned: dict[str, dict] = {}
    for source in run.record.get("mixture") or []:
        entry = planned.setdefault(source["task"], {"probability": 0.0, "rows": 0})
        entry["probability"] += float(source["probability"])
        entry["rows"] += int(source["examples"])
    names = sorted(set(planned) | set(examples))
    total_examples = sum(examples.values()) or 0
    total_tokens = sum(tokens.values()) or 0
    per_example = {t: tokens[t] / examples[t] for t in names if examples.get(t) and tokens.get(t)}
    token_weight = {t: planned.get(t, {}).get("probability", 0.0) * per_example.get(t, 0.0) for t in names}
    weight_sum = sum(token_weight.values())
    rows = []
    for t in names:
        p = planned.get(t, {})
        rows.append({
            "task": t,
            "planned_examples": p.get("probability"),
            "realised_examples": examples.get(t, 0) / total_examples if total_examples else None,
            "planned_tokens": token_weight[t] / weight_sum if weight_sum else None,
            "realised_tokens": tokens.get(t, 0) / total_tokens if total_tokens and tokens else None,
            "examples_seen": examples.get(t, 0), "tokens_seen": tokens.get(t),
            "dataset_examples": p.get("rows"),
            "epochs": examples.get(t, 0) / p["rows"] if p.get("rows") else None,
        })
    return rows


def packing_losses(run: RunData) -> dict:
    """What the packer truncated or dropped so far (the latest ``packing/truncated_*`` / ``dropped_*``)."""
    last = run.train[-1] if run.train else {}
    return {k.split("/", 1)[1]: v for k, v in last.items()
            if k.startswith(("packing/truncated", "packing/dropped"))}


def protocol_label(runs: Any) -> str:
    """What the per-dataset number of these runs' evaluations is (T0's median over templates, or T-Few's
    median over seeds of one random template per example); both when the runs differ."""
    names = sorted({str((ev.get("protocol") or {}).get("name", "t0")) if isinstance(ev.get("protocol"), dict)
                    else str(ev.get("protocol") or "t0") for run in runs for ev in run.evals})
    labels = {"t0": "median over templates", "tfew": "T-Few: median over seeds, one random template per example"}
    return " / ".join(labels.get(n, n) for n in names) or labels["t0"]


def eval_table(run: RunData) -> dict[str, dict[str, Any]]:
    """dataset -> {"steps", "median", "min", "max", "chance"} over the run's evaluations."""
    out: dict[str, dict[str, Any]] = {}
    for ev in run.evals:
        for dataset, s in ev["datasets"].items():
            if not isinstance(s, dict) or s.get("median") is None:
                continue
            entry = out.setdefault(dataset, {"steps": [], "median": [], "min": [], "max": [], "chance": None})
            chances = sorted(r["chance"] for r in (ev["templates"].get(dataset) or {}).values()
                             if isinstance(r, dict) and isinstance(r.get("chance"), (int, float)))
            if chances:
                entry["chance"] = chances[len(chances) // 2]  # templates of a dataset share it; the median if not
            entry["steps"].append(ev["step"])
            for key in ("median", "min", "max"):
                entry[key].append(float(s.get(key) if s.get(key) is not None else s["median"]))
    return out
