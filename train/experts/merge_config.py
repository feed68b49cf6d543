"""The merge config of ``mtf merge CONFIG.yaml``: YAML -> dataclasses, strictly, every problem at once.

In the spirit of mergekit's files::

    base_model: runs/base/final            # the model the experts were finetuned from (HF directory or hub name)
    models:                                # experts: full HF checkpoints or peft adapter directories
      - {model: runs/expert_a/final, weight: 1.0}
      - {model: runs/expert_b/final, weight: 1.0, density: 0.5}   # per-expert density (ties) / drop_rate (dare_*)
    method: ties                           # linear | task_arithmetic | ties | dare_linear | dare_ties
    parameters: {lambda: 1.0, density: 0.2}
    dtype: float32                         # float32 | bfloat16 | float16
    output_dir: runs/merged

Loading is as strict as a run config's (``train/config.py``), and reports every problem in one error
instead of the first: an unknown key (with the closest valid one), a value of the wrong type, an
unknown method, a parameter out of range, and a parameter the chosen method does not read (a setting that
would be silently ignored is a mistake in the file). Dotted ``key=value`` overrides work as for
``mtf train``, with list indices for experts: ``models.1.weight=0.5``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from train.config import _coerce, parse_override, read_yaml
from train.errors import ConfigError

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
DTYPES = ("float32", "bfloat16", "float16")
Method = Literal["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
Dtype = Literal["float32", "bfloat16", "float16"]

# The parameters each method reads. Setting another one is an error, not a silent no-op.
USES: dict[str, tuple[str, ...]] = {
    "linear": ("normalize_weights",),
    "task_arithmetic": ("lambda", "normalize_weights"),
    "ties": ("lambda", "density"),
    "dare_linear": ("lambda", "drop_rate", "seed", "normalize_weights"),
    "dare_ties": ("lambda", "drop_rate", "seed"),
}
# Defaults of the parameters a method reads and the file leaves unset. normalize_weights: linear averages
# (weights summing to 1); task arithmetic sums task vectors as the paper does (lambda then scales the sum).
DEFAULTS: dict[str, Any] = {"lambda": 1.0, "density": 0.2, "drop_rate": 0.9, "seed": 0}
NORMALIZE_DEFAULT = {"linear": True, "task_arithmetic": False, "dare_linear": False}


@dataclass
class ExpertSpec:
    model: Optional[str] = None  # a full HF checkpoint directory (or hub name) or a peft adapter directory
    weight: float = 1.0  # its weight in the sum / election / mean
    density: Optional[float] = None  # ties: this expert's fraction kept by trim (default parameters.density)
    drop_rate: Optional[float] = None  # dare_*: this expert's drop probability (default parameters.drop_rate)


@dataclass
class MergeParameters:
    lambda_: Optional[float] = field(default=None, metadata={"key": "lambda"})  # scale of the merged task vector
    density: Optional[float] = None  # ties: fraction of each task vector kept, in (0, 1]
    drop_rate: Optional[float] = None  # dare_*: probability of dropping an entry, in [0, 1)
    seed: Optional[int] = None  # dare_*: seed of the masks (per expert and tensor, see methods.tensor_seed)
    normalize_weights: Optional[bool] = None  # divide the weights by their sum (linear: true; others: false)


@dataclass
class MergeConfig:
    base_model: Optional[str] = None  # required except for linear merges of full checkpoints
    models: list[ExpertSpec] = field(default_factory=list)
    method: Optional[Method] = None
    parameters: MergeParameters = field(default_factory=MergeParameters)
    dtype: Dtype = "float32"  # dtype of the written weights (the merge itself computes in float32)
    output_dir: Optional[str] = None
    max_shard_mb: float = 2000.0  # output file size (MB = 10^6 bytes); one model.safetensors when it fits
    overwrite: bool = False  # replace an existing, non-empty output_dir
    chosen_by: Any = None  # free-form record of how the parameters were chosen (e.g. a validation grid search)

    source: Optional[str] = field(default=None, metadata={"internal": True})

    def parameter(self, name: str) -> Any:
        """A method parameter as the merge uses it: the file's value, else the default."""
        value = getattr(self.parameters, "lambda_" if name == "lambda" else name)
        if value is not None:
            return value
        if name == "normalize_weights":
            return NORMALIZE_DEFAULT.get(self.method or "", False)
        return DEFAULTS[name]

    def resolved_parameters(self) -> dict:
        """The parameters the method reads, defaults filled in (what ``merge_record.json`` records)."""
        return {name: self.parameter(name) for name in USES[self.method]}

    def expert_weights(self) -> list[float]:
        """The experts' weights as the merge uses them (normalised when ``normalize_weights``)."""
        weights = [m.weight for m in self.models]
        if "normalize_weights" in USES[self.method] and self.parameter("normalize_weights"):
            total = math.fsum(weights)
            return [w / total for w in weights]
        return weights

    def expert_values(self, name: str) -> list[float]:
        """Per expert, ``density`` or ``drop_rate``: its own value, else the parameter's."""
        return [getattr(m, name) if getattr(m, name) is not None else self.parameter(name) for m in self.models]


