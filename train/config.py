"""Typed, strict run configuration: YAML -> dataclasses, dotted overrides, cross-field checks.

A run config has these sections (each a dataclass below): ``run``, ``model``, ``peft``, ``data``, ``optim``,
``schedule``, ``trainer``, ``eval``, ``logging``, ``checkpoint``. Loading is strict:

* an unknown key anywhere fails before any work, naming the file and the key and suggesting the
  closest valid one (``optim.lrr`` -> "did you mean optim.lr?");
* a value of the wrong type fails and says which type was expected;
* impossible combinations (fp16 with a T5 model, eval every 0 steps, ...) fail in :func:`validate`,
  which runs before any model or data is loaded.

Overrides on the command line are dotted ``key=value`` pairs whose value is parsed as YAML
(``optim.lr=3e-4 trainer.max_steps=50 eval.mixture=null``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from train.errors import ConfigError
from train.yamlfile import load_yaml

ModelKind = Literal["auto", "encdec", "decoder", "prefix_lm"]
Precision = Literal["fp32", "bf16", "fp16"]
LossNormalization = Literal["token_mean", "sequence_mean", "target_mean", "sum"]
OverlongPolicy = Literal["truncate_left", "truncate_right", "truncate_target", "drop"]
PadTo = Literal["auto", "longest", "capacity"]
# sdpa/eager: 4-D float masks; flex_attention: BlockMasks (CUDA to train); flash_attention_2: varlen, decoders, CUDA
AttnImplementation = Literal["sdpa", "eager", "flex_attention", "flash_attention_2"]
ATTN_IMPLEMENTATIONS = typing.get_args(AttnImplementation)


@dataclass
class RunConfig:
    output_dir: str = "runs/demo"  # the run directory: config.yaml, metrics.jsonl, checkpoints/, eval/
    name: Optional[str] = None  # shown in loggers; defaults to the output_dir's name


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None  # hub name or local HF directory with weights
    config: Optional[str] = None  # a model config JSON (configs/models/*.json): random initialisation
    kind: ModelKind = "auto"  # inferred from the model config when "auto"
    tokenizer: Optional[str] = None  # hub name, local directory, or "byt5" (needs no files)
    attn_implementation: AttnImplementation = "sdpa"
    gradient_checkpointing: bool = False


@dataclass
class PeftSection:
    method: Literal["none", "ia3", "lora"] = "none"  # parameter-efficient finetuning through peft; none = every weight
    target_modules: Optional[list[str]] = None  # module names to adapt; None = the family default (train/modeling/adapters.py)
    feedforward_modules: Optional[list[str]] = None  # ia3: targets whose INPUT is scaled (FFN); None = the family default
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    init_from: Optional[str] = None  # a peft adapter directory to start from (T-Few: (IA)^3 pre-trained on the mixture)
    export_merged: bool = False  # also write the base with the adapter merged in, as a plain HF model, to final/merged


@dataclass
class DataConfig:
    train_mixture: str = "data_mixtures/demo_train.yaml"
    max_input_tokens: int = 256  # enc-dec: encoder row capacity
    max_target_tokens: int = 64  # enc-dec: decoder row capacity
    max_tokens: int = 512  # decoder / prefix_lm: row capacity (input + target)
    packing: bool = True
    # Width of each micro-batch's tensors: "longest" = its longest row (per side for enc-dec), "capacity" =
    # max_*_tokens (static shapes, for torch.compile / XLA); "auto" = longest unpacked, capacity packed.
    pad_to: PadTo = "auto"
    pack_window: int = 64  # open rows the streaming best-fit packer keeps, per lane (bounded memory)
    lanes: Union[int, Literal["auto"]] = "auto"  # independent (stream, packer) lanes of the global batch; ranks build whole lanes (train/data/lanes.py)
    prefetch_steps: int = 2  # steps of data built ahead in a background thread (train/data/prefetch.py); 0 = inside the step
    overlong: OverlongPolicy = "truncate_left"
    max_examples_per_task: Optional[int] = None  # cap rows loaded per task (quick runs)
    data_root: Optional[str] = None  # root that relative data paths of the mixture resolve against
    num_proc: Optional[int] = None  # datasets.map workers for rendering/tokenizing
    cache_dir: Optional[str] = None  # datasets cache (defaults to HF_DATASETS_CACHE)

    def padding(self) -> str:
        """``pad_to`` with "auto" resolved: "longest", each micro-batch padded to its longest row (enc-dec: per side).

        An unpacked row is one example, and padding it to the capacity made ``packing=false`` an unfair
        baseline; a packed enc-dec row fills its encoder side but often not its decoder side (T0-style
        short targets in a 256-token target row), where the decoder's output layer then ran over padding.
        "capacity" stays for static shapes (torch.compile, XLA); losses are the same either way.
        """
        return "longest" if self.pad_to == "auto" else self.pad_to


@dataclass
class OptimConfig:
    name: Literal["adamw", "adafactor"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad_norm: Optional[float] = 1.0


@dataclass
class ScheduleConfig:
    name: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0


@dataclass
class LossWeightsConfig:
    """T-Few's three training losses, summed with these weights (each a mean with a global denominator).

    The default trains the LM loss alone, exactly as without this section. A choice loss > 0 makes the
    packer carry each example's wrong answer choices in its row (see train/data/packing.py).
    """

    lm: float = 1.0  # the gold target's NLL, normalised by trainer.loss_normalization
    unlikelihood: float = 0.0  # -log(1 - p + 0.01) over the wrong answer choices' tokens (token mean)
    rank_classification: float = 0.0  # CE over an example's choices scored by mean token log-prob (example mean)

    def choice_losses(self) -> bool:
        """True when a loss needs the answer choices in the packed rows."""
        return self.unlikelihood > 0 or self.rank_classification > 0


@dataclass
class TrainerConfig:
    max_steps: int = 100
    global_batch_size: Optional[int] = 8  # rows (packed sequences) per optimizer step, over all ranks
    global_batch_tokens: Optional[int] = None  # alternative: tokens per step; rows = tokens / row capacity
    micro_batch_size: int = 8  # rows per forward pass per rank
    grad_accum: Optional[int] = None  # derived from the batch, micro-batch and ranks when None
    precision: Precision = "fp32"
    loss_normalization: LossNormalization = "token_mean"
    loss_weights: LossWeightsConfig = field(default_factory=LossWeightsConfig)  # lm / unlikelihood / rank_classification
    loss_chunk_tokens: Optional[int] = None  # output layer + loss over this many label positions at a time (peak memory O(chunk x vocab)); None = all at once
    deepspeed: Optional[str] = None  # path to a DeepSpeed JSON (configs/deepspeed/*.json)
    compile: bool = False  # torch.compile the model's forward (and so its backward); pair with data.pad_to=capacity
    seed: int = 42
    resume: str = "auto"  # "auto" (newest complete checkpoint, if any) | a checkpoint path | "none"
    resume_fallback: bool = False  # "auto": if the newest checkpoint is damaged, resume from the newest good one
    resume_allow_changes: list[str] = field(default_factory=list)  # keys (or sections) that may differ from the checkpoint's config
    trust_checkpoint: bool = False  # allow checkpoint files that need arbitrary unpickling (only your own)
    max_time: Optional[float] = None  # seconds; stop cleanly with a checkpoint when exceeded
    nan_guard: bool = True  # stop on a non-finite loss, keeping the last good checkpoint
    cpu: bool = False  # force CPU even when a GPU is present


@dataclass
class EvalConfig:
    mixture: Optional[str] = None  # eval mixture (held-out tasks); None disables eval
    every_steps: Optional[int] = None  # periodic eval; None = only at the end
    at_end: bool = True
    max_examples_per_template: Optional[int] = 64  # periodic evals; the final eval uses final_max_examples_per_template
    final_max_examples_per_template: Optional[int] = None
    batch_size: int = 16  # examples per scoring batch
    best_metric: Optional[str] = None  # e.g. "eval/super_glue/copa/median": keep the best checkpoint by it
    allow_held_out_overlap: bool = False  # train mixture may contain an eval dataset only if True
    protocol: Literal["t0", "tfew"] = "t0"  # t0: median over templates; tfew: median over seeds, one random template per example
    protocol_seeds: int = 5  # tfew: seeds 0..N-1
    length_normalized: bool = False  # rank classification scored by mean (not summed) token log-probability (T-Few)
    scoring: Literal["t0", "lm-eval"] = "t0"  # how prompt + choice become tokens: t0 (choices end with eos) or lm-eval (harness)
    choice_eos: Optional[bool] = None  # override the scoring convention's choice eos (None: the convention's)
    choice_separator: Optional[str] = None  # override its prompt-choice separator (None: the convention's)


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "offline"
    project: str = "mtf"
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    every_steps: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False
    progress_bar: bool = True
    peak_tflops: Optional[float] = None  # per device; enables the MFU estimate


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = None  # None = only at the end
    keep_last: int = 2
    export_final: bool = True  # Hugging Face format (safetensors + tokenizer) under <output_dir>/final


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    # Where the config came from; relative paths in it resolve against the current directory.
    source: Optional[str] = field(default=None, metadata={"internal": True})


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, strictly.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, file: str) -> Any:
    """Return ``value`` checked (and losslessly converted) against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, file)
            except ConfigError as err:
                errors.append(err)
        raise _type_error(value, tp, where, file)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"{file}: `{where}` is {value!r}, but it must be one of {', '.join(repr(a) for a in allowed)}.{extra}"
            )
        return value
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise _type_error(value, tp, where, file)
        return [_coerce(v, inner, f"{where}[{i}]", file) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(value, tp, where, file)
        return _build(tp, value, where, file)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, tp, where, file)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e6 in YAML is a float; accept it where it is a whole number
        raise _type_error(value, tp, where, file)
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # PyYAML reads "3e-4" (no dot) as a string; accept it as the number it is
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise _type_error(value, tp, where, file)
        if not math.isfinite(number):  # .nan / .inf are valid YAML floats but no valid setting
            raise ConfigError(f"{file}: `{where}` is {value!r}; it must be a finite number.")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(value, tp, where, file)
    raise AssertionError(f"unsupported config annotation {tp!r} at {where}")


