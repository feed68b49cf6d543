"""Parameter-efficient finetuning through ``peft``: (IA)^3 and LoRA on any model kind.

The adapter is a modelling concern only: :func:`wrap_with_adapter` injects peft's layers into the
Hugging Face model and freezes everything else, and the rest of the stack does not change. The
adapters replace ``nn.Linear`` (or GPT-2's ``Conv1D``) modules and never touch attention masks, so
packed rows stay exact (tests/test_adapters.py checks packed vs unpacked losses and gradients).

Where (IA)^3 goes, per model family (the T-Few paper: rescale keys, values and the FFN's intermediate
activation)::

    T5 / mT5 / T0, gated FFN (v1.1, lm-adapted)   k, v, wi_1      output of wi_1 = the linear branch of
                                                                 act(wi_0 x) * (wi_1 x): scaling it
                                                                 scales the intermediate activation
    T5, plain FFN (original T5)                  k, v, wo        input of wo (a "feed-forward" module)
    Llama / Mistral / Qwen2                      k_proj, v_proj, down_proj (input of down_proj)
    GPT-2                                        c_attn, mlp.c_proj (input of mlp.c_proj)
    BLOOM                                        query_key_value, mlp.dense_4h_to_h (input)

LoRA defaults to the query and value projections (peft's own defaults); ``peft.target_modules``
overrides either method's targets.

Checkpoints of an adapter run hold only the trainable tensors (:func:`adapter_state_dict`); the frozen
base is rebuilt from ``model.name_or_path`` or, for a random init, from ``model.config`` and the seed.
The final export (:func:`export_adapter`) writes peft's own format (``adapter_config.json`` +
``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from train.errors import ConfigError

METHODS = ("none", "ia3", "lora")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MTF_RECORD = "mtf_adapter.json"  # what the export adds beside peft's files: base, method, where the base is

# (IA)^3 targets and the subset that scales its INPUT (peft's "feedforward_modules"), per model type.
_IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "t5_gated": (["k", "v", "wi_1"], []),
    "t5": (["k", "v", "wo"], ["wo"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
}
_LORA_DEFAULTS: dict[str, list[str]] = {
    "t5": ["q", "v"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bloom": ["query_key_value"],
}
_FAMILY = {"t5": "t5", "mt5": "t5", "umt5": "t5", "llama": "llama", "mistral": "llama", "qwen2": "llama",
           "qwen3": "llama", "olmo": "llama", "olmo2": "llama", "gemma": "llama", "gpt2": "gpt2", "bloom": "bloom"}


def _family(model_config: Any) -> str:
    model_type = getattr(model_config, "model_type", "")
    family = _FAMILY.get(model_type)
    if family is None:
        raise ConfigError(f"`peft.target_modules` has no default for model type {model_type!r}; list the module names to "
                          "adapt, e.g. `peft.target_modules=[q_proj,v_proj]` (see `print(model)` for the names).")
    return family


def default_targets(method: str, model_config: Any) -> tuple[list[str], list[str]]:
    """(target modules, (IA)^3 feed-forward modules) for ``method`` on this model family."""
    family = _family(model_config)
    if method == "ia3":
        if family == "t5" and getattr(model_config, "is_gated_act", False):
            family = "t5_gated"
        targets, feedforward = _IA3_DEFAULTS[family]
        return list(targets), list(feedforward)
    return list(_LORA_DEFAULTS[family]), []


def peft_config(cfg: Any, model_config: Any) -> Any:
    """The ``peft`` config object for the run config's ``peft`` section (peft records the base model's
    ``name_or_path`` itself when it wraps the model).

    Raises:
        ConfigError: ``peft.method`` is unknown, or a model family without defaults and no targets.
    """
    from peft import IA3Config, LoraConfig

    p = cfg.peft
    if p.method not in METHODS[1:]:
        raise ConfigError(f"`peft.method` is {p.method!r}; choose one of {', '.join(METHODS)}.")
    targets, feedforward = default_targets(p.method, model_config) if p.target_modules is None else (list(p.target_modules), [])
    if p.method == "ia3" and p.feedforward_modules is not None:
        feedforward = list(p.feedforward_modules)
    task = "SEQ_2_SEQ_LM" if getattr(model_config, "is_encoder_decoder", False) else "CAUSAL_LM"
    fan_in_fan_out = getattr(model_config, "model_type", "") == "gpt2"  # GPT-2's Conv1D stores (in, out)
    if p.method == "ia3":
        unknown = [m for m in feedforward if m not in targets]
        if unknown:
            raise ConfigError(f"`peft.feedforward_modules` {unknown} are not in the targets {targets}; every feed-forward "
                              "module must also be a target module.")
        return IA3Config(task_type=task, target_modules=targets, feedforward_modules=feedforward,
                         fan_in_fan_out=fan_in_fan_out)
    return LoraConfig(task_type=task, target_modules=targets, r=p.lora_rank, lora_alpha=p.lora_alpha,
                      lora_dropout=p.lora_dropout, fan_in_fan_out=fan_in_fan_out)


def _module_names(model: Any) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _check_targets(targets: list[str], model: Any, key: str) -> None:
    """Every target name must match at least one module (peft only fails when none of them matches)."""
    names = _module_names(model)
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if "." in n and not n.rsplit(".", 1)[-1].isdigit()})
            raise ConfigError(f"`{key}`: {target!r} matches no module of this {type(model).__name__}. Module names "
                              f"end in: {', '.join(leaves[:40])}. Fix `{key}` (or leave it null for the family default).")


def build_run_model(cfg: Any, model_config: Any, kind: str) -> Any:
    """The seeded model of a run, wrapped with its peft adapter when ``peft.method`` is set.

    Seeding first makes a random-init base identical in every process and on every rebuild (resume,
    export, evaluating a checkpoint), which is what lets adapter checkpoints leave the frozen base out.
    """
    from accelerate.utils import set_seed

    from train.modeling.models import build_model

    set_seed(cfg.trainer.seed)
    model = build_model(cfg.model, model_config, kind)
    if cfg.peft.method != "none":
        model = wrap_with_adapter(cfg, model, model_config)
    return model


def wrap_with_adapter(cfg: Any, model: Any, model_config: Any) -> Any:
    """Inject the adapter of ``cfg.peft`` into ``model`` and freeze every base parameter.

    Returns the ``peft.PeftModel`` (train it, save it, merge it). With ``peft.init_from`` the adapter
    starts from those weights (T-Few: (IA)^3 pre-trained on the multitask mixture).

    Raises:
        ConfigError: a target module that matches nothing, an ``init_from`` adapter of another method,
            other targets or another base model.
    """
    from peft import get_peft_model

    pconf = peft_config(cfg, model_config)
    _check_targets(sorted(pconf.target_modules), model, "peft.target_modules")
    if cfg.model.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        # transformers#26334: with a frozen embedding the checkpointed blocks' inputs need no grad, and a
        # reentrant checkpoint then drops the adapters' gradients. Make the embedding output require grad.
        model.enable_input_require_grads()
    wrapped = get_peft_model(model, pconf)
    if cfg.peft.method == "ia3" and cfg.trainer.deepspeed:
        _gather_ia3_vectors_under_zero3(wrapped)
    if cfg.peft.init_from:
        load_adapter_weights(wrapped, Path(cfg.peft.init_from), cfg)
    return wrapped


def _gather_ia3_vectors_under_zero3(model: Any) -> None:
    """ZeRO-3 gathers a module's own parameters when the module's forward runs. peft keeps each (IA)^3
    vector in a ParameterDict that is never called, so the vector stays an empty shard and the forward
    fails ("size of tensor b (0)"). Registering each vector as an external parameter of its (IA)^3
    layer makes DeepSpeed gather it for that layer's forward and backward. ZeRO-1/2 ignore it.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    from peft.tuners.ia3.layer import IA3Layer

    for module in model.modules():
        if isinstance(module, IA3Layer):
            for vector in module.ia3_l.values():
                register_external_parameter(module, vector)