# --------------------------------------------------------------------------------------------------
# Building, strictly, collecting every problem.


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {_key(f): f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def all_merge_keys(cls: type = MergeConfig, prefix: str = "") -> list[str]:
    """Every dotted key a merge config accepts (``parameters.lambda``, ``models[].weight``, ...)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for key, f in _fields(cls).items():
        dotted = f"{prefix}.{key}" if prefix else key
        keys.append(dotted)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += all_merge_keys(tp, dotted)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            keys += all_merge_keys(typing.get_args(tp)[0], f"{dotted}[]")
    return keys


def _build(cls: type, data: dict, prefix: str, file: str, problems: list[str], bad: set[str]) -> Any:
    """``cls`` from ``data``; each unknown key or bad value adds a problem (and its key to ``bad``)."""
    known = _fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            candidates = [f"{prefix}.{k}" if prefix else k for k in known]
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            if close:
                hint = f"{prefix}.{close[0]}" if prefix else close[0]
            else:  # a right key in the wrong section: match it against every key's last part
                keys = sorted(all_merge_keys(), key=lambda k: "[]" in k)  # parameters.density before models[].density
                hint = next((k for k in keys if k != where and difflib.get_close_matches(
                    str(key), [k.rsplit(".", 1)[-1]], n=1, cutoff=0.8)), None)
            suggestion = f" Did you mean `{hint}`?" if hint else ""
            problems.append(f"{file}: unknown key `{where}`.{suggestion} Valid keys here: {', '.join(sorted(candidates))}.")
            bad.add(where)
            continue
        f = known[key]
        try:
            kwargs[f.name] = _convert(value, hints[f.name], where, file, problems, bad)
        except ConfigError as err:
            problems.append(str(err))
            bad.add(where)
    return cls(**kwargs)


def _convert(value: Any, tp: Any, where: str, file: str, problems: list[str], bad: set[str]) -> Any:
    if dataclasses.is_dataclass(tp):
        if value is None:  # `parameters=null` (e.g. switching methods on the command line): every default
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: `{where}` is {value!r}, but it must be a mapping of keys "
                              f"({', '.join(_fields(tp))}).")
        return _build(tp, value, where, file, problems, bad)
    if typing.get_origin(tp) is list and typing.get_args(tp)[0] is ExpertSpec:
        if not isinstance(value, list):
            raise ConfigError(f"{file}: `{where}` must be a list of experts, e.g. `- {{model: runs/a/final, weight: 1.0}}`; "
                              f"got {value!r}.")
        experts = []
        for i, item in enumerate(value):
            if isinstance(item, str):  # shorthand: a bare path
                item = {"model": item}
            if not isinstance(item, dict):
                problems.append(f"{file}: `{where}[{i}]` is {item!r}; write an expert as a path or "
                                "`{model: PATH, weight: 1.0}`.")
                bad.add(f"{where}[{i}]")
                continue
            experts.append(_build(ExpertSpec, item, f"{where}[{i}]", file, problems, bad))
        return experts
    args = typing.get_args(tp)
    if value is not None and typing.get_origin(tp) is Union and type(None) in args and len(args) == 2:
        tp = next(a for a in args if a is not type(None))  # Optional[X] with a value: X's own message (a Literal's hint)
    return _coerce(value, tp, where, file)


def apply_merge_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each dotted ``key=value`` override into ``data``; a number indexes a list (``models.0.weight=2``)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(path):
            here = ".".join(path[:depth]) or "the top level"
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override `{text}`: `{part}` is not an index of the {len(node)} entries of "
                                      f"`{here}` (0..{len(node) - 1}).")
                slot: Any = int(part)
            elif isinstance(node, dict):
                slot = part
            else:
                raise ConfigError(f"override `{text}`: `{here}` is not a section, it holds {node!r}.")
            if depth == len(path) - 1:
                node[slot] = value
            else:
                child = node[slot] if isinstance(node, list) else node.get(slot)
                if child is None:
                    child = {}
                elif isinstance(child, str) and isinstance(node, list):  # a bare expert path: make it a mapping
                    child = {"model": child}
                node[slot] = child
                node = child
    return data


def read_merge_yaml(path: str | Path) -> dict:
    """The merge file as a mapping (safe loader, duplicate keys refused); errors name the file and the fix."""
    return read_yaml(path, what="merge config", example="configs/merges/tfew_tiny_ties.yaml",
                     top_level="a mapping (base_model, models, method, parameters, dtype, output_dir)")


def load_merge_config(path: str | Path | None, overrides: Optional[list[str]] = None) -> MergeConfig:
    """Load a merge config from YAML plus dotted overrides and check it (no model file is opened).

    Raises:
        ConfigError: every unknown key, wrong type, out-of-range or unused parameter and missing required
            key, one per line, each naming the file, the key and the fix.
    """
    data = read_merge_yaml(path) if path is not None else {}
    apply_merge_overrides(data, list(overrides or []))
    file = str(path) if path is not None else "<overrides>"
    problems: list[str] = []
    bad: set[str] = set()
    cfg = _build(MergeConfig, data, "", file, problems, bad)
    cfg.source = str(path) if path is not None else None
    problems += merge_problems(cfg, bad)
    if problems:
        raise ConfigError("\n".join(problems) if len(problems) > 1 else problems[0])
    return cfg


def merge_problems(cfg: MergeConfig, bad: Union[set[str], tuple] = ()) -> list[str]:
    """Every missing key, out-of-range value and unused parameter of ``cfg`` (keys in ``bad`` already failed)."""
    out = []
    file = cfg.source or "<merge config>"
    method = cfg.method
    if method is None and "method" not in bad:
        out.append(f"{file}: set `method` to one of {', '.join(METHODS)}.")
    if not cfg.models and "models" not in bad:
        out.append(f"{file}: list the experts under `models`, e.g. "
                   "`models: [{model: runs/a/final}, {model: runs/b/final}]`.")
    if not cfg.output_dir and "output_dir" not in bad:
        out.append(f"{file}: set `output_dir`, the directory the merged model is written to (e.g. runs/merged).")
    if not cfg.base_model and "base_model" not in bad and method not in (None, "linear"):
        out.append(f"{file}: `{method}` needs `base_model` (task vectors are differences from it): the model the "
                   "experts were finetuned from.")
    for i, spec in enumerate(cfg.models):
        if not spec.model and f"models[{i}]" not in bad and f"models[{i}].model" not in bad:
            out.append(f"{file}: `models[{i}].model` is missing; give the expert's directory (or hub name).")
    if method is not None:
        uses = USES[method]
        for name in ("lambda", "density", "drop_rate", "seed", "normalize_weights"):
            if name not in uses and getattr(cfg.parameters, "lambda_" if name == "lambda" else name) is not None:
                out.append(f"{file}: `parameters.{name}` is set, but `{method}` does not use it (it reads "
                           f"{', '.join(uses)}); remove it or pick a method that does.")
        for i, spec in enumerate(cfg.models):
            for name in ("density", "drop_rate"):
                if name not in uses and getattr(spec, name) is not None:
                    out.append(f"{file}: `models[{i}].{name}` is set, but `{method}` does not use it; remove it.")
    out += _range_problems(cfg, file, bad)
    if cfg.max_shard_mb <= 0 and "max_shard_mb" not in bad:
        out.append(f"{file}: `max_shard_mb` is {cfg.max_shard_mb}; it must be greater than 0 (2000 writes 2 GB shards).")
    out += _path_problems(cfg, file)
    return out


def _range_problems(cfg: MergeConfig, file: str, bad: Union[set[str], tuple]) -> list[str]:
    out = []
    method = cfg.method
    values = [("parameters.density", cfg.parameters.density)] + [(f"models[{i}].density", m.density)
                                                                  for i, m in enumerate(cfg.models)]
    for key, density in values:
        if density is not None and not 0 < density <= 1 and key not in bad:
            out.append(f"{file}: `{key}` is {density}; it must be in (0, 1]: the fraction of each task vector TIES "
                       "keeps (0.2 keeps the top 20% of magnitudes, 1 keeps everything).")
    values = [("parameters.drop_rate", cfg.parameters.drop_rate)] + [(f"models[{i}].drop_rate", m.drop_rate)
                                                                     for i, m in enumerate(cfg.models)]
    for key, rate in values:
        if rate is not None and not 0 <= rate < 1 and key not in bad:
            out.append(f"{file}: `{key}` is {rate}; it must be in [0, 1): the probability that DARE drops an entry "
                       "(0.9 drops 90% and scales the rest by 10).")
    if cfg.parameters.seed is not None and cfg.parameters.seed < 0:
        out.append(f"{file}: `parameters.seed` is {cfg.parameters.seed}; it must be at least 0.")
    if method is None:
        return out
    signed = method in ("task_arithmetic", "dare_linear")  # a negative weight subtracts a task (Ilharco et al.)
    for i, spec in enumerate(cfg.models):
        if f"models[{i}].weight" in bad:
            continue
        if signed and spec.weight == 0:
            out.append(f"{file}: `models[{i}].weight` is 0; remove the expert instead (negative weights subtract a task).")
        elif not signed and spec.weight <= 0:
            out.append(f"{file}: `models[{i}].weight` is {spec.weight}; `{method}` needs weights greater than 0 "
                       "(negative weights are for task_arithmetic and dare_linear).")
    weights = [m.weight for m in cfg.models]
    if cfg.models and "normalize_weights" in USES[method] and cfg.parameter("normalize_weights") \
            and math.fsum(weights) == 0:
        out.append(f"{file}: the expert weights sum to 0, so `parameters.normalize_weights` cannot divide by their sum; "
                   "change a weight or set `parameters.normalize_weights=false`.")
    return out


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists() or name.count("/") > 1


def _path_problems(cfg: MergeConfig, file: str) -> list[str]:
    out = []
    named = [("base_model", cfg.base_model)] + [(f"models[{i}].model", m.model) for i, m in enumerate(cfg.models)]
    for key, name in named:
        if name and _looks_local(name) and not Path(name).expanduser().exists():
            out.append(f"{file}: `{key}` {name!r} does not exist (paths are relative to the current directory).")
    if cfg.output_dir:
        out_dir = Path(cfg.output_dir).expanduser().resolve()
        for key, name in named:
            if name and Path(name).expanduser().exists() and Path(name).expanduser().resolve() == out_dir:
                out.append(f"{file}: `output_dir` is `{key}` ({name}); write the merge to a new directory.")
        if out_dir.is_file():
            out.append(f"{file}: `output_dir` {cfg.output_dir!r} is a file; give a directory.")
        elif out_dir.is_dir() and any(out_dir.iterdir()) and not cfg.overwrite:
            out.append(f"{file}: `output_dir` {cfg.output_dir!r} exists and is not empty; choose another directory or "
                       "set `overwrite=true` to replace it.")
    return out


def to_dict(cfg: MergeConfig) -> dict:
    """The resolved config as plain data with the file's key names (``lambda``, not ``lambda_``)."""

    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {_key(f): plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get("internal")}
        if isinstance(obj, list):
            return [plain(v) for v in obj]
        return obj

    return plain(cfg)
