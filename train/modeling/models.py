"""Models and tokenizers: load by hub name or local directory, or build randomly from a config file.

Encoder-decoder models (T5, mT5) load through ``AutoModelForSeq2SeqLM``, decoders through
``AutoModelForCausalLM``. The kind is explicit in the run config (``model.kind``) or inferred from
the model config's ``is_encoder_decoder``. ``prefix_lm`` is a decoder trained and evaluated with a
bidirectional mask over the input (see :mod:`train.modeling.features`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from train.config import ModelConfig
from train.errors import ConfigError

KINDS = ("encdec", "decoder", "prefix_lm")


@dataclass
class ModelInfo:
    """What the rest of the stack needs to know about a model, without the weights."""

    kind: str  # encdec | decoder | prefix_lm
    model_type: str  # e.g. "t5", "llama"
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int  # enc-dec only; pad for decoders (unused)
    vocab_size: int


def load_model_config(cfg: ModelConfig) -> Any:
    """The ``transformers`` config of the model, without loading weights.

    Raises:
        ConfigError: the config file or model directory cannot be read.
    """
    from transformers import AutoConfig

    if cfg.config:
        path = Path(cfg.config)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"`model.config`: {path} does not exist. Ship a JSON model config, e.g. configs/models/t5_tiny.json.") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"`model.config`: {path} is not valid JSON ({err}).") from None
        model_type = data.pop("model_type", None)
        if not model_type:
            raise ConfigError(f"`model.config`: {path} has no `model_type` (e.g. \"t5\", \"llama\", \"gpt2\").")
        try:
            return AutoConfig.for_model(model_type, **data)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"`model.config`: {path}: {err}") from None
    try:
        return AutoConfig.from_pretrained(cfg.name_or_path)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"`model.name_or_path` = {cfg.name_or_path!r} cannot be loaded: {str(err).splitlines()[0]} "
            "Give a local directory with config.json, or a hub name reachable from this machine "
            "(set HF_HUB_OFFLINE=0 and log in if it is gated)."
        ) from None


def infer_kind(cfg: ModelConfig, model_config: Any) -> str:
    """``model.kind`` if set, else ``encdec`` for encoder-decoder configs and ``decoder`` otherwise."""
    is_encdec = bool(getattr(model_config, "is_encoder_decoder", False))
    if cfg.kind == "auto":
        return "encdec" if is_encdec else "decoder"
    if (cfg.kind == "encdec") != is_encdec:
        raise ConfigError(
            f"`model.kind` is {cfg.kind!r} but the model ({model_config.model_type}) is "
            f"{'an encoder-decoder' if is_encdec else 'a decoder-only model'}. Set `model.kind=auto`."
        )
    return cfg.kind


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer named by ``model.tokenizer`` (or the model's own); ``byt5`` needs no files.

    Raises:
        ConfigError: the tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer, ByT5Tokenizer

    name = cfg.tokenizer or cfg.name_or_path
    if name is None:
        raise ConfigError("set `model.tokenizer` (a directory, hub name, or `byt5`) when the model is built from `model.config`.")
    if name == "byt5":
        return ByT5Tokenizer()
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"`model.tokenizer` = {name!r} cannot be loaded: {str(err).splitlines()[0]} "
            "Give a directory with the tokenizer files (e.g. configs/tokenizers/t5), a hub name, or `byt5`."
        ) from None
    check_eos(tok, f"the tokenizer `model.{'tokenizer' if cfg.tokenizer else 'name_or_path'}` = {name!r}")
    if tok.pad_token_id is None:
        # Decoder tokenizers (GPT-2, Llama) often have no pad token; padding is masked out anyway.
        tok.pad_token = tok.eos_token
    return tok


def check_eos(tokenizer: Any, where: str) -> None:
    """Every target ends with the tokenizer's eos, and a missing pad falls back to it: the tokenizer must name one.

    Args:
        where: the tokenizer as the user named it, e.g. "the tokenizer `model.tokenizer` = '/tmp/olmo'".

    Raises:
        ConfigError: the tokenizer has no eos token (e.g. a folder with OLMo's bare tokenizer.json).
    """
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"{where} names no eos token, but every target ends with one and padding falls back to it. Add a "
            'tokenizer_config.json naming "eos_token" (and "pad_token") next to its tokenizer files, e.g. '
            '{"eos_token": "<|endoftext|>", "pad_token": "<|padding|>"} for the OLMo (GPT-NeoX) tokenizer.json.'
        )


def check_vocab(model_config: Any, tokenizer: Any, where: str) -> None:
    """Every token id the tokenizer can produce must have an embedding row (a larger vocab_size is fine).

    Args:
        where: the model (and tokenizer) as the user named them; it starts the message.

    Raises:
        ConfigError: ``len(tokenizer)`` exceeds the model config's ``vocab_size``.
    """
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    if vocab and len(tokenizer) > vocab:
        raise ConfigError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}: token ids "
            "would index past the embedding. Use the model's own tokenizer or raise vocab_size in the model config."
        )


def align_special_tokens(cfg: ModelConfig, model_config: Any, tokenizer: Any) -> dict[str, tuple[Any, int]]:
    """Give a random-init model's config (``model.config``) the tokenizer's pad, eos and bos ids, in place.

    Training takes token ids from the tokenizer only, but the export copies the config's ids into
    ``config.json`` and ``generation_config.json``, where a plain ``model.generate()`` stops and pads with
    them. pad falls back to eos (as in :func:`model_info`); bos is set only when the tokenizer has one;
    T5's ``decoder_start_token_id`` is kept. A pretrained model (``model.name_or_path``) keeps its config.
    Call it before :func:`build_model`: the model's generation config is made from its config then.

    Returns:
        ``{name: (old, new)}`` for each id the model config set to another value; printed once (on rank 0).
    """
    if not cfg.config:
        return {}
    eos = tokenizer.eos_token_id
    wanted = {"pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
              "eos_token_id": eos}
    if tokenizer.bos_token_id is not None:
        wanted["bos_token_id"] = tokenizer.bos_token_id
    replaced: dict[str, tuple[Any, int]] = {}
    for key, new in wanted.items():
        old = getattr(model_config, key, None)
        if old == new or (isinstance(old, list) and new in old):  # a list of eos ids that holds the tokenizer's
            continue
        setattr(model_config, key, new)
        if old is not None:  # filling an unset id is not worth a line
            replaced[key] = (old, new)
    if replaced and int(os.environ.get("RANK", "0")) == 0:
        ids = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in replaced.items())
        print(f"[mtf] note: `model.config` = {cfg.config}: replaced {ids} with the ids of the tokenizer "
              f"{cfg.tokenizer!r}, so the export's config.json and generation_config.json match it. Set them in "
              "the model config to silence this.", file=sys.stderr, flush=True)
    return replaced


def model_info(cfg: ModelConfig, model_config: Any, tokenizer: Any) -> ModelInfo:
    """What the stack needs to know about the model; checks that the model and tokenizer agree.

    A random-init model's config gets the tokenizer's special token ids here (:func:`align_special_tokens`),
    before the model is built from it.

    Raises:
        ConfigError: a wrong ``model.kind``, a tokenizer without eos, or one larger than the model's vocabulary.
    """
    kind = infer_kind(cfg, model_config)
    model = f"`model.config` = {cfg.config}" if cfg.config else f"`model.name_or_path` = {cfg.name_or_path!r}"
    tokenizer_name = cfg.tokenizer or cfg.name_or_path
    check_eos(tokenizer, f"the tokenizer {tokenizer_name!r}")
    check_vocab(model_config, tokenizer, f"{model} with the tokenizer {tokenizer_name!r}")
    align_special_tokens(cfg, model_config, tokenizer)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    start = getattr(model_config, "decoder_start_token_id", None)
    if start is None:
        start = pad
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    return ModelInfo(kind=kind, model_type=model_config.model_type, pad_token_id=int(pad), eos_token_id=int(eos),
                     decoder_start_token_id=int(start), vocab_size=vocab)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def safetensors_damage(file: Path) -> Optional[str]:
    """Why a safetensors file cannot be read (truncated, bad header), or None when it is whole.

    Reads the header only; safetensors checks that the data it describes covers the file exactly.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        return str(err)
    return None


def check_local_weights(path: Path) -> None:
    """A local model directory must hold weights, and its safetensors files must be whole.

    Raises:
        ConfigError: no weight file, or a damaged (e.g. truncated) one.
    """
    if not any((path / name).exists() for name in WEIGHT_FILES) and not list(path.glob("model-*.safetensors")):
        raise ConfigError(f"{path}: has config.json but no model weights ({', '.join(WEIGHT_FILES[::2])}). "
                          "Was the export interrupted? Re-export it, or use a run checkpoint.")
    for file in sorted(path.glob("*.safetensors")):
        damage = safetensors_damage(file)
        if damage:
            raise ConfigError(f"{file} is damaged ({damage}); re-export or re-download the model.")


def build_model(cfg: ModelConfig, model_config: Any, kind: str) -> Any:
    """Load weights (``name_or_path``) or initialise randomly (``config``); the RNG must be seeded first."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if kind == "encdec" else AutoModelForCausalLM
    if cfg.config:
        model = auto.from_config(model_config, attn_implementation=cfg.attn_implementation)
    else:
        if Path(cfg.name_or_path).is_dir():
            check_local_weights(Path(cfg.name_or_path))
        try:
            model = auto.from_pretrained(cfg.name_or_path, attn_implementation=cfg.attn_implementation)
        except (OSError, ValueError, RuntimeError) as err:
            raise ConfigError(f"`model.name_or_path` = {cfg.name_or_path!r}: the weights cannot be loaded "
                              f"({str(err).splitlines()[0]}).") from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if hasattr(model.config, "use_cache"):
        # A KV cache during training is useless and, with packed position ids, leaks across segments.
        model.config.use_cache = False
    return model
