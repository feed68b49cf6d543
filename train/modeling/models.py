"""Models and tokenizers: load by hub name or local directory, or build randomly from a config file.

Encoder-decoder models (T5, mT5) load through ``AutoModelForSeq2SeqLM``, decoders through
``AutoModelForCausalLM``. The kind is explicit in the run config (``model.kind``) or inferred from
the model config's ``is_encoder_decoder``. ``prefix_lm`` is a decoder trained and evaluated with a
bidirectional mask over the input (see :mod:`train.modeling.features`).

``model.attn_implementation`` picks the attention: sdpa (default) or eager with 4-D float masks,
flex_attention with BlockMasks, flash_attention_2 (decoders) with varlen boundaries and no mask.
:func:`check_attn_implementation` refuses, before any weights or data are loaded, a backend that this
model, this machine or this run cannot use, instead of letting transformers fall back or fail mid-step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from train.config import ATTN_IMPLEMENTATIONS, ModelConfig
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
        ConfigError: a wrong ``model.kind``, an attention backend that cannot train here
            (:func:`check_attn_implementation`), a tokenizer without eos, or one larger than the model's vocabulary.
    """
    kind = infer_kind(cfg, model_config)
    check_attn_implementation(cfg, model_config, kind, training=True)
    model = _model_name(cfg)
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


# ---------------------------------------------------------------------------------------------- attention

# flex_attention for enc-dec models runs under this name (:func:`register_batched_bias_flex_attention`).
BATCHED_BIAS_FLEX_ATTENTION = "mtf_batched_bias_flex_attention"


def _model_name(cfg: ModelConfig) -> str:
    return f"`model.config` = {cfg.config}" if cfg.config else f"`model.name_or_path` = {cfg.name_or_path!r}"


