"""``mtf merge``: a merge streamed tensor by tensor from safetensors files into a loadable model directory.

::

    plan_merge(cfg)  headers only: every input's tensors, shapes, config.json and tokenizer checked against the
                     base (all problems in one error); the output files planned from the base's tensor sizes
    merge(cfg)       for each output file, for each tensor: read the base's tensor and one tensor per expert
                     -> methods.merge_tensor (float32) -> cast to `dtype` -> appended to the file (ShardWriter).
                     Then config.json (dtype updated), generation_config.json, the tokenizer files, the index and
                     merge_record.json, in a temporary directory renamed to `output_dir` once complete.

Memory: one tensor per input and the float32 work copies of one tensor, never a whole model, and not even a
whole output shard (each merged tensor goes to disk at once). The summary reports the process's resident
memory growth over the merge (sampled after every tensor) beside that accounted working set. Tied weights
(T5's ``shared`` / ``lm_head`` / ``embed_tokens``) are stored once: the merge writes the names the base's
files hold, and ``from_pretrained`` ties them again from ``config.json``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from train.errors import ConfigError
from train.experts.checkpoints import (DTYPE_BYTES, INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES, Adapter, Checkpoint,
                                       architecture_problem, file_sha256, has_tokenizer, open_expert,
                                       resolve_model_dir, tensor_problems, tokenizer_problem)
from train.experts.merge_config import MergeConfig, to_dict
from train.experts.methods import merge_tensor

MB = 1_000_000
RECORD_FILE = "merge_record.json"
SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
MAX_PROBLEMS_SHOWN = 30


@dataclass
class MergePlan:
    """What :func:`merge` will read and write, checked before any tensor data is read."""

    cfg: MergeConfig
    base: Optional[Checkpoint]
    experts: list  # Checkpoint | Adapter, in `models` order
    layout: Checkpoint  # whose tensor names and config.json the output has: the base, else the first expert
    tokenizer_dir: Optional[Path]
    shards: list[list[str]]  # tensor names per output file
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        if len(self.shards) == 1:
            return [SINGLE_FILE]
        return [f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors" for i in range(len(self.shards))]


def plan_merge(cfg: MergeConfig) -> MergePlan:
    """Open every input's headers and check that they fit together.

    Raises:
        ConfigError: one error listing every problem: an input that is no model, a tensor missing on one side, a
            shape difference (each naming the tensor and both files), another architecture in ``config.json``,
            another tokenizer, an adapter that does not fit the base.
    """
    problems: list[str] = []
    base = None
    if cfg.base_model:
        base_dir = resolve_model_dir(cfg.base_model, "base_model")
        if (base_dir / "adapter_config.json").is_file():
            raise ConfigError(f"`base_model` = {cfg.base_model!r} is a peft adapter; the base must be a full model "
                              "(an adapter's own base), and the adapter goes under `models`.")
        base = Checkpoint(base_dir, "base_model")
    experts = []
    for i, spec in enumerate(cfg.models):
        who = f"models[{i}]"
        try:
            experts.append(open_expert(resolve_model_dir(spec.model, f"{who}.model"), who, base))
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise _incompatible(cfg, problems)
    layout = base if base is not None else experts[0]
    notes = []
    for expert in experts:
        if expert is layout:
            continue
        problems += tensor_problems(layout, expert)
        if isinstance(expert, Checkpoint):
            problem = architecture_problem(layout, expert)
            if problem:
                problems.append(problem)
        else:
            named = expert.peft_config.get("base_model_name_or_path")
            if named and Path(named).resolve() != layout.path.resolve() and named != cfg.base_model:
                notes.append(f"{expert.who} ({expert.path}) names base {named!r} in adapter_config.json; it is applied "
                             f"to base_model {cfg.base_model!r} as the config says.")
    tokenizer_dir = layout.path if has_tokenizer(layout.path) else \
        next((e.path for e in experts if has_tokenizer(e.path)), None)
    if tokenizer_dir is not None:
        owner = layout.who if tokenizer_dir == layout.path else next(e.who for e in experts if e.path == tokenizer_dir)
        for expert in experts:
            if expert.path != tokenizer_dir:
                problem = tokenizer_problem(tokenizer_dir, expert.path, owner, expert.who)
                if problem:
                    problems.append(problem)
        if tokenizer_dir != layout.path:
            notes.append(f"{layout.who} has no tokenizer files; the output gets {owner}'s ({tokenizer_dir}).")
    else:
        notes.append("no input has tokenizer files; add them to the output before `mtf eval` (or pass --tokenizer).")
    if problems:
        raise _incompatible(cfg, problems)
    return MergePlan(cfg, base, experts, layout, tokenizer_dir, _plan_shards(layout, cfg), notes)


def _incompatible(cfg: MergeConfig, problems: list[str]) -> ConfigError:
    shown = problems[:MAX_PROBLEMS_SHOWN]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return ConfigError(f"{cfg.source or 'the merge config'}: the models cannot be merged ({len(problems)} problem(s)):\n  "
                       + "\n  ".join(shown) + more)


def _plan_shards(layout: Checkpoint, cfg: MergeConfig) -> list[list[str]]:
    """Tensor names per output file, each file at most ``max_shard_mb`` (a larger tensor alone). Inside a file
    the tensors go widest dtype first, then by name, as ``safetensors.torch.save_file`` orders them (aligned)."""
    limit = cfg.max_shard_mb * MB
    shards: list[list[str]] = [[]]
    size = 0
    for name in layout.names:
        nbytes = _output_bytes(layout, name, cfg.dtype)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    width = {name: DTYPE_BYTES[_output_dtype(layout, name, cfg.dtype)] for name in layout.names}
    return [sorted(names, key=lambda n: (-width[n], n)) for names in shards]


def _output_dtype(layout: Checkpoint, name: str, dtype: str) -> str:
    """The safetensors dtype a tensor is written in: ``dtype`` for float tensors, the stored one otherwise."""
    info = layout.tensors[name]
    return SAFETENSORS_DTYPE[dtype] if info.is_float else info.dtype


def _output_bytes(layout: Checkpoint, name: str, dtype: str) -> int:
    return math.prod(layout.tensors[name].shape) * DTYPE_BYTES[_output_dtype(layout, name, dtype)]


class ShardWriter:
    """One safetensors file written tensor by tensor, so the shard is never held in memory.

    The file's header is known before any tensor is merged (names, dtypes and shapes come from the base's
    headers), so it is written first and each merged tensor's bytes follow as soon as they exist::

        [8 bytes: header length N, little-endian] [N bytes: JSON header, space-padded to 8] [tensor 0][tensor 1]...

    which is the safetensors format byte for byte (``safe_open`` checks the offsets cover the data exactly).
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in entries:
            size = math.prod(shape) * DTYPE_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        self.entries, self.position, self.bytes = list(entries), 0, offset
        self.path = path
        self.handle = open(path, "wb")
        self.handle.write(len(blob).to_bytes(8, "little") + blob)

    def write(self, name: str, tensor: Any) -> None:
        """Append the next tensor; it must be the next entry, with its dtype and shape."""
        import torch

        expected, dtype, shape = self.entries[self.position]
        assert name == expected and tuple(tensor.shape) == tuple(shape), (name, expected, tensor.shape, shape)
        assert SAFETENSORS_DTYPE.get(str(tensor.dtype).removeprefix("torch."), dtype) == dtype, (name, tensor.dtype, dtype)
        data = tensor.contiguous().reshape(-1)
        if data.numel():
            self.handle.write(memoryview(data.view(torch.uint8).numpy()))  # the bytes as they are (little-endian)
        self.position += 1

    def abort(self) -> None:
        self.handle.close()

    def close(self) -> None:
        self.handle.close()
        assert self.position == len(self.entries), f"{self.path}: {self.position} of {len(self.entries)} tensors written"