def check_init_from(cfg: Any) -> None:
    """Check ``peft.init_from`` before anything is built: a peft adapter of this method and base.

    Raises:
        ConfigError: the directory is missing or not an adapter, or its method or base model differ.
    """
    path = cfg.peft.init_from
    if not path:
        return
    record = read_adapter_config(Path(path), key="peft.init_from")
    method = str(record.get("peft_type", "")).lower()
    if method != cfg.peft.method:
        raise ConfigError(f"`peft.init_from` = {path!r} is a {method or 'unknown'} adapter but `peft.method` is "
                          f"{cfg.peft.method!r}; use an adapter trained with the same method.")
    base = record.get("base_model_name_or_path")
    ours = cfg.model.name_or_path or cfg.model.config
    if base and ours and not _same_base(base, ours, Path(path)):
        raise ConfigError(f"`peft.init_from` = {path!r} was trained on base model {base!r}, but `model.name_or_path` is "
                          f"{ours!r}. Set `model.name_or_path={base}` (or `model.config`), or use an adapter of this base.")


def _same_base(theirs: str, ours: str, adapter_dir: Path) -> bool:
    if theirs == ours:
        return True
    candidates = [Path(theirs), adapter_dir / theirs]
    return any(c.exists() and Path(ours).exists() and c.resolve() == Path(ours).resolve() for c in candidates)


def read_adapter_config(path: Path, *, key: str) -> dict:
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise ConfigError(f"`{key}` = {str(path)!r} holds no {ADAPTER_CONFIG}; give a directory written by "
                          "`PeftModel.save_pretrained` (e.g. an adapter run's final/).")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file} is not valid JSON ({err}); re-export the adapter.") from None