def _model_class(model_config: Any, kind: str) -> Optional[type]:
    """The class :func:`build_model` will instantiate; None when transformers does not map the config (remote code)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    mapping = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING if kind == "encdec" else MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return mapping[type(model_config)]
    except KeyError:
        return None


def _attention_dropout(model_config: Any) -> tuple[str, float]:
    """The model config key that sets dropout on attention probabilities, and its value ("", 0.0 if none)."""
    for key in ("attention_dropout", "attn_pdrop", "dropout_rate"):  # Llama/OLMo/Qwen2, GPT-2, T5 (its one dropout)
        value = getattr(model_config, key, None)
        if isinstance(value, (int, float)):
            return key, float(value)
    return "", 0.0


def varlen_limitation(kind: str, *, choices: bool) -> str | None:
    """Why FlashAttention's varlen kernel cannot run these rows, or None: it is causal within each piece, nothing else.

    Args:
        kind: "decoder" or "prefix_lm".
        choices: the rows carry answer choices (branch ids).
    """
    if kind == "prefix_lm":
        return ("prefix-LM needs bidirectional attention over each input, and varlen FlashAttention is causal within "
                "each packed example")
    if choices:
        return ("the answer choices of the unlikelihood and rank-classification losses must each see their input but "
                "not the target packed between them, which varlen FlashAttention cannot express")
    return None


def check_attn_implementation(cfg: ModelConfig, model_config: Any, kind: str, *, training: bool) -> None:
    """Refuse ``model.attn_implementation`` when this model, torch build, machine or run cannot use it.

    Reads the model config only, so it runs before any weights or data are loaded: from :func:`model_info`
    (start of training, ``mtf validate``) and from :func:`build_model` (evaluation too). sdpa and eager pass
    (transformers checks them itself); the config-only conflicts (precision, answer choices, ``trainer.cpu``)
    are refused earlier by :func:`train.config.problems`.

    Args:
        cfg: the ``model`` section.
        model_config: the transformers config (:func:`load_model_config`).
        kind: the resolved kind ("encdec", "decoder" or "prefix_lm").
        training: also refuse what only training needs: a backward pass (flex_attention has none on CPU)
            and no attention dropout (flex_attention has none). Evaluation may run flex_attention on CPU
            (compiled forward, decoders only).

    Raises:
        ConfigError: naming the key, the model, why, and what to use instead.
    """
    attention = cfg.attn_implementation
    if attention in ("sdpa", "eager"):
        return
    import torch

    model_class = _model_class(model_config, kind)
    where = (f"`model.attn_implementation={attention}` with {_model_name(cfg)} "
             f"({model_class.__name__ if model_class else model_config.model_type})")

    def refuse(why: str, fix: str = "use `model.attn_implementation=sdpa`") -> None:
        raise ConfigError(f"{where}: {why}. Fix: {fix}.")

    if attention == "flex_attention":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            refuse(f"this torch ({torch.__version__}) has no torch.nn.attention.flex_attention",
                   "install torch >= 2.5, or use `model.attn_implementation=sdpa`")
        if model_class is not None and not model_class._supports_flex_attn:
            refuse("transformers has no flex_attention for this model class (`_supports_flex_attn` is False)")
        if training and not torch.cuda.is_available():
            refuse("torch's flex_attention has no backward pass on CPU (torch 2.13 raises NotImplementedError at the "
                   "first step) and this machine has no CUDA GPU",
                   "train on a CUDA GPU, or use `model.attn_implementation=sdpa` on CPU")
        if kind == "encdec" and not torch.cuda.is_available():
            refuse("on CPU, torch 2.13 fails to compile flex_attention with T5's relative position bias (an inductor "
                   "C++ error once the decoder length differs from the encoder's) and this machine has no CUDA GPU",
                   "run it on a CUDA GPU, or use `model.attn_implementation=sdpa` on CPU")
        key, dropout = _attention_dropout(model_config)
        if training and dropout > 0:
            refuse(f"flex_attention has no attention dropout, and the model config sets `{key}` = {dropout}",
                   f"set `{key}` to 0 in the model config, or use `model.attn_implementation=sdpa`")
    elif attention == "flash_attention_2":
        if kind == "encdec" or (model_class is not None and not model_class._supports_flash_attn):
            refuse("transformers has no FlashAttention for this model class (`_supports_flash_attn` is False)",
                   "use `model.attn_implementation=sdpa`, or `flex_attention` where the model supports it")
        why = varlen_limitation(kind, choices=False)  # answer choices: train.config.problems, from the loss weights
        if why:
            refuse(why, "use `model.attn_implementation=flex_attention` (CUDA) or `sdpa`")
        if model_class is not None and not model_class.is_backend_compatible():
            refuse("this model class does not hand the packed examples' boundaries (cu_seq_lens) to its attention "
                   "(`_supports_attention_backend` is False), so packed examples would attend each other")
        if importlib.util.find_spec("flash_attn") is None:
            refuse("the `flash_attn` package is not installed", "`pip install flash-attn --no-build-isolation` on a "
                   "CUDA machine, or use `model.attn_implementation=sdpa`")
        if not torch.cuda.is_available():
            refuse("FlashAttention runs on CUDA GPUs only and this machine has none")
    else:
        refuse(f"unknown attention implementation; expected one of {', '.join(ATTN_IMPLEMENTATIONS)}")


def _batched_bias_flex_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                                 position_bias: Any = None, **kwargs: Any) -> Any:
    """transformers' ``flex_attention_forward``, with a position bias of batch size 1 broadcast to the batch.

    T5 computes its relative position bias once per stack, as (1, heads, q, k), and transformers' flex
    ``score_mod`` reads ``position_bias[batch_idx, head_idx, q_idx, kv_idx]``: out of bounds for every row but
    the first (torch 2.13: an IndexError uncompiled, an inductor bounds assertion compiled on CPU). ``expand``
    makes every row read the same bias without copying it; the gradient still reaches the bias embedding.

    Args:
        query: (batch, heads, q, head_dim); key, value: (batch, kv_heads, k, head_dim).
        attention_mask: a BlockMask (packed rows) or what transformers' flex mask builder made.
        position_bias: (1 or batch, heads, q, k), or None.

    Returns:
        (attention output (batch, q, heads, head_dim), log-sum-exp or None), as ``flex_attention_forward``.
    """
    from transformers.integrations.flex_attention import flex_attention_forward

    if position_bias is not None and position_bias.shape[0] != query.shape[0]:
        position_bias = position_bias.expand(query.shape[0], -1, -1, -1)  # (batch, heads, q, k), a view
    return flex_attention_forward(module, query, key, value, attention_mask, position_bias=position_bias, **kwargs)


def register_batched_bias_flex_attention() -> str:
    """Make :func:`_batched_bias_flex_attention` an attention implementation; returns its name. Idempotent.

    Uses transformers' public hooks: ``AttentionInterface.register`` adds a new name (no existing one changes),
    ``AttentionMaskInterface.register`` gives it flex's mask builder, so evaluation's 2-D padding masks still
    become BlockMasks. The name contains "flex_attention": transformers applies its flex checks to it and
    :func:`train.modeling.features.attention_backend` builds BlockMasks for it.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flex_attention_mask

    AttentionInterface.register(BATCHED_BIAS_FLEX_ATTENTION, _batched_bias_flex_attention)
    AttentionMaskInterface.register(BATCHED_BIAS_FLEX_ATTENTION, flex_attention_mask)
    return BATCHED_BIAS_FLEX_ATTENTION


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
    """Load weights (``name_or_path``) or initialise randomly (``config``); the RNG must be seeded first.

    Raises:
        ConfigError: the weights cannot be loaded, or ``model.attn_implementation`` cannot run this model here.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    check_attn_implementation(cfg, model_config, kind, training=False)
    attention = cfg.attn_implementation
    if attention == "flex_attention" and kind == "encdec":
        attention = register_batched_bias_flex_attention()  # T5's bias needs it (see there)
    auto = AutoModelForSeq2SeqLM if kind == "encdec" else AutoModelForCausalLM
    if cfg.config:
        model = auto.from_config(model_config, attn_implementation=attention)
    else:
        if Path(cfg.name_or_path).is_dir():
            check_local_weights(Path(cfg.name_or_path))
        try:
            model = auto.from_pretrained(cfg.name_or_path, attn_implementation=attention)
        except (OSError, ValueError, RuntimeError) as err:
            raise ConfigError(f"`model.name_or_path` = {cfg.name_or_path!r}: the weights cannot be loaded "
                              f"({str(err).splitlines()[0]}).") from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if hasattr(model.config, "use_cache"):
        # A KV cache during training is useless and, with packed position ids, leaks across segments.
        model.config.use_cache = False
    return model