# ------------------------------------------------------------------------------------------ merging


class PeakMemory:
    """The process's peak resident memory above its value at the start.

    Two readings, the larger wins: the current RSS sampled whenever :meth:`sample` is called (Linux:
    ``/proc/self/statm``), and the kernel's high-water mark (``getrusage`` ``ru_maxrss``) when it rose during
    the merge, which also catches the short-lived work copies between two samples.
    """

    def __init__(self) -> None:
        self.start = self.peak = _rss_bytes()
        self.high_water_before = _high_water_bytes()

    def sample(self) -> None:
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth_bytes(self) -> int:
        high_water = _high_water_bytes()
        peak = max(self.peak, high_water) if high_water > self.high_water_before else self.peak
        return max(0, peak - self.start)


def _high_water_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the high-water mark is the best there is
        return _high_water_bytes()


def merge(cfg: MergeConfig, *, dry_run: bool = False) -> dict:
    """Merge the experts of ``cfg`` into ``cfg.output_dir`` (or, with ``dry_run``, only plan and check).

    Returns:
        The summary, which is also what ``merge_record.json`` holds: method, resolved parameters, expert weights,
        inputs with a SHA-256 per weight file, output files, tensors merged and changed, peak memory, seconds.

    Raises:
        ConfigError: the inputs do not fit together (see :func:`plan_merge`), or an integer tensor differs
            between them. Nothing is left in ``output_dir`` then.
    """
    started = time.perf_counter()
    plan = plan_merge(cfg)
    if dry_run:
        return _summary(plan, None, time.perf_counter() - started, dry_run=True)
    out_dir = Path(cfg.output_dir).expanduser()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.merging-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        stats = _write_weights(plan, partial)
        _write_side_files(plan, partial)
        summary = _summary(plan, stats, time.perf_counter() - started)
        (partial / RECORD_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        if out_dir.exists():  # overwrite=true (merge_problems refused it otherwise)
            old = out_dir.parent / f".{out_dir.name}.replaced-{os.getpid()}"
            out_dir.rename(old)
            partial.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary


def _write_weights(plan: MergePlan, out: Path) -> dict:
    import torch
    cfg, layout = plan.cfg, plan.layout
    dtype = getattr(torch, cfg.dtype)
    weights = cfg.expert_weights()
    options = {"lam": cfg.parameter("lambda") if cfg.method != "linear" else 1.0}
    if cfg.method == "ties":
        options["densities"] = cfg.expert_values("density")
    if cfg.method.startswith("dare_"):
        options["drop_rates"] = cfg.expert_values("drop_rate")
        options["seed"] = cfg.parameter("seed")
    meter = PeakMemory()
    changed, working_set, written, weight_map = 0, 0, 0, {}
    for file, names in zip(plan.files, plan.shards):
        writer = ShardWriter(out / file, [(n, _output_dtype(layout, n, cfg.dtype), layout.tensors[n].shape)
                                          for n in names])
        try:
            for name in names:
                stored = layout.tensor(name)
                if not layout.tensors[name].is_float:
                    merged = _same_everywhere(plan, name, stored)
                    inputs = [stored]
                elif plan.base is not None and not any(e.changes(name) for e in plan.experts):
                    merged, inputs = stored, [stored]  # only adapters, none touching this tensor: the base, bit for bit
                else:
                    base = stored.float() if plan.base is not None else None
                    inputs = [stored if e is layout else e.tensor(name, base) for e in plan.experts]
                    merged = merge_tensor(cfg.method, name, base, [t.float() for t in inputs], weights, **options)
                    reference = base if base is not None else inputs[0].float()  # without a base: vs models[0]
                    changed += not torch.equal(merged, reference)
                output = merged.to(dtype) if merged.is_floating_point() else merged
                writer.write(name, output)
                live = {id(t): t for t in (stored, *inputs, merged, output)}  # held at this moment, once each
                working_set = max(working_set, sum(_nbytes(t) for t in live.values()))
                meter.sample()
                del stored, inputs, merged, output, live
        except BaseException:
            writer.abort()  # the partial file goes with the partial directory
            raise
        writer.close()
        written += writer.bytes
        weight_map.update({name: file for name in names})
    if len(plan.files) > 1:
        index = {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    largest = max((layout.tensors[n].nbytes for n in layout.names), default=0)
    return {"tensors": len(layout.names), "tensors_changed": changed, "bytes_written": written,
            "memory": {"peak_rss_growth_mb": round(meter.growth_bytes / MB, 2),
                       "working_set_mb": round(working_set / MB, 2),
                       "largest_tensor_mb": round(largest / MB, 2),
                       "model_mb": round(written / MB, 2)}}


def _nbytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size()


def _same_everywhere(plan: MergePlan, name: str, stored: Any) -> Any:
    """An integer or bool tensor (a buffer) is copied, and must be the same in every input."""
    import torch

    for expert in plan.experts:
        if expert is plan.layout:
            continue
        theirs = expert.tensor(name, stored)
        if not torch.equal(theirs, stored):
            raise ConfigError(f"tensor `{name}` ({plan.layout.tensors[name].dtype}) is not a float tensor and differs "
                              f"between {plan.layout.where(name)} and {_where(expert, name)}; integer tensors cannot "
                              "be merged. Do the experts come from one base?")
    return stored


def _where(expert: Any, name: str) -> str:
    return expert.where(name) if isinstance(expert, Checkpoint) else f"{expert.who} ({expert.weights_file})"


def _write_side_files(plan: MergePlan, out: Path) -> None:
    """config.json (dtype updated), generation_config.json, and the tokenizer files."""
    config = plan.layout.config()
    if config is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for key in keys:  # transformers 5 writes `dtype`, 4.x `torch_dtype`
            config[key] = plan.cfg.dtype
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = plan.layout.path / "generation_config.json"
    if generation.is_file():
        shutil.copy2(generation, out / generation.name)
    if plan.tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (plan.tokenizer_dir / name).is_file():
                shutil.copy2(plan.tokenizer_dir / name, out / name)


def _summary(plan: MergePlan, stats: Optional[dict], seconds: float, dry_run: bool = False) -> dict:
    import safetensors
    import torch

    from train import __version__

    cfg = plan.cfg

    def files(source: Any) -> dict[str, Optional[str]]:
        return {str(f): (None if dry_run else file_sha256(f)) for f in source.files}

    experts = []
    for spec, expert, weight in zip(cfg.models, plan.experts, cfg.expert_weights()):
        entry = {"model": spec.model, "path": str(expert.path), "kind": expert.kind, "weight": weight}
        if cfg.method == "ties":
            entry["density"] = spec.density if spec.density is not None else cfg.parameter("density")
        if cfg.method.startswith("dare_"):
            entry["drop_rate"] = spec.drop_rate if spec.drop_rate is not None else cfg.parameter("drop_rate")
        if isinstance(expert, Adapter):
            entry["tensors_adapted"] = len(expert.targets)
        entry["files"] = files(expert)
        experts.append(entry)
    summary = {
        "method": cfg.method,
        "parameters": cfg.resolved_parameters(),
        "chosen_by": cfg.chosen_by,
        "output_dir": str(cfg.output_dir),
        "dtype": cfg.dtype,
        "base_model": None if plan.base is None else {"model": cfg.base_model, "path": str(plan.base.path),
                                                      "files": files(plan.base)},
        "models": experts,
        "files": plan.files,
        "tokenizer_from": None if plan.tokenizer_dir is None else str(plan.tokenizer_dir),
        "tensors": len(plan.layout.names),
        "notes": plan.notes,
        "config": to_dict(cfg),
        "config_file": cfg.source,
        "versions": {"mtf": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__},
        "seconds": round(seconds, 2),
        "dry_run": dry_run,
    }
    if stats is not None:
        summary.update(stats)
    return summary


def format_summary(summary: dict) -> str:
    """The one paragraph ``mtf merge`` prints."""
    params = ", ".join(f"{k} {v}" for k, v in summary["parameters"].items())
    kinds = ", ".join(f"{m['model']} ({m['kind']}, weight {m['weight']:g})" for m in summary["models"])
    base = summary["base_model"]["model"] if summary["base_model"] else "none"
    experts = f"{len(summary['models'])} expert{'s' if len(summary['models']) != 1 else ''}"
    if summary.get("dry_run"):
        return (f"[mtf] merge plan checked: {summary['method']} ({params}) of {experts} "
                f"[{kinds}] on base {base}: {summary['tensors']} tensors into {len(summary['files'])} file(s) "
                f"in {summary['output_dir']} ({summary['dtype']}). Nothing written (--dry-run).")
    memory = summary["memory"]
    text = (f"[mtf] merged {experts} [{kinds}] on base {base} with {summary['method']} "
            f"({params}): {summary['tensors']} tensors ({summary['tensors_changed']} changed) written as "
            f"{summary['dtype']} to {summary['output_dir']} ({len(summary['files'])} file(s), "
            f"{memory['model_mb']:.1f} MB) in {summary['seconds']:.1f} s; "
            f"peak memory +{memory['peak_rss_growth_mb']:.1f} MB "
            f"RSS (working set {memory['working_set_mb']:.1f} MB, largest tensor {memory['largest_tensor_mb']:.1f} MB). "
            f"Record: {summary['output_dir']}/{RECORD_FILE}.")
    for note in summary["notes"]:
        text += f"\n[mtf] note: {note}"
    return text