def _type_error(value: Any, tp: Any, where: str, file: str) -> ConfigError:
    return ConfigError(
        f"{file}: `{where}` is {value!r} ({type(value).__name__}), but it must be {_type_name(tp)}. "
        f"Fix the value in the file or override it, e.g. `{where}=<{_type_name(tp)}>`."
    )


def _public_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _build(cls: type, data: dict, prefix: str, file: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in _public_fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            candidates = [f"{prefix}.{k}" if prefix else k for k in known]
            hint = difflib.get_close_matches(where, candidates, n=1, cutoff=0.6)
            if not hint:  # a right key in the wrong section: search every section
                hint = difflib.get_close_matches(where, all_keys(), n=1, cutoff=0.6)
            suggestion = f" Did you mean `{hint[0]}`?" if hint else ""
            raise ConfigError(
                f"{file}: unknown config key `{where}`.{suggestion} "
                f"Valid keys here: {', '.join(sorted(candidates))}."
            )
        kwargs[key] = _coerce(value, hints[key], where, file)
    return cls(**kwargs)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts (``optim.lr``, ``logging.wandb.mode``, ...)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in _public_fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], key))
    return keys


# --------------------------------------------------------------------------------------------------
# Files and overrides.


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(
            f"override `{text}` has no `=`. Write overrides as dotted key=value pairs, e.g. `optim.lr=3e-4`."
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override `{text}` has an empty key. Example: `trainer.max_steps=50`.")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override `{text}`: the value is not valid YAML ({err}).") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each dotted override into the nested ``data`` dict (creating sections as needed)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override `{text}`: `{part}` is not a section, it holds {child!r}.")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path, *, what: str = "config file", example: str = "configs/demo.yaml",
              top_level: str = "a mapping of sections (run, model, data, ...)") -> dict:
    """Read a YAML mapping with the safe loader; errors name the file and the fix.

    ``what``, ``example`` and ``top_level`` word the errors for other YAML files (``mtf merge`` configs).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist. Pass the path of a YAML file, e.g. {example}.")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}. Fix the syntax at the line shown.") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err}). Save the file as UTF-8.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be {top_level}, not {type(data).__name__}.")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a run config from YAML plus dotted overrides, strictly, then run :func:`validate`.

    Raises:
        ConfigError: unknown key, wrong type or impossible combination; the message names the file,
            the key and the fix.
    """
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    file = str(path) if path is not None else "<overrides>"
    cfg = _build(Config, data, "", file)
    cfg.source = str(path) if path is not None else None
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (what ``config.yaml`` in the run directory holds)."""
    data = dataclasses.asdict(cfg)
    data.pop("source", None)
    return data


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Cross-field checks that need no model or data.

T5_FAMILY = ("t5", "mt5", "umt5", "t0", "byt5", "flan-t5", "longt5")


def _looks_like_t5(cfg: Config) -> bool:
    text = " ".join(str(x).lower() for x in (cfg.model.name_or_path, cfg.model.config) if x)
    return cfg.model.kind == "encdec" or any(name in text for name in T5_FAMILY)


def problems(cfg: Config) -> list[str]:
    """Every impossible combination in ``cfg`` (empty when it is consistent)."""
    out = []
    file = cfg.source or "<config>"
    m, d, t, e = cfg.model, cfg.data, cfg.trainer, cfg.eval
    if not m.name_or_path and not m.config:
        out.append(f"{file}: set `model.name_or_path` (hub name or local directory) or `model.config` (a JSON model config for a random init).")
    if m.name_or_path and m.config:
        out.append(f"{file}: `model.name_or_path` and `model.config` are both set; keep one (weights to load, or a config to initialise randomly).")
    if t.precision == "fp16" and _looks_like_t5(cfg):
        out.append(
            f"{file}: `trainer.precision=fp16` with a T5-family model: T5 overflows in fp16 and produces NaN losses "
            "(t5#539, transformers#9295). Use `trainer.precision=bf16` (or fp32)."
        )
    out.extend(_bound_problems(cfg, file))
    w = t.loss_weights
    if not any(v > 0 for v in (w.lm, w.unlikelihood, w.rank_classification)):
        out.append(f"{file}: every `trainer.loss_weights` is 0, so nothing would be trained; give at least one of "
                   "`lm`, `unlikelihood`, `rank_classification` a weight > 0 (T-Few: 1, 1, 1).")
    if w.choice_losses() and "bloom" in " ".join(str(x).lower() for x in (m.name_or_path, m.config) if x):
        out.append(f"{file}: `trainer.loss_weights.unlikelihood` / `rank_classification` pack answer choices after the "
                   "target, which BLOOM's ALiBi cannot keep exact (the input-to-choice distance changes); use the LM "
                   "loss alone with BLOOM, or a model with position ids (T5, Llama, GPT-2).")
    for key in all_keys():
        if get_key(cfg, key) == "":  # e.g. `run.output_dir=` would write into the current directory
            out.append(f"{file}: `{key}` is an empty string; give a value (or null where that is allowed).")
    if (t.global_batch_size is None) == (t.global_batch_tokens is None):
        out.append(f"{file}: set exactly one of `trainer.global_batch_size` (rows) and `trainer.global_batch_tokens`; the other must be null.")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        out.append(f"{file}: `optim.betas` is {cfg.optim.betas}; it must be two values in [0, 1), e.g. [0.9, 0.999].")
    if cfg.schedule.warmup_steps > t.max_steps:
        out.append(f"{file}: `schedule.warmup_steps` is {cfg.schedule.warmup_steps}; it must be between 0 and trainer.max_steps ({t.max_steps}).")
    if t.compile and t.deepspeed:
        out.append(f"{file}: `trainer.compile=true` with `trainer.deepspeed` is not supported here (DeepSpeed wraps "
                   "the model in its engine, which compiles through its own `compile` config); set one of them.")
    if e.best_metric and not e.mixture:
        out.append(f"{file}: `eval.best_metric` needs `eval.mixture`.")
    if t.resume not in ("auto", "none") and not Path(t.resume).exists():
        out.append(f"{file}: `trainer.resume` is {t.resume!r}, which is neither 'auto', 'none' nor an existing checkpoint path.")
    for key, path in (("data.train_mixture", d.train_mixture), ("eval.mixture", e.mixture), ("model.config", m.config),
                      ("trainer.deepspeed", t.deepspeed)):
        if path and not Path(path).exists():
            out.append(f"{file}: `{key}` points to {path!r}, which does not exist (paths are relative to the current directory).")
    if t.deepspeed and Path(t.deepspeed).is_file():
        out.extend(_deepspeed_json_problems(t.deepspeed, file))
    if cfg.peft.lora_dropout >= 1:
        out.append(f"{file}: `peft.lora_dropout` is {cfg.peft.lora_dropout}; it must be below 1.")
    if cfg.peft.method == "none" and (cfg.peft.init_from or cfg.peft.export_merged or cfg.peft.target_modules):
        out.append(f"{file}: `peft.init_from` / `peft.target_modules` / `peft.export_merged` need an adapter; set "
                   "`peft.method` to ia3 or lora (or remove them).")
    if cfg.peft.init_from and not Path(cfg.peft.init_from).is_dir():
        out.append(f"{file}: `peft.init_from` points to {cfg.peft.init_from!r}, which is not a directory (a peft adapter "
                   "directory with adapter_config.json, e.g. an adapter run's final/).")
    if m.name_or_path and m.name_or_path.startswith(("/", "./", "../")) and not Path(m.name_or_path).exists():
        out.append(f"{file}: `model.name_or_path` {m.name_or_path!r} is a local path that does not exist.")
    out.extend(_attention_problems(cfg, file))
    return out


def _attention_problems(cfg: Config, file: str) -> list[str]:
    """``model.attn_implementation`` against the rest of the run (against the model: check_attn_implementation)."""
    out = []
    attention, t = cfg.model.attn_implementation, cfg.trainer
    if attention in ("flex_attention", "flash_attention_2") and t.cpu:
        why = "has no backward pass on CPU" if attention == "flex_attention" else "runs on CUDA GPUs only"
        out.append(f"{file}: `model.attn_implementation={attention}` with `trainer.cpu=true`: {attention} {why}. "
                   "Use `model.attn_implementation=sdpa` on CPU.")
    if attention == "flash_attention_2":
        if t.precision == "fp32":
            out.append(f"{file}: `model.attn_implementation=flash_attention_2` with `trainer.precision=fp32`: "
                       "FlashAttention computes in bf16 or fp16 only. Set `trainer.precision=bf16`, or use "
                       "`model.attn_implementation=sdpa`.")
        if t.loss_weights.choice_losses():
            out.append(f"{file}: `model.attn_implementation=flash_attention_2` with the unlikelihood / "
                       "rank-classification losses: they pack answer choices, and each must see its input but not the "
                       "target packed between them, which varlen FlashAttention cannot express. Set both of those "
                       "`trainer.loss_weights` to 0, or use `model.attn_implementation=flex_attention` or `sdpa`.")
    return out


# The lowest valid value of every numeric key: (minimum, whether the minimum itself is allowed).
# tests/test_config.py fails when a numeric key is missing here, so a new one gets a bound on purpose.
MINIMUMS: dict[str, tuple[float, bool]] = {
    "data.max_input_tokens": (1, True), "data.max_target_tokens": (1, True), "data.max_tokens": (1, True),
    "data.pack_window": (1, True), "data.lanes": (1, True), "data.prefetch_steps": (0, True),
    "data.max_examples_per_task": (1, True), "data.num_proc": (1, True),
    "optim.lr": (0, False), "optim.weight_decay": (0, True), "optim.eps": (0, False),
    "optim.clip_grad_norm": (0, False), "schedule.warmup_steps": (0, True),
    "trainer.max_steps": (1, True), "trainer.global_batch_size": (1, True), "trainer.global_batch_tokens": (1, True),
    "trainer.micro_batch_size": (1, True), "trainer.grad_accum": (1, True), "trainer.seed": (0, True),
    "trainer.max_time": (0, False), "trainer.loss_chunk_tokens": (1, True), "trainer.loss_weights.lm": (0, True),
    "trainer.loss_weights.unlikelihood": (0, True), "trainer.loss_weights.rank_classification": (0, True),
    "eval.every_steps": (1, True), "eval.max_examples_per_template": (1, True),
    "eval.final_max_examples_per_template": (1, True), "eval.batch_size": (1, True), "eval.protocol_seeds": (1, True),
    "logging.every_steps": (1, True), "logging.peak_tflops": (0, False),
    "checkpoint.every_steps": (1, True), "checkpoint.keep_last": (1, True),
    "peft.lora_rank": (1, True), "peft.lora_alpha": (0, False), "peft.lora_dropout": (0, True),
}


NULL_MEANS = {
    "trainer.global_batch_size": "to use trainer.global_batch_tokens",
    "trainer.global_batch_tokens": "to use trainer.global_batch_size",
    "trainer.grad_accum": "to derive it from the micro-batch size",
    "data.max_examples_per_task": "for every row", "data.num_proc": "for one process",
    "eval.final_max_examples_per_template": "for every example", "optim.clip_grad_norm": "for no clipping",
}


def get_key(cfg: Any, key: str) -> Any:
    """The value of a dotted key (``optim.lr``) of a config."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _bound_problems(cfg: Config, file: str) -> list[str]:
    out = []
    for key, (minimum, inclusive) in MINIMUMS.items():
        value = get_key(cfg, key)
        if value is None or isinstance(value, str) or value > minimum or (inclusive and value == minimum):  # str: "auto"
            continue
        limit = f"at least {minimum:g}" if inclusive else f"greater than {minimum:g}"
        off = f", or null {NULL_MEANS.get(key, 'to turn it off')}" if _is_optional(key) else ""
        out.append(f"{file}: `{key}` is {value}; it must be {limit}{off}.")
    return out


def _is_optional(key: str) -> bool:
    section, _, name = key.rpartition(".")
    cls = typing.get_type_hints(Config)[section.split(".")[0]]
    for part in section.split(".")[1:]:
        cls = typing.get_type_hints(cls)[part]
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])


def _deepspeed_json_problems(path: str, file: str) -> list[str]:
    try:
        ds = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return [f"{file}: `trainer.deepspeed` = {path!r} is not valid JSON: {err.msg} at line {err.lineno}, "
                f"column {err.colno}. Fix the file (configs/deepspeed/*.json are valid examples)."]
    except (OSError, UnicodeDecodeError) as err:
        return [f"{file}: `trainer.deepspeed` = {path!r} cannot be read ({err})."]
    if not isinstance(ds, dict):
        return [f"{file}: `trainer.deepspeed` = {path!r} must hold a JSON object (e.g. {{\"zero_optimization\": ...}})."]
    return []


def validate(cfg: Config) -> None:
    """Raise one :class:`ConfigError` listing every problem :func:`problems` finds."""
    found = problems(cfg)
    if found:
        raise ConfigError("\n".join(found) if len(found) > 1 else found[0])