def load_adapter_weights(model: Any, path: Path, cfg: Any) -> None:
    """Load peft-format adapter weights from ``path`` into the wrapped ``model`` (all keys must match)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise ConfigError(f"`peft.init_from` = {str(path)!r} has no {ADAPTER_WEIGHTS}.")
    result = set_peft_model_state_dict(model, load_file(str(file)))
    missing = [k for k in result.missing_keys if _is_adapter_key(k)]
    if result.unexpected_keys or missing:
        raise ConfigError(f"`peft.init_from` = {str(path)!r} does not fit this model's adapter (missing {missing[:3]}, "
                          f"unexpected {list(result.unexpected_keys)[:3]}); were other `peft.target_modules` used?")


def _is_adapter_key(name: str) -> bool:
    return any(part in name for part in ("lora_", "ia3_l"))


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; under ZeRO-3 the partitioned sizes are counted in full."""
    trainable = total = 0
    for param in model.parameters():
        n = int(getattr(param, "ds_numel", 0) or param.numel())
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def trainable_names(model: Any) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def adapter_state_dict(state: dict, names: set[str]) -> dict:
    """The entries of a full (unwrapped) state dict that belong to trainable parameters."""
    return {k: v for k, v in state.items() if k in names}


def export_adapter(accelerator: Any, model: Any, tokenizer: Any, out_dir: Path, cfg: Any, *, merged: bool,
                   rebuild: Any) -> Path:
    """Write the adapter in peft's format to ``out_dir``; optionally the merged model to ``out_dir/merged``.

    Every rank must call this (ZeRO-3 gathers the sharded parameters). A base built from a config file
    (random init) is written to ``out_dir/base`` so the adapter loads on any machine.

    Args:
        rebuild: ``() -> PeftModel`` building a fresh, unprepared copy of the wrapped model on the CPU of
            the main process (ZeRO-3 parameters cannot be merged in place).

    Raises:
        TrainingError: the gathered adapter is empty (peft#453: under ZeRO-3 ``state_dict()`` returns
            empty partitions unless the weights are gathered first).
    """
    from train.errors import TrainingError

    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; every rank must call it
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        unwrapped = accelerator.unwrap_model(model)
        names = {n for n in state if _is_adapter_key(n)}
        empty = [n for n in names if state[n].numel() == 0]
        if not names or empty:
            raise TrainingError(f"the adapter gathered for export is empty ({empty[:3] or 'no adapter tensors'}); under "
                                "ZeRO-3 set `stage3_gather_16bit_weights_on_model_save: true` in the DeepSpeed JSON.")
        unwrapped.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        base_dir = None
        if merged or cfg.model.config:
            fresh = rebuild()
            fresh.load_state_dict({k: v.detach().to("cpu") for k, v in state.items()}, strict=True)
            if cfg.model.config:  # a random-init base exists nowhere else: ship it beside the adapter
                base_dir = out_dir / "base"
                copy.deepcopy(fresh).unload().save_pretrained(str(base_dir), safe_serialization=True)
                tokenizer.save_pretrained(str(base_dir))
            if merged:
                fresh.merge_and_unload().save_pretrained(str(out_dir / "merged"), safe_serialization=True)
                tokenizer.save_pretrained(str(out_dir / "merged"))
        record = {"method": cfg.peft.method, "base_model": cfg.model.name_or_path or None,
                  "base_dir": "base" if base_dir else None, "merged_dir": "merged" if merged else None,
                  "model_config": cfg.model.config}
        (out_dir / MTF_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    return out_dir


def find_base(adapter_dir: Path, base: Optional[str]) -> str:
    """The base model of an exported adapter: ``base`` if given, else the export's ``base/``, else the name
    in ``adapter_config.json``.

    Raises:
        ConfigError: none of them names a loadable base.
    """
    if base:
        return base
    record_file = adapter_dir / MTF_RECORD
    if record_file.is_file():
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record.get("base_dir") and (adapter_dir / record["base_dir"] / "config.json").is_file():
            return str(adapter_dir / record["base_dir"])
    named = read_adapter_config(adapter_dir, key="model").get("base_model_name_or_path")
    if not named or str(named).endswith(".json"):
        raise ConfigError(f"{adapter_dir}: the adapter does not say where its base model is "
                          f"(base_model_name_or_path={named!r}); pass it with `--base-model DIR_OR_HUB_NAME`.")
    return str(named)


def load_adapter_for_eval(adapter_dir: Path, base: Optional[str], kind: str) -> tuple[Any, str]:
    """(merged plain model, its base path) for an exported adapter directory.

    The adapter is merged into the base (``merge_and_unload``), so evaluation runs the same code as a
    full model's.
    """
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    base_path = find_base(adapter_dir, base)
    try:
        config = AutoConfig.from_pretrained(base_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{adapter_dir}: its base model {base_path!r} cannot be loaded ({str(err).splitlines()[0]}); "
                          "pass the base with `--base-model DIR_OR_HUB_NAME`.") from None
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = auto.from_pretrained(base_path)
    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter_dir))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ConfigError(f"{adapter_dir}: the adapter does not load onto base {base_path!r} "
                          f"({str(err).splitlines()[0]}); pass the right base with `--base-model`.") from None
    return wrapped.merge_and_unload(), base_path
